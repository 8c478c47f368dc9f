"""One daemon deciding which models hold device memory: budgets, admission,
eviction, swap, idle sleep, waking on demand, and the events that tell of it."""

import json
import subprocess
import sys
import threading
import time

import grpc
import pytest

from sleepd.proto import sleepd_pb2 as pb
from sleepd.proto import sleepd_pb2_grpc as pb_grpc
from support import MiB, sleeping, wait_for


def digests(report) -> list:
    return [region.get("sha256") for region in report["regions"]]


def three_models(start_daemon, start_engine):
    """a asleep, b and c awake, on a device that holds two of the three."""
    daemon = start_daemon(devices=1, capacity="10MiB")
    a = start_engine(daemon, "a", regions=[("weights", 4 * MiB)], seed=1)
    b = start_engine(daemon, "b", regions=[("weights", 4 * MiB)], seed=2)
    daemon.ctl("sleep", "--model", "a")
    c = start_engine(daemon, "c", regions=[("weights", 4 * MiB)], seed=3)
    return daemon, a, b, c


def test_waking_with_eviction_sleeps_the_least_recently_active_model(start_daemon, start_engine):
    daemon, a, b, c = three_models(start_daemon, start_engine)
    c.request("touch")  # b is now the least recently active

    out = daemon.ctl("wake", "--model", "a", "--evict").stdout
    assert "evicted b" in out
    assert sleeping(daemon) == {"a": False, "b": True, "c": False}
    assert [r["state"] for r in b.report()["regions"]] == ["offloaded"]

    # The evicted model comes back bit-identical when it is woken in turn.
    a.request("touch")
    daemon.ctl("wake", "--model", "b", "--evict")
    assert sleeping(daemon) == {"a": False, "b": False, "c": True}
    assert digests(b.report()) == digests(b.initial)
    status = daemon.status()
    assert int(status["devices"][0]["used"]) <= int(status["devices"][0]["budget"])


def test_a_pinned_model_is_never_evicted_and_priority_comes_first(start_daemon, start_engine):
    daemon, _, b, c = three_models(start_daemon, start_engine)
    c.request("touch")
    assert "pinned" in daemon.ctl("policy", "--model", "b", "--pinned", "yes").stdout  # b is older, but pinned

    daemon.ctl("wake", "--model", "a", "--evict")
    assert sleeping(daemon) == {"a": False, "b": False, "c": True}

    # A lower priority goes first even when it was active more recently.
    daemon.ctl("policy", "--model", "b", "--pinned", "no", "--priority", "5")
    daemon.ctl("policy", "--model", "a", "--priority", "0")
    b.request("touch")
    daemon.ctl("wake", "--model", "c", "--evict")
    assert sleeping(daemon) == {"a": True, "b": False, "c": False}


def test_a_refused_wake_names_the_bytes_missing_and_changes_nothing(start_daemon, start_engine):
    daemon = three_models(start_daemon, start_engine)[0]
    before = daemon.status()

    result = daemon.ctl("wake", "--model", "a", check=False)
    assert result.returncode != 0 and "RESOURCE_EXHAUSTED" in result.stderr
    assert "needs 4.0 MiB" in result.stderr and "2.0 MiB more" in result.stderr
    assert "b 4.0 MiB" in result.stderr and "c 4.0 MiB" in result.stderr  # what holds the device
    assert daemon.status() == before

    # With every other model pinned there is nothing to evict: refused too, unchanged.
    daemon.ctl("policy", "--model", "b", "--pinned", "yes")
    daemon.ctl("policy", "--model", "c", "--pinned", "yes")
    before = daemon.status()
    result = daemon.ctl("wake", "--model", "a", "--evict", check=False)
    assert result.returncode != 0 and "no model may be evicted" in result.stderr
    assert daemon.status() == before


def test_the_device_reserve_shrinks_the_budget(start_daemon, start_engine):
    daemon = start_daemon("--device-reserve", "4MiB", devices=1, capacity="10MiB")
    device = daemon.status()["devices"][0]
    assert (int(device["capacity"]), int(device["reserve"]), int(device["budget"])) == (10 * MiB, 4 * MiB, 6 * MiB)
    start_engine(daemon, "a", regions=[("weights", 4 * MiB)])
    from sleepd.client import SleepClient, SleepdError

    with SleepClient.connect("b", socket=daemon.socket) as client:
        try:
            client.alloc(4 * MiB, "weights")
            raise AssertionError("an allocation past the budget was admitted")
        except SleepdError as error:
            assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        client.alloc(4 * MiB, "weights", evict=True)  # evicts a
    assert sleeping(daemon) == {"a": True}
    device = daemon.status()["devices"][0]
    assert int(device["committed"]) == 4 * MiB  # a, asleep, would need its 4 MiB back


class UsageSampler(threading.Thread):
    """Reads each device's used bytes as fast as the daemon answers."""

    def __init__(self, daemon):
        super().__init__(daemon=True)
        self.channel = grpc.insecure_channel(f"unix:{daemon.socket}")
        self.stub = pb_grpc.SleepdStub(self.channel)
        self.stop = threading.Event()
        self.peak, self.samples, self.budget = 0, 0, 0

    def run(self):
        while not self.stop.is_set():
            for device in self.stub.Status(pb.StatusRequest()).devices:
                self.peak = max(self.peak, device.used)
                self.budget = device.budget
            self.samples += 1


def test_swap_keeps_both_models_intact_and_never_exceeds_the_budget(start_daemon, start_engine):
    # A budget below the capacity: the backend itself would refuse past the capacity, never past the budget.
    daemon = start_daemon("--device-reserve", "16MiB", devices=1, capacity="80MiB")
    regions = [("weights", 4 * MiB)] * 10 + [("kv_cache", 4 * MiB)] * 2
    a = start_engine(daemon, "a", regions=regions, seed=1)
    daemon.ctl("sleep", "--model", "a")
    b = start_engine(daemon, "b", regions=regions, seed=2)
    daemon.ctl("swap", "--to", "a", "--from", "b")  # a first swap measures the movers' throughput

    sampler = UsageSampler(daemon)
    sampler.start()
    out = daemon.ctl("swap", "--to", "b").stdout  # eviction picks a
    sampler.stop.set()
    sampler.join()

    assert "slept a" in out and "woke b" in out and "swap took" in out
    assert sampler.samples > 3
    assert sampler.peak <= sampler.budget == 64 * MiB, f"peak {sampler.peak} over the budget"
    assert sleeping(daemon) == {"a": True, "b": False}
    b_regions = b.report()["regions"]
    assert [r.get("sha256") for r in b_regions if r["tag"] == "weights"] == \
        [r["sha256"] for r in b.initial["regions"] if r["tag"] == "weights"]
    assert all(r["zero"] for r in b_regions if r["tag"] == "kv_cache")

    daemon.ctl("swap", "--to", "a", "--from", "b")
    a_regions = a.report()["regions"]
    assert [r.get("sha256") for r in a_regions if r["tag"] == "weights"] == \
        [r["sha256"] for r in a.initial["regions"] if r["tag"] == "weights"]


@pytest.mark.parametrize("backend", ["host"])  # batching is the same on every backend
@pytest.mark.parametrize("flags, unmaps", [((), [6]), (("--swap-batch", "8MiB"), [2, 2, 2])],
                         ids=["default-64MiB", "8MiB"])
def test_a_swap_puts_the_outgoing_model_to_sleep_one_batch_at_a_time(flags, unmaps, start_daemon, start_engine):
    """swap.batch: each batch of the outgoing model's memory is one unmap its engine answers."""
    daemon = start_daemon(*flags, devices=1, capacity="64MiB")
    regions = [("weights", 4 * MiB)] * 6
    b = start_engine(daemon, "b", regions=regions, seed=2)
    daemon.ctl("sleep", "--model", "b")
    a = start_engine(daemon, "a", regions=regions, seed=1)
    daemon.ctl("swap", "--to", "b", "--from", "a")
    assert a.request("unmaps") == {"unmaps": unmaps}
    assert sleeping(daemon) == {"a": True, "b": False}
    assert [r.get("sha256") for r in b.report()["regions"]] == [r["sha256"] for r in b.initial["regions"]]


def test_a_failed_restore_in_a_swap_leaves_the_old_model_awake(start_daemon, start_engine):
    daemon = start_daemon(devices=1, capacity="16MiB")
    regions = [("weights", 4 * MiB)] * 3
    b = start_engine(daemon, "b", regions=regions, seed=2, weights_hook="fail")
    daemon.ctl("sleep", "--model", "b")
    a = start_engine(daemon, "a", regions=regions, seed=1)
    pool_before = daemon.status()["pool"]["used"]

    result = daemon.ctl("swap", "--to", "b", "--from", "a", check=False)
    assert result.returncode != 0
    assert "a woken again" in result.stderr and "weights did not load" in result.stderr
    assert sleeping(daemon) == {"a": False, "b": True}
    assert digests(a.report()) == digests(a.initial)
    assert a.report()["hooks"] == {"sleep": 1, "wake": 1}
    assert [r["state"] for r in b.report()["regions"]] == ["offloaded"] * 3
    assert daemon.status()["pool"]["used"] == pool_before, "b's backups changed"


def test_idle_sleep_fires_after_its_time_and_not_before(start_daemon, start_engine):
    daemon = start_daemon(devices=1)
    idle = start_engine(daemon, "idle", regions=[("weights", 4 * MiB)])
    busy = start_engine(daemon, "busy", regions=[("weights", 4 * MiB)])
    # Both touched before their policies are set: however long sleepctl takes on a loaded machine, neither
    # was idle for 4 s before `started` + 4 s, and anything seen asleep before then fired early.
    started = time.monotonic()
    for engine in (idle, busy):
        engine.request("touch")
    for engine in (idle, busy):
        daemon.ctl("policy", "--model", engine.model, "--idle-seconds", "4")
    busy_touched = started
    while time.monotonic() - started < 3.5:
        busy.request("touch")
        busy_touched = time.monotonic()
        state = sleeping(daemon)
        answered = time.monotonic()
        if answered - started < 4.0:
            assert state["idle"] is False, "idle sleep fired early"
        if answered - busy_touched < 4.0:
            assert state["busy"] is False, "a model in use went to sleep"
    wait_for(lambda: sleeping(daemon)["idle"], timeout=15, what="idle sleep")
    assert time.monotonic() - started >= 4.0
    assert [r["state"] for r in idle.report()["regions"]] == ["offloaded"]
    # The busy one sleeps too once nobody touches it.
    wait_for(lambda: sleeping(daemon)["busy"], timeout=15, what="idle sleep of the other")


def test_ensure_awake_wakes_a_sleeping_model_on_demand(daemon, start_engine):
    engine = start_engine(daemon, "qwen", regions=[("weights", 4 * MiB)])
    daemon.ctl("sleep", "--model", "qwen")
    assert engine.request("ensure_awake") == {"sleeping": False, "woke": True}
    assert digests(engine.report()) == digests(engine.initial)
    assert engine.request("ensure_awake") == {"sleeping": False, "woke": False}  # awake already: returns at once


def test_events_tell_of_sleep_wake_eviction_refusal_and_a_lost_rank(start_daemon, start_engine):
    daemon = start_daemon(devices=1, capacity="10MiB")
    watcher = subprocess.Popen([sys.executable, "-m", "sleepd.client.ctl", "--socket", daemon.socket, "--json",
                                "events", "--count", "9"], stdout=subprocess.PIPE, text=True)
    assert json.loads(watcher.stdout.readline())["kind"] == "subscribed"  # live: nothing below is missed
    a = start_engine(daemon, "a", regions=[("weights", 4 * MiB)])
    start_engine(daemon, "b", regions=[("weights", 4 * MiB)])
    daemon.ctl("sleep", "--model", "a")
    start_engine(daemon, "c", regions=[("weights", 4 * MiB)])
    daemon.ctl("wake", "--model", "a", check=False)
    daemon.ctl("wake", "--model", "a", "--evict")
    a.kill()
    out, _ = watcher.communicate(timeout=30)
    events = [json.loads(line) for line in out.splitlines()]
    assert [(event["kind"], event["model"]) for event in events] == [
        ("attached", "a"), ("attached", "b"), ("slept", "a"), ("attached", "c"), ("refused", "a"),
        ("slept", "b"), ("evicted", "b"), ("woke", "a"), ("rank_lost", "a")]
    assert "room for a" in events[6]["detail"]
    assert int(events[2]["bytes"]) == 4 * MiB


def test_a_model_gets_its_configured_policy_when_it_first_attaches(start_daemon, start_engine, tmp_path):
    config = tmp_path / "sleepd.toml"
    config.write_text('[models.qwen]\npriority = 3\npinned = true\neviction_level = 2\nidle_seconds = 90\n')
    daemon = start_daemon("--config", str(config))
    start_engine(daemon, "qwen", regions=[("weights", 4 * MiB)])
    policy = daemon.status()["models"][0]["policy"]
    assert (policy["priority"], policy["pinned"], policy["evictionLevel"], policy["idleSeconds"]) == (3, True, 2, 90)
