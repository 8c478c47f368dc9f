"""Starting a real sleepd and real engine processes, shared by every test."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

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


class Daemon:
    """A sleepd process on its own socket, state directory and host pool."""

    def __init__(self, tmp_path, *flags):
        self.dir = tmp_path
        self.socket = str(tmp_path / "sleepd.sock")
        self.state_dir = tmp_path / "state"
        self.log_path = tmp_path / "sleepd.log"
        self.pool_dir = f"/dev/shm/sleepd-test-{os.getpid()}-{tmp_path.name}"
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "sleepd.daemon.main", "--socket", self.socket, "--state-dir", str(self.state_dir),
             "--metrics-address", "127.0.0.1:0", "--host-pool-dir", self.pool_dir, *flags],
            stdout=self._log, stderr=subprocess.STDOUT)
        runtime = self.state_dir / "daemon.json"
        wait_for(lambda: runtime.exists() or self.process.poll() is not None, what="sleepd to start")
        if self.process.poll() is not None:
            raise AssertionError(f"sleepd exited at start:\n{self.log()}")
        self.info = json.loads(runtime.read_text())
        self.pid = self.process.pid

    def log(self) -> str:
        return self.log_path.read_text()

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

        return [child.pid for child in psutil.Process(self.pid).children() if "mover" in " ".join(child.cmdline())]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        subprocess.run(["rm", "-rf", self.pool_dir])


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
