"""vLLM's RL weight update on sleepd: sleep at level 2 (weights and KV cache discarded),
bring the weights back, load new ones into the same tensors, bring the KV cache back,
and vLLM answers as the new model does."""

import json
import os
import subprocess
import sys

import pytest

from servers import ENVIRONMENT
from support import Daemon

# The first test also waits for vLLM to start (minutes on two shared cores).
pytestmark = pytest.mark.timeout(1200)

HERE = os.path.dirname(os.path.abspath(__file__))
TIMEOUT = 900  # vLLM's start on two shared cores


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    daemon = Daemon(tmp_path_factory.mktemp("sleepd"), "host")
    yield daemon
    daemon.stop()


def start(daemon, model: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, **ENVIRONMENT, "SLEEPD_MODEL": model, "SLEEPD_SOCKET": daemon.socket,
           # collective_rpc sends the loading function to the worker process pickled by value.
           "VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}
    return subprocess.Popen([sys.executable, os.path.join(HERE, "rl_flow.py"), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def result(process: subprocess.Popen) -> dict:
    output, _ = process.communicate(timeout=TIMEOUT)
    lines = [line for line in output.splitlines() if line.startswith("RESULT ")]
    assert process.returncode == 0 and lines, f"rl_flow.py failed ({process.returncode}):\n{output[-6000:]}"
    return json.loads(lines[-1][len("RESULT "):])


def test_level_2_sleep_then_new_weights_into_the_same_tensors_give_the_new_models_answers(daemon, tiny_models):
    # The reference (the new checkpoint loaded from disk) runs beside the flow, as another model.
    flow = start(daemon, "policy", "flow", tiny_models["a"], tiny_models["b"])
    reference = start(daemon, "reference", "reference", tiny_models["b"])
    seen, expected = result(flow), result(reference)

    assert seen["asleep"]["vllm"] is True
    assert seen["asleep"]["sleepd"] == {"sleeping": True, "tags": {"weights": "DISCARDED", "kv_cache": "DISCARDED"}}
    assert seen["weights_back"]["vllm"] is True, "vLLM said awake before the KV cache was back"
    assert seen["weights_back"]["sleepd"] == {"sleeping": True, "tags": {"weights": "MAPPED", "kv_cache": "DISCARDED"}}
    assert seen["loaded"] and seen["loaded"][0] > 0
    assert seen["awake"] == {"vllm": False, "sleepd": {"sleeping": False,
                                                       "tags": {"weights": "MAPPED", "kv_cache": "MAPPED"}}}
    assert seen["before"] != expected["before"], "the two checkpoints answer alike: the test proves nothing"
    assert seen["after"] == expected["before"]
