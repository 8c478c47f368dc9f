"""Routing torch's CUDA (or, with torch_npu, NPU) allocations into daemon-owned memory.

A CUDAPluggableAllocator (NPUPluggableAllocator on an NPU) points torch at the C
hooks in sleepd._C, whose signatures both accept; a MemPool
and `use_mem_pool` send one thread's allocations to it; a ChunkPool behind the
hooks (a NativePool) carves them out of large daemon regions, refilled in C++:
torch calls the hooks holding its allocator lock, and a refill that took the GIL
there would deadlock with any thread that frees a tensor.

torch routes only the allocations of the thread that opened the pool: other
threads' (a loader's thread pool) go to plain device memory and never sleep.
A pool block that sees the device's memory grow outside every sleepd pool
says so with a RoutingWarning rather than let it pass silently.
"""

import contextlib
import os
import threading
import warnings

from sleepd import _C

MiB = 1 << 20


class RoutingWarning(RuntimeWarning):
    """Device memory was allocated outside sleepd while a pool() block was open."""


def _device_api(backend: str):
    """torch's module for the backend's devices and its pluggable allocator class. The NPU
    path (torch_npu) has never run: no NPU was available where it was written."""
    import torch

    if backend == "acl":
        import torch_npu

        return torch.npu, torch_npu.npu.memory.NPUPluggableAllocator
    return torch.cuda, torch.cuda.memory.CUDAPluggableAllocator


class TorchPool:
    def __init__(self, native_pool, device: int, backend: str = "cuda"):
        self.tag = native_pool.tag
        self.native = native_pool
        self._api, pluggable = _device_api(backend)
        refuse_async_allocator(self._api)
        self._allocator = pluggable(_C.__file__, "sleepd_malloc", "sleepd_free")
        # A MemPool binds to the device current when it is made: made on another, the client's
        # allocations would fall back to plain cudaMalloc, bypass sleepd and never sleep.
        with self._api.device(device):
            self.mem_pool = self._api.MemPool(self._allocator.allocator())

    @contextlib.contextmanager
    def active(self, device: int, pooled_bytes):
        """Routes this thread's allocations on `device` here. `pooled_bytes()`: what every
        sleepd pool of this process holds, to tell the device's growth outside them."""
        reserved, pooled = self._api.memory_reserved(device), pooled_bytes()
        with _expandable_segments_off():
            self.native.activate()
            try:
                with self._api.use_mem_pool(self.mem_pool, device=device):
                    yield self
            finally:
                self.native.deactivate()
        outside = self._api.memory_reserved(device) - reserved - (pooled_bytes() - pooled)
        if outside > 0:
            warnings.warn(f"{outside / MiB:.0f} MiB of device {device} were allocated outside sleepd while "
                          f"pool({self.tag!r}) was open, most likely by another thread: pool() routes only the "
                          "allocations of the thread that opens it, so that memory will not sleep; open pool() "
                          "in every thread that allocates what should sleep", RoutingWarning, stacklevel=5)  # the caller's `with client.pool()`


# Expandable segments map memory themselves, past a pluggable allocator. The setting is
# the whole process's: the first pool() block to open turns it off if it was on, and the
# last to close turns it back on.
_settings_lock = threading.Lock()
_open_blocks = 0
_expandable_was_on = False


def _set_allocator_settings(settings: str) -> None:
    import torch

    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None)  # torch.cuda's own is deprecated in 2.13
    (setter or torch.cuda.memory._set_allocator_settings)(settings)


def refuse_async_allocator(api) -> None:
    """Refuses a process whose torch allocates with cudaMallocAsync: that backend takes no pluggable
    allocator or MemPool, so nothing would land in sleepd."""
    backend = getattr(getattr(api, "memory", None), "get_allocator_backend", None)
    if backend is not None and backend() == "cudaMallocAsync":
        raise RuntimeError("torch allocates with cudaMallocAsync (PYTORCH_ALLOC_CONF or PYTORCH_CUDA_ALLOC_CONF "
                           "backend:cudaMallocAsync), which routes nothing to a pluggable allocator: sleepd's "
                           "pool() needs torch's native allocator; remove that setting")


def _expandable_segments_on() -> bool:
    """Whether torch's allocator uses expandable segments: the last value given wins."""
    import torch

    getter = getattr(torch._C, "_accelerator_getAllocatorSettings", None)  # torch 2.9 and later
    given = [getter()] if getter else [os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""),
                                       os.environ.get("PYTORCH_ALLOC_CONF", "")]
    on = False
    for setting in ",".join(given).split(","):
        key, _, value = setting.partition(":")
        if key.strip() == "expandable_segments":
            on = value.strip().lower() == "true"
    return on


@contextlib.contextmanager
def _expandable_segments_off():
    global _open_blocks, _expandable_was_on
    with _settings_lock:
        if _open_blocks == 0:
            _expandable_was_on = _expandable_segments_on()
            if _expandable_was_on:
                _set_allocator_settings("expandable_segments:False")
        _open_blocks += 1
    try:
        yield
    finally:
        with _settings_lock:
            _open_blocks -= 1
            if _open_blocks == 0 and _expandable_was_on:
                _set_allocator_settings("expandable_segments:True")
