"""GPU scenarios: they run only where a real NVIDIA GPU, its driver and a CUDA
build of torch are present, and skip with the reason everywhere else.

    python -m pytest -q tests/gpu
"""

import pytest

from sleepd import _C
from sleepd.bench.local import LocalDaemon


def _why_not() -> str | None:
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "torch sees no CUDA device (a CPU build of torch, or no GPU)"
    return _C.cuda_unavailable_reason()


REASON = _why_not()


def pytest_collection_modifyitems(config, items):
    if REASON:
        for item in items:
            if "tests/gpu" in str(item.fspath):
                item.add_marker(pytest.mark.skip(reason=f"needs a GPU: {REASON}"))


@pytest.fixture
def gpu_daemon(tmp_path):
    daemon = LocalDaemon(str(tmp_path), "--backend", "cuda", "--host-pool-budget", "32GiB")
    yield daemon
    daemon.stop()


@pytest.fixture
def backend():
    return "cuda"
