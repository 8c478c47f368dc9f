"""This worker process's attachment to the daemon.

vLLM reaches its sleep-mode allocator through a process-wide singleton
(`CuMemAllocator.get_instance()`), so the allocator that replaces it is one per
process too: made once the worker knows its rank and device, and found here.
"""

import os

from sleepd.client import SleepClient

from .allocator import SleepdAllocator

_allocator: SleepdAllocator | None = None


def global_rank(worker) -> int:
    """Distinct across TP, PP and DP. Data-parallel engines each number their workers from 0,
    except under an external launcher (torchrun, as verl runs vLLM), where the rank is torch's own."""
    parallel = worker.parallel_config
    if parallel.distributed_executor_backend == "external_launcher":
        return worker.rank
    return parallel.data_parallel_rank * parallel.world_size + worker.rank


def attach(worker, device: int) -> SleepdAllocator:
    """Attaches this worker as its global rank of $SLEEPD_MODEL on `device`."""
    global _allocator
    if not worker.vllm_config.model_config.enable_sleep_mode:
        raise RuntimeError(f"SLEEPD_MODEL={os.environ['SLEEPD_MODEL']} is set but vLLM's sleep mode is off, so "
                           "vLLM would keep its memory to itself: pass --enable-sleep-mode (LLM(..., "
                           "enable_sleep_mode=True)), or unset SLEEPD_MODEL")
    if _allocator is not None:
        raise RuntimeError(f"this process is already attached to sleepd as rank {_allocator.client.rank} of "
                           f"{_allocator.client.model}; vLLM runs one worker per process")
    # vLLM must run its own sleep (its scheduler pauses first): outside sleeps go through its controller.
    client = SleepClient.connect(os.environ["SLEEPD_MODEL"], rank=global_rank(worker), device=device,
                                 needs_controller=True)
    _allocator = SleepdAllocator(client)
    return _allocator


def allocator() -> SleepdAllocator:
    if _allocator is None:
        raise RuntimeError("vLLM asked for its sleep-mode allocator before this worker attached to sleepd "
                           "(the worker attaches when it initialises its device)")
    return _allocator
