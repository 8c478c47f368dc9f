"""Engines that run their own sleep (vLLM): a sleep asked from outside the engine
goes through the model's controller, which has the engine's ranks sleep through
their own calls; without a controller it is refused, never unmapped under a
running scheduler. Real daemon, real rank processes, a real controller process."""

import os
import shutil
import tempfile
import time

import pytest

from sleepd.client import Waker
from support import OTHER, Daemon, MiB, by_tag, scrape, second_tenant_unavailable, sleeping, value, wait_for

REGIONS = [("weights", 4 * MiB), ("kv_cache", 2 * MiB)]
REFUSAL = "runs its own sleep and has no controller attached"


@pytest.fixture
def backend():
    return "host"


@pytest.fixture
def sockets():
    """Short paths for the ranks' command sockets (a Unix socket path has 107 bytes at most)."""
    directory = tempfile.mkdtemp(prefix="sleepd-ranks-")
    os.chmod(directory, 0o755)
    yield lambda name: os.path.join(directory, name)
    shutil.rmtree(directory)


def start_ranks(daemon, start_engine, sockets, model="qwen", seed=0, regions=REGIONS):
    """Two ranks of an engine that runs its own sleep, each listening for its front end."""
    return [start_engine(daemon, model, rank=rank, regions=regions, seed=seed + rank, needs_controller=True,
                         listen=sockets(f"{model}{rank}")) for rank in (0, 1)]


def rank_sockets(sockets, model="qwen"):
    return [sockets(f"{model}0"), sockets(f"{model}1")]


def states(rank) -> dict:
    return {tag: region["state"] for tag, region in by_tag(rank.report()).items()}


def weights(rank) -> str:
    return by_tag(rank.report())["weights"]["sha256"]


def assert_refused(result, code: str, *phrases: str) -> None:
    """Non-zero exit, one line on stderr, naming the code and saying why."""
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"[{code}]" in lines[0] and all(phrase in lines[0] for phrase in phrases), lines[0]


def test_an_outside_sleep_and_wake_run_through_the_controller_and_the_engines_own_calls(
        daemon, start_engine, start_controller, sockets):
    ranks = start_ranks(daemon, start_engine, sockets)
    controller = start_controller(daemon, "qwen", rank_sockets(sockets))
    assert controller.attached == {"attached": True}
    model = daemon.status("qwen")["models"][0]
    assert model["needsController"] and model["controllerPid"] == controller.pid
    assert f"qwen: outside sleeps and wakes go through its controller, pid {controller.pid}" in \
        daemon.ctl("status").stdout.splitlines()

    slept = daemon.ctl("sleep", "--model", "qwen")
    # Asked once by sleepctl; every rank then called sleep itself, and the first one slept them all.
    assert controller.request("requests")["requests"] == [{"sleep": 1, "tags": [], "actions": {}}]
    assert "8.0 MiB offloaded, 4.0 MiB discarded" in slept.stdout and "now asleep" in slept.stdout
    for rank in ranks:
        assert states(rank) == {"weights": "offloaded", "kv_cache": "discarded"}
        assert rank.report()["hooks"]["sleep"] == 1
    assert sleeping(daemon) == {"qwen": True}

    woke = daemon.ctl("wake", "--model", "qwen", "--tags", "weights")
    assert controller.request("requests")["requests"][-1] == {"wake": ["weights"]}
    assert "8.0 MiB restored" in woke.stdout
    daemon.ctl("wake", "--model", "qwen")
    assert [weights(rank) for rank in ranks] == [by_tag(rank.initial)["weights"]["sha256"] for rank in ranks]
    assert sleeping(daemon) == {"qwen": False}


def test_an_outside_sleep_without_a_controller_is_refused_and_the_engines_own_sleep_still_works(
        daemon, start_engine, sockets):
    ranks = start_ranks(daemon, start_engine, sockets)
    other = start_engine(daemon, "small", regions=[("weights", 2 * MiB)])
    daemon.ctl("sleep", "--model", "small")
    before = daemon.status()
    assert before["models"][0]["name"] == "qwen" and before["models"][0]["controllerPid"] == 0
    assert f"qwen: its engine {REFUSAL}; outside sleeps are refused" in daemon.ctl("status").stdout.splitlines()

    assert_refused(daemon.ctl("sleep", "--model", "qwen", check=False), "FAILED_PRECONDITION",
                   "sleep qwen:", f"model qwen's engine {REFUSAL}")
    assert_refused(daemon.ctl("swap", "--to", "small", "--from", "qwen", check=False), "FAILED_PRECONDITION",
                   REFUSAL)
    assert daemon.status() == before

    # The engine's own API (its ranks' calls) sleeps and wakes it directly; the second rank's call is a no-op.
    assert ranks[0].request("sleep") == {"sleeping": True}
    assert ranks[1].request("sleep") == {"sleeping": True}
    assert ranks[1].report()["hooks"]["sleep"] == 1
    assert ranks[1].request("wake") == {"sleeping": False}
    assert weights(ranks[1]) == by_tag(ranks[1].initial)["weights"]["sha256"]
    assert other.report()["regions"][0]["state"] == "offloaded"


def test_a_killed_controller_leaves_outside_sleeps_refused_and_the_ranks_working(
        daemon, start_engine, start_controller, sockets):
    ranks = start_ranks(daemon, start_engine, sockets)
    controller = start_controller(daemon, "qwen", rank_sockets(sockets))
    daemon.ctl("sleep", "--model", "qwen")
    daemon.ctl("wake", "--model", "qwen")
    controller.kill()
    wait_for(lambda: daemon.status("qwen")["models"][0]["controllerPid"] == 0, what="the controller's lease to end")

    assert_refused(daemon.ctl("sleep", "--model", "qwen", check=False), "FAILED_PRECONDITION", REFUSAL)
    assert states(ranks[0]) == {"weights": "mapped", "kv_cache": "mapped"}
    assert ranks[0].request("sleep", level=2) == {"sleeping": True}
    assert ranks[0].request("wake") == {"sleeping": False}
    # A new front end takes over.
    again = start_controller(daemon, "qwen", rank_sockets(sockets))
    assert again.attached == {"attached": True}
    daemon.ctl("sleep", "--model", "qwen")
    assert states(ranks[1]) == {"weights": "offloaded", "kv_cache": "discarded"}


def test_a_failing_controller_fails_the_outside_sleep_with_its_reason_and_nothing_sleeps(
        daemon, start_engine, start_controller, sockets):
    ranks = start_ranks(daemon, start_engine, sockets)
    start_controller(daemon, "qwen", rank_sockets(sockets), on_sleep="fail")
    before = daemon.status()
    assert_refused(daemon.ctl("sleep", "--model", "qwen", check=False), "ABORTED",
                   "the scheduler would not pause")
    assert daemon.status() == before
    assert ranks[0].report()["hooks"]["sleep"] == 0


def test_eviction_never_unmaps_an_engine_without_its_controller_and_goes_through_one_when_attached(
        start_daemon, start_engine, start_controller, sockets):
    daemon = start_daemon(devices=1, capacity="14MiB")
    small = start_engine(daemon, "small", regions=[("weights", 4 * MiB)])
    daemon.ctl("sleep", "--model", "small")
    ranks = start_ranks(daemon, start_engine, sockets)  # 12 MiB of the 14
    before = daemon.status("qwen")

    assert_refused(daemon.ctl("wake", "--model", "small", "--evict", check=False), "RESOURCE_EXHAUSTED",
                   "no model may be evicted", "no controller attached")
    assert daemon.status("qwen") == before

    controller = start_controller(daemon, "qwen", rank_sockets(sockets))
    woke = daemon.ctl("wake", "--model", "small", "--evict")
    assert "evicted qwen" in woke.stdout
    assert controller.request("requests")["requests"] == [{"sleep": 1, "tags": [], "actions": {}}]
    assert [states(rank) for rank in ranks] == [{"weights": "offloaded", "kv_cache": "discarded"}] * 2
    assert small.report()["regions"][0]["sha256"] == small.initial["regions"][0]["sha256"]


def test_idle_sleep_skips_an_engine_without_its_controller_and_asks_it_when_attached(
        daemon, start_engine, start_controller, sockets):
    ranks = start_ranks(daemon, start_engine, sockets)
    daemon.ctl("policy", "--model", "qwen", "--idle-seconds", "0.3")
    time.sleep(1.5)
    assert sleeping(daemon) == {"qwen": False}
    assert states(ranks[0]) == {"weights": "mapped", "kv_cache": "mapped"}

    controller = start_controller(daemon, "qwen", rank_sockets(sockets))
    wait_for(lambda: sleeping(daemon)["qwen"], timeout=10, what="idle sleep through the controller")
    assert controller.request("requests")["requests"][0] == {"sleep": 1, "tags": [], "actions": {}}


def test_swap_between_two_engines_runs_each_ones_sleep_and_wake_through_its_controller(
        start_daemon, start_engine, start_controller, sockets):
    daemon = start_daemon(devices=1, capacity="14MiB")
    a = start_ranks(daemon, start_engine, sockets, "a", seed=10)
    a_controller = start_controller(daemon, "a", rank_sockets(sockets, "a"))
    daemon.ctl("sleep", "--model", "a")
    b = start_ranks(daemon, start_engine, sockets, "b", seed=20)
    b_controller = start_controller(daemon, "b", rank_sockets(sockets, "b"))

    daemon.ctl("swap", "--to", "a", "--from", "b")
    assert sleeping(daemon) == {"a": False, "b": True}
    assert b_controller.request("requests")["requests"] == [{"sleep": 1, "tags": [], "actions": {}}]
    assert a_controller.request("requests")["requests"][-1] == {"wake": []}
    assert [weights(rank) for rank in a] == [by_tag(rank.initial)["weights"]["sha256"] for rank in a]
    assert [states(rank) for rank in b] == [{"weights": "offloaded", "kv_cache": "discarded"}] * 2


def test_ranks_that_all_call_sleep_at_once_sleep_the_model_once_and_all_succeed(daemon, start_engine):
    ranks = [start_engine(daemon, "qwen", rank=rank, regions=REGIONS, needs_controller=True) for rank in range(3)]
    for rank in ranks:
        rank.send("sleep")
    assert [rank.process.stdout.readline().strip() for rank in ranks] == ['{"sleeping": true}'] * 3
    assert [rank.report()["hooks"]["sleep"] for rank in ranks] == [1, 1, 1]
    for rank in ranks:
        rank.send("wake")
    assert [rank.process.stdout.readline().strip() for rank in ranks] == ['{"sleeping": false}'] * 3
    assert [rank.report()["hooks"]["wake"] for rank in ranks] == [1, 1, 1]


def test_a_request_that_finds_its_model_asleep_wakes_it_or_waits_and_the_wait_is_measured(
        daemon, start_engine, start_controller, sockets):
    ranks = start_ranks(daemon, start_engine, sockets)
    controller = start_controller(daemon, "qwen", rank_sockets(sockets))
    daemon.ctl("sleep", "--model", "qwen")
    # From the front end: its wake goes through the engine (back to this controller), then it is awake.
    assert controller.request("ensure_awake")["woke"] is True
    assert controller.request("requests")["requests"][-1] == {"wake": []}
    assert sleeping(daemon) == {"qwen": False}

    # SLEEPD_WAKE_ON_REQUEST=0: the request waits for someone else's wake.
    waiter = start_engine(daemon, "plain", regions=[("weights", MiB)], env={"SLEEPD_WAKE_ON_REQUEST": "0"})
    daemon.ctl("sleep", "--model", "plain")
    assert waiter.request("ensure_awake", timeout=0.3)["code"] == "DEADLINE_EXCEEDED"
    waiter.send("ensure_awake")
    time.sleep(0.5)
    assert sleeping(daemon)["plain"] is True
    daemon.ctl("wake", "--model", "plain")
    assert waiter.process.stdout.readline().strip() == '{"sleeping": false, "woke": false}'

    samples = scrape(daemon)
    assert value(samples, "sleepd_wake_wait_seconds_count", model="qwen", how="woke") == 1
    assert value(samples, "sleepd_wake_wait_seconds_count", model="plain", how="waited") == 1
    assert value(samples, "sleepd_wake_wait_seconds_sum", model="plain", how="waited") >= 0.5
    assert ranks[0].request("ensure_awake") == {"sleeping": False, "woke": False}  # awake: not counted
    assert value(scrape(daemon), "sleepd_wake_wait_seconds_count", model="qwen", how="woke") == 1


def test_a_request_that_waits_for_a_wake_gives_up_at_the_daemons_wake_wait_limit(start_daemon, start_engine):
    daemon = start_daemon("--wake-wait-limit", "1.5")
    waiter = start_engine(daemon, "plain", regions=[("weights", MiB)], env={"SLEEPD_WAKE_ON_REQUEST": "0"})
    daemon.ctl("sleep", "--model", "plain")
    for timeout in (0, 60):  # 0 asks for the daemon's limit; a longer timeout is capped by it
        started = time.monotonic()
        answer = waiter.request("ensure_awake", timeout=timeout)
        assert answer["code"] == "DEADLINE_EXCEEDED" and "still asleep after 1.5 s" in answer["error"], answer
        assert 1.5 <= time.monotonic() - started < 15
    assert sleeping(daemon) == {"plain": True}


def test_a_controller_whose_engine_ended_lets_go_of_the_model_for_the_next_engine_and_its_front_end(
        daemon, start_engine, start_controller, sockets):
    """The daemon ends a controller's lease when its model has no ranks left (the engine shut down); that
    controller must not attach again when a new engine of the same name starts, or the new engine's own
    front end would be refused as a second controller."""
    ranks = start_ranks(daemon, start_engine, sockets)
    first = start_controller(daemon, "qwen", rank_sockets(sockets))
    for rank in ranks:
        rank.kill()
    wait_for(lambda: not daemon.status()["models"], what="the model to end with its ranks")
    for path in rank_sockets(sockets):
        os.unlink(path)  # left by the killed ranks

    start_ranks(daemon, start_engine, sockets, seed=10)
    wait_for(lambda: len(daemon.status("qwen")["models"][0]["ranks"]) == 2, what="the new engine's ranks")
    time.sleep(1)  # ample for the first controller to attach again, as it did before every attach was a retry
    assert daemon.status("qwen")["models"][0]["controllerPid"] == 0
    second = start_controller(daemon, "qwen", rank_sockets(sockets))
    assert second.attached == {"attached": True}
    daemon.ctl("sleep", "--model", "qwen")
    assert first.request("requests")["requests"] == []
    assert second.request("requests")["requests"] == [{"sleep": 1, "tags": [], "actions": {}}]


def test_a_second_front_end_wakes_the_model_through_its_controller_even_after_a_daemon_restart(
        tmp_path, daemon, start_engine, start_controller, sockets):
    """A Waker is a front end beside the controller (vLLM's second API server): it never controls the
    model, and its requests wake it the way the controller's would, through the engine's own wake."""
    start_ranks(daemon, start_engine, sockets)
    controller = start_controller(daemon, "qwen", rank_sockets(sockets))
    waker = Waker("qwen", socket=daemon.socket)
    try:
        daemon.ctl("sleep", "--model", "qwen")
        assert waker.ensure_awake().woke is True
        assert controller.request("requests")["requests"][-1] == {"wake": []}
        assert sleeping(daemon) == {"qwen": False}
        assert daemon.status("qwen")["models"][0]["controllerPid"] == controller.pid

        daemon.stop()  # the Waker's credentials die with this daemon
        again = Daemon(tmp_path, "host", "--host-devices", "2", "--host-device-capacity", "256MiB")
        try:
            wait_for(lambda: again.status("qwen")["models"][0]["controllerPid"] == controller.pid, timeout=60,
                     what="the ranks and the controller to attach to the new daemon")
            again.ctl("sleep", "--model", "qwen")
            assert waker.ensure_awake().woke is True
            assert controller.request("requests")["requests"][-1] == {"wake": []}
            assert sleeping(again) == {"qwen": False}
        finally:
            again.stop()
    finally:
        waker.close()


@pytest.mark.skipif(second_tenant_unavailable() is not None, reason=str(second_tenant_unavailable()))
def test_only_the_models_owner_may_become_its_controller_and_only_one_at_a_time(
        shared_daemon, start_engine, start_controller, sockets):
    daemon = shared_daemon()
    start_ranks(daemon, start_engine, sockets, regions=[("weights", MiB)])
    stranger = start_controller(daemon, "qwen", rank_sockets(sockets), as_uid=OTHER)
    assert stranger.attached["code"] == "NOT_FOUND"  # as if there were no qwen: no one learns who uses which name
    assert stranger.attached["error"] == "model 'qwen' is not attached (attached: none you may see)"
    assert daemon.status("qwen")["models"][0]["controllerPid"] == 0

    owner = start_controller(daemon, "qwen", rank_sockets(sockets))
    second = start_controller(daemon, "qwen", rank_sockets(sockets))
    assert owner.attached == {"attached": True}
    assert second.attached["code"] == "ALREADY_EXISTS" and str(owner.pid) in second.attached["error"]
