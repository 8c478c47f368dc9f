"""A hostile local tenant (uid OTHER, no groups, no token) tries every attack a
real one used against a root daemon serving a root victim. Each is refused with
the status a caller branches on, and the victim's state and bytes do not change.
The attacker (tests/hostile_tenant.py) drops to its uid before it opens any socket."""

import json
import os
import subprocess
import sys

import pytest

from support import HERE, OTHER, MiB, second_tenant_unavailable

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
