"""A hostile local tenant (uid OTHER, no groups, no token) tries every attack a
real one used against a root daemon serving a root victim. Each is refused with
the status a caller branches on, and the victim's state and bytes do not change.
The attacker (tests/hostile_tenant.py) drops to its uid before it opens any socket."""

import json
import os
import subprocess
import sys
import time

import pytest

from sleepd.daemon import admission
from support import HERE, OTHER, MiB, second_tenant_unavailable, wait_for

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


def promptly(action, within: float = 5.0):
    """`action`'s result, once it has answered within `within` seconds."""
    start = time.monotonic()
    result = action()
    assert time.monotonic() - start < within, f"{action} took {time.monotonic() - start:.1f} s"
    return result


def test_a_flood_of_streams_is_refused_past_its_caps_and_starves_no_one(victim, start_engine):
    daemon, engine = victim
    worker = start_engine(daemon, "worker", regions=[("weights", 2 * MiB)])
    status, report = daemon.status("victim"), engine.report()
    # Events streams without a token and with its own; then, of each, calls that never send their request.
    asked = {"anonymous_events": 300, "own_events": 40, "anonymous_silent": 150, "own_silent": 150}
    flood = subprocess.Popen([sys.executable, os.path.join(HERE, "hostile_tenant.py"), str(OTHER), daemon.socket,
                              "stream_flood", *map(str, asked.values())], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        held = json.loads(flood.stdout.readline() or "null")
        assert held is not None, flood.communicate(timeout=30)[1]
        # While the flood holds all it was let in: root, root's engines and any other uid are answered at once.
        promptly(daemon.status)
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
    let_in = {"anonymous_events": admission.ANONYMOUS_EVENT_STREAMS,
              "anonymous_silent": admission.ANONYMOUS_CALLS - admission.ANONYMOUS_EVENT_STREAMS,
              "own_events": admission.EVENT_STREAMS_PER_UID,
              "own_silent": admission.CALLS_PER_UID - admission.EVENT_STREAMS_PER_UID}
    assert {kind: tally["open"] for kind, tally in held.items()} == let_in, held
    assert all(tally["refused"] == {"RESOURCE_EXHAUSTED": asked[kind] - let_in[kind]}
               for kind, tally in held.items()), held
    assert held["own_events"]["details"] == [
        f"uid {OTHER} has {admission.EVENT_STREAMS_PER_UID} Events streams open, the most a non-admin may; close some"]
    assert held["anonymous_events"]["details"][0].startswith(
        f"callers without a token have {admission.ANONYMOUS_EVENT_STREAMS} Events streams open"), held
    # Once closed, everything the flood held was given back: a second flood gets exactly as far.
    assert json.loads(out.splitlines()[-1]) == held
    wait_for(lambda: daemon.status("victim") == status, what="the victim's status as before")
    assert engine.report() == report
