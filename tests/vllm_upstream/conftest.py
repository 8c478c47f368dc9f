"""vLLM's own sleep-mode tests on sleepd: the run's daemon, models and environment.

The tests are vLLM's, taken unchanged from the source distribution of the release the vLLM suite pins
(.ci/vllm-tests fetches it once, then offline). What cannot work offline or on a CPU is supplied from
outside them: the checkpoints they name are tiny generated ones of the same architectures, in a
Hugging Face cache under the same ids (HF_HUB_OFFLINE=1), and the accelerator memory query answers
with the host's memory (layer/sitecustomize.py). Where vLLM is not installed (the README's test
command), every test here is skipped with the reason, like tests/vllm_suite."""

import os
import subprocess
import sys

import pytest

from support import skip_where_vllm_is_missing

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
WHY_SKIPPED = ("vLLM is not installed here: .ci/vllm-env VENV builds its environment, "
               "then .ci/vllm-tests VENV runs vLLM's own sleep-mode tests")


def pytest_collection_modifyitems(items):
    skip_where_vllm_is_missing(items, "tests/vllm_upstream", WHY_SKIPPED)


# The checkpoints vLLM's tests name, and the generator of a stand-in of the same architecture.
def _builders():
    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "vllm_suite"))
    import tiny_model

    return {
        "hmellor/tiny-random-LlamaForCausalLM": tiny_model.build_llama,  # safetensors
        "facebook/opt-125m": tiny_model.build_opt,  # a pytorch .bin checkpoint
        # test_sleep.py serves it with --max-model-len 8192
        "meta-llama/Llama-3.2-1B": lambda directory: tiny_model.build_llama(directory, 8192, "bfloat16"),
        "tiny-random/qwen3-next-moe": tiny_model.build_qwen3_next,  # hybrid: gated delta net + attention
    }


@pytest.fixture(scope="session")
def hub_cache(tmp_path_factory) -> str:
    """A Hugging Face hub cache that holds each named checkpoint as a snapshot of `main`."""
    hub = tmp_path_factory.mktemp("hf-hub")
    revision = "0" * 40
    for repo, build in _builders().items():
        folder = hub / f"models--{repo.replace('/', '--')}"
        (folder / "refs").mkdir(parents=True)
        (folder / "refs" / "main").write_text(revision)
        snapshot = folder / "snapshots" / revision
        snapshot.mkdir(parents=True)
        build(str(snapshot))
    return str(hub)


@pytest.fixture(scope="session")
def vllm_tests() -> str:
    """The folder holding the extracted vLLM test files (fetched and extracted once, then cached)."""
    return subprocess.run([os.path.join(ROOT, ".ci", "vllm-tests"), "--extract"], check=True,
                          capture_output=True, text=True).stdout.strip()


@pytest.fixture(scope="session")
def compile_cache(tmp_path_factory) -> str:
    """vLLM's compile cache, shared by every test and both runs, so that compiling costs once."""
    return os.environ.get("SLEEPD_VLLM_CACHE_ROOT") or str(tmp_path_factory.mktemp("vllm-cache"))
