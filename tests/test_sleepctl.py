"""sleepctl as people use it: tables for people and JSON for scripts, a progress bar when an
operation takes a while on a terminal, `top`, and one-line errors. Shell completion: test_completion.py."""

import json
import os
import pty
import subprocess
import sys
import time

import pytest

from support import HERE, MiB


@pytest.fixture
def backend():
    """What sleepctl shows does not depend on the memory backend."""
    return "host"


@pytest.fixture
def qwen(daemon, start_engine):
    return start_engine(daemon, "qwen", regions=[("weights", 4 * MiB), ("kv_cache", 2 * MiB)])


def sleepctl(*args, env=None, check=True) -> subprocess.CompletedProcess:
    environment = {**os.environ, **(env or {})}
    result = subprocess.run([sys.executable, "-m", "sleepd.client.ctl", *args], capture_output=True, text=True,
                            timeout=60, env=environment)
    if check and result.returncode != 0:
        raise AssertionError(f"sleepctl {' '.join(args)}: {result.stderr}")
    return result


def on_a_terminal(*args, columns: int = 120) -> tuple[int, str]:
    """Runs sleepctl with a pseudo-terminal as its stdout, as in an interactive shell."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: stdin, stdout and stderr are the terminal
        os.environ.update(TERM="xterm-256color", COLUMNS=str(columns))
        os.execv(sys.executable, [sys.executable, "-m", "sleepd.client.ctl", *args])
    output = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        output += chunk
    os.close(fd)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), output.decode(errors="replace")


class SlowEngine:
    """An engine whose sleep and wake hooks take `delay` seconds (tests/slow_engine.py)."""

    def __init__(self, daemon, model: str, delay: float, nbytes: int = 8 * MiB):
        self.process = subprocess.Popen([sys.executable, os.path.join(HERE, "slow_engine.py"), "--socket",
                                         daemon.socket, "--model", model, "--delay", str(delay), "--bytes",
                                         str(nbytes)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.process.stdout.readline().strip() == "ready"

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=30)


def test_status_is_a_table_for_people_and_json_for_scripts_with_the_option_before_or_after(daemon, qwen):
    daemon.ctl("sleep", "--model", "qwen")
    table = daemon.ctl("status").stdout
    lines = table.splitlines()
    header = next(line for line in lines if line.startswith("MODEL"))
    assert header.split() == ["MODEL", "STATE", "RANK", "DEVICE", "PID", "TAG", "REGIONS", "BYTES", "REGION",
                              "STATE"]
    rows = [line.split() for line in lines[lines.index(header) + 2:] if line.strip()]
    assert rows[0][:5] == ["qwen", "asleep", "0", "host:0", str(qwen.pid)]
    assert ["kv_cache", "1", "2.0", "MiB", "discarded"] == rows[0][5:]
    assert ["weights", "1", "4.0", "MiB", "offloaded"] == rows[1][-5:]
    assert all(line == line.rstrip() for line in lines), "piped tables carry no trailing padding"
    assert any(line.split()[:1] == ["host:0"] for line in lines)  # the devices table

    before = json.loads(daemon.ctl("--json", "status").stdout)
    after = json.loads(daemon.ctl("status", "--json").stdout)
    for status in (before, after):
        assert [model["name"] for model in status["models"]] == ["qwen"]
        assert status["models"][0]["sleeping"] is True
    for command in (["sleep", "--model", "qwen"], ["wake", "--model", "qwen"],
                    ["policy", "--model", "qwen", "--priority", "3"]):
        assert isinstance(json.loads(daemon.ctl(*command, "--json").stdout), dict)

    # No --socket: $SLEEPD_SOCKET names the daemon.
    assert "qwen" in sleepctl("status", env={"SLEEPD_SOCKET": daemon.socket}).stdout


def test_top_shows_devices_models_and_their_states_in_one_frame(daemon, qwen, start_engine):
    start_engine(daemon, "llama", device=1, regions=[("weights", 2 * MiB)])
    daemon.ctl("sleep", "--model", "qwen")
    frame = daemon.ctl("top", "--once").stdout
    rows = {line.split()[0]: line.split() for line in frame.splitlines() if line.strip()}
    assert rows["qwen"][1] == "asleep" and rows["llama"][1] == "awake"
    assert rows["qwen"][4:10] == ["0", "B", "4.0", "MiB", "2.0", "MiB"]  # awake, offloaded, discarded
    assert rows["host:0"][1:3] == ["0", "B"] and rows["host:1"][1:3] == ["2.0", "MiB"]  # devices: used
    assert "host pool" in frame and "4.0 MiB of" in frame

    code, screen = on_a_terminal("--socket", daemon.socket, "top", "--once")
    assert code == 0 and "\x1b[" in screen and "asleep" in screen  # colours on a terminal
    snapshot = json.loads(daemon.ctl("--json", "top", "--once").stdout)
    assert {model["name"] for model in snapshot["models"]} == {"qwen", "llama"}


def test_top_refreshes_until_interrupted(daemon, qwen):
    process = subprocess.Popen([sys.executable, "-m", "sleepd.client.ctl", "--socket", daemon.socket, "--json",
                                "top", "--interval", "0.2"], stdout=subprocess.PIPE, text=True)
    frames = [json.loads(process.stdout.readline()) for _ in range(2)]
    daemon.ctl("sleep", "--model", "qwen")
    deadline = time.monotonic() + 10
    while not json.loads(process.stdout.readline())["models"][0]["sleeping"]:
        assert time.monotonic() < deadline, "top never showed the sleep"
    process.send_signal(2)  # Ctrl-C
    assert process.wait(timeout=10) == 0
    assert not frames[0]["models"][0]["sleeping"]


def test_a_long_sleep_or_wake_shows_a_progress_bar_on_a_terminal_and_nowhere_else(daemon):
    slow = SlowEngine(daemon, "slow", delay=1.2)
    fast = SlowEngine(daemon, "fast", delay=0)
    try:
        code, screen = on_a_terminal("--socket", daemon.socket, "sleep", "--model", "slow")
        assert code == 0, screen
        assert "━" in screen and "8.0/8.0 MiB" in screen and "B/s" in screen, screen
        assert "slept slow: 1 regions, 8.0 MiB offloaded" in screen

        # Not a terminal: the same summary line, no bar.
        result = daemon.ctl("wake", "--model", "slow")
        assert result.stdout.startswith("woke slow") and "B/s" not in result.stdout
        assert len(result.stdout.splitlines()) == 1

        # --json on a terminal: JSON only.
        code, screen = on_a_terminal("--socket", daemon.socket, "--json", "sleep", "--model", "slow")
        assert code == 0 and json.loads(screen.replace("\r\n", "\n"))["model"] == "slow"

        # Under a second: no bar either.
        code, screen = on_a_terminal("--socket", daemon.socket, "sleep", "--model", "fast")
        assert code == 0 and "━" not in screen and screen.startswith("slept fast")
    finally:
        slow.close()
        fast.close()


def test_errors_are_one_line_with_a_non_zero_status(daemon, qwen, tmp_path):
    cases = [
        (["--socket", str(tmp_path / "none.sock"), "status"], "is sleepd running?"),
        (["--socket", daemon.socket, "sleep"], "required: --model"),
        (["--socket", daemon.socket, "snooze"], "invalid choice: 'snooze'"),
        (["--socket", daemon.socket, "sleep", "--model", "mistral"], "NOT_FOUND"),
        (["--socket", daemon.socket, "top", "--once", "--model", "mistral"], "NOT_FOUND"),
    ]
    for args, words in cases:
        result = sleepctl(*args, check=False)
        assert result.returncode != 0, args
        assert len(result.stderr.strip().splitlines()) == 1 and words in result.stderr, (args, result.stderr)
        assert result.stderr.startswith("sleepctl"), result.stderr


def modules_loaded_by_sleepctl(*args, env=None) -> set[str]:
    """The modules the installed `sleepctl` imports for `args`, as Python's own import log reports them."""
    command = os.path.join(os.path.dirname(sys.executable), "sleepctl")
    result = subprocess.run([command, *args], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYTHONPROFILEIMPORTTIME": "1", **(env or {})})
    assert result.returncode == 0, result.stderr
    lines = [line.rpartition("|")[2].strip() for line in result.stderr.splitlines() if line.startswith("import time:")]
    return set(lines[1:])  # after the header


def rpc_modules(names: set[str]) -> list[str]:
    return sorted(name for name in names if name.partition(".")[0] == "grpc" or name.endswith(("_pb2", "_pb2_grpc")))


def test_help_and_completion_that_need_no_daemon_load_no_grpc(tmp_path):
    """`sleepctl --help` and a shell's completion of commands and options answer at once: neither loads
    gRPC nor the generated protobuf code, which only the commands that talk to the daemon need."""
    loaded = modules_loaded_by_sleepctl("--help")
    assert "argparse" in loaded and rpc_modules(loaded) == []
    assert rpc_modules(modules_loaded_by_sleepctl("wake", "--help")) == []

    offered = tmp_path / "offered"
    for line in ("sleepctl s", "sleepctl wake --", "sleepctl sleep --level "):
        # What bash's completion function sets before it runs sleepctl.
        loaded = modules_loaded_by_sleepctl(env={"_ARGCOMPLETE": "1", "_ARGCOMPLETE_SHELL": "bash",
                                                 "COMP_LINE": line, "COMP_POINT": str(len(line)),
                                                 "_ARGCOMPLETE_STDOUT_FILENAME": str(offered)})
        assert offered.read_text(), line  # completion ran, and offered something
        assert rpc_modules(loaded) == [], line


def test_sleepctl_and_the_client_import_nothing_of_the_daemon():
    code = ("import sys, sleepd.client.ctl.commands; from sleepd.client import *; "
            "print(sorted(name for name in sys.modules if name.startswith('sleepd.daemon')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
