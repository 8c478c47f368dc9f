"""An unmodified `vllm serve --enable-sleep-mode` with SLEEPD_MODEL set: vLLM's own
endpoints put it to sleep and wake it through the daemon, and its API server is the
model's controller, so `sleepctl sleep` and `wake`, idle sleep and a request that
reaches the sleeping server run vLLM's own sleep and wake.

vLLM's own tests (tests/vllm_upstream) prove on sleepd what vLLM sees of this: `/sleep`,
`/is_sleeping`, its sleep-state metrics, `/wake_up` by tags. These prove what sleepd sees.

One server serves the whole module (vLLM takes a minute or two to start here); the
test that restarts the daemon puts the new one in `node`, and the test that kills
vLLM's worker comes last."""

import json
import os
import signal
import subprocess
import sys
import threading

import pytest

from kernel import memfd_bytes, memfd_mappings, shmem_bytes
from servers import ASLEEP, AWAKE, PROMPTS, VllmServer, asleep, model_status, tag_states
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
    # Weight sets off (SLEEPD_WEIGHT_CACHE=0): these tests count the model's own memory, and one restarts the
    # daemon, which does not keep weight sets yet (test_vllm_weight_sets.py tests them).
    server = VllmServer(node["daemon"], MODEL, tiny_models["a"], str(tmp_path_factory.mktemp("vllm") / "vllm.log"),
                        environment={"SLEEPD_WEIGHT_CACHE": "0"})
    server.before = server.answers()
    yield server
    server.stop()


def test_with_SLEEPD_WEIGHT_CACHE_0_the_server_loads_as_before_and_commits_no_weight_set(node, server):
    assert json.loads(node["daemon"].ctl("--json", "sets").stdout).get("weightSets", []) == []
    regions = [r for rank in model_status(node["daemon"], MODEL)["ranks"] for r in rank["regions"]]
    assert regions and not any(r["weightSet"] for r in regions)
    with open(server.log_path) as log:
        assert "weight set" not in log.read()


def worker_pid(daemon, model: str = MODEL) -> int:
    (rank,) = model_status(daemon, model)["ranks"]
    return rank["pid"]


def test_vllm_sleep_endpoint_frees_the_memory_as_the_kernel_sees_it_and_a_wake_by_tags_brings_each_back(node,
                                                                                                        server):
    daemon = node["daemon"]
    prefix = daemon.memfd_prefix(MODEL)
    worker = worker_pid(daemon)
    assert asleep(daemon, server) is False
    assert memfd_bytes([daemon.pid, worker], prefix) >= KV_CACHE_BYTES
    shmem_awake = shmem_bytes()
    sleeps = value(scrape(daemon), "sleepd_sleep_duration_seconds_count", model=MODEL, level="1") or 0

    server.call("POST", "/sleep?level=1")  # a 200: 0.32 says {"status": "sleeping"}, 0.29 nothing

    assert asleep(daemon, server) is True
    holders = [daemon.pid, worker, *daemon.mover_pids()]
    assert memfd_bytes(holders, prefix) == 0, "a process still holds the model's memory open"
    assert memfd_mappings(worker, prefix) == [], "the vLLM worker still maps the model's memory"
    # The KV cache is gone from the kernel's shared memory; the weights (1.5 MiB) moved to the host pool.
    assert shmem_awake - shmem_bytes() >= KV_CACHE_BYTES // 2
    assert value(scrape(daemon), "sleepd_sleep_duration_seconds_count", model=MODEL, level="1") == sleeps + 1

    # Both vLLM and sleepctl count the model asleep until its last tag is back.
    server.call("POST", "/wake_up?tags=weights")
    assert server.is_sleeping() is True
    assert model_status(daemon, MODEL)["sleeping"] is True
    assert tag_states(daemon, MODEL) == {"weights": "MAPPED", "kv_cache": "DISCARDED"}

    server.call("POST", "/wake_up?tags=kv_cache")
    assert asleep(daemon, server) is False
    assert server.answers() == server.before


def test_the_api_server_is_the_controller_and_sleepctl_sleep_runs_vllms_own_sleep(node, server):
    daemon = node["daemon"]
    status = model_status(daemon, MODEL)
    assert status["needsController"] is True
    assert status["controllerPid"] == server.process.pid

    daemon.ctl("sleep", "--model", MODEL, "--level", "1")
    assert asleep(daemon, server) is True

    daemon.ctl("wake", "--model", MODEL)
    assert asleep(daemon, server) is False
    assert server.answers() == server.before


def test_idle_sleep_runs_vllms_own_sleep_through_the_controller(node, server):
    daemon = node["daemon"]
    idle_sleeps = value(scrape(daemon), "sleepd_evictions_total", model=MODEL, reason="idle") or 0
    daemon.ctl("policy", "--model", MODEL, "--idle-seconds", "2")
    try:
        wait_for(lambda: model_status(daemon, MODEL)["sleeping"], timeout=60, what=f"{MODEL} to sleep once idle")
    finally:
        daemon.ctl("policy", "--model", MODEL, "--idle-seconds", "0")
    assert asleep(daemon, server) is True  # vLLM says so too: its own sleep ran
    assert value(scrape(daemon), "sleepd_evictions_total", model=MODEL, reason="idle") == idle_sleeps + 1

    daemon.ctl("wake", "--model", MODEL)
    assert asleep(daemon, server) is False
    assert server.answers() == server.before


def test_a_request_to_a_sleeping_vllm_wakes_it_and_is_answered(node, server):
    daemon = node["daemon"]
    woke = value(scrape(daemon), "sleepd_wake_wait_seconds_count", model=MODEL, how="woke") or 0
    daemon.ctl("sleep", "--model", MODEL, "--level", "1")
    assert asleep(daemon, server) is True

    assert server.complete(PROMPTS[0]) == server.before[0]

    assert asleep(daemon, server) is False
    assert value(scrape(daemon), "sleepd_wake_wait_seconds_count", model=MODEL, how="woke") == woke + 1
    assert server.answers() == server.before


def test_requests_in_flight_or_arriving_while_sleepctl_sleeps_vllm_are_all_answered(node, server):
    """vLLM's own /sleep aborts requests in flight by default; the controller's sleep lets them finish.
    Requests that reach vLLM after its scheduler paused are woken for, not left queued. (Whether one
    was running as the pause began is up to timing; here they mostly wait in their EnsureAwake.)"""
    daemon = node["daemon"]
    tokens = 200
    replies, sent = [], []

    def request(prompt):
        return server.call("POST", "/v1/completions", {"model": server.checkpoint, "prompt": prompt,
                                                        "max_tokens": tokens, "temperature": 0, "ignore_eos": True})

    def client(prompt):
        # Back to back until sleepctl has returned (so some run as the sleep begins and some arrive while
        # it runs), then once more: that one finds the model asleep.
        for _ in range(200):
            last = sleep.poll() is not None
            sent.append(prompt)
            replies.append(request(prompt))
            if last:
                return

    sleep = subprocess.Popen([sys.executable, "-m", "sleepd.client.ctl", "--socket", daemon.socket, "sleep",
                              "--model", MODEL, "--level", "1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    clients = [threading.Thread(target=client, args=(prompt,)) for prompt in PROMPTS]
    for thread in clients:
        thread.start()
    output, _ = sleep.communicate(timeout=300)
    for thread in clients:
        thread.join(timeout=120)

    assert sleep.returncode == 0, output
    assert not any(thread.is_alive() for thread in clients), "a request was still unanswered after 2 minutes"
    assert len(replies) == len(sent)
    assert replies and all(reply["choices"][0]["finish_reason"] == "length" for reply in replies), replies
    assert all(reply["usage"]["completion_tokens"] == tokens for reply in replies)
    if asleep(daemon, server):
        daemon.ctl("wake", "--model", MODEL)
    assert asleep(daemon, server) is False


def test_a_daemon_restarted_under_a_serving_vllm_gets_its_memory_back_and_vllm_keeps_serving(node, server):
    os.kill(node["daemon"].pid, signal.SIGKILL)
    node["daemon"].process.wait(timeout=30)
    assert server.answers() == server.before, "vLLM stopped answering, or answers otherwise, without its daemon"

    node["daemon"] = daemon = Daemon(node["directory"], "host")

    wait_for(lambda: [(r["rank"], r.get("orphaned", False)) for m in daemon.status()["models"] if m["name"] == MODEL
                      for r in m["ranks"]] == [(0, False)], timeout=180, what="vLLM's worker to attach again")
    assert tag_states(daemon, MODEL) == AWAKE
    assert memfd_bytes([daemon.pid], daemon.memfd_prefix(MODEL)) >= KV_CACHE_BYTES, "the new daemon lacks the memory"
    wait_for(lambda: model_status(daemon, MODEL)["controllerPid"] == server.process.pid, timeout=60,
             what="vLLM's API server to attach again as the model's controller")
    # The new daemon really holds it: vLLM's own sleep goes through it, and nothing is lost.
    server.call("POST", "/sleep?level=1")
    assert tag_states(daemon, MODEL) == ASLEEP
    assert memfd_bytes([daemon.pid, worker_pid(daemon)], daemon.memfd_prefix(MODEL)) == 0
    server.call("POST", "/wake_up")
    assert server.answers() == server.before


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
