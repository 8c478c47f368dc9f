"""Sleeps and wakes from outside vLLM go through vLLM's engine, with several vLLM
engines on one device: `sleepctl swap` and eviction run each one's own sleep and
wake through the process that is its controller (what one `vllm serve` shows alone,
its API server as the controller, is in test_vllm_server.py). A request that reaches a
sleeping vLLM wakes it (or, with SLEEPD_WAKE_ON_REQUEST=0, waits for a wake), through
either of two API servers; an `LLM` or `AsyncLLM` script's process is its controller.

Servers on a device that fits one of them awake (each holds a 1 GiB KV
cache): A, with two API server processes, is up for the whole module; B
starts once A sleeps. The tests run in order and each leaves the state the
next one expects.
"""

import os
import signal
import subprocess
import sys
import threading

import pytest

from kernel import memfd_bytes
from servers import ASLEEP, AWAKE, PROMPTS, VllmServer, asleep, model_status, script_result, start_script, tag_states
from support import MiB, Daemon, Engine, scrape, value, wait_for

# The first test also waits for vLLM to start (minutes on two shared cores).
pytestmark = pytest.mark.timeout(900)

A, B = "ctl-a", "ctl-b"
# One server awake (1 GiB of KV cache and some MiB of weights) fits; two do not.
CAPACITY = "1536MiB"
SCRIPT_SECONDS = 600  # a vLLM script's start, its checks and its exit


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    daemon = Daemon(tmp_path_factory.mktemp("sleepd"), "host", "--host-device-capacity", CAPACITY)
    yield daemon
    daemon.stop()


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    return tmp_path_factory.mktemp("vllm")


@pytest.fixture(scope="module")
def server_a(daemon, tiny_models, logs):
    """A runs two API server processes (--api-server-count 2)."""
    server = VllmServer(daemon, A, tiny_models["a"], str(logs / "a.log"), "--api-server-count", "2")
    server.before = server.answers()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def server_b(daemon, tiny_models, logs, server_a):
    """B makes requests wait for a wake instead of waking it. It only fits while A sleeps."""
    daemon.ctl("sleep", "--model", A, "--level", "1")
    server = VllmServer(daemon, B, tiny_models["b"], str(logs / "b.log"), environment={"SLEEPD_WAKE_ON_REQUEST": "0"})
    server.before = server.answers()
    yield server
    server.stop()


def test_with_two_api_servers_a_request_to_either_wakes_the_model(daemon, server_a):
    """`vllm serve --api-server-count 2`: two API server processes share one engine core. The first to
    attach is the controller; the other is a second front end, whose requests wake the model through the
    daemon (and so through the controller)."""
    connections = server_a.connection_to_each_api_server(2)
    assert model_status(daemon, A)["controllerPid"] in connections and len(connections) == 2
    for pid, connection in connections.items():
        daemon.ctl("sleep", "--model", A, "--level", "1")
        assert asleep(daemon, server_a)
        assert server_a.complete(PROMPTS[0], connection=connection) == server_a.before[0], f"API server {pid}"
        assert asleep(daemon, server_a) is False
    for connection in connections.values():
        connection.close()


def test_two_vllm_servers_swap_through_their_controllers_and_answer_as_before(daemon, server_a, server_b):
    assert asleep(daemon, server_a) is True and asleep(daemon, server_b) is False

    daemon.ctl("swap", "--to", A)
    assert asleep(daemon, server_a) is False and asleep(daemon, server_b) is True
    assert server_a.answers() == server_a.before

    daemon.ctl("swap", "--to", B)
    assert asleep(daemon, server_a) is True and asleep(daemon, server_b) is False
    assert server_b.answers() == server_b.before


def test_a_request_to_the_sleeping_server_evicts_the_other(daemon, server_a, server_b):
    assert asleep(daemon, server_a) is True and asleep(daemon, server_b) is False
    evicted = value(scrape(daemon), "sleepd_evictions_total", model=B, reason="room") or 0

    assert server_a.complete(PROMPTS[1]) == server_a.before[1]

    assert asleep(daemon, server_a) is False and asleep(daemon, server_b) is True
    assert value(scrape(daemon), "sleepd_evictions_total", model=B, reason="room") == evicted + 1


def test_with_wake_on_request_off_a_request_waits_for_a_wake(daemon, server_a, server_b):
    assert asleep(daemon, server_b) is True
    answers = []
    request = threading.Thread(target=lambda: answers.append(server_b.complete(PROMPTS[2])))
    request.start()
    request.join(timeout=10)
    assert request.is_alive() and answers == [], "the request did not wait for the model to be woken"
    assert asleep(daemon, server_b) is True

    daemon.ctl("swap", "--to", B)

    request.join(timeout=120)
    assert answers == [server_b.before[2]]
    assert value(scrape(daemon), "sleepd_wake_wait_seconds_count", model=B, how="waited") == 1


@pytest.mark.parametrize("multiprocessing", ["1", "0"], ids=["engine-core-apart", "engine-core-in-process"])
def test_an_llm_scripts_process_is_the_controller_so_sleepctl_runs_its_own_sleep_and_a_request_wakes_it(
        daemon, server_b, tiny_models, multiprocessing):
    """With VLLM_ENABLE_V1_MULTIPROCESSING=0 the engine core (and the worker) run in the script's process,
    stepped only by its generate(): the controller's sleep waits for those steps to finish the requests in
    flight."""
    if not asleep(daemon, server_b):
        daemon.ctl("sleep", "--model", B, "--level", "1")  # room for this vLLM's KV cache
    seen, log = script_result(start_script(daemon, f"offline-{multiprocessing}", "llm_controller.py",
                                           tiny_models["a"],
                                           environment={"VLLM_ENABLE_V1_MULTIPROCESSING": multiprocessing}),
                              SCRIPT_SECONDS, with_log=True)

    assert seen["attached"] == {"sleeping": False, "controller_pid": seen["pid"], "tags": AWAKE}
    assert seen["sleepctl_sleep"]["code"] == 0, seen["sleepctl_sleep"]["stderr"]
    assert seen["sleepctl_sleep"]["status"] == {"sleeping": True, "controller_pid": seen["pid"], "tags": ASLEEP}
    assert seen["sleepctl_sleep"]["vllm_sleeping"] is True  # vLLM's own sleep ran
    assert seen["while_asleep"] == seen["before"]
    assert seen["after_request"] == {"status": {"sleeping": False, "controller_pid": seen["pid"], "tags": AWAKE},
                                     "vllm_sleeping": False}
    during = seen["sleep_during_generate"]
    assert (during["code"], during["answered"]) == (0, True), during["stderr"]
    # The sleep landed in the middle of the batch. An engine core of its own runs ahead of the script's
    # steps, so vLLM's log says it: its waiting sleep found requests in flight (only this sleep waits). One
    # in the script's process runs only in those steps, so requests were left unanswered when it slept.
    if multiprocessing == "1":
        assert log.count("Waiting for in-flight requests to complete before sleeping") == 1
    else:
        assert len(during["unanswered_at_sleep"]) == 1 and during["unanswered_at_sleep"][0] > 0
    assert seen["own_sleep"] == {"sleeping": True, "controller_pid": seen["pid"], "tags": ASLEEP}
    assert seen["after"] == seen["before"]


def test_an_async_llm_used_directly_is_its_own_controller_too(daemon, server_b, tiny_models):
    if not asleep(daemon, server_b):
        daemon.ctl("sleep", "--model", B, "--level", "1")  # room for this vLLM's KV cache
    seen = script_result(start_script(daemon, "async", "async_llm_controller.py", tiny_models["a"]), SCRIPT_SECONDS)

    assert seen["attached"] == {"sleeping": False, "controller_pid": seen["pid"], "tags": AWAKE}
    assert seen["sleepctl_sleep"]["code"] == 0, seen["sleepctl_sleep"]["stderr"]
    assert seen["sleepctl_sleep"]["status"] == {"sleeping": True, "controller_pid": seen["pid"], "tags": ASLEEP}
    assert seen["sleepctl_sleep"]["vllm_sleeping"] is True
    assert seen["while_asleep"] == seen["before"]
    assert seen["after"] == {"status": {"sleeping": False, "controller_pid": seen["pid"], "tags": AWAKE},
                             "vllm_sleeping": False}


def test_a_vllm_worker_killed_while_awake_leaves_the_daemon_serving_and_the_other_server_untouched(daemon, server_a,
                                                                                                   server_b):
    """It ends server B. (The asleep case is in test_vllm_server.py.)"""
    if not asleep(daemon, server_a):
        daemon.ctl("sleep", "--model", A, "--level", "1")
    if asleep(daemon, server_b):
        daemon.ctl("wake", "--model", B)
    (rank,) = model_status(daemon, B)["ranks"]
    assert memfd_bytes([daemon.pid, rank["pid"]], daemon.memfd_prefix(B)) > 0
    a_before = tag_states(daemon, A), model_status(daemon, A)["ranks"]

    os.kill(rank["pid"], signal.SIGKILL)

    wait_for(lambda: B not in {m["name"] for m in daemon.status()["models"]} or not model_status(daemon, B)["ranks"],
             timeout=60, what="the daemon to reclaim the killed worker")
    assert memfd_bytes([daemon.pid, *daemon.mover_pids()], daemon.memfd_prefix(B)) == 0
    assert daemon.process.poll() is None
    assert (tag_states(daemon, A), model_status(daemon, A)["ranks"]) == a_before
    daemon.ctl("wake", "--model", A)
    assert asleep(daemon, server_a) is False
    assert server_a.answers() == server_a.before


def test_a_vllm_worker_killed_in_the_middle_of_an_outside_sleep_fails_it_and_leaves_the_daemon_serving(
        daemon, server_a):
    """The worker is stopped, so the sleep sleepctl asks for waits in vLLM's own sleep, and is killed
    there. Last: it ends server A."""
    other = Engine(daemon, "other", regions=[("weights", 4 * MiB), ("kv_cache", 4 * MiB)])
    try:
        (rank,) = model_status(daemon, A)["ranks"]
        assert memfd_bytes([daemon.pid, rank["pid"]], daemon.memfd_prefix(A)) > 0
        other_before = other.report()
        os.kill(rank["pid"], signal.SIGSTOP)
        sleeping = subprocess.Popen([sys.executable, "-m", "sleepd.client.ctl", "--socket", daemon.socket, "sleep",
                                     "--model", A, "--level", "1"], stderr=subprocess.PIPE, text=True)
        try:
            sleeping.wait(timeout=10)
            raise AssertionError(f"the sleep ended while vLLM's worker was stopped: {sleeping.stderr.read()}")
        except subprocess.TimeoutExpired:
            pass  # in the middle of it: the daemon waits for vLLM's own sleep

        os.kill(rank["pid"], signal.SIGKILL)

        _, error = sleeping.communicate(timeout=120)
        assert sleeping.returncode != 0 and len(error.strip().splitlines()) == 1, error
        assert A in error, error
        wait_for(lambda: A not in {m["name"] for m in daemon.status()["models"]}
                 or not model_status(daemon, A)["ranks"], timeout=60, what="the daemon to reclaim the killed worker")
        assert memfd_bytes([daemon.pid, *daemon.mover_pids()], daemon.memfd_prefix(A)) == 0
        assert daemon.process.poll() is None
        assert other.report() == other_before
    finally:
        other.close()
