"""vLLM's RL weight update on sleepd: sleep at level 2 (weights and KV cache discarded),
bring the weights back, load new ones into the same tensors, bring the KV cache back,
and vLLM answers as the new model does."""

import pytest

from servers import script_result, start_rl_flow
from support import Daemon

# The first test also waits for vLLM to start (minutes on two shared cores).
pytestmark = pytest.mark.timeout(1200)

TIMEOUT = 900  # vLLM's start on two shared cores


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    daemon = Daemon(tmp_path_factory.mktemp("sleepd"), "host")
    yield daemon
    daemon.stop()


def test_level_2_sleep_then_new_weights_into_the_same_tensors_give_the_new_models_answers(daemon, tiny_models):
    # The reference (the new checkpoint loaded from disk) runs beside the flow, as another model.
    flow = start_rl_flow(daemon, "policy", "flow", tiny_models["a"], tiny_models["b"])
    reference = start_rl_flow(daemon, "reference", "reference", tiny_models["b"])
    seen, expected = script_result(flow, TIMEOUT), script_result(reference, TIMEOUT)

    assert seen["asleep"]["vllm"] is True
    assert seen["asleep"]["sleepd"] == {"sleeping": True, "tags": {"weights": "DISCARDED", "kv_cache": "DISCARDED"}}
    assert seen["weights_back"]["vllm"] is True, "vLLM said awake before the KV cache was back"
    assert seen["weights_back"]["sleepd"] == {"sleeping": True, "tags": {"weights": "MAPPED", "kv_cache": "DISCARDED"}}
    assert seen["loaded"] and seen["loaded"][0] > 0
    assert seen["awake"] == {"vllm": False, "sleepd": {"sleeping": False,
                                                       "tags": {"weights": "MAPPED", "kv_cache": "MAPPED"}}}
    assert seen["before"] != expected["before"], "the two checkpoints answer alike: the test proves nothing"
    assert seen["after"] == expected["before"]
