"""The plugin as vLLM loads it: inert without SLEEPD_MODEL, and a clear refusal where
SLEEPD_MODEL is set but vLLM's sleep mode is off."""

import os
import subprocess
import sys

import pytest

from servers import ENVIRONMENT
from support import Daemon

pytestmark = pytest.mark.timeout(900)

# What vLLM's plugin loader leaves in place, as one line: whether the CPU platform offers
# sleep mode and whose code a CPU worker's sleep is.
PROBE = """
from vllm.plugins import load_general_plugins
load_general_plugins()
from vllm.platforms.cpu import CpuPlatform
from vllm.v1.worker.cpu_worker import CPUWorker
print(CpuPlatform().is_sleep_mode_available(), CPUWorker.sleep.__module__)
"""

REFUSED = """
if __name__ == "__main__":
    import sys
    from vllm import LLM
    LLM(sys.argv[1], dtype="float32", enforce_eager=True, max_model_len=256, kv_cache_memory_bytes=64 << 20)
"""


def probe(**env) -> str:
    plain = {key: value for key, value in os.environ.items() if key != "SLEEPD_MODEL"}
    result = subprocess.run([sys.executable, "-c", PROBE], env={**plain, **ENVIRONMENT, **env},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout.strip().splitlines()[-1]


def test_the_plugin_changes_nothing_in_vllm_without_SLEEPD_MODEL():
    assert probe() == "False vllm.v1.worker.cpu_worker"
    assert probe(SLEEPD_MODEL="tiny") == "True sleepd.integrations.vllm.cpu"


def test_SLEEPD_MODEL_without_sleep_mode_is_refused_with_the_reason(tmp_path, tiny_models):
    daemon = Daemon(tmp_path, "host")
    try:
        # The engine core, and so the worker that refuses, in the script's process: one process to start
        # instead of three (the worker refuses wherever it runs).
        env = {**os.environ, **ENVIRONMENT, "SLEEPD_MODEL": "tiny", "SLEEPD_SOCKET": daemon.socket,
               "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
        result = subprocess.run([sys.executable, "-c", REFUSED, tiny_models["a"]], env=env, capture_output=True,
                                text=True, timeout=600)
        assert result.returncode != 0
        assert "SLEEPD_MODEL=tiny is set but vLLM's sleep mode is off" in result.stdout + result.stderr
        assert daemon.status()["models"] == [], "the refused worker left a model attached"
    finally:
        daemon.stop()
