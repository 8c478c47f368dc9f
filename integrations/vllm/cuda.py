"""vLLM on CUDA: every worker's sleep-mode allocator becomes a SleepdAllocator,
whose pools are `SleepClient.pool(tag)`. Everything vLLM allocates inside
`use_memory_pool(tag)` (weights, KV cache and, from 0.32, runtime state) then
lives in daemon-owned device memory, and vLLM's own `sleep`/`wake_up` reach
the daemon through the allocator, unchanged.
"""

import contextlib

from . import session
from .patching import run_after, run_within


def _attach(worker) -> None:
    import torch

    # vLLM's init_device has just made the worker's GPU current.
    session.attach(worker, device=torch.cuda.current_device())


@contextlib.contextmanager
def _memory_seen_by_this_rank(worker):
    """vLLM's Worker.sleep reads the device's free memory before and after and asserts it did not
    shrink. On a GPU that several models share, another model waking meanwhile shrinks it though
    this rank freed all it held. During the sleep, the queries it makes answer for this rank alone
    (SleepdAllocator.memory_info), so its check and its log line are about its own memory."""
    import torch

    allocator = session.allocator()
    total = torch.cuda.mem_get_info()[1]
    # Older releases ask torch.cuda, newer ones torch.accelerator (where this torch has it).
    queries = [(module, name) for module, name in ((torch.cuda, "mem_get_info"), (torch.accelerator, "get_memory_info"))
               if hasattr(module, name)]
    originals = [getattr(module, name) for module, name in queries]
    for module, name in queries:
        setattr(module, name, lambda *device: allocator.memory_info(total))
    try:
        yield
    finally:
        for (module, name), original in zip(queries, originals):
            setattr(module, name, original)


def install() -> None:
    from vllm.device_allocator import cumem
    from vllm.v1.worker.gpu_worker import Worker

    run_after(Worker, "init_device", _attach)
    run_within(Worker, "sleep", _memory_seen_by_this_rank)
    # Every release reaches the allocator through this singleton accessor, directly (before 0.32)
    # or through vllm.device_allocator.get_mem_allocator_instance() (0.32 on).
    cumem.CuMemAllocator.get_instance = staticmethod(session.allocator)
