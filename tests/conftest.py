"""Starting a real sleepd and real engine processes, shared by every test."""

import json
import os
import subprocess
import sys
import time

import pytest

from sleepd.bench.local import LocalDaemon
from sleepd.common.sizes import parse_size

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

    def __init__(self, tmp_path, backend: str, *flags):
        super().__init__(str(tmp_path), "--backend", backend, *flags)
        self.backend = backend

    def memfd_prefix(self, model: str) -> str:
        """How the kernel names this model's device memory (the driver double names none by model)."""
        return f"/memfd:sleepd:{model}:" if self.backend == "host" else "/memfd:fakecuda"

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


@pytest.fixture(scope="session")
def fake_cuda(tmp_path_factory) -> str:
    """The driver double (tests/fakecuda), built once per session."""
    library = tmp_path_factory.mktemp("fakecuda") / "libfakecuda.so"
    subprocess.run(["g++", "-std=c++17", "-O2", "-shared", "-fPIC", "-o", str(library),
                    os.path.join(HERE, "fakecuda", "fakecuda.cpp")], check=True)
    return str(library)


class FakeCuda:
    """The double's knobs and counters, for the processes of one test."""

    def __init__(self, directory):
        self.counters_dir = directory / "counters"
        self.counters_dir.mkdir()
        self.control_file = directory / "control"
        self.control_file.write_text("")

    def counters(self, pid: int) -> dict:
        return json.loads((self.counters_dir / f"{pid}.json").read_text())

    def inject(self, **faults) -> None:
        self.control_file.write_text("".join(f"{key}={value}\n" for key, value in faults.items()))


@pytest.fixture(params=["host", "cuda"])
def backend(request) -> str:
    """Every end-to-end scenario runs on the host backend and on CUDA over the driver double."""
    return request.param


@pytest.fixture
def fake(backend, fake_cuda, tmp_path, monkeypatch):
    if backend != "cuda":
        return None
    double = FakeCuda(tmp_path)
    # Inherited by the daemon, its movers, the engines and sleepctl alike.
    monkeypatch.setenv("SLEEPD_LIBCUDA", fake_cuda)
    monkeypatch.setenv("FAKE_CUDA_COUNTERS", str(double.counters_dir))
    monkeypatch.setenv("FAKE_CUDA_CONTROL", str(double.control_file))
    return double


@pytest.fixture
def start_daemon(tmp_path, backend, fake, monkeypatch):
    daemons = []

    def start(*flags, devices: int = 2, capacity: str = "256MiB"):
        if backend == "host":
            flags = ("--host-devices", str(devices), "--host-device-capacity", capacity, *flags)
        else:
            monkeypatch.setenv("FAKE_CUDA_DEVICES", str(devices))
            monkeypatch.setenv("FAKE_CUDA_MEMORY", str(parse_size(capacity)))
        daemon = Daemon(tmp_path, backend, *flags)
        daemons.append(daemon)
        return daemon

    yield start
    for daemon in daemons:
        daemon.stop()


@pytest.fixture
def daemon(start_daemon):
    return start_daemon()


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
