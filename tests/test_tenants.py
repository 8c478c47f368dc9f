"""A hostile local tenant (uid OTHER, no groups, no token) tries every attack a
real one used against a root daemon serving a root victim. Each is refused with
the status a caller branches on, and the victim's state and bytes do not change.
The attacker (tests/hostile_tenant.py) drops to its uid before it opens any socket."""

import contextlib
import json
import os
import resource
import subprocess
import sys

import pytest

from sleepd.daemon.handles import MAX_CONNECTIONS_PER_UID
from support import HERE, OTHER, MiB, by_tag, second_tenant_unavailable

pytestmark = pytest.mark.skipif(second_tenant_unavailable() is not None, reason=str(second_tenant_unavailable()))


@pytest.fixture
def backend():
    """Host only: the CUDA double lives in a directory only root may read."""
    return "host"


def attack(daemon, name: str, *args) -> dict:
    """Runs one attack as uid OTHER; returns what the daemon answered it."""
    result = subprocess.run([sys.executable, os.path.join(HERE, "hostile_tenant.py"), str(OTHER), daemon.socket,
                             name, *args], capture_output=True, text=True, timeout=120)
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


def test_one_uid_holding_all_its_connections_leaves_root_room_to_attach(victim, start_engine):
    daemon, engine = victim
    status, report = daemon.status(), engine.report()

    with holding(daemon, "flood", str(MAX_CONNECTIONS_PER_UID + 40)) as flood:
        assert flood["welcomed"] == MAX_CONNECTIONS_PER_UID, flood
        assert flood["refused"] == {"RESOURCE_EXHAUSTED": 40}, flood
        late = start_engine(daemon, "late", regions=[("weights", 1 * MiB)])
        assert by_tag(late.report())["weights"]["state"] == "mapped"
        assert engine.report() == report

    late.close()
    assert_untouched(daemon, engine, status, report)
    refusals = [line for line in daemon.log().splitlines() if "refused a connection" in line]
    assert len(refusals) == 1 and f"uid {OTHER} has {MAX_CONNECTIONS_PER_UID} connections open" in refusals[0], refusals
