"""Fixtures: a real sleepd on each backend, real engine processes, the CUDA driver and ACL runtime doubles."""

import hashlib
import os
import subprocess
import tempfile
from pathlib import Path

import pytest

from sleepd.common.sizes import parse_size
from support import HERE, ControllerProcess, Daemon, Engine, FakeAcl, FakeCuda

# required_suites: --require-suites / $SLEEPD_REQUIRE_SUITES, the suites a run must run in full (CI's);
# pytester: for that plugin's own tests.
pytest_plugins = ["required_suites", "pytester"]

# Every daemon the tests start checks its lock order (daemon/locks.py): a lock taken
# out of order stops it, and the test that did it fails.
os.environ.setdefault("SLEEPD_CHECK_LOCKS", "1")


def _build(source: str, library, folder: str = "fakecuda") -> None:
    # A double is written against sleepd's own declarations of the API it stands for.
    subprocess.run(["g++", "-std=c++17", "-O2", "-shared", "-fPIC", "-I", os.path.join(os.path.dirname(HERE), "csrc"),
                    "-o", str(library), os.path.join(HERE, folder, source)], check=True)


@pytest.fixture(scope="session")
def fake_cuda(tmp_path_factory) -> str:
    """The driver double (tests/fakecuda), built once per session."""
    library = tmp_path_factory.mktemp("fakecuda") / "libfakecuda.so"
    _build("fakecuda.cpp", library)
    return str(library)


@pytest.fixture(scope="session")
def fake_nvml(tmp_path_factory) -> str:
    """A directory holding the NVML double under the name nvidia-ml-py loads, libnvidia-ml.so.1."""
    directory = tmp_path_factory.mktemp("fakenvml")
    _build("fakenvml.cpp", directory / "libnvidia-ml.so.1")
    return str(directory)


@pytest.fixture(scope="session")
def fake_acl(tmp_path_factory) -> str:
    """The ACL runtime double (tests/fakeacl), built once per session."""
    library = tmp_path_factory.mktemp("fakeacl") / "libfakeacl.so"
    _build("fakeacl.cpp", library, "fakeacl")
    return str(library)


@pytest.fixture(params=["host", "cuda", "acl"])
def backend(request) -> str:
    """Every end-to-end scenario runs on the host backend, on CUDA over the driver double
    and on ACL over the runtime double."""
    return request.param


@pytest.fixture
def fake(backend, tmp_path, monkeypatch, request):
    if backend == "acl":
        return _acl_double(request.getfixturevalue("fake_acl"), tmp_path, monkeypatch)
    if backend != "cuda":
        return None
    fake_cuda, fake_nvml = request.getfixturevalue("fake_cuda"), request.getfixturevalue("fake_nvml")
    double = FakeCuda(tmp_path)
    # Inherited by the daemon, its movers, the engines and sleepctl alike.
    monkeypatch.setenv("SLEEPD_LIBCUDA", fake_cuda)
    monkeypatch.setenv("LD_LIBRARY_PATH", os.pathsep.join(filter(None, [fake_nvml, os.environ.get("LD_LIBRARY_PATH")])))
    monkeypatch.setenv("FAKE_CUDA_COUNTERS", str(double.counters_dir))
    monkeypatch.setenv("FAKE_CUDA_CONTROL", str(double.control_file))
    # The NVML double counts only this test's memory, whatever else runs on the machine.
    monkeypatch.setenv("FAKE_CUDA_TAG", hashlib.sha1(str(tmp_path).encode()).hexdigest()[:12])
    return double


def _acl_double(library: str, tmp_path, monkeypatch) -> FakeAcl:
    double = FakeAcl(tmp_path)
    # Inherited by the daemon, its movers, the engines and sleepctl alike.
    monkeypatch.setenv("SLEEPD_LIBACL", library)
    monkeypatch.setenv("FAKE_ACL_STATE", str(double.state_dir))
    monkeypatch.setenv("FAKE_ACL_COUNTERS", str(double.counters_dir))
    monkeypatch.setenv("FAKE_ACL_CONTROL", str(double.control_file))
    # aclrtGetMemInfo counts only this test's memory, whatever else runs on the machine.
    monkeypatch.setenv("FAKE_ACL_TAG", hashlib.sha1(str(tmp_path).encode()).hexdigest()[:12])
    return double


@pytest.fixture
def start_daemon(tmp_path, backend, fake, monkeypatch):
    daemons = []

    def start(*flags, devices: int = 2, capacity: str = "256MiB"):
        if backend == "host":
            flags = ("--host-devices", str(devices), "--host-device-capacity", capacity, *flags)
        else:
            prefix = "FAKE_CUDA" if backend == "cuda" else "FAKE_ACL"
            monkeypatch.setenv(f"{prefix}_DEVICES", str(devices))
            monkeypatch.setenv(f"{prefix}_MEMORY", str(parse_size(capacity)))
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


@pytest.fixture
def start_controller():
    controllers = []

    def start(daemon, model, rank_sockets, **kwargs):
        controller = ControllerProcess(daemon, model, rank_sockets, **kwargs)
        controllers.append(controller)
        return controller

    yield start
    for controller in controllers:
        controller.close()


@pytest.fixture
def shared_daemon(backend):
    """Starts daemons whose socket directory every uid can reach (pytest's tmp_path
    is root-only), for tests with a second tenant."""
    directory = Path(tempfile.mkdtemp(prefix="sleepd-tenants-"))
    directory.chmod(0o755)
    started = []

    def start(*flags):
        daemon = Daemon(directory, backend, "--host-devices", "1", "--host-device-capacity", "64MiB", *flags)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.stop()
    subprocess.run(["rm", "-rf", str(directory)])
