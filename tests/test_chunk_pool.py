"""The sub-allocator behind torch's pluggable-allocator hooks, driven through the
same C entry points torch calls, over real host memory."""

import ctypes
import os

import pytest

from sleepd import _C

MiB = 1 << 20


class Chunks:
    """Hands out real mapped memory as chunks, recording each."""

    def __init__(self):
        self.backend = _C.HostBackend(1, 256 * MiB)
        self.given = []

    def __call__(self, nbytes):
        page = os.sysconf("SC_PAGESIZE")
        size = -(-nbytes // page) * page
        handle = self.backend.create(0, size)
        address = self.backend.reserve(size)
        self.backend.map(address, size, handle, 0)
        self.given.append((address, size))
        return address, size


def test_allocations_are_carved_from_few_chunks_and_reused():
    chunks = Chunks()
    pool = _C.ChunkPool(chunks, 8 * MiB)
    addresses = [pool.allocate(MiB) for _ in range(6)]
    assert pool.chunk_count == 1 and len(chunks.given) == 1
    base, size = chunks.given[0]
    assert all(base <= a < base + size for a in addresses)
    assert len(set(addresses)) == 6
    big = pool.allocate(20 * MiB)  # larger than a chunk: a chunk of its own
    assert pool.chunk_count == 2 and chunks.given[1][1] >= 20 * MiB
    for address in addresses:
        pool.deallocate(address)
    assert pool.allocate(7 * MiB) == base, "freed extents were not merged back"
    assert pool.bytes_in_use == 27 * MiB
    pool.deallocate(big)
    with pytest.raises(_C.BackendError, match="did not allocate"):
        pool.deallocate(big)


def test_the_c_hooks_serve_the_active_pool_and_free_from_any_pool():
    library = ctypes.CDLL(_C.__file__)
    malloc, free = library.sleepd_malloc, library.sleepd_free
    malloc.restype, malloc.argtypes = ctypes.c_void_p, [ctypes.c_ssize_t, ctypes.c_int, ctypes.c_void_p]
    free.restype, free.argtypes = None, [ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int, ctypes.c_void_p]

    assert malloc(4096, 0, None) is None  # no active pool: torch sees an allocation failure
    chunks = Chunks()
    pool = _C.ChunkPool(chunks, 4 * MiB)
    pool.activate()
    try:
        pointer = malloc(3 * MiB, 0, None)
    finally:
        pool.deactivate()
    base, size = chunks.given[0]
    assert base <= pointer < base + size
    ctypes.memset(pointer, 0x5A, 3 * MiB)  # it is real, writable memory
    assert pool.bytes_in_use == 3 * MiB
    free(pointer, 3 * MiB, 0, None)  # freed with no pool active, as torch may
    assert pool.bytes_in_use == 0


def test_a_pool_opened_inside_another_hands_the_thread_back_to_it_when_it_closes():
    library = ctypes.CDLL(_C.__file__)
    malloc = library.sleepd_malloc
    malloc.restype, malloc.argtypes = ctypes.c_void_p, [ctypes.c_ssize_t, ctypes.c_int, ctypes.c_void_p]
    outer_chunks, inner_chunks = Chunks(), Chunks()
    outer, inner = _C.ChunkPool(outer_chunks, 4 * MiB), _C.ChunkPool(inner_chunks, 4 * MiB)

    def served_by(chunks, pointer):
        return any(base <= pointer < base + size for base, size in chunks.given)

    outer.activate()
    try:
        inner.activate()
        try:
            assert served_by(inner_chunks, malloc(MiB, 0, None))
        finally:
            inner.deactivate()
        assert served_by(outer_chunks, malloc(MiB, 0, None)), "the outer pool no longer served after the inner closed"
    finally:
        outer.deactivate()
    assert malloc(4096, 0, None) is None


def test_a_failing_refill_is_an_allocation_failure_not_a_crash():
    def refuse(nbytes):
        raise MemoryError("the daemon said no")

    pool = _C.ChunkPool(refuse, MiB)
    with pytest.raises(MemoryError):
        pool.allocate(4096)
    library = ctypes.CDLL(_C.__file__)
    library.sleepd_malloc.restype = ctypes.c_void_p
    library.sleepd_malloc.argtypes = [ctypes.c_ssize_t, ctypes.c_int, ctypes.c_void_p]
    pool.activate()
    try:
        assert library.sleepd_malloc(4096, 0, None) is None
    finally:
        pool.deactivate()

