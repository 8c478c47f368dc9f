"""What the kernel says about memory, independent of sleepd's own bookkeeping."""

import os


def memfd_bytes(pids, prefix: str) -> int:
    """Bytes of pages backing the memfds named `prefix...` that any of `pids`
    holds open (each memfd counted once), from st_blocks."""
    seen = {}
    for pid in pids:
        fd_dir = f"/proc/{pid}/fd"
        for name in os.listdir(fd_dir):
            try:
                if os.readlink(f"{fd_dir}/{name}").startswith(prefix):
                    st = os.stat(f"{fd_dir}/{name}")
                    seen[st.st_ino] = st.st_blocks * 512
            except FileNotFoundError:
                continue
    return sum(seen.values())


def memfd_mappings(pid: int, prefix: str) -> list[str]:
    """Lines of /proc/PID/maps that map a memfd named `prefix...`."""
    with open(f"/proc/{pid}/maps") as maps:
        return [line for line in maps if prefix in line]


def shmem_bytes() -> int:
    """Shared memory the kernel holds (memfds and tmpfs), from /proc/meminfo."""
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("Shmem:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no Shmem line in /proc/meminfo")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def drop_from_page_cache(path: str) -> None:
    """Asks the kernel to forget the file's cached pages (posix_fadvise DONTNEED): the next read goes to disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
        os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(descriptor)


def cached_pages(path: str, start: int = 0) -> int:
    """How many of the file's pages from byte `start` on are in the page cache (mincore over a fresh,
    never-touched mapping, which reads nothing itself)."""
    import ctypes
    import mmap

    size = os.path.getsize(path)
    if size <= start:
        return 0
    page = mmap.PAGESIZE
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    descriptor = os.open(path, os.O_RDONLY)
    try:
        address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, descriptor, 0)
        if address in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), f"mmap {path}")
        try:
            pages = (size + page - 1) // page
            vector = (ctypes.c_ubyte * pages)()
            if libc.mincore(address, size, vector) != 0:
                raise OSError(ctypes.get_errno(), f"mincore {path}")
            return sum(1 for index in range(start // page, pages) if vector[index] & 1)
        finally:
            libc.munmap(address, size)
    finally:
        os.close(descriptor)
