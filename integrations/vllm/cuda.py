"""vLLM on CUDA: every worker's sleep-mode allocator becomes a SleepdAllocator,
whose pools are `SleepClient.pool(tag)`. Everything vLLM allocates inside
`use_memory_pool(tag)` (weights, KV cache and, from 0.32, runtime state) then
lives in daemon-owned device memory, and vLLM's own `sleep`/`wake_up` reach
the daemon through the allocator, unchanged.
"""

from . import session
from .patching import run_after


def _attach(worker) -> None:
    import torch

    # vLLM's init_device has just made the worker's GPU current.
    session.attach(worker, device=torch.cuda.current_device())


def install() -> None:
    from vllm.device_allocator import cumem
    from vllm.v1.worker.gpu_worker import Worker

    run_after(Worker, "init_device", _attach)
    # Every release reaches the allocator through this singleton accessor, directly (before 0.32)
    # or through vllm.device_allocator.get_mem_allocator_instance() (0.32 on).
    cumem.CuMemAllocator.get_instance = staticmethod(session.allocator)
