"""An unmodified `vllm serve --enable-sleep-mode` with SLEEPD_MODEL set: vLLM's own
endpoints put it to sleep and wake it through the daemon.

One server serves the whole module (vLLM takes a minute or two to start here);
the test that restarts the daemon puts the new one in `node`, and the test that
kills vLLM's worker comes last."""

import os
import signal

import pytest

from kernel import memfd_bytes, memfd_mappings, shmem_bytes
from servers import VllmServer, model_status, tag_states
from support import MiB, Daemon, Engine, scrape, value, wait_for

# The first test also waits for vLLM to start (minutes on two shared cores).
pytestmark = pytest.mark.timeout(900)

MODEL = "tiny"
KV_CACHE_BYTES = 1 << 30  # VLLM_CPU_KVCACHE_SPACE=1


@pytest.fixture(scope="module")
def node(tmp_path_factory) -> dict:
    """The node's daemon, and where it keeps its state: a restarted daemon replaces it here."""
    directory = tmp_path_factory.mktemp("sleepd")
    node = {"directory": directory, "daemon": Daemon(directory, "host")}
    yield node
    node["daemon"].stop()


@pytest.fixture(scope="module")
def server(node, tiny_models, tmp_path_factory):
    server = VllmServer(node["daemon"], MODEL, tiny_models["a"], str(tmp_path_factory.mktemp("vllm") / "vllm.log"))
    yield server
    server.stop()


def worker_pid(daemon, model: str = MODEL) -> int:
    (rank,) = model_status(daemon, model)["ranks"]
    return rank["pid"]


def assert_a_sleep_frees_memory_and_answers_stay_the_same(daemon, server, model: str) -> None:
    before = server.answers()
    prefix = daemon.memfd_prefix(model)
    worker = worker_pid(daemon, model)
    assert tag_states(daemon, model) == {"weights": "MAPPED", "kv_cache": "MAPPED"}
    assert memfd_bytes([daemon.pid, worker], prefix) >= KV_CACHE_BYTES
    shmem_awake = shmem_bytes()
    sleeps = value(scrape(daemon), "sleepd_sleep_duration_seconds_count", model=model, level="1") or 0

    server.call("POST", "/sleep?level=1")  # a 200: 0.32 says {"status": "sleeping"}, 0.29 nothing

    assert server.is_sleeping() is True
    assert model_status(daemon, model)["sleeping"] is True
    assert tag_states(daemon, model) == {"weights": "OFFLOADED", "kv_cache": "DISCARDED"}
    holders = [daemon.pid, worker, *daemon.mover_pids()]
    assert memfd_bytes(holders, prefix) == 0, "a process still holds the model's memory open"
    assert memfd_mappings(worker, prefix) == [], "the vLLM worker still maps the model's memory"
    # The KV cache is gone from the kernel's shared memory; the weights (1.5 MiB) moved to the host pool.
    assert shmem_awake - shmem_bytes() >= KV_CACHE_BYTES // 2
    assert value(scrape(daemon), "sleepd_sleep_duration_seconds_count", model=model, level="1") == sleeps + 1

    server.call("POST", "/wake_up")

    assert server.is_sleeping() is False
    assert model_status(daemon, model)["sleeping"] is False
    assert tag_states(daemon, model) == {"weights": "MAPPED", "kv_cache": "MAPPED"}
    assert server.answers() == before


def test_vllm_sleep_endpoint_goes_through_sleepd_frees_memory_and_answers_stay_the_same(node, server):
    assert_a_sleep_frees_memory_and_answers_stay_the_same(node["daemon"], server, MODEL)


def test_vllm_stays_asleep_until_its_last_tag_is_back_and_sleepctl_agrees(node, server):
    daemon = node["daemon"]
    before = server.answers()
    server.call("POST", "/sleep?level=1")

    server.call("POST", "/wake_up?tags=weights")
    assert server.is_sleeping() is True
    assert model_status(daemon, MODEL)["sleeping"] is True
    assert tag_states(daemon, MODEL) == {"weights": "MAPPED", "kv_cache": "DISCARDED"}

    server.call("POST", "/wake_up?tags=kv_cache")
    assert server.is_sleeping() is False
    assert model_status(daemon, MODEL)["sleeping"] is False
    assert server.answers() == before


def test_a_daemon_restarted_under_a_serving_vllm_gets_its_memory_back_and_vllm_keeps_serving(node, server):
    before = server.answers()
    os.kill(node["daemon"].pid, signal.SIGKILL)
    node["daemon"].process.wait(timeout=30)
    assert server.answers() == before, "vLLM stopped answering, or answers otherwise, without its daemon"

    node["daemon"] = daemon = Daemon(node["directory"], "host")

    wait_for(lambda: [(r["rank"], r.get("orphaned", False)) for m in daemon.status()["models"] if m["name"] == MODEL
                      for r in m["ranks"]] == [(0, False)], timeout=180, what="vLLM's worker to attach again")
    assert tag_states(daemon, MODEL) == {"weights": "MAPPED", "kv_cache": "MAPPED"}
    assert memfd_bytes([daemon.pid], daemon.memfd_prefix(MODEL)) >= KV_CACHE_BYTES, "the new daemon lacks the memory"
    wait_for(lambda: model_status(daemon, MODEL)["controllerPid"] == server.process.pid, timeout=60,
             what="vLLM's API server to attach again as the model's controller")
    # The new daemon really holds it: vLLM's own sleep goes through it, and nothing is lost.
    server.call("POST", "/sleep?level=1")
    assert tag_states(daemon, MODEL) == {"weights": "OFFLOADED", "kv_cache": "DISCARDED"}
    assert memfd_bytes([daemon.pid, worker_pid(daemon)], daemon.memfd_prefix(MODEL)) == 0
    server.call("POST", "/wake_up")
    assert server.answers() == before


def test_a_vllm_worker_killed_while_asleep_leaves_the_daemon_serving_and_other_models_untouched(node, server):
    daemon = node["daemon"]
    other = Engine(daemon, "other", regions=[("weights", 4 * MiB), ("kv_cache", 4 * MiB)])
    try:
        other_before = other.report()
        server.call("POST", "/sleep?level=1")
        worker = worker_pid(daemon)

        os.kill(worker, signal.SIGKILL)

        wait_for(lambda: MODEL not in {m["name"] for m in daemon.status()["models"]}
                 or not model_status(daemon, MODEL)["ranks"], timeout=60, what="the daemon to reclaim the dead worker")
        assert memfd_bytes([daemon.pid, *daemon.mover_pids()], daemon.memfd_prefix(MODEL)) == 0
        assert daemon.process.poll() is None
        assert other.report() == other_before
        daemon.ctl("sleep", "--model", "other", "--level", "1")
        daemon.ctl("wake", "--model", "other")
        after = {region["tag"]: region for region in other.report()["regions"]}
        weights = next(region for region in other_before["regions"] if region["tag"] == "weights")
        assert after["weights"]["sha256"] == weights["sha256"], "the other model's weights changed"
    finally:
        other.close()
