"""A tag's chunk pool in an engine: allocations carved out of large daemon regions
that a DaemonRefill allocates over the fd socket and maps, all in C++.

Native code reaches it through sleepd._C's exported C functions sleepd_malloc and
sleepd_free (the signatures torch's pluggable allocators call) on a thread where
the pool is active; TorchPool (torch_pool.py) points torch at them. The refill
never takes the GIL: the caller may hold a lock (torch's allocator lock) that a
thread holding the GIL is waiting for.
"""

from sleepd import _C

from .fd_socket import ANSWER_SECONDS


class NativePool:
    def __init__(self, fd_socket, backend, device: int, tag: str, chunk_bytes: int, busy_seconds: float):
        """`busy_seconds`: how long a refill keeps asking while the model is busy with a sleep or wake."""
        self.tag = tag
        device_pid = backend.device_pid() if backend.shares_tokens else 0
        self.refill = _C.DaemonRefill(fd_socket.channel, backend, device, tag, device_pid, ANSWER_SECONDS,
                                      busy_seconds)
        self.chunks = _C.ChunkPool(self.refill, chunk_bytes)

    def activate(self) -> None:
        """Serves this thread's sleepd_malloc calls; pools nest, the innermost serves."""
        self.chunks.activate()

    def deactivate(self) -> None:
        self.chunks.deactivate()

    @property
    def bytes_in_use(self) -> int:
        return self.chunks.bytes_in_use
