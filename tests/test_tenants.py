"""A hostile local tenant (uid OTHER, no groups, no token) tries every attack a
real one used against a root daemon serving a root victim. Each is refused with
the status a caller branches on, and the victim's state and bytes do not change.
The attacker (tests/hostile_tenant.py) drops to its uid before it opens any socket."""

import contextlib
import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from sleepd.common.shown import MAX_LINE
from support import (HERE, OTHER, MiB, assert_refused, by_tag, ctl_as, metrics_text, second_tenant_unavailable,
                     sleeping, wait_for)

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


@contextlib.contextmanager
def holding(daemon, name: str, *args):
    """Runs an attack that holds what it took (connections) until the block ends; yields what it reports."""
    process = subprocess.Popen([sys.executable, os.path.join(HERE, "hostile_tenant.py"), str(OTHER), daemon.socket,
                                name, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        line = process.stdout.readline()
        assert line, process.communicate(timeout=60)[1]
        yield json.loads(line)
    finally:
        process.stdin.close()
        process.wait(timeout=60)


def start_root_daemon(argv) -> subprocess.CompletedProcess:
    """Root's sleepd on `argv`, expected to refuse to start (a daemon that starts runs into the timeout)."""
    return subprocess.run(argv, capture_output=True, text=True, timeout=30)


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
def start_victim(shared_daemon, start_engine):
    """Root's daemon (started with `flags`) and root's model, whose state and bytes every attack must leave alone."""
    def start(*flags):
        daemon = shared_daemon(*flags)
        engine = start_engine(daemon, "victim", regions=[("weights", 4 * MiB), ("kv_cache", 2 * MiB)])
        return daemon, engine

    return start


@pytest.fixture
def victim(start_victim):
    return start_victim()


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


def test_a_hand_back_finished_without_a_daemon_restart_is_refused_and_the_daemon_serves_on(victim):
    daemon, engine = victim
    status, report = daemon.status(), engine.report()
    answers = attack(daemon, "premature_hand_back", "mine")
    for when in ("unattached", "attached", "twice"):
        assert answers[when]["code"] == "FAILED_PRECONDITION", answers
        assert "not handing back" in answers[when]["details"], answers
    assert answers["bytes_kept"], answers
    assert daemon.process.poll() is None, daemon.log()
    assert_untouched(daemon, engine, status, report)


def test_a_tenant_cannot_tell_roots_model_from_one_that_does_not_exist_and_roots_model_is_untouched(
        victim, start_engine):
    daemon, engine = victim
    start_engine(daemon, "mine", regions=[("weights", 1 * MiB)], as_uid=OTHER)
    status, report = daemon.status(), engine.report()
    for command in (["sleep", "--model", "{}"], ["wake", "--model", "{}"], ["policy", "--model", "{}",
                    "--idle-seconds", "60"], ["swap", "--to", "mine", "--from", "{}"], ["swap", "--to", "{}"],
                    ["status", "--model", "{}"]):
        answers = {}
        for name in ("victim", "absent"):
            refused = ctl_as(daemon, OTHER, *[part.format(name) for part in command])
            assert refused.returncode != 0 and "[NOT_FOUND]" in refused.stderr, refused.stderr
            assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
            answers[name] = refused.stderr.replace(name, "NAME")
        assert answers["victim"] == answers["absent"], command
        assert "(attached: mine)" in answers["victim"], answers["victim"]
    assert_untouched(daemon, engine, status, report)

    # Only attaching tells that a name is taken, and not by whom.
    refused = subprocess.run([sys.executable, os.path.join(HERE, "engine_process.py"), "--socket", daemon.socket,
                              "--model", "victim", "--region", "weights:4096", "--as-uid", str(OTHER)],
                             capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert refused.returncode != 0 and "PERMISSION_DENIED" in refused.stderr, refused.stderr
    assert "belongs to another user" in refused.stderr and "uid 0" not in refused.stderr, refused.stderr
    assert_untouched(daemon, engine, status, report)


def test_a_name_another_uid_claimed_is_never_shared_nor_does_it_bring_the_configured_policy(shared_daemon,
                                                                                             start_engine, tmp_path):
    config = tmp_path / "sleepd.toml"
    config.write_text("[models.qwen]\npriority = 10\npinned = true\n\n[models.mine]\nowner = 65534\npriority = 4\n")
    config.chmod(0o644)
    daemon = shared_daemon("--config", str(config))
    start_engine(daemon, "qwen", regions=[("weights", 4 * MiB)], as_uid=OTHER)
    start_engine(daemon, "mine", regions=[("weights", 4 * MiB)], as_uid=OTHER)
    policies = {model["name"]: model["policy"] for model in daemon.status()["models"]}
    assert policies["qwen"].get("priority", 0) == 0 and not policies["qwen"].get("pinned")  # no owner: admins only
    assert policies["mine"]["priority"] == 4  # its configured owner claimed it
    with pytest.raises(AssertionError, match="exited at start"):  # root too: one model, one uid
        start_engine(daemon, "qwen", rank=1, regions=[("weights", 4 * MiB)])
    assert [r["rank"] for m in daemon.status()["models"] if m["name"] == "qwen" for r in m["ranks"]] == [0]


def test_persistent_regions_of_a_dead_rank_go_back_only_to_its_uid(shared_daemon, start_engine):
    daemon = shared_daemon()
    owner = start_engine(daemon, "store", regions=[("weights", 4 * MiB)], persist=True)
    weights = by_tag(owner.initial)["weights"]["sha256"]
    owner.kill()
    wait_for(lambda: daemon.status()["models"][0]["ranks"][0].get("orphaned"), what="the rank to be orphaned")
    with pytest.raises(AssertionError, match="exited at start"):
        start_engine(daemon, "store", as_uid=OTHER)
    heir = start_engine(daemon, "store")
    assert by_tag(heir.initial)["weights"]["sha256"] == weights


def test_a_tenant_can_neither_evict_another_nor_make_its_own_model_unevictable(victim, start_engine):
    daemon, engine = victim
    attacker = start_engine(daemon, "greedy", regions=[("weights", 4 * MiB)], as_uid=OTHER)
    status, report = daemon.status(), engine.report()
    refused = attacker.request("alloc", size=56 * MiB, tag="kv_cache", evict=True)
    assert refused["code"] == "RESOURCE_EXHAUSTED" and "victim" not in refused["error"], refused
    assert "other users' models" in refused["error"]
    level0 = ctl_as(daemon, OTHER, "policy", "--model", "greedy", "--eviction-level", "0")
    assert level0.returncode != 0 and "PERMISSION_DENIED" in level0.stderr
    assert [m for m in daemon.status()["models"] if m["name"] == "victim"] == \
        [m for m in status["models"] if m["name"] == "victim"]
    assert engine.report() == report
    assert {m["name"]: m["sleeping"] for m in daemon.status()["models"]}["victim"] is False


def test_an_eviction_refuses_rather_than_discard_what_the_full_host_pool_cannot_take(shared_daemon, start_engine):
    daemon = shared_daemon("--host-pool-budget", "32MiB")
    big = start_engine(daemon, "big", regions=[("weights", 30 * MiB)])
    daemon.ctl("sleep", "--model", "big")
    victim_engine = start_engine(daemon, "victim", regions=[("weights", 40 * MiB)], as_uid=OTHER)
    report = victim_engine.report()
    result = daemon.ctl("wake", "--model", "big", "--evict", check=False)
    assert result.returncode != 0 and "RESOURCE_EXHAUSTED" in result.stderr, result.stderr
    assert victim_engine.report() == report  # weights still mapped, every byte as it was
    assert {r["state"] for r in big.report()["regions"]} == {"offloaded"}


def crowded_by_a_tenant(shared_daemon, start_engine, start_controller):
    """Root's big model asleep, with no room to wake it: the first eviction candidates are the tenant's
    llama, whose second rank refuses to quiesce, and mistral, whose controller never answers; the
    last is root's small, whose room is enough."""
    daemon = shared_daemon("--eviction-answer-seconds", "2")
    big = start_engine(daemon, "big", regions=[("weights", 30 * MiB)])
    daemon.ctl("sleep", "--model", "big")
    llama = [start_engine(daemon, "llama", rank=rank, regions=[("weights", 6 * MiB)], seed=1 + rank, as_uid=OTHER,
                          sleep_hook="fail" if rank else "ok") for rank in (0, 1)]
    mistral = start_engine(daemon, "mistral", regions=[("weights", 12 * MiB)], seed=3, as_uid=OTHER,
                           needs_controller=True)
    assert start_controller(daemon, "mistral", [], on_sleep="hang", as_uid=OTHER).attached == {"attached": True}
    small = start_engine(daemon, "small", regions=[("weights", 12 * MiB)], seed=4)
    return daemon, big, [*llama, mistral], small


def test_an_eviction_skips_a_tenants_models_that_refuse_or_never_answer_and_evicts_the_next(
        shared_daemon, start_engine, start_controller):
    daemon, big, tenants, small = crowded_by_a_tenant(shared_daemon, start_engine, start_controller)
    started = time.monotonic()
    woke = daemon.ctl("wake", "--model", "big", "--evict")
    assert time.monotonic() - started < 30  # about the bound (2 s), not the controller timeout (300 s)
    assert "evicted small" in woke.stdout
    assert sleeping(daemon) == {"big": False, "llama": False, "mistral": False, "small": True}
    assert big.report()["regions"][0]["sha256"] == big.initial["regions"][0]["sha256"]
    for engine in tenants:  # awake, every byte as it was
        assert engine.report()["regions"] == engine.initial["regions"]
    assert tenants[0].report()["hooks"] == {"sleep": 1, "wake": 1}  # llama's rank that paused was resumed


def test_an_eviction_that_skipped_every_candidate_names_each_and_why_and_changes_nothing(
        shared_daemon, start_engine, start_controller):
    daemon, _, tenants, _ = crowded_by_a_tenant(shared_daemon, start_engine, start_controller)
    daemon.ctl("policy", "--model", "small", "--pinned", "yes")
    before = daemon.status()
    started = time.monotonic()
    result = daemon.ctl("wake", "--model", "big", "--evict", check=False)
    assert time.monotonic() - started < 30
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1 and "[RESOURCE_EXHAUSTED]" in lines[0], result.stderr
    assert "skipped llama (" in lines[0] and "llama rank 1" in lines[0] and "refused to pause" in lines[0], lines[0]
    assert "mistral (" in lines[0] and "did not answer within 2 s (eviction_answer_seconds)" in lines[0], lines[0]
    assert daemon.status() == before
    for engine in tenants:
        assert engine.report()["regions"] == engine.initial["regions"]


def test_a_tenants_rank_that_answers_after_an_eviction_gave_up_on_it_is_resumed_and_its_model_stays_awake(
        shared_daemon, start_engine):
    daemon = shared_daemon("--eviction-answer-seconds", "1")
    big = start_engine(daemon, "big", regions=[("weights", 30 * MiB)])
    daemon.ctl("sleep", "--model", "big")
    slow = start_engine(daemon, "slow", regions=[("weights", 20 * MiB)], seed=1, as_uid=OTHER, sleep_hook="slow")
    small = start_engine(daemon, "small", regions=[("weights", 20 * MiB)], seed=2)
    assert "evicted small" in daemon.ctl("wake", "--model", "big", "--evict").stdout
    # Its quiesce finishes seconds after the eviction went on, and the resume queued behind it follows.
    wait_for(lambda: slow.report()["hooks"] == {"sleep": 1, "wake": 1}, timeout=30, what="the slow rank's resume")
    assert slow.report()["regions"] == slow.initial["regions"]
    assert sleeping(daemon) == {"big": False, "slow": False, "small": True}
    # Nothing of the abandoned sleep is left held: root sleeps and wakes the model as any other.
    daemon.ctl("sleep", "--model", "slow")
    daemon.ctl("wake", "--model", "slow")
    assert slow.report()["regions"] == slow.initial["regions"]
    assert big.report()["regions"][0]["sha256"] == big.initial["regions"][0]["sha256"]
    assert small.report()["regions"][0]["state"] == "offloaded"


def test_a_tenant_is_held_to_its_quota_and_root_is_not(shared_daemon, start_engine, tmp_path):
    config = tmp_path / "sleepd.toml"
    config.write_text('[quotas.default]\ndevice = "8MiB"\nhost_pool = "2MiB"\n')
    config.chmod(0o644)
    daemon = shared_daemon("--config", str(config))
    tenant = start_engine(daemon, "tenant", regions=[("weights", 4 * MiB)], as_uid=OTHER)
    refused = tenant.request("alloc", size=8 * MiB, tag="kv_cache")
    assert refused["code"] == "RESOURCE_EXHAUSTED" and "quota is 8.0 MiB ([quotas.default])" in refused["error"]
    slept = ctl_as(daemon, OTHER, "sleep", "--model", "tenant")
    assert slept.returncode != 0 and "host pool quota is 2.0 MiB" in slept.stderr
    assert tenant.report()["regions"] == tenant.initial["regions"]
    start_engine(daemon, "admins", regions=[("weights", 16 * MiB)])  # the default binds no admin


def test_a_tenants_stalled_engine_delays_only_its_own_model(shared_daemon, start_engine):
    """The tenant's ranks hold their model's lock through a sleep that waits on them, with
    sessions ending behind it; root's status, attach and wake on the same device go on."""
    daemon = shared_daemon("--hook-timeout", "60", "--device-step-timeout", "2")
    victim_engine = start_engine(daemon, "victim", regions=[("weights", 4 * MiB)])
    daemon.ctl("sleep", "--model", "victim")
    with holding(daemon, "stall_device", "stalled", "11") as ready:
        assert ready == {"ready": True}
        started = time.monotonic()
        assert "stalled" in {m["name"] for m in daemon.status()["models"]}
        newcomer = start_engine(daemon, "newcomer", regions=[("weights", MiB)])
        daemon.ctl("wake", "--model", "victim")
        took = time.monotonic() - started
        # Each waits out at most a device step (2 s) and its rollback, never the 60 s hook timeout.
        assert took < 20, f"root's status, attach and wake took {took:.0f} s behind the stalled tenant"
        assert victim_engine.report()["regions"] == victim_engine.initial["regions"]
        assert newcomer.report()["regions"] == newcomer.initial["regions"]
    assert daemon.process.poll() is None


def test_a_tenants_models_allocating_at_once_share_one_quota(shared_daemon, tmp_path):
    config = tmp_path / "sleepd.toml"
    config.write_text('[quotas.default]\ndevice = "64MiB"\n')
    config.chmod(0o644)
    daemon = shared_daemon("--config", str(config), "--host-device-capacity", "512MiB")
    answers = attack(daemon, "quota_race", "4", str(60 * MiB))
    assert answers == {"granted": 1, "refused": ["RESOURCE_EXHAUSTED"] * 3}, answers


def test_a_tenant_sees_only_its_own_models(victim, start_engine):
    daemon, engine = victim
    start_engine(daemon, "theirs", regions=[("weights", 4 * MiB)], as_uid=OTHER)
    seen = json.loads(ctl_as(daemon, OTHER, "--json", "status").stdout)
    assert [model["name"] for model in seen["models"]] == ["theirs"]
    hidden = ctl_as(daemon, OTHER, "status", "--model", "victim")
    assert hidden.returncode != 0 and "NOT_FOUND" in hidden.stderr

    watcher = subprocess.Popen([sys.executable, os.path.join(HERE, "hostile_tenant.py"), str(OTHER), daemon.socket,
                                "events", "6"], stdout=subprocess.PIPE, text=True)
    assert watcher.stdout.readline().strip() == "ready"
    daemon.ctl("sleep", "--model", "victim")
    daemon.ctl("wake", "--model", "victim")
    assert ctl_as(daemon, OTHER, "sleep", "--model", "theirs").returncode == 0
    seen = json.loads(watcher.stdout.read())
    watcher.wait()
    assert {event["model"] for event in seen["events"]} == {"theirs"}
    assert daemon.ctl("--json", "status").stdout.count('"victim"') >= 1  # root sees every model
def test_a_descriptor_flood_stops_at_the_daemons_limit_and_root_attaches_once_it_ends(victim, start_engine):
    daemon, engine = victim
    report = engine.report()
    # Room for a few dozen connections more than the daemon holds now.
    limit = max(int(fd) for fd in os.listdir(f"/proc/{daemon.pid}/fd")) + 48
    resource.prlimit(daemon.pid, resource.RLIMIT_NOFILE, (limit, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

    with holding(daemon, "flood", "1000") as flood:
        assert flood["stopped"], f"the daemon took all {flood['opened']} connections: {flood}"
        assert flood["welcomed"] > 0 and flood["waiting"] > 0, flood  # then it stopped accepting, and waited
        assert daemon.process.poll() is None

    late = start_engine(daemon, "late", regions=[("weights", 1 * MiB)])
    assert by_tag(late.report())["weights"]["state"] == "mapped"
    assert engine.report() == report
    log = daemon.log()
    assert log.count("cannot accept connections (EMFILE") == 1, log
    assert "accepting again" in log


def test_one_uid_holding_all_its_connections_leaves_root_room_to_attach(start_victim, start_engine):
    cap = 24  # fd_socket.connections_per_uid, configured below its default of 256
    daemon, engine = start_victim("--fd-socket-connections-per-uid", str(cap))
    status, report = daemon.status(), engine.report()

    with holding(daemon, "flood", str(cap + 40)) as flood:
        assert flood["welcomed"] == cap, flood
        assert flood["refused"] == {"RESOURCE_EXHAUSTED": 40}, flood
        late = start_engine(daemon, "late", regions=[("weights", 1 * MiB)])
        assert by_tag(late.report())["weights"]["state"] == "mapped"
        assert engine.report() == report

    late.close()
    assert_untouched(daemon, engine, status, report)
    refusals = [line for line in daemon.log().splitlines() if "refused a connection" in line]
    assert len(refusals) == 1 and f"uid {OTHER} has {cap} connections open" in refusals[0], refusals


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
    wait_for(lambda: [(m["name"], [r.get("orphaned", False) for r in m["ranks"]]) for m in again.status()["models"]]
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


def test_a_client_sends_nothing_to_a_daemon_another_user_runs(tmp_path):
    fake = subprocess.Popen([sys.executable, os.path.join(HERE, "hostile_tenant.py"), str(OTHER), "-", "fake_daemon",
                             "5"], stdout=subprocess.PIPE, text=True)
    line = fake.stdout.readline().split()
    assert line[0] == "ready"
    engine = subprocess.run([sys.executable, os.path.join(HERE, "engine_process.py"), "--socket", line[1],
                             "--model", "qwen", "--region", "weights:4096"], capture_output=True, text=True,
                            timeout=60, stdin=subprocess.DEVNULL)
    assert engine.returncode != 0 and "PERMISSION_DENIED" in engine.stderr and "uid 65534" in engine.stderr
    assert json.loads(fake.stdout.read()) == {"accepted": 1, "received": 0}
    fake.wait(timeout=30)


def test_without_a_runtime_directory_the_client_never_looks_under_tmp(monkeypatch):
    from sleepd.common import paths

    monkeypatch.delenv("SLEEPD_SOCKET", raising=False)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setattr(paths, "SYSTEM_SOCKET", "/proc/sleepd/sleepd.sock")  # not even root can create it
    assert paths.client_socket(None) == "/proc/sleepd/sleepd.sock"
    path, note = paths.daemon_socket(None)
    assert not path.startswith("/tmp") and "XDG_RUNTIME_DIR is not set" in note
def health_check(socket_path: str) -> str:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"unix:{socket_path}") as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def promptly(action, within: float = 5.0):
    """`action`'s result, once it has answered within `within` seconds."""
    start = time.monotonic()
    result = action()
    assert time.monotonic() - start < within, f"{action} took {time.monotonic() - start:.1f} s"
    return result


def test_a_flood_of_streams_is_refused_past_its_caps_and_starves_no_one(start_victim, start_engine):
    # The [grpc] caps, configured below their defaults (128, 16, 16, 4).
    caps = {"calls_per_uid": 40, "event_streams_per_uid": 6, "anonymous_calls": 10, "anonymous_event_streams": 3}
    daemon, engine = start_victim(*[part for key, cap in caps.items()
                                    for part in (f"--grpc-{key.replace('_', '-')}", str(cap))])
    worker = start_engine(daemon, "worker", regions=[("weights", 2 * MiB)])
    status, report = daemon.status("victim"), engine.report()
    # Events streams without a token and with its own; then, of each, calls that never send their request.
    asked = {"anonymous_events": 30, "own_events": 20, "anonymous_silent": 30, "own_silent": 60}
    flood = subprocess.Popen([sys.executable, os.path.join(HERE, "hostile_tenant.py"), str(OTHER), daemon.socket,
                              "stream_flood", *map(str, asked.values())], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        held = json.loads(flood.stdout.readline() or "null")
        assert held is not None, flood.communicate(timeout=30)[1]
        # While the flood holds all it was let in: root, root's engines and any other uid are answered at once.
        promptly(daemon.status)
        assert promptly(lambda: health_check(daemon.socket)) == "SERVING"  # a probe, with no token
        assert promptly(lambda: worker.request("sleep", level=1)) == {"sleeping": True}
        assert promptly(lambda: worker.request("wake")) == {"sleeping": False}
        for late in [promptly(lambda: start_engine(daemon, "late", regions=[("weights", MiB)])),
                     promptly(lambda: start_engine(daemon, "neighbour", regions=[("weights", MiB)], as_uid=OTHER - 1))]:
            assert promptly(lambda: late.request("sleep", level=1)) == {"sleeping": True}
            assert promptly(lambda: late.request("wake")) == {"sleeping": False}
            late.close()
        flood.stdin.write("done\n")
        flood.stdin.flush()
        out, err = flood.communicate(timeout=120)
    finally:
        if flood.poll() is None:
            flood.kill()
            flood.wait()
    assert flood.returncode == 0, err
    let_in = {"anonymous_events": caps["anonymous_event_streams"],
              "anonymous_silent": caps["anonymous_calls"] - caps["anonymous_event_streams"],
              "own_events": caps["event_streams_per_uid"],
              "own_silent": caps["calls_per_uid"] - caps["event_streams_per_uid"]}
    assert {kind: tally["open"] for kind, tally in held.items()} == let_in, held
    assert all(tally["refused"] == {"RESOURCE_EXHAUSTED": asked[kind] - let_in[kind]}
               for kind, tally in held.items()), held
    assert held["own_events"]["details"] == [
        f"uid {OTHER} has {caps['event_streams_per_uid']} Events streams open, the most a non-admin may; close some"]
    assert held["anonymous_events"]["details"][0].startswith(
        f"callers without a token have {caps['anonymous_event_streams']} Events streams open"), held
    # Once closed, everything the flood held was given back: a second flood gets exactly as far.
    assert json.loads(out.splitlines()[-1]) == held
    wait_for(lambda: daemon.status("victim") == status, what="the victim's status as before")
    assert engine.report() == report


def test_a_peers_groups_come_from_its_connection_not_from_proc():
    """SO_PEERGROUPS: the groups the peer had when it connected, which a later change (or a
    reused pid) cannot alter."""
    import socket

    from sleepd.daemon.auth import Peer

    def groups_now(pid):
        with open(f"/proc/{pid}/status") as status:
            return [line.split()[1:] for line in status if line.startswith("Groups:")][0]

    path = str(Path(tempfile.mkdtemp()) / "s")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(1)
    child = subprocess.Popen([sys.executable, "-c",
                              "import os, socket, sys, time; os.setgroups([4242, 4343]); "
                              "s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); "
                              "os.setgroups([]); time.sleep(30)", path])
    try:
        connection, _ = listener.accept()
        wait_for(lambda: groups_now(child.pid) == [], what="the peer to drop its groups after connecting")
        peer = Peer.of_connection(connection)
        assert peer.pid == child.pid and {4242, 4343} <= peer.groups
        connection.close()
    finally:
        child.kill()
        child.wait()
        listener.close()


def test_a_tenants_throwaway_models_leave_no_series_behind_once_forgotten(victim):
    daemon, engine = victim
    status, report = daemon.status(), engine.report()
    before = metrics_text(daemon)
    churned = attack(daemon, "churn_models", "40")["names"]
    after = metrics_text(daemon)
    assert not [name for name in churned if name in after], after
    assert len(after) < len(before) + 2048, f"/metrics grew from {len(before)} to {len(after)} bytes"
    assert 'model="victim"' in after
    assert_untouched(daemon, engine, status, report)


def test_a_tenant_past_its_model_and_region_caps_is_refused_and_root_is_not(shared_daemon, start_engine, tmp_path):
    config = tmp_path / "sleepd.toml"
    config.write_text("[quotas.default]\nmodels = 2\nregions = 3\n")
    config.chmod(0o644)
    daemon = shared_daemon("--config", str(config))
    engine = start_engine(daemon, "victim", regions=[("weights", 4 * MiB), ("kv_cache", 2 * MiB)])
    status, report = daemon.status(), engine.report()
    answers = attack(daemon, "exceed_caps", "2", "3")
    assert answers["attached"] == 2 and answers["attach"]["code"] == "RESOURCE_EXHAUSTED", answers
    assert "attach tenant-2: uid 65534 may own 2 models ([quotas.default] models)" in answers["attach"]["details"]
    assert answers["allocated"] == 3 and answers["alloc"]["code"] == "RESOURCE_EXHAUSTED", answers
    assert "may hold 3 regions ([quotas.default] regions) and hold 3" in answers["alloc"]["details"]
    assert_untouched(daemon, engine, status, report)
    for name in ("root-a", "root-b"):  # the default binds no admin
        start_engine(daemon, name, regions=[("weights", MiB)] * 4)


def test_idle_and_half_sent_metrics_connections_cost_the_daemon_no_threads_and_scrapes_go_on(victim):
    daemon, engine = victim
    status, report = daemon.status(), engine.report()
    process = psutil.Process(daemon.pid)
    threads = process.num_threads()
    with holding(daemon, "hold_metrics_connections", daemon.info["metrics_address"], "400") as held:
        assert held["opened"] == 400
        time.sleep(1)
        assert process.num_threads() <= threads + 8, f"{process.num_threads()} threads, {threads} before"
    started = time.monotonic()
    assert 'model="victim"' in metrics_text(daemon)
    assert time.monotonic() - started < 5
    assert_untouched(daemon, engine, status, report)


def test_metrics_show_a_tenant_no_models_names_or_tags_and_the_operators_scraper_all_of_them(victim, start_engine):
    daemon, engine = victim
    start_engine(daemon, "theirs", regions=[("secret_tag", MiB)], as_uid=OTHER)
    daemon.ctl("sleep", "--model", "victim")
    daemon.ctl("wake", "--model", "victim")
    answers = attack(daemon, "read_metrics", daemon.info["metrics_address"])
    seen = answers["anonymous"]
    assert seen["status"] == 200 and "sleepd_device_used_bytes" in seen["text"] and "sleepd_sessions" in seen["text"]
    for private in ("victim", "theirs", "weights", "kv_cache", "secret_tag", "model="):
        assert private not in seen["text"], private
    assert answers["guessed"]["status"] == 401 and "wrong bearer token" in answers["guessed"]["text"]
    operators = metrics_text(daemon)
    for name in ('model="victim"', 'model="theirs"', 'tag="secret_tag"', "sleepd_wake_duration_seconds_count"):
        assert name in operators, name


def test_a_tenants_error_text_reaches_roots_terminal_and_the_log_escaped_bounded_and_rate_limited(victim,
                                                                                                  start_engine):
    """The tenant's sleep hook fails with a cleared screen, forged sleepctl and log lines (and from its
    second failure on, 3 MiB more) when root sleeps its model, then four times a second by its idle policy."""
    daemon, engine = victim
    hostile = start_engine(daemon, "mine", regions=[("weights", 4 * MiB)], sleep_hook="hostile_error", as_uid=OTHER)
    status, report = daemon.status("victim"), engine.report()
    logged_before = os.path.getsize(daemon.log_path)

    for bulk in (False, True):
        refused = daemon.ctl("sleep", "--model", "mine", check=False)
        assert refused.returncode == 1 and refused.stdout == "", refused
        assert refused.stderr.count("\n") == 1 and len(refused.stderr) < MAX_LINE + 100, refused.stderr[:3000]
        assert not set(refused.stderr) & {"\x1b", "\r", "\u202e"}, refused.stderr
        assert "\\x1b[2J\\x1b[H\\rwoke victim" in refused.stderr, refused.stderr
        assert ("more characters)" in refused.stderr) is bulk, refused.stderr

    assert ctl_as(daemon, OTHER, "policy", "--model", "mine", "--idle-seconds", "0.1").returncode == 0
    wait_for(lambda: hostile.report()["hooks"]["sleep"] >= 12, what="a dozen idle sleeps of the tenant's model")
    assert ctl_as(daemon, OTHER, "policy", "--model", "mine", "--idle-seconds", "0").returncode == 0
    with open(daemon.log_path, encoding="utf-8") as log:
        log.seek(logged_before)
        grown = log.read()
    assert len(grown) < 16384, grown[:3000]
    assert not set(grown) & {"\x1b", "\r", "\u202e"}
    lines = grown.splitlines()
    assert not [line for line in lines if line.startswith(("woke victim", "2030-01-01"))], grown
    assert len([line for line in lines if "idle sleep of mine failed" in line]) == 1, grown
    assert {m["name"]: m["sleeping"] for m in daemon.status()["models"]} == {"victim": False, "mine": False}
    assert daemon.status("victim") == status
    assert engine.report() == report


def test_names_and_tags_no_rule_allows_are_refused_on_every_message_that_carries_one(victim):
    daemon, engine = victim
    status, report = daemon.status("victim"), engine.report()
    answers = attack(daemon, "bad_names", "mine")
    assert len(answers) == 40, answers  # 5 messages for each of 4 tags, 5 for each of 4 names
    for what, answered in answers.items():
        assert answered["code"] == "INVALID_ARGUMENT", (what, answered)
        assert answered["details"].isprintable() and len(answered["details"]) < 500, (what, answered)
    models = daemon.status()["models"]
    assert [model["name"] for model in models] == ["victim"]  # the tenant's own went with its attacker
    assert daemon.status("victim") == status
    assert engine.report() == report


def test_memory_the_daemon_let_go_of_is_gone_though_a_tenant_kept_its_descriptor(victim):
    daemon, engine = victim
    status, report = daemon.status(), engine.report()
    answers = attack(daemon, "keep_freed_memory", "12", str(40 * MiB))  # 480 MiB through a 64 MiB device
    left = answers["freed"] + [answers["slept"]]
    assert len(left) == 13
    for kept in left:  # the kernel's view: no pages, and the descriptor cannot grow the memory again
        assert kept == {"size": 0, "blocks": 0, "regrown": "Operation not permitted"}, answers
    assert answers["woke_intact"]
    assert daemon.status()["devices"] == status["devices"]
    assert_untouched(daemon, engine, status, report)


KEY = "victim's weights: revision abc123, bfloat16, tp 1, rank 0"


def test_a_tenant_neither_sees_nor_joins_nor_drops_another_uids_weight_set(victim, start_engine):
    daemon, engine = victim
    set_id = engine.request("commit", key=KEY, tags=["weights"])["weight_set"]
    weights = by_tag(engine.initial)["weights"]["sha256"]
    tenant = start_engine(daemon, "theirs", regions=[("kv_cache", MiB)], as_uid=OTHER)
    assert tenant.request("join", key=KEY) == {"found": False}  # as if there were none: nothing to learn
    assert json.loads(ctl_as(daemon, OTHER, "--json", "sets").stdout).get("weightSets", []) == []
    dropped = ctl_as(daemon, OTHER, "drop-set", "--set", set_id)
    assert dropped.returncode == 1 and "NOT_FOUND" in dropped.stderr
    assert by_tag(engine.report())["weights"]["sha256"] == weights
    assert set_id in daemon.ctl("sets").stdout


def test_an_owner_shares_weight_sets_with_a_uid_the_operator_names(shared_daemon, start_engine):
    daemon = shared_daemon("--weight-sets-shared-with", f"0:{OTHER}")
    engine = start_engine(daemon, "victim", regions=[("weights", 4 * MiB), ("kv_cache", 2 * MiB)])
    set_id = engine.request("commit", key=KEY, tags=["weights"])["weight_set"]
    tenant = start_engine(daemon, "theirs", regions=[("kv_cache", MiB)], as_uid=OTHER)
    joined = tenant.request("join", key=KEY)
    assert joined["found"] and joined["weight_set"] == set_id
    assert by_tag(tenant.report())["weights"]["sha256"] == by_tag(engine.initial)["weights"]["sha256"]
    # Still root's: counted against root, listed to the tenant only as far as it joined it.
    assert json.loads(ctl_as(daemon, OTHER, "--json", "sets").stdout).get("weightSets", []) == []
    assert "theirs rank 0" in daemon.ctl("sets").stdout
    index = [r["tag"] for r in tenant.report()["regions"]].index("weights")
    tenant.send("poke", index=index)
    assert tenant.process.wait(timeout=30) == -signal.SIGSEGV, "the tenant maps root's weights read-only"
    assert by_tag(engine.report())["weights"]["sha256"] == by_tag(engine.initial)["weights"]["sha256"]


def test_a_tenants_kept_weight_sets_give_way_before_its_own_allocation_is_refused(shared_daemon, start_engine,
                                                                                   tmp_path):
    config = tmp_path / "sleepd.toml"
    config.write_text('[quotas.default]\ndevice = "8MiB"\n')
    config.chmod(0o644)
    daemon = shared_daemon("--config", str(config))
    loader = start_engine(daemon, "loader", regions=[("weights", 4 * MiB)], as_uid=OTHER)
    loader.request("commit", key=KEY, tags=["weights"])
    loader.close()
    wait_for(lambda: "none: kept" in daemon.ctl("sets").stdout, what="the tenant's set kept")
    # 4 MiB kept + 6 MiB asked > its 8 MiB: its kept set goes to the host pool instead of a refusal.
    server = start_engine(daemon, "server", regions=[("kv_cache", 6 * MiB)], as_uid=OTHER)
    assert server.report()["regions"][0]["state"] == "mapped"
    assert json.loads(daemon.ctl("--json", "sets").stdout)["weightSets"][0]["where"] == "host"
