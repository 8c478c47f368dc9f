"""Starting a real sleepd and real engine processes, shared by every test."""

import json
import os
import subprocess
import sys
import time

import pytest

from sleepd.bench.local import LocalDaemon

HERE = os.path.dirname(os.path.abspath(__file__))
MiB = 1 << 20


def wait_for(predicate, timeout=20.0, interval=0.02, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class Daemon(LocalDaemon):
    """A sleepd process on its own socket, state directory and host pool, with test helpers."""

    def __init__(self, tmp_path, *flags):
        super().__init__(str(tmp_path), *flags)

    def ctl(self, *args, check=True) -> subprocess.CompletedProcess:
        result = subprocess.run([sys.executable, "-m", "sleepd.client.ctl", "--socket", self.socket, *args],
                                capture_output=True, text=True, timeout=120)
        if check and result.returncode != 0:
            raise AssertionError(f"sleepctl {' '.join(args)} failed: {result.stderr}")
        return result

    def status(self, model: str = "") -> dict:
        return json.loads(self.ctl("--json", "status", *(["--model", model] if model else [])).stdout)

    def mover_pids(self) -> list[int]:
        import psutil

        pids = []
        for child in psutil.Process(self.pid).children():
            try:
                if child.status() != psutil.STATUS_ZOMBIE and "sleepd.daemon.mover" in child.cmdline():
                    pids.append(child.pid)
            except psutil.NoSuchProcess:
                continue
        return pids


class Engine:
    """A real engine process (tests/engine_process.py) attached as one rank."""

    def __init__(self, daemon: Daemon, model: str, rank: int = 0, device: int = 0, regions=(), seed: int = 0,
                 sleep_hook: str = "ok"):
        args = [sys.executable, os.path.join(HERE, "engine_process.py"), "--socket", daemon.socket,
                "--model", model, "--rank", str(rank), "--device", str(device), "--seed", str(seed),
                "--sleep-hook", sleep_hook]
        for tag, size in regions:
            args += ["--region", f"{tag}:{size}"]
        self.model, self.rank = model, rank
        self.process = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.pid = self.process.pid
        first = self.process.stdout.readline()
        if not first:
            raise AssertionError(f"engine {model} rank {rank} exited at start ({self.process.wait()})")
        self.initial = json.loads(first)

    def request(self, op: str, **fields) -> dict:
        self.process.stdin.write(json.dumps({"op": op, **fields}) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise AssertionError(f"engine {self.model} rank {self.rank} died")
        return json.loads(line)

    def report(self) -> dict:
        return self.request("report")

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.process.stdin.write(json.dumps({"op": "exit"}) + "\n")
                self.process.stdin.flush()
                self.process.wait(timeout=10)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()


@pytest.fixture
def start_daemon(tmp_path):
    daemons = []

    def start(*flags):
        daemon = Daemon(tmp_path, *flags)
        daemons.append(daemon)
        return daemon

    yield start
    for daemon in daemons:
        daemon.stop()


@pytest.fixture
def daemon(start_daemon):
    return start_daemon("--host-devices", "2", "--host-device-capacity", "256MiB")


@pytest.fixture
def start_engine():
    engines = []

    def start(daemon, model, **kwargs):
        engine = Engine(daemon, model, **kwargs)
        engines.append(engine)
        return engine

    yield start
    for engine in engines:
        engine.close()
