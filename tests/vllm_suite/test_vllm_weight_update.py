"""vLLM's RL weight-update flow on sleepd: sleep at level 2 (weights and KV cache discarded),
bring the weights back, load new ones into the same tensors, bring the KV cache back,
and vLLM answers as the new model does. Two rounds in one engine: to the second checkpoint
and back to the first, whose answers the engine gave when it loaded it from disk."""

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
    seen = script_result(start_rl_flow(daemon, "policy", tiny_models["a"], tiny_models["b"]), TIMEOUT)

    for update in seen["updates"]:
        assert update["asleep"]["vllm"] is True
        assert update["asleep"]["sleepd"] == {"sleeping": True,
                                              "tags": {"weights": "DISCARDED", "kv_cache": "DISCARDED"}}
        assert update["weights_back"]["vllm"] is True, "vLLM said awake before the KV cache was back"
        assert update["weights_back"]["sleepd"] == {"sleeping": True,
                                                    "tags": {"weights": "MAPPED", "kv_cache": "DISCARDED"}}
        assert update["loaded"] and update["loaded"][0] > 0
        assert update["awake"] == {"vllm": False, "sleepd": {"sleeping": False,
                                                             "tags": {"weights": "MAPPED", "kv_cache": "MAPPED"}}}
    to_new, back = seen["updates"]
    assert to_new["answers"] != seen["before"], "the two checkpoints answer alike: the test proves nothing"
    assert back["answers"] == seen["before"]
