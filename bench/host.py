"""Host-backend sleep and wake throughput, each beside a plain single-threaded
memcpy of the same bytes measured in the same run, and the wall time of a
level-2 sleep plus wake of a model with many small regions."""

import statistics
import time

from sleepd import _C
from sleepd.client import SleepClient
from sleepd.common.sizes import format_size, parse_size

from .local import LocalDaemon

GiB = 1 << 30


def add_arguments(parser) -> None:
    parser.add_argument("--size", default="1GiB", help="bytes of offloaded regions (default 1GiB)")
    parser.add_argument("--region-size", default="128MiB", help="size of each offloaded region")
    parser.add_argument("--rounds", type=int, default=3, help="sleep/wake cycles to time")
    parser.add_argument("--small-regions", type=int, default=1000, help="regions of the many-small-regions model")
    parser.add_argument("--prefault", action="store_true", help="start the daemon with --host-pool-prefault")
    parser.add_argument("--keep-freed-seconds", type=float, default=0.0,
                        help="start the daemon with --host-pool-keep-freed-seconds (default 0, the daemon's default)")


def plain_memcpy_seconds(size: int) -> float:
    """One single-threaded memcpy between two already-faulted buffers of `size` bytes."""
    backend = _C.HostBackend(1, 2 * size)
    handles = [backend.create(0, size), backend.create(0, size)]
    addresses = [backend.reserve(size) for _ in handles]
    for address, handle in zip(addresses, handles):
        backend.map(address, size, handle, 0)
    _C.plain_memcpy(addresses[1], addresses[0], size)  # fault both sides in
    timings = []
    for _ in range(3):
        started = time.perf_counter()
        _C.plain_memcpy(addresses[1], addresses[0], size)
        timings.append(time.perf_counter() - started)
    for address, handle in zip(addresses, handles):
        backend.free_reservation(address, size)
        backend.release(handle)
    return min(timings)


def run(args) -> int:
    size = parse_size(args.size)
    region_size = min(parse_size(args.region_size), size)
    count = size // region_size
    size = count * region_size
    flags = ["--host-device-capacity", str(size + 256 * (1 << 20)), "--host-pool-budget", str(size + GiB)]
    if args.prefault:
        flags.append("--host-pool-prefault")
    if args.keep_freed_seconds:
        flags += ["--host-pool-keep-freed-seconds", str(args.keep_freed_seconds)]

    memcpy_seconds = plain_memcpy_seconds(size)
    memcpy_rate = size / memcpy_seconds
    print(f"plain memcpy, 1 thread, {format_size(size)}: {memcpy_rate / GiB:.2f} GiB/s")

    with LocalDaemon(None, *flags) as daemon:
        with SleepClient.connect("bench", socket=daemon.socket) as client:
            regions = [client.alloc(region_size, "weights") for _ in range(count)]
            for region in regions:
                region.memoryview[::4096] = b"\x5a" * len(range(0, region.size, 4096))
            sleeps, wakes = [], []
            for _ in range(args.rounds):
                sleeps.append(client.sleep(level=1).seconds)
                wakes.append(client.wake().seconds)
        print(f"\nlevel-1 sleep/wake of {count} x {format_size(region_size)} weights ({format_size(size)}), "
              f"{args.rounds} rounds{' (pool pre-faulted)' if args.prefault else ''}; the wake's time includes "
              "creating the memory (target: 0.70 x memcpy or more each):")
        for what, timings in (("sleep (offload)", sleeps), ("wake (restore)", wakes)):
            first, later = timings[0], statistics.median(timings[1:] or timings)
            print(f"  {what:16} first {size / first / GiB:6.2f} GiB/s ({memcpy_seconds / first:.2f} x memcpy)"
                  f"   later (median) {size / later / GiB:6.2f} GiB/s ({memcpy_seconds / later:.2f} x memcpy)")
        later_sleep = statistics.median(sleeps[1:] or sleeps)
        print(f"  first sleep / later sleep: {later_sleep / sleeps[0]:.2f} (target: 0.90 or more)")

        with SleepClient.connect("small", socket=daemon.socket) as client:
            for index in range(args.small_regions):
                client.alloc(4096 * (1 + index % 4), "weights" if index % 2 else "kv_cache")
            cycles = []
            for _ in range(max(3, args.rounds)):
                started = time.perf_counter()
                client.sleep(level=2)
                client.wake()
                cycles.append(time.perf_counter() - started)
        median = statistics.median(cycles)
        print(f"\nlevel-2 sleep + wake of a model with {args.small_regions} small regions, {len(cycles)} rounds: "
              f"first {cycles[0] * 1000:.0f} ms, median {median * 1000:.0f} ms "
              f"({median / args.small_regions * 1e6:.0f} us per region; target: under 50 ms for 1000)")
    return 0
