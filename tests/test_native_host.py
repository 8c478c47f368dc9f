"""The host backend in sleepd._C, checked against what the kernel reports."""

import contextlib
import os
import random

import pytest

from sleepd import _C

MiB = 1 << 20
BLOCK = _C.CHECKSUM_BLOCK


def memfd_blocks(backend, handle) -> int:
    fd = backend.export_handle(handle)
    try:
        return os.fstat(fd).st_blocks * 512
    finally:
        os.close(fd)


def test_create_commits_memory_and_release_frees_it():
    backend = _C.HostBackend(1, 64 * MiB)
    handle = backend.create(0, 8 * MiB, "sleepd:test")
    fd = backend.export_handle(handle)
    assert os.fstat(fd).st_blocks * 512 >= 8 * MiB
    assert os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:sleepd:test")
    assert backend.used(0) == 8 * MiB
    backend.release(handle)
    assert backend.used(0) == 0
    # The exported fd kept no memory alive: the daemon takes it back, and it cannot grow again.
    assert (os.fstat(fd).st_size, os.fstat(fd).st_blocks) == (0, 0)
    with pytest.raises(PermissionError):
        os.ftruncate(fd, 8 * MiB)
    os.close(fd)


def test_capacity_is_enforced_and_a_refusal_changes_nothing():
    backend = _C.HostBackend(2, 16 * MiB)
    first = backend.create(0, 12 * MiB)
    with pytest.raises(_C.OutOfMemoryError, match="host:0"):
        backend.create(0, 8 * MiB)
    assert backend.used(0) == 12 * MiB
    backend.create(1, 16 * MiB)  # devices are independent
    backend.release(first)
    backend.create(0, 16 * MiB)
    with pytest.raises(_C.BackendError, match="does not exist"):
        backend.create(2, MiB)
    with pytest.raises(_C.BackendError, match="page size"):
        backend.create(0, 100)


def test_map_unmap_and_remap_keep_the_address_and_the_bytes():
    daemon_side = _C.HostBackend(1, 64 * MiB)
    engine_side = _C.HostBackend()
    handle = daemon_side.create(0, 4 * MiB)

    def map_at(address):
        fd = daemon_side.export_handle(handle)
        imported = engine_side.import_handle(fd, 0, 4 * MiB)
        os.close(fd)
        engine_side.map(address, 4 * MiB, imported, 0)
        engine_side.release(imported)

    address = engine_side.reserve(4 * MiB)
    map_at(address)
    view = _C.memoryview(address, 4 * MiB)
    view[:5] = b"hello"
    engine_side.unmap(address, 4 * MiB)
    # The address is still reserved: a new mapping elsewhere cannot land on it.
    other = engine_side.reserve(4 * MiB)
    assert not (address <= other < address + 4 * MiB)
    map_at(address)
    assert bytes(_C.memoryview(address, 5)) == b"hello"
    engine_side.free_reservation(address, 4 * MiB)
    engine_side.free_reservation(other, 4 * MiB)


def test_import_checks_the_size_and_does_not_take_the_fd():
    backend = _C.HostBackend(1, 64 * MiB)
    handle = backend.create(0, MiB)
    fd = backend.export_handle(handle)
    with pytest.raises(_C.BackendError, match="expected"):
        backend.import_handle(fd, 0, 2 * MiB)
    imported = backend.import_handle(fd, 0, MiB)
    os.fstat(fd)  # still open: the caller owns it
    os.close(fd)
    backend.release(imported)
    with pytest.raises(_C.BackendError, match="unknown handle"):
        backend.release(imported)


@contextlib.contextmanager
def memory_and_a_slab(size: int):
    """(backend, source, target, host, payload): device memory `source` holding random `payload`, an
    empty `target`, and `size` bytes of host memory mapped from a file, as a mover maps a pool slab."""
    backend = _C.HostBackend(1, 2 * size)
    source, target = backend.create(0, size), backend.create(0, size)
    host_fd = os.memfd_create("host")
    os.ftruncate(host_fd, size)
    host = _C.map_file(host_fd, size)
    payload = os.urandom(size)
    fd = backend.export_handle(source)
    os.pwrite(fd, payload, 0)
    os.close(fd)
    try:
        yield backend, source, target, host, payload
    finally:  # every descriptor closed now, not when a traceback's frames are collected
        backend.release_all([source, target])
        _C.unmap_file(host, size)
        os.close(host_fd)


@pytest.mark.parametrize("size", [4096, 3 * MiB + 4096, 64 * MiB])
def test_copies_between_a_handle_and_host_memory_are_exact(size):
    with memory_and_a_slab(size) as (backend, source, target, host, payload):
        checksums = backend.copy_to_host(source, 0, host, size)
        assert bytes(_C.memoryview(host, size)) == payload
        assert checksums == [_C.crc32c(payload[at:at + BLOCK]) for at in range(0, size, BLOCK)]
        backend.copy_from_host(target, 0, host, size, checksums)
        fd = backend.export_handle(target)
        assert os.pread(fd, size, 0) == payload
        backend.zero(target, 4096, size - 4096)
        assert os.pread(fd, size, 0) == payload[:4096] + bytes(size - 4096)
        os.close(fd)
        with pytest.raises(_C.BackendError, match="outside"):
            backend.copy_to_host(source, 4096, host, size)


def test_a_copy_back_that_finds_a_byte_changed_names_its_block_and_stops_there():
    size = 3 * BLOCK + 5 * MiB
    with memory_and_a_slab(size) as (backend, source, target, host, _):
        checksums = backend.copy_to_host(source, 0, host, size)
        _C.memoryview(host, size)[2 * BLOCK + 12345] ^= 1
        with pytest.raises(_C.ChecksumMismatch, match="block 2 has CRC32C") as mismatch:
            backend.copy_from_host(target, 0, host, size, checksums)
        assert mismatch.value.block == 2 and isinstance(mismatch.value, _C.BackendError)
        fd = backend.export_handle(target)
        assert os.pread(fd, MiB, 3 * BLOCK) == bytes(MiB), "nothing after the damaged block is copied"
        os.close(fd)
        with pytest.raises(_C.BackendError, match="checksums do not cover"):
            backend.copy_from_host(target, 0, host, size, checksums[:1])
        backend.copy_from_host(target, 0, host, size)  # without checksums: unchecked, as a backup from before them


# RFC 3720's CRC32C examples (iSCSI), and the check value of "123456789".
@pytest.mark.parametrize("data, crc", [(b"123456789", 0xE3069283), (bytes(32), 0x8A9136AA), (b"\xff" * 32, 0x62A8AB43),
                                       (bytes(range(32)), 0x46DD794E), (bytes(range(31, -1, -1)), 0x113FDB5C)])
def test_checksums_are_crc32c(data, crc):
    assert _C.crc32c(data) == crc
    assert _C.crc32c(data, portable=True) == crc


def test_the_cpus_crc32_instructions_and_the_portable_loop_agree_at_every_size_and_alignment():
    data = os.urandom(200_000)
    rng = random.Random(7)
    for _ in range(300):
        start = rng.randrange(64)
        end = start + rng.choice([rng.randrange(64), rng.randrange(30_000), rng.randrange(len(data) - 64)])
        assert _C.crc32c(data[start:end]) == _C.crc32c(data[start:end], portable=True), (start, end)


@pytest.mark.parametrize("size", [1, 4095, 3 * MiB + 17, 64 * MiB])
def test_parallel_copy_matches_the_source(size):
    source = os.urandom(size)
    fd = os.memfd_create("copy")
    os.ftruncate(fd, 2 * size)
    base = _C.map_file(fd, 2 * size)
    _C.memoryview(base, size)[:] = source
    _C.parallel_copy(base + size, base, size)
    assert bytes(_C.memoryview(base + size, size)) == source
    _C.unmap_file(base, 2 * size)
    os.close(fd)


def test_punch_hole_gives_pages_back_to_the_kernel(tmp_path):
    path = tmp_path / "slab"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    os.posix_fallocate(fd, 0, 4 * MiB)
    before = os.fstat(fd).st_blocks
    _C.punch_hole(fd, 0, 2 * MiB)
    assert os.fstat(fd).st_blocks < before
    assert os.fstat(fd).st_size == 4 * MiB
    os.close(fd)


def open_fds() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")}


def permissions(address: int) -> str:
    """The permissions /proc/self/maps shows for the mapping that holds `address`."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            span, perms = line.split()[:2]
            start, end = (int(part, 16) for part in span.split("-"))
            if start <= address < end:
                return perms
    raise LookupError(f"{address:#x} is not mapped")


def test_a_batch_create_is_all_or_none():
    backend = _C.HostBackend(2, 64 * MiB)
    # Enough regions to be split across threads; the last ones do not fit device 0.
    creations = [(0, MiB, f"sleepd:batch:{i}") for i in range(100)]
    before = open_fds()
    with pytest.raises(_C.OutOfMemoryError, match="host:0"):
        backend.create_all(creations)
    assert backend.used(0) == 0 and open_fds() == before  # what was created went again
    handles = backend.create_all([(i % 2, MiB, "sleepd:batch") for i in range(100)])
    assert len(set(handles)) == 100 and backend.used(0) == backend.used(1) == 50 * MiB
    backend.release_all(handles)
    assert backend.used(0) == backend.used(1) == 0 and open_fds() == before


def test_a_batch_release_releases_every_handle_before_it_reports_an_unknown_one():
    backend = _C.HostBackend(1, 256 * MiB)
    handles = backend.create_all([(0, MiB, "sleepd:batch")] * 80)
    with pytest.raises(_C.BackendError, match="unknown handle"):
        backend.release_all(handles[:40] + [10 ** 9] + handles[40:])
    assert backend.used(0) == 0


def test_a_batch_map_is_all_or_none_and_closes_every_descriptor():
    daemon_side = _C.HostBackend(1, 64 * MiB)
    engine_side = _C.HostBackend()
    handles = daemon_side.create_all([(0, MiB, "sleepd:batch")] * 3)
    addresses = [engine_side.reserve(MiB) for _ in handles]
    before = open_fds()
    # The third memory is too small for its mapping: nothing stays mapped, no descriptor stays open.
    fds = [daemon_side.export_handle(h) for h in handles]
    with pytest.raises(_C.BackendError, match="expected"):
        engine_side.map_all([(fds[0], addresses[0], MiB), (fds[1], addresses[1], MiB), (fds[2], addresses[2], 2 * MiB)], 0)
    assert open_fds() == before
    assert [permissions(address) for address in addresses] == ["---p"] * 3  # bare reservations again
    fds = [daemon_side.export_handle(h) for h in handles]
    imported = engine_side.map_all([(fd, address, MiB) for fd, address in zip(fds, addresses)], 0)
    engine_side.write(addresses[2], b"sleepd")
    assert engine_side.read(addresses[2], 6) == b"sleepd"
    done, error = engine_side.unmap_all([(address, MiB, handle) for address, handle in zip(addresses, imported)])
    assert (done, error) == (3, "")
    assert [permissions(address) for address in addresses] == ["---p"] * 3
    assert open_fds() == before
    daemon_side.release_all(handles)
