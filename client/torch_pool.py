"""Routing torch's CUDA allocations into daemon-owned memory.

A CUDAPluggableAllocator points torch at the C hooks in sleepd._C; a MemPool
and `use_mem_pool` send one thread's allocations to it; a ChunkPool behind the
hooks carves them out of large daemon regions.
"""

import contextlib

from sleepd import _C


class TorchPool:
    def __init__(self, client, tag: str, chunk_bytes: int):
        import torch

        self.tag = tag
        self.regions = []
        self._client = client
        self.chunks = _C.ChunkPool(self._refill, chunk_bytes)
        self._allocator = torch.cuda.memory.CUDAPluggableAllocator(_C.__file__, "sleepd_malloc", "sleepd_free")
        self.mem_pool = torch.cuda.MemPool(self._allocator.allocator())

    def _refill(self, nbytes: int) -> tuple[int, int]:
        region = self._client.alloc(nbytes, self.tag)
        self.regions.append(region)
        return region.address, region.mapped_size

    @contextlib.contextmanager
    def active(self, device: int):
        import torch

        # Expandable segments map memory themselves, past the pluggable allocator.
        torch.cuda.memory._set_allocator_settings("expandable_segments:False")
        self.chunks.activate()
        try:
            with torch.cuda.use_mem_pool(self.mem_pool, device=device):
                yield self
        finally:
            self.chunks.deactivate()
