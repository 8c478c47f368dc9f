"""Shell completion as people use it: the script `sleepctl completion bash` (or `zsh`) prints, loaded in
that shell, offers commands, options, values and the running daemon's models and tags. CI runs this file
in full (.ci/run fetches zsh where the machine lacks it)."""

import functools
import os
import shlex
import shutil
import subprocess
import sys

import pytest

from support import MiB

ZSH = shutil.which("zsh")


@pytest.fixture
def backend():
    """What completion offers does not depend on the memory backend."""
    return "host"


@functools.cache
def script(shell: str) -> str:
    """What `sleepctl completion SHELL` prints."""
    return subprocess.run([sys.executable, "-m", "sleepd.client.ctl", "completion", shell], capture_output=True,
                          text=True, timeout=60, check=True).stdout


def environment(env=None) -> dict:
    """This environment with this sleepctl first on PATH, as the script runs `sleepctl` to complete."""
    return {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"], **(env or {})}


def completions(line: str, env=None) -> list[str]:
    """What bash offers for `line` (the cursor at its end), with the script sleepctl prints: the function
    it registers for sleepctl is called with the variables and arguments bash's completion gives it."""
    words = line.split(" ")
    program = (f"{script('bash')}\n"
               "[[ $(complete -p sleepctl) =~ -F\\ ([^ ]+)\\ sleepctl$ ]] || exit 3\n"
               f"COMP_LINE={shlex.quote(line)} COMP_POINT={len(line)}\n"
               f"COMP_WORDS=({' '.join(shlex.quote(word) for word in words)}) COMP_CWORD={len(words) - 1}\n"
               '"${BASH_REMATCH[1]}" sleepctl "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD-1]}"\n'
               "printf '%s\\n' \"${COMPREPLY[@]}\"\n")
    result = subprocess.run(["bash", "--norc", "--noprofile"], input=program, capture_output=True, text=True,
                            timeout=60, env=environment(env))
    assert result.returncode == 0 and not result.stderr, result.stderr
    # Outside a real completion `compopt` fails, so argcomplete itself ends a lone match with the space that
    # bash would add.
    return sorted(filter(None, (word.removesuffix(" ") for word in result.stdout.splitlines())))


def test_bash_completion_offers_commands_options_values_and_the_daemons_models(daemon, start_engine):
    start_engine(daemon, "qwen", regions=[("weights", 4 * MiB), ("kv_cache", 2 * MiB)])
    start_engine(daemon, "llama", regions=[("weights", MiB)])
    assert completions("sleepctl s") == ["sets", "sleep", "status", "swap"]
    assert completions("sleepctl --json w") == ["wake"]
    assert completions("sleepctl wake --") == ["--evict", "--help", "--json", "--model", "--socket", "--tags",
                                               "--timeout"]
    assert completions("sleepctl sleep --level ") == ["0", "1", "2"]
    assert completions("sleepctl completion ") == ["bash", "zsh"]
    # Names come from the daemon the command line (or $SLEEPD_SOCKET) names.
    assert completions(f"sleepctl --socket {daemon.socket} sleep --model ") == ["llama", "qwen"]
    assert completions("sleepctl wake --model q", env={"SLEEPD_SOCKET": daemon.socket}) == ["qwen"]
    assert completions(f"sleepctl --socket {daemon.socket} sleep --model qwen --tags kv_cache w") == ["weights"]
    # No daemon: nothing to offer, and no error on the terminal.
    assert completions("sleepctl wake --model ", env={"SLEEPD_SOCKET": daemon.socket + ".gone"}) == []


@pytest.mark.skipif(ZSH is None, reason="zsh not found on PATH (Debian's zsh package; .ci/run fetches it)")
def test_the_zsh_script_loads_in_zsh_and_offers_the_same_words():
    # A zsh unpacked from its packages into a folder, bin/zsh linked onto PATH (.ci/run's), finds its modules
    # and functions under that folder ($1), not where it was built to look; an installed zsh is left as it is.
    root = os.path.dirname(os.path.dirname(os.path.realpath(ZSH)))
    unpacked = "if [[ -d $1$module_path[1] ]]; then module_path=($1$^module_path); fpath=($1$^fpath); fi\n"
    # The function the script registers with compinit runs as a completion widget would run it, with
    # `_describe` (which would show a menu) printing the "word:description" pairs it is handed instead.
    probe = ("(( ${+_comps[sleepctl]} )) || exit 3\n"
             "_describe() { print -rl -- \"${(@P)2}\" }\n"
             "BUFFER='sleepctl completion '; CURSOR=${#BUFFER}; words=(${=BUFFER} ''); $_comps[sleepctl]\n"
             "BUFFER='sleepctl wake --ev'; CURSOR=${#BUFFER}; words=(${=BUFFER}); $_comps[sleepctl]\n")
    program = unpacked + "autoload -U compinit && compinit -u\n" + script("zsh") + probe
    result = subprocess.run([ZSH, "-f", "-c", program, "zsh", root], capture_output=True, text=True, timeout=60,
                            env=environment())
    assert result.returncode == 0 and not result.stderr, result.stderr
    lines = [line.partition(":")[0] for line in result.stdout.splitlines()]
    assert lines[:2] == ["bash", "zsh"] and "--evict" in lines[2:]
