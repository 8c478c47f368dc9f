"""A sleepd started as a child process on private sockets, for benchmarks and tests."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time


class LocalDaemon:
    """A sleepd process with its own socket, state directory and host pool under `directory`."""

    def __init__(self, directory: str | None = None, *flags: str, log_path: str | None = None,
                 launcher: tuple[str, ...] = (sys.executable, "-m", "sleepd.daemon.main")):
        self._tmp = None if directory else tempfile.TemporaryDirectory(prefix="sleepd-")
        self.dir = directory or self._tmp.name
        self.socket = os.path.join(self.dir, "sleepd.sock")
        self.state_dir = os.path.join(self.dir, "state")
        self.pool_dir = f"/dev/shm/sleepd-local-{os.getpid()}-{abs(hash(self.dir)):x}"
        self.log_path = log_path or os.path.join(self.dir, "sleepd.log")
        self._log = open(self.log_path, "a")
        runtime = os.path.join(self.state_dir, "daemon.json")
        if os.path.exists(runtime):  # left by a daemon that was killed: not a sign that this one is up
            os.unlink(runtime)
        self.process = subprocess.Popen(
            [*launcher, "--socket", self.socket, "--state-dir", self.state_dir,
             "--metrics-address", "127.0.0.1:0", "--host-pool-dir", self.pool_dir, *flags],
            stdout=self._log, stderr=subprocess.STDOUT)
        self.pid = self.process.pid
        deadline = time.monotonic() + 30
        while not os.path.exists(runtime):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"sleepd did not start:\n{self.log()}")
            time.sleep(0.02)
        with open(runtime) as file:
            self.info = json.load(file)

    def log(self) -> str:
        with open(self.log_path) as file:
            return file.read()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        subprocess.run(["rm", "-rf", self.pool_dir], check=False)
        if self._tmp:
            self._tmp.cleanup()

    def __enter__(self) -> "LocalDaemon":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
