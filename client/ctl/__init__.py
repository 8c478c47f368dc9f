# PYTHON_ARGCOMPLETE_OK (argcomplete's global completion looks for this marker)
"""`sleepctl`: look at and control a running sleepd.

    sleepctl status                        devices, models, ranks, tags, bytes, state
    sleepctl sleep --model qwen --level 2
    sleepctl wake  --model qwen --tags weights
    sleepctl swap  --to llama --from qwen      overlapped: qwen out, llama in
    sleepctl policy --model qwen --priority 5 --pinned yes
    sleepctl events                        slept, woke, evicted, refused, rank_lost as they happen
    sleepctl top                           a live view of devices, models and states
    sleepctl completion bash               a completion script: source <(sleepctl completion bash)

Global options (--socket, --json, --timeout) go before or after the command.
Tables are for people; --json prints JSON for scripts. A sleep, wake or swap
that takes more than about a second shows a progress bar when stdout is a
terminal. Exit status is 0 on success; on failure one line goes to stderr and
the status is non-zero.

Its modules: `arguments` (the command line), `completion`, `commands` (those that
talk to the daemon), `render` (what they print), `progress` (the bar) and `top`.
"""

import sys

import argcomplete

from . import completion
from .arguments import parser


def main(argv: list[str] | None = None) -> int:
    command_line = parser()
    # Under a shell's completion (argcomplete's environment) this prints the words and exits. Options are
    # offered once a word starts with "-"; options without a completer (numbers) offer nothing, not file names.
    argcomplete.autocomplete(command_line, always_complete_options=False,
                             default_completer=argcomplete.SuppressCompleter())
    args = command_line.parse_args(argv)
    if args.command == "completion":
        sys.stdout.write(completion.script(args.shell))
        return 0
    # gRPC and the generated code load here, for the commands that talk to the daemon only: --help, usage
    # errors and completion stay quick.
    from .commands import run

    return run(args)
