"""Under systemd: the unit passes `systemd-analyze verify`, and the daemon speaks the notify
protocol to a real $NOTIFY_SOCKET: READY=1 only once both sockets accept, STATUS= lines that
follow the models, WATCHDOG=1 at half of $WATCHDOG_USEC, STOPPING=1 on SIGTERM."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from sleepd.daemon import config
from sleepd.daemon.notify import Notifier
from support import MiB, Engine

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "deploy" / "sleepd.service"


def unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze not found (Debian's systemd package has it)")
def test_the_unit_passes_systemd_analyze_verify(tmp_path):
    # verify checks that ExecStart= exists and is executable: point it at the sleepd under test.
    sleepd = shutil.which("sleepd") or str(Path(sys.executable).with_name("sleepd"))
    assert os.access(sleepd, os.X_OK), "the sleepd console script is not installed"
    unit = tmp_path / "sleepd.service"
    unit.write_text(UNIT.read_text().replace("ExecStart=/usr/local/bin/sleepd", f"ExecStart={sleepd}"))
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True, text=True,
                            timeout=60)
    # verify reports unknown keys and bad values on stderr and still exits 0: any output is a finding.
    assert result.returncode == 0 and not result.stdout.strip() and not result.stderr.strip(), \
        result.stdout + result.stderr


def test_the_unit_is_a_notify_service_with_group_sockets_state_and_hardening_that_keeps_devices():
    unit = unit_settings()
    assert unit["Type"] == ["notify"] and unit["NotifyAccess"] == ["main"]
    assert unit["ExecStart"][0].split()[0].endswith("/sleepd")
    assert "WatchdogSec" in unit
    assert unit["RuntimeDirectory"] == ["sleepd"] and unit["RuntimeDirectoryMode"][0] in ("0750", "0770")
    assert unit["Group"] == ["sleepd"]  # the group whose members reach the sockets (not the admin group)
    assert unit["StateDirectory"] == ["sleepd"]
    assert unit["RestartPreventExitStatus"] == [str(config.EXIT_CONFIG)]
    assert unit["NoNewPrivileges"] == ["yes"] and unit["ProtectSystem"] == ["strict"]
    assert "/dev/shm" in " ".join(unit["ReadWritePaths"])  # the host backup pool
    assert unit["ProtectHome"] == ["yes"] and unit["PrivateTmp"] == ["yes"]
    for hides_devices in ("PrivateDevices", "DevicePolicy", "DeviceAllow"):
        assert hides_devices not in unit, f"{hides_devices}= would hide /dev/nvidia* from the movers"


class NotifySocket:
    """What systemd listens on: a datagram socket; each message is KEY=VALUE lines."""

    def __init__(self, path: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.messages: list[tuple[float, dict[str, str]]] = []

    def receive(self, timeout: float) -> dict[str, str] | None:
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(4096)
        except socket.timeout:
            return None
        fields = dict(line.split("=", 1) for line in data.decode().splitlines() if line)
        self.messages.append((time.monotonic(), fields))
        return fields

    def wait_for(self, predicate, timeout: float = 20.0) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            fields = self.receive(deadline - time.monotonic())
            if fields is not None and predicate(fields):
                return fields
        raise AssertionError(f"no such notification in {timeout} s; got {[m for _, m in self.messages]}")


def accepts(path: str, kind: int) -> bool:
    probe = socket.socket(socket.AF_UNIX, kind)
    try:
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


def test_the_daemon_notifies_ready_status_watchdog_and_stopping(tmp_path):
    notify = NotifySocket(str(tmp_path / "notify"))
    socket_path = str(tmp_path / "sleepd.sock")
    env = {key: value for key, value in os.environ.items() if not key.startswith("SLEEPD_")}
    env.update(NOTIFY_SOCKET=str(tmp_path / "notify"), WATCHDOG_USEC="400000")
    pool = f"/dev/shm/sleepd-test-notify-{os.getpid()}"
    daemon = subprocess.Popen([sys.executable, "-m", "sleepd.daemon.main", "--backend", "host", "--socket",
                               socket_path, "--state-dir", str(tmp_path / "state"), "--metrics-address", "off",
                               "--host-pool-dir", pool, "--host-device-capacity", "64MiB"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    engine = None
    try:
        ready = notify.wait_for(lambda fields: "READY" in fields)
        # Checked the moment READY=1 arrives: both sockets already accept.
        assert accepts(socket_path, socket.SOCK_STREAM) and accepts(socket_path + ".fds", socket.SOCK_SEQPACKET)
        assert ready["READY"] == "1"
        assert ready["STATUS"].startswith("models: 0 awake, 0 asleep")
        assert [fields for _, fields in notify.messages[:-1] if "READY" in fields] == []

        # Pings at half of WATCHDOG_USEC (0.2 s): several within a second.
        started = time.monotonic()
        while time.monotonic() - started < 1.0:
            notify.receive(0.5)
        pings = [at for at, fields in notify.messages if fields.get("WATCHDOG") == "1"]
        assert len(pings) >= 3, notify.messages
        assert max(b - a for a, b in zip(pings, pings[1:])) < 0.4  # never the whole timeout without a ping

        # STATUS follows the models: an engine attaches, then its model sleeps.
        engine = Engine(SimpleNamespace(socket=socket_path), "qwen", regions=[("weights", 4 * MiB)])
        notify.wait_for(lambda fields: fields.get("STATUS", "").startswith("models: 1 awake, 0 asleep")
                        and "1 session" in fields["STATUS"])
        subprocess.run([sys.executable, "-m", "sleepd.client.ctl", "--socket", socket_path, "sleep", "--model",
                        "qwen"], check=True, capture_output=True, timeout=60)
        status = notify.wait_for(lambda fields: fields.get("STATUS", "").startswith("models: 0 awake, 1 asleep"))
        assert "host pool: 4.0 MiB used" in status["STATUS"]

        daemon.send_signal(signal.SIGTERM)
        stopping = notify.wait_for(lambda fields: "STOPPING" in fields)
        assert stopping["STOPPING"] == "1"
        assert daemon.wait(timeout=30) == 0
    finally:
        if engine:
            engine.kill()
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        shutil.rmtree(pool, ignore_errors=True)


def test_the_notifier_speaks_to_abstract_sockets_and_leaves_nothing_for_child_processes():
    name = f"sleepd-test-{os.getpid()}"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind("\0" + name)
    listener.settimeout(5)
    environ = {"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid())}
    notifier = Notifier.from_environment(environ)
    assert environ == {}  # the movers the daemon starts must not inherit them
    assert notifier.watchdog_interval == 1.5
    assert notifier.ready("up; line one\nline two")
    assert listener.recv(4096) == b"READY=1\nSTATUS=up; line one line two\n"
    assert notifier.stopping()
    assert listener.recv(4096).startswith(b"STOPPING=1\n")
    notifier.close()
    listener.close()

    # The watchdog belongs to another process: no pings from this one.
    assert Notifier.from_environment({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "1"}).watchdog_interval is None
    # Without systemd everything is a no-op.
    assert not Notifier.from_environment({}).ready("up")
