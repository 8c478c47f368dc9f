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
