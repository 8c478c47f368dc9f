"""vLLM on Ascend NPUs (vllm-ascend): every NPU worker's sleep-mode allocator
(vllm-ascend's `CaMemAllocator`, reached through its `get_instance()` singleton
accessor as vLLM's `CuMemAllocator` is on CUDA) becomes a SleepdAllocator, whose
pools are `SleepClient.pool(tag)` over torch_npu's pluggable allocator.
vllm-ascend's `sleep(level)`/`wake_up(tags)` then reach the daemon unchanged.

Written from vllm-ascend 0.11, 0.13 and 0.18 (their workers call the
allocator's get_instance, use_memory_pool, sleep, wake_up and
get_current_usage, all of which SleepdAllocator has); it has never run, as no
NPU was available where it was written (tests/npu/test_vllm_ascend.py runs it
on one).
"""

from . import session
from .patching import run_after

# Where NPUWorker lives: vllm-ascend 0.13 on, then 0.11.
WORKER_MODULES = ("vllm_ascend.worker.worker", "vllm_ascend.worker.worker_v1")


def _attach(worker) -> None:
    import torch

    # vllm-ascend's init_device has just made the worker's NPU current.
    session.attach(worker, device=torch.npu.current_device())


def _worker_class():
    import importlib

    for name in WORKER_MODULES:
        try:
            return importlib.import_module(name).NPUWorker
        except (ImportError, AttributeError):
            continue
    from vllm_ascend import __version__

    raise RuntimeError(f"sleepd cannot run vllm-ascend {__version__}: none of {', '.join(WORKER_MODULES)} "
                       "defines NPUWorker; sleepd was written against vllm-ascend 0.11 to 0.18 (see docs/vllm.md)")


def install() -> None:
    from vllm_ascend.device_allocator import camem

    run_after(_worker_class(), "init_device", _attach)
    camem.CaMemAllocator.get_instance = staticmethod(session.allocator)
