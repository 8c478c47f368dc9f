"""A bounded soak: many engine processes cycle through allocate, fill, sleep at a
random level, wake, verify and free, while some are killed at random. At the
end it prints cycles run, bytes verified, corrupted bytes, the descriptors and
bytes the daemon leaked (as the kernel sees them) and its RSS at start and end."""

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

from .local import LocalDaemon


def add_arguments(parser) -> None:
    parser.add_argument("--minutes", type=float, default=1.0, help="how long to run (default 1)")
    parser.add_argument("--clients", type=int, default=4, help="engine processes at a time")
    parser.add_argument("--kill-every", type=float, default=5.0, help="seconds between random kills (0: none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


def _fds(daemon: LocalDaemon) -> int:
    """The daemon's open descriptors, less the host pool's slab files: the pool
    grows by design (its pages are counted in the leaked bytes instead)."""
    count = 0
    for name in os.listdir(f"/proc/{daemon.pid}/fd"):
        try:
            count += not os.readlink(f"/proc/{daemon.pid}/fd/{name}").startswith(daemon.pool_dir)
        except FileNotFoundError:
            continue
    return count


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


def _held_bytes(daemon: LocalDaemon) -> int:
    """Shared memory the daemon's processes still hold: region memfds and pool pages."""
    import psutil

    seen = {}
    for pid in [daemon.pid] + [child.pid for child in psutil.Process(daemon.pid).children()]:
        for name in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{name}")
                if target.startswith("/memfd:sleepd:") or target.startswith(daemon.pool_dir):
                    st = os.stat(f"/proc/{pid}/fd/{name}")
                    seen[st.st_ino] = st.st_blocks * 512
            except FileNotFoundError:
                continue
    return sum(seen.values())


class _Totals:
    def __init__(self):
        self.lock = threading.Lock()
        self.cycles = self.verified = self.corrupted = self.kills = 0

    def read(self, stream) -> None:
        for line in stream:
            result = json.loads(line)
            with self.lock:
                self.cycles += 1
                self.verified += result["verified"]
                self.corrupted += result["corrupted"]


def run(args) -> int:
    rng = random.Random(args.seed)
    deadline = time.time() + args.minutes * 60
    totals = _Totals()
    with LocalDaemon(None, "--host-devices", "2", "--host-device-capacity", "1GiB",
                     "--host-pool-budget", "1GiB") as daemon:
        time.sleep(0.5)
        fds_start, rss_start = _fds(daemon), _rss(daemon.pid)
        workers: dict[int, subprocess.Popen] = {}
        readers = []
        next_id = 0

        def spawn(slot: int) -> None:
            nonlocal next_id
            next_id += 1
            process = subprocess.Popen([sys.executable, "-m", "sleepd.bench.soak_worker", daemon.socket,
                                        f"soak-{next_id}", str(slot % 2), str(args.seed * 1000 + next_id),
                                        str(deadline)], stdout=subprocess.PIPE, text=True)
            reader = threading.Thread(target=totals.read, args=(process.stdout,), daemon=True)
            reader.start()
            readers.append(reader)
            workers[slot] = process

        for slot in range(args.clients):
            spawn(slot)
        next_kill = time.time() + args.kill_every if args.kill_every else float("inf")
        while time.time() < deadline:
            time.sleep(0.1)
            if time.time() >= next_kill:
                slot = rng.randrange(args.clients)
                workers[slot].send_signal(signal.SIGKILL)
                workers[slot].wait()
                totals.kills += 1
                spawn(slot)
                next_kill = time.time() + args.kill_every
            for slot, process in list(workers.items()):
                if process.poll() is not None and time.time() < deadline - 1:
                    spawn(slot)  # a worker that ended early is replaced
        for process in workers.values():
            process.wait(timeout=120)
        for reader in readers:
            reader.join(timeout=10)
        # The daemon reclaims killed sessions asynchronously: give it a moment.
        settle = time.time() + 10
        while time.time() < settle and (_held_bytes(daemon) or _fds(daemon) > fds_start):
            time.sleep(0.2)
        summary = {"minutes": args.minutes, "clients": args.clients, "kills": totals.kills,
                   "cycles": totals.cycles, "bytes_verified": totals.verified, "corrupted_bytes": totals.corrupted,
                   "leaked_fds": max(0, _fds(daemon) - fds_start), "leaked_bytes": _held_bytes(daemon),
                   "rss_start": rss_start, "rss_end": _rss(daemon.pid)}
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"soak: {summary['minutes']:g} min, {args.clients} clients, {totals.kills} kills")
        print(f"  cycles run       {summary['cycles']}")
        print(f"  bytes verified   {summary['bytes_verified']}")
        print(f"  corrupted bytes  {summary['corrupted_bytes']}")
        print(f"  leaked fds       {summary['leaked_fds']}")
        print(f"  leaked bytes     {summary['leaked_bytes']} (memfds and pool pages the kernel still holds)")
        print(f"  daemon RSS       {summary['rss_start'] >> 20} MiB at start, {summary['rss_end'] >> 20} MiB at end")
    return 1 if summary["corrupted_bytes"] or summary["leaked_fds"] or summary["leaked_bytes"] else 0
