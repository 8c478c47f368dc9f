"""vLLM on sleepd on a real GPU: an unmodified `vllm serve --enable-sleep-mode` whose
sleep-mode allocator is sleepd's (the plugin's CUDA path, which CI's CPU build of
vLLM cannot reach). Needs a GPU and a CUDA build of vLLM; skips with the reason
otherwise.

    SLEEPD_MODEL is set by the tests; run: python -m pytest -q tests/gpu/test_vllm_gpu.py
"""

import pytest

pytest.importorskip("vllm", reason="needs vLLM (a CUDA build) installed beside sleepd")

from support import Daemon  # noqa: E402
from vllm_suite import tiny_model  # noqa: E402
from vllm_suite.servers import VllmServer, model_status, script_result, start_rl_flow, tag_states  # noqa: E402

from sleepd import _C  # noqa: E402
from sleepd.daemon.nvml import Nvml  # noqa: E402

pytestmark = pytest.mark.timeout(1200)
MODEL = "tiny"
KV_CACHE_BYTES = 2 << 30


def device_used_bytes() -> int:
    """Used memory on CUDA device 0 as NVML reports it (the driver's view, not sleepd's)."""
    return Nvml.open([_C.CudaBackend().uuid(0)]).memory(0).used


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    return {name: tiny_model.build(str(tmp_path_factory.mktemp(f"tiny-{name}")), seed)
            for name, seed in (("a", 0), ("b", 1))}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    daemon = Daemon(tmp_path_factory.mktemp("sleepd"), "cuda", "--host-pool-budget", "32GiB")
    yield daemon
    daemon.stop()


@pytest.fixture(scope="module")
def server(daemon, checkpoints, tmp_path_factory):
    server = VllmServer(daemon, MODEL, checkpoints["a"], str(tmp_path_factory.mktemp("vllm") / "vllm.log"),
                        "--kv-cache-memory-bytes", str(KV_CACHE_BYTES))
    yield server
    server.stop()


def test_vllm_sleep_endpoint_frees_device_memory_through_sleepd_and_answers_stay_the_same(daemon, server):
    before = server.answers()
    states = tag_states(daemon, MODEL)
    assert states["weights"] == "MAPPED" and states["kv_cache"] == "MAPPED", states
    awake = device_used_bytes()

    server.call("POST", "/sleep?level=1")

    assert server.is_sleeping() is True
    assert model_status(daemon, MODEL)["sleeping"] is True
    states = tag_states(daemon, MODEL)
    assert (states["weights"], states["kv_cache"]) == ("OFFLOADED", "DISCARDED"), states
    # vLLM 0.32 on keeps runtime state (its own tag) at every level, as its cumem backend does.
    assert states.get("runtime", "OFFLOADED") == "OFFLOADED", states
    freed = awake - device_used_bytes()
    assert freed >= 0.95 * KV_CACHE_BYTES, f"NVML: only {freed} bytes freed"

    server.call("POST", "/wake_up")
    assert server.is_sleeping() is False
    assert model_status(daemon, MODEL)["sleeping"] is False
    assert server.answers() == before


def test_level_2_sleep_then_new_weights_into_the_same_tensors_give_the_new_models_answers(daemon, checkpoints):
    seen = script_result(start_rl_flow(daemon, "policy", checkpoints["a"], checkpoints["b"]), 900)
    for update in seen["updates"]:
        assert update["weights_back"]["vllm"] is True
        assert update["weights_back"]["sleepd"]["sleeping"] is True
        assert update["awake"]["vllm"] is False and update["awake"]["sleepd"]["sleeping"] is False
    to_new, back = seen["updates"]
    assert to_new["answers"] != seen["before"]
    assert back["answers"] == seen["before"]
