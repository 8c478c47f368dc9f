"""sleepctl's command line: its commands and options, and the completers that offer their values."""

import argparse

import argcomplete

from sleepd.common.limits import MAX_LEVEL

from . import completion


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line, like every other error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def parser() -> argparse.ArgumentParser:
    def global_options(target: argparse.ArgumentParser, top: bool) -> None:
        # Accepted after the command too; there they override what came before it.
        default = (lambda value: value) if top else (lambda value: argparse.SUPPRESS)
        socket = target.add_argument("--socket", default=default(None),
                                     help="sleepd's gRPC socket (default $SLEEPD_SOCKET, else "
                                          "/run/sleepd/sleepd.sock, else $XDG_RUNTIME_DIR/sleepd/sleepd.sock)")
        socket.completer = argcomplete.FilesCompleter()
        target.add_argument("--json", action="store_true", default=default(False), help="print JSON for scripts")
        target.add_argument("--timeout", type=float, default=default(600.0),
                            help="seconds to wait for the daemon (default 600)")

    parser = _Parser(prog="sleepctl", description="Look at and control a running sleepd.",
                     epilog="Run `sleepctl COMMAND --help` for a command's options.")
    global_options(parser, top=True)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name, help, **kwargs):
        sub = commands.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".", **kwargs)
        global_options(sub, top=False)
        return sub

    levels = argcomplete.ChoicesCompleter(range(MAX_LEVEL + 1))

    status = command("status", "devices, models, ranks, tags, bytes and state", aliases=["ls"])
    status.add_argument("--model", default="", help="only this model").completer = completion.models

    sleep = command("sleep", "put a model to sleep")
    sleep.add_argument("--model", required=True).completer = completion.models
    level = sleep.add_argument("--level", type=int, default=1, help="0 quiesce, 1 weights offloaded and kv_cache "
                                                                    "discarded, 2 both discarded (default 1)")
    level.completer = levels
    sleep.add_argument("--tags", nargs="+", help="only these tags").completer = completion.tags
    action = sleep.add_argument("--action", nargs="+", metavar="TAG=ACTION", help="explicit offload or discard per tag")
    action.completer = completion.tag_actions

    wake = command("wake", "wake a model, all tags or some")
    wake.add_argument("--model", required=True).completer = completion.models
    wake.add_argument("--tags", nargs="+", help="only these tags").completer = completion.tags
    wake.add_argument("--evict", action="store_true", help="put other models to sleep to make room")

    swap = command("swap", "put models to sleep and wake another in their place, overlapped")
    swap.add_argument("--to", required=True, dest="to_model", help="the model to wake").completer = completion.models
    from_models = swap.add_argument("--from", nargs="+", dest="from_models", default=[],
                                    help="the models to put to sleep (default: as eviction policy picks)")
    from_models.completer = completion.models

    policy = command("policy", "show or change a model's eviction policy")
    policy.add_argument("--model", required=True).completer = completion.models
    policy.add_argument("--priority", type=int, help="lower is evicted first")
    policy.add_argument("--pinned", choices=["yes", "no"], help="a pinned model is never evicted")
    eviction_level = policy.add_argument("--eviction-level", type=int, help="the sleep level eviction uses (default 1)")
    eviction_level.completer = levels
    policy.add_argument("--idle-seconds", type=float, help="sleep by itself after this long idle (0: never)")

    command("sets", "weight sets: key, bytes, where their memory is, and the engines that joined each")
    drop_set = command("drop-set", "drop a weight set no engine has joined")
    drop_set.add_argument("--set", required=True, dest="weight_set", help="its id, as `sleepctl sets` shows it")

    events = command("events", "stream state changes as they happen")
    events.add_argument("--model", default="", help="only this model").completer = completion.models
    events.add_argument("--count", type=int, help="stop after this many events")

    top = command("top", "a live view of devices, models and states")
    top.add_argument("--model", default="", help="only this model").completer = completion.models
    top.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes (default 1)")
    top.add_argument("--once", action="store_true", help="print one frame and exit")

    completion_command = command("completion", "print a shell completion script",
                                 epilog="bash: source <(sleepctl completion bash), or save it in "
                                        "/etc/bash_completion.d/sleepctl; zsh: sleepctl completion zsh > "
                                        "\"${fpath[1]}/_sleepctl\"")
    completion_command.add_argument("shell", choices=["bash", "zsh"])
    return parser
