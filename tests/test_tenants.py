"""A hostile local tenant (uid OTHER, no groups, no token) tries every attack a
real one used against a root daemon serving a root victim. Each is refused with
the status a caller branches on, and the victim's state and bytes do not change.
The attacker (tests/hostile_tenant.py) drops to its uid before it opens any socket."""

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from support import HERE, OTHER, MiB, by_tag, second_tenant_unavailable, wait_for

pytestmark = pytest.mark.skipif(second_tenant_unavailable() is not None, reason=str(second_tenant_unavailable()))


@pytest.fixture
def backend():
    """Host only: the CUDA double lives in a directory only root may read."""
    return "host"


def attack(daemon, name: str, *args) -> dict:
    """Runs one attack as uid OTHER on `daemon` (None: before root's daemon is up); returns
    what the daemon answered it, or what it planted."""
    result = subprocess.run([sys.executable, os.path.join(HERE, "hostile_tenant.py"), str(OTHER),
                             daemon.socket if daemon else "-", name, *args], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def start_root_daemon(argv) -> subprocess.CompletedProcess:
    """Root's sleepd on `argv`, expected to refuse to start (a daemon that starts runs into the timeout)."""
    return subprocess.run(argv, capture_output=True, text=True, timeout=30)


def assert_refused(result, path: str, found: str, advice: str = "remove it") -> None:
    """Exit status 78 and one line that names the path, what was found and what to do; nothing else went wrong."""
    assert result.returncode == 78, result.stderr
    lines = [line for line in result.stderr.splitlines() if "CRITICAL" in line]
    assert len(lines) == 1, result.stderr
    for what in (path, found, advice):
        assert what in lines[0], lines[0]
    assert "Traceback" not in result.stderr


def fingerprint(path) -> tuple:
    """A file's bytes, size and allocated blocks (a punched hole shows in the blocks)."""
    info = os.stat(path)
    with open(path, "rb") as file:
        return hashlib.sha256(file.read()).hexdigest(), info.st_size, info.st_blocks


@pytest.fixture
def root_only_file(tmp_path):
    """A file only root may read or write (pytest's tmp_path is root's alone)."""
    path = tmp_path / "root-only"
    path.write_bytes(os.urandom(4 * MiB))
    path.chmod(0o600)
    return path


@pytest.fixture
def world_writable():
    """A directory like /tmp: every uid may create in it, each may remove only its own."""
    directory = Path(tempfile.mkdtemp(prefix="sleepd-world-"))
    directory.chmod(0o1777)
    yield directory
    subprocess.run(["rm", "-rf", str(directory)])


@pytest.fixture
def victim(shared_daemon, start_engine):
    """Root's daemon and root's model, whose state and bytes every attack must leave alone."""
    daemon = shared_daemon()
    engine = start_engine(daemon, "victim", regions=[("weights", 4 * MiB), ("kv_cache", 2 * MiB)])
    return daemon, engine


def assert_untouched(daemon, engine, status, report):
    assert daemon.status() == status
    assert engine.report() == report


def test_a_relay_from_an_abstract_address_is_no_admin(victim):
    daemon, engine = victim
    status, report = daemon.status(), engine.report()
    answers = attack(daemon, "relay", "victim")
    assert answers["sleep"]["code"] == "UNAUTHENTICATED", answers
    assert answers["policy"]["code"] == "UNAUTHENTICATED", answers
    assert_untouched(daemon, engine, status, report)


def test_a_pool_directory_planted_while_the_daemon_was_down_stops_it_and_nothing_leaks(victim, shared_daemon,
                                                                                     root_only_file):
    daemon, engine = victim
    before = engine.report()
    protected = fingerprint(root_only_file)
    daemon.stop()  # the engine keeps its memory mapped; stop() also wipes the pool, as a reboot wipes /dev/shm
    planted = attack(daemon, "plant_pool", daemon.pool_dir, str(root_only_file))
    assert planted["slab-0001"] == f"symlink to {root_only_file}"

    refused = start_root_daemon(daemon.process.args)  # root's daemon, restarted on the same paths
    assert_refused(refused, daemon.pool_dir, f"owned by uid {OTHER}")
    assert fingerprint(root_only_file) == protected  # never written into, no hole punched
    assert attack(daemon, "look_in", daemon.pool_dir) == planted  # nothing of the victim's landed there

    # The operator does what the line says; the victim attaches again with every byte.
    subprocess.run(["rm", "-rf", daemon.pool_dir], check=True)
    again = shared_daemon()
    wait_for(lambda: [(m["name"], [r.get("detached", False) for r in m["ranks"]]) for m in again.status()["models"]]
             == [("victim", [False])], timeout=30, what="the victim to attach to the restarted daemon")
    assert engine.report()["regions"] == before["regions"]
    # Its weights offloaded into the pool root's daemon made: the attacker cannot even list it.
    again.ctl("sleep", "--model", "victim", "--level", "1")
    assert attack(again, "look_in", again.pool_dir) == {"error": "Permission denied"}
    again.ctl("wake", "--model", "victim")
    assert by_tag(engine.report())["weights"]["sha256"] == by_tag(before)["weights"]["sha256"]


# Each made first, by the other user, in a directory like /tmp; the last is the shape of the
# per-user fallback socket /tmp/sleepd-UID/sleepd/sleepd.sock.
@pytest.mark.parametrize("socket, made_first, advice", [
    ("sleepd/sleepd.sock", "state", "remove it"),
    ("sleepd/sleepd.sock", "sleepd", "remove it"),
    ("sleepd-0/sleepd/sleepd.sock", "sleepd-0", "choose a path that only root"),
], ids=["state directory", "socket directory", "above the socket directory"])
def test_a_directory_another_user_made_first_stops_the_daemon(socket, made_first, advice, world_writable):
    taken = str(world_writable / made_first)
    attack(None, "make_directory", taken)
    pool_dir = f"/dev/shm/sleepd-tenants-{os.getpid()}-{world_writable.name}"
    try:
        refused = start_root_daemon([sys.executable, "-m", "sleepd.daemon.main", "--backend", "host",
                                     "--socket", str(world_writable / socket), "--state-dir",
                                     str(world_writable / "state"), "--host-pool-dir", pool_dir,
                                     "--metrics-address", "off", "--host-device-capacity", "64MiB"])
    finally:
        subprocess.run(["rm", "-rf", pool_dir])
    assert_refused(refused, taken, f"owned by uid {OTHER}", advice)
    assert attack(None, "look_in", taken) == {}  # nothing of root's daemon went in there


def test_a_state_file_that_is_a_symlink_stops_the_daemon(shared_daemon, root_only_file):
    """Only root can put anything in root's state directory; a symlink there is refused all
    the same, as it would be had another user got it there."""
    daemon = shared_daemon()
    daemon.stop()
    state_file = Path(daemon.state_dir) / "state.json"
    state_file.unlink(missing_ok=True)  # written only once there was something to record
    state_file.symlink_to(root_only_file)
    protected = fingerprint(root_only_file)
    refused = start_root_daemon(daemon.process.args)
    assert_refused(refused, str(state_file), "is a symlink")
    assert fingerprint(root_only_file) == protected
