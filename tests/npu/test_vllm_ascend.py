"""vLLM on sleepd on a real Ascend NPU: an unmodified `vllm serve --enable-sleep-mode`
(vllm-ascend's platform) whose sleep-mode allocator is sleepd's. Needs an NPU and
vllm-ascend installed beside sleepd; skips with the reason otherwise.

    python -m pytest -q tests/npu/test_vllm_ascend.py
"""

import pytest

pytest.importorskip("vllm_ascend", reason="needs vllm-ascend installed beside sleepd")

from support import Daemon  # noqa: E402
from test_npu import free_bytes  # noqa: E402
from vllm_suite import tiny_model  # noqa: E402
from vllm_suite.servers import VllmServer, model_status, tag_states  # noqa: E402

pytestmark = pytest.mark.timeout(1200)
MODEL = "tiny"
KV_CACHE_BYTES = 2 << 30


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    daemon = Daemon(tmp_path_factory.mktemp("sleepd"), "acl", "--host-pool-budget", "32GiB")
    checkpoint = tiny_model.build(str(tmp_path_factory.mktemp("tiny")), 0)
    server = VllmServer(daemon, MODEL, checkpoint, str(tmp_path_factory.mktemp("vllm") / "vllm.log"),
                        "--kv-cache-memory-bytes", str(KV_CACHE_BYTES))
    server.daemon = daemon
    yield server
    server.stop()
    daemon.stop()


def test_vllm_ascend_sleeps_through_sleepd_frees_the_npu_and_answers_the_same(server):
    daemon = server.daemon
    before = server.answers()
    assert tag_states(daemon, MODEL) == {"weights": "MAPPED", "kv_cache": "MAPPED"}
    awake = free_bytes()

    server.call("POST", "/sleep?level=1")

    assert server.is_sleeping() is True and model_status(daemon, MODEL)["sleeping"] is True
    assert tag_states(daemon, MODEL) == {"weights": "OFFLOADED", "kv_cache": "DISCARDED"}
    freed = free_bytes() - awake
    assert freed >= 0.95 * KV_CACHE_BYTES, f"aclrtGetMemInfo: only {freed} bytes freed"
    server.call("POST", "/wake_up")
    assert server.answers() == before


def test_sleepctl_sleep_runs_vllm_ascends_own_sleep_and_a_request_wakes_it(server):
    daemon = server.daemon
    before = server.answers()
    daemon.ctl("sleep", "--model", MODEL, "--level", "1")
    assert server.is_sleeping() is True
    assert server.answers() == before  # the first request wakes it
    assert server.is_sleeping() is False and model_status(daemon, MODEL)["sleeping"] is False
