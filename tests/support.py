"""Starting a real sleepd and real engine processes: what every test shares."""

import importlib.util
import json
import os
import secrets
import stat
import subprocess
import sys
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from sleepd.bench.local import LocalDaemon

HERE = os.path.dirname(os.path.abspath(__file__))
MiB = 1 << 20
OTHER = 65534  # a second tenant: nobody / nogroup on Debian


def second_tenant_unavailable() -> str | None:
    """Why this machine cannot run a process as uid OTHER beside root's, or None."""
    if os.geteuid() != 0:
        return "acting as a second uid needs root to drop to it"
    # Modules still load after the drop (grpc imports some lazily): the packages must be readable by that uid.
    import grpc
    import sleepd

    for directory in {os.path.dirname(os.path.dirname(grpc.__file__)), os.path.dirname(sleepd.__path__[0])}:
        path = directory
        while path != "/":
            if not os.stat(path).st_mode & stat.S_IXOTH:
                return f"{path} is closed to other uids, so uid {OTHER} cannot load sleepd's packages"
            path = os.path.dirname(path)
    return None


# Processes become the other tenant by dropping privileges after Python and sleepd
# are loaded, so this works even where that uid cannot read the toolchain.
AS_UID = ("import os, sys, shutil, gettext; from sleepd.client.ctl import arguments, commands, main; "
          "arguments.parser(); os.setgroups([]); os.setgid({uid}); os.setuid({uid}); sys.exit(main(sys.argv[1:]))")


def ctl_as(daemon, uid, *args) -> subprocess.CompletedProcess:
    """sleepctl run by a process of `uid`, as the kernel will report it to the daemon."""
    return subprocess.run([sys.executable, "-c", AS_UID.format(uid=uid), "--socket", daemon.socket, *args],
                          capture_output=True, text=True, timeout=60)


def skip_where_vllm_is_missing(items, folder: str, why: str) -> None:
    """Marks the collected tests under `folder` skipped with `why` where vLLM is not installed
    (the README's test command): the vLLM suites run in environments of their own."""
    if importlib.util.find_spec("vllm") is None:
        for item in items:
            if f"{folder}/" in str(item.path):
                item.add_marker(pytest.mark.skip(reason=why))


def wait_for(predicate, timeout=20.0, interval=0.02, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def assert_refused(result, path: str, found: str, advice: str = "remove it") -> None:
    """The daemon's start was refused: exit status 78 and one line that names the path, what was
    found and what to do; nothing else went wrong."""
    assert result.returncode == 78, result.stderr
    lines = [line for line in result.stderr.splitlines() if "CRITICAL" in line]
    assert len(lines) == 1, result.stderr
    for what in (path, found, advice):
        assert what in lines[0], lines[0]
    assert "Traceback" not in result.stderr


def by_tag(report) -> dict:
    """An engine's report's regions by tag."""
    return {region["tag"]: region for region in report["regions"]}


def sleeping(daemon) -> dict:
    """{model: whether it sleeps}, from the daemon's status."""
    return {model["name"]: model["sleeping"] for model in daemon.status()["models"]}


def metrics_text(daemon, authorized: bool = True) -> str:
    """The daemon's /metrics as the operator's scraper reads it, with the bearer token (else as anyone)."""
    request = urllib.request.Request(f"http://{daemon.info['metrics_address']}/metrics")
    if authorized:
        request.add_header("Authorization", f"Bearer {daemon.metrics_token}")
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.read().decode()


def scrape(daemon) -> dict:
    """The daemon's /metrics: {(name, sorted labels): value}."""
    text = metrics_text(daemon)
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, name, **labels):
    """A sample of a scrape, or None."""
    return samples.get((name, tuple(sorted(labels.items()))))


class Daemon(LocalDaemon):
    """A sleepd process on its own socket, state directory and host pool, with test helpers."""

    def __init__(self, tmp_path, backend: str, *flags, **options):
        # The operator's scraper: the per-model series need the bearer token.
        self.metrics_token = secrets.token_hex(16)
        token_file = os.path.join(str(tmp_path), f"metrics-token-{self.metrics_token[:8]}")
        descriptor = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(descriptor, self.metrics_token.encode())
        os.close(descriptor)
        super().__init__(str(tmp_path), "--backend", backend, "--metrics-token-file", token_file, *flags, **options)
        self.backend = backend

    def memfd_prefix(self, model: str) -> str:
        """How the kernel names this model's device memory (the doubles name none by model)."""
        return {"host": f"/memfd:sleepd:{model}:", "cuda": "/memfd:fakecuda", "acl": "/memfd:fakeacl"}[self.backend]

    def ctl(self, *args, check=True) -> subprocess.CompletedProcess:
        result = subprocess.run([sys.executable, "-m", "sleepd.client.ctl", "--socket", self.socket, *args],
                                capture_output=True, text=True, timeout=120)
        if check and result.returncode != 0:
            raise AssertionError(f"sleepctl {' '.join(args)} failed: {result.stderr}")
        return result

    def status(self, model: str = "") -> dict:
        """sleepctl's JSON status, less the one field that changes by itself (seconds idle),
        so that two statuses compare equal exactly when the state is the same."""
        status = json.loads(self.ctl("--json", "status", *(["--model", model] if model else [])).stdout)
        for entry in status.get("models", []):
            entry.pop("idleSeconds", None)
        return status

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
                 sleep_hook: str = "ok", weights_hook: str = "ok", as_uid: int | None = None,
                 persist: bool = False, env: dict | None = None, needs_controller: bool = False,
                 listen: str | None = None):
        args = [sys.executable, os.path.join(HERE, "engine_process.py"), "--socket", daemon.socket,
                "--model", model, "--rank", str(rank), "--device", str(device), "--seed", str(seed),
                "--sleep-hook", sleep_hook, "--weights-hook", weights_hook]
        for tag, size in regions:
            args += ["--region", f"{tag}:{size}"]
        self.model, self.rank = model, rank
        if as_uid is not None:  # a second tenant: the engine drops to that uid before it connects
            args += ["--as-uid", str(as_uid)]
        if persist:
            args.append("--persist")
        if needs_controller:
            args.append("--needs-controller")
        if listen:  # the engine's front end (a test controller) reaches it there
            args += ["--listen", listen]
        self.process = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                        env={**os.environ, **(env or {})})
        self.pid = self.process.pid
        first = self.process.stdout.readline()
        if not first:
            raise AssertionError(f"engine {model} rank {rank} exited at start ({self.process.wait()})")
        self.initial = json.loads(first)

    def send(self, op: str, **fields) -> None:
        """A command without waiting for its answer (the engine may die on it)."""
        self.process.stdin.write(json.dumps({"op": op, **fields}) + "\n")
        self.process.stdin.flush()

    def request(self, op: str, **fields) -> dict:
        self.send(op, **fields)
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


class ControllerProcess:
    """A real controller process (tests/controller_process.py): the front end of an engine whose
    ranks listen on `rank_sockets`, attached as `model`'s controller."""

    def __init__(self, daemon: Daemon, model: str, rank_sockets, on_sleep: str = "ok", as_uid: int | None = None):
        args = [sys.executable, os.path.join(HERE, "controller_process.py"), "--socket", daemon.socket,
                "--model", model, "--on-sleep", on_sleep, *[f"--rank={path}" for path in rank_sockets]]
        if as_uid is not None:
            args += ["--as-uid", str(as_uid)]
        self.process = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.pid = self.process.pid
        self.attached = json.loads(self.process.stdout.readline() or '{"error": "exited at start"}')

    def request(self, op: str, **fields) -> dict:
        self.process.stdin.write(json.dumps({"op": op, **fields}) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise AssertionError("the controller died")
        return json.loads(line)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()


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


class FakeAcl(FakeCuda):
    """The ACL double's knobs and counters, and the runtime's own view of device memory."""

    def __init__(self, directory):
        super().__init__(directory)
        self.state_dir = directory / "acl-tokens"
        self.state_dir.mkdir()

    def allowed_pids(self) -> set[int]:
        """Every process on any token's allow-list, as the runtime last set them."""
        pids = set()
        for token in self.state_dir.iterdir():
            lines = token.read_text().splitlines()
            pids.update(int(pid) for pid in (lines[1].split() if len(lines) > 1 and lines[1] != "any" else ()))
        return pids

    def memory_info(self, device: int = 0) -> tuple[int, int]:
        """(free, total) bytes of `device`, as aclrtGetMemInfo reports them to a process of its own."""
        code = ("import json, sys; from sleepd import _C; b = _C.AclBackend(); "
                f"print(json.dumps(b.memory_info({device})))")
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise AssertionError(f"aclrtGetMemInfo failed: {result.stderr}")
        return tuple(json.loads(result.stdout))
