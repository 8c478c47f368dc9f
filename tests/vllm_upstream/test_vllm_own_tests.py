"""vLLM's own sleep-mode tests (release pinned in tests/vllm_suite/requirements.txt) pass on sleepd,
and the end-to-end ones fail without it with vLLM's refusal of sleep mode on a CPU: so they exercise
sleepd's plug-in and nothing else makes them pass.

Each run is one pytest of vLLM's test tree (its own conftest and utils, unchanged); each test here
reads one of its outcomes. A vLLM test that is skipped, or not collected, fails here."""

import json
import os
import subprocess
import sys
import time

import pytest

from support import Daemon

LAYER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "layer")
SLEEP_MODE = "tests/basic_correctness/memory/sleep_mode/test_sleep_mode.py"
ROUTES = "tests/entrypoints/rl/state_transitions/test_sleep.py"

# The units of vLLM's sleep routes and sleep-mode contracts: they need no sleep mode, and pass with and
# without SLEEPD_MODEL.
UNITS = [
    "tests/v1/worker/test_sleep_mode_backend.py",
    "tests/v1/engine/test_wake_up_contract.py",
    "tests/v1/worker/test_kv_cache_allocation_scope.py",
    "tests/v1/worker/test_gpu_worker.py::test_sleep_preservation_restores_private_draft_not_shared_target",
    "tests/v1/worker/test_gpu_worker.py::test_sleep_preservation_allows_empty_draft_but_rejects_target_typo",
    "tests/v1/core/test_scheduler.py::test_kv_cache_release_after_keep_pause_preserves_requests",
    "tests/v1/core/test_scheduler.py::test_kv_cache_release_rejects_nonresident_memory",  # reads opt-125m's config
    "tests/v1/kv_connector/unit/test_config.py::test_kv_connector_allows_expandable_segments_with_sleep_mode",
    "tests/v1/kv_connector/unit/test_config.py::test_kv_connector_allows_expandable_segments_with_cumem_allocator",
    *(f"{ROUTES}::{name}" for name in (
        "test_sleep_route_response_and_engine_arguments", "test_sleep_route_rejects_invalid_query_before_dispatch",
        "test_wake_route_maps_engine_result_without_state_query", "test_release_kv_cache_memory_route",
        "test_sleep_mode_recorder_tracks_duration_and_cleans_up",
        "test_sleep_routes_visible_on_production_metrics_endpoint")),
]
# End to end: an engine with sleep mode on. The ones that start the engine in the test's own process
# come last, so the processes forked for the others start from a pytest process that has none.
END_TO_END = [
    f"{SLEEP_MODE}::test_end_to_end[hmellor/tiny-random-LlamaForCausalLM]",  # safetensors
    f"{SLEEP_MODE}::test_end_to_end[facebook/opt-125m]",  # a pytorch .bin checkpoint
    f"{SLEEP_MODE}::test_deep_sleep",
    f"{SLEEP_MODE}::test_deep_sleep_lora",
    f"{SLEEP_MODE}::test_deep_sleep_async",
    f"{ROUTES}::test_sleep_mode",  # vllm serve: /sleep, /is_sleeping, the sleep-state metrics, /wake_up by tags
    "tests/models/language/generation/test_gdn_sleep_wake.py::test_gdn_sleep_wake_no_stale_state",  # hybrid
]
REFUSAL = "Sleep mode is not supported on current platform"
RUN_SECONDS = 3600  # one run of them all; each of vLLM's tests may take up to TEST_SECONDS
TEST_SECONDS = 1200
# The first test of each run waits for the whole run.
pytestmark = pytest.mark.timeout(RUN_SECONDS + 300)


def _run(vllm_tests, hub_cache, compile_cache, report, ids, sleepd=None) -> dict:
    """Runs vLLM's tests `ids`; returns {nodeid: [its reports]} and the run's output (also kept beside
    `report`, as output.log)."""
    environment = {name: value for name, value in os.environ.items()
                   if not name.startswith(("SLEEPD_", "PYTEST_", "HF_", "VLLM_"))}
    environment.update({
        # The environment's bin first, as if activated: vLLM's RemoteOpenAIServer runs `vllm serve` from PATH.
        "PATH": os.pathsep.join([os.path.dirname(sys.executable), environment.get("PATH", "")]),
        "PYTHONPATH": LAYER, "SLEEPD_VLLM_TESTS_HOST_MEMORY": "1", "SLEEPD_VLLM_TESTS_REPORT": str(report),
        "HF_HUB_CACHE": hub_cache, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
        "VLLM_CACHE_ROOT": compile_cache,
        "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB: small models, two cores, and other work beside these tests
    })
    if sleepd is not None:
        environment.update({"SLEEPD_SOCKET": sleepd.socket, "SLEEPD_MODEL": "vllm-own",
                            "SLEEPD_VLLM_TESTS_MODEL": "vllm-own"})
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "pytest", "-p", "sleepd_vllm_layer", "-p", "no:cacheprovider",
                             "-q", "-rA", "--timeout", str(TEST_SECONDS), *ids], cwd=vllm_tests, env=environment,
                            capture_output=True, text=True, timeout=RUN_SECONDS)
    with open(os.path.join(os.path.dirname(report), "output.log"), "w") as log:
        log.write(result.stdout + result.stderr)
    reports = {}
    if os.path.exists(report):
        with open(report) as file:
            for line in file:
                entry = json.loads(line)
                reports.setdefault(entry["nodeid"], []).append(entry)
    return {"reports": reports, "output": result.stdout + result.stderr, "seconds": time.monotonic() - started}


@pytest.fixture(scope="module")
def on_sleepd(vllm_tests, hub_cache, compile_cache, tmp_path_factory):
    directory = tmp_path_factory.mktemp("sleepd")
    daemon = Daemon(directory, "host")
    try:
        yield _run(vllm_tests, hub_cache, compile_cache, directory / "report.jsonl", UNITS + END_TO_END, daemon)
    finally:
        daemon.stop()


@pytest.fixture(scope="module")
def without_sleepd(vllm_tests, hub_cache, compile_cache, tmp_path_factory):
    directory = tmp_path_factory.mktemp("control")
    return _run(vllm_tests, hub_cache, compile_cache, directory / "report.jsonl", UNITS + END_TO_END)


def _ids(test_ids) -> list[str]:
    """pytest would name a parameter with brackets test_id<n>; these keep vLLM's node id readable."""
    return [test_id.replace("[", "(").replace("]", ")") for test_id in test_ids]


def _outcomes(run, test_id) -> list:
    """The reports of the vLLM test (or tests, for a file or a parametrised function) `test_id`."""
    found = [entry for nodeid, entries in run["reports"].items()
             if nodeid == test_id or nodeid.startswith((test_id + "[", test_id + "::"))
             for entry in entries]
    assert found, f"{test_id} did not run; the run's output ends:\n{run['output'][-6000:]}"
    return found


def _assert_passed(run, test_id) -> None:
    for entry in _outcomes(run, test_id):
        assert entry["outcome"] == "passed", (
            f"{entry['nodeid']} {entry['outcome']} ({entry['when']}):\n{entry['longrepr'][-6000:]}\n"
            f"{entry['output'][-6000:]}")


@pytest.mark.parametrize("test_id", END_TO_END, ids=_ids(END_TO_END))
def test_vllm_end_to_end_passes_on_sleepd(on_sleepd, test_id):
    _assert_passed(on_sleepd, test_id)


@pytest.mark.parametrize("test_id", UNITS, ids=_ids(UNITS))
def test_vllm_unit_passes_with_sleepd_model_set(on_sleepd, test_id):
    _assert_passed(on_sleepd, test_id)


@pytest.mark.parametrize("test_id", END_TO_END, ids=_ids(END_TO_END))
def test_vllm_end_to_end_is_refused_without_sleepd(without_sleepd, test_id):
    """The control: vLLM on a CPU refuses sleep mode by itself, so without SLEEPD_MODEL each fails."""
    for entry in _outcomes(without_sleepd, test_id):
        assert entry["outcome"] == "failed", f"{entry['nodeid']} {entry['outcome']} without sleepd"
        assert REFUSAL in entry["longrepr"] + entry["output"], (
            f"{entry['nodeid']} failed without sleepd, but not with vLLM's refusal ({REFUSAL!r}):\n"
            f"{entry['longrepr'][-6000:]}")


@pytest.mark.parametrize("test_id", UNITS, ids=_ids(UNITS))
def test_vllm_unit_passes_without_sleepd(without_sleepd, test_id):
    _assert_passed(without_sleepd, test_id)
