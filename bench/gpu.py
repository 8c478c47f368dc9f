"""GPU sleep and wake throughput, each as a ratio to raw pinned-memory copy
bandwidth measured in the same run, against the naive in-process way (per
tensor .to("cpu") into freshly pinned memory, then back), with level-2
latency and the device memory left in use while asleep.

Needs an NVIDIA GPU, its driver and a CUDA build of torch."""

import re
import statistics
import time
from dataclasses import dataclass

from sleepd import _C
from sleepd.common.sizes import format_size, parse_size

from .local import LocalDaemon

GiB = 1 << 30
TENSOR_BYTES = 256 << 20


def add_arguments(parser) -> None:
    parser.add_argument("--size", default="8GiB", help="bytes of weights (default 8GiB)")
    parser.add_argument("--rounds", type=int, default=3, help="sleep/wake cycles after the first")
    parser.add_argument("--no-prefault", action="store_true", help="do not pre-fault and pin the pool at start")


def _seconds(fn) -> float:
    import torch

    torch.cuda.synchronize()
    started = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - started


def pinned_bandwidth(size: int) -> tuple[float, float]:
    """Bytes/s device-to-host and host-to-device between one device buffer and pinned memory."""
    import torch

    device = torch.empty(size, dtype=torch.uint8, device="cuda")
    host = torch.empty(size, dtype=torch.uint8, pin_memory=True)
    host.copy_(device)  # warm up both directions
    device.copy_(host)
    dtoh = min(_seconds(lambda: host.copy_(device, non_blocking=True)) for _ in range(3))
    htod = min(_seconds(lambda: device.copy_(host, non_blocking=True)) for _ in range(3))
    return size / dtoh, size / htod


def naive_seconds(tensors) -> tuple[float, float]:
    """vLLM-style in-process offload: per tensor into freshly pinned memory, then back."""
    import torch

    backups = []
    down = _seconds(lambda: backups.extend(
        torch.empty_like(t, device="cpu", pin_memory=True).copy_(t, non_blocking=True) for t in tensors))
    up = _seconds(lambda: [t.copy_(b, non_blocking=True) for t, b in zip(tensors, backups)])
    return down, up


def process_device_bytes(pid: int) -> int:
    """What NVML says `pid` holds on CUDA device 0 (found by UUID: NVML's indices can differ)."""
    import pynvml

    pynvml.nvmlInit()
    try:
        handle = pynvml.nvmlDeviceGetHandleByUUID(_C.CudaBackend().uuid(0))
        return sum(p.usedGpuMemory or 0 for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle) if p.pid == pid)
    finally:
        pynvml.nvmlShutdown()


@dataclass
class Measured:
    """One run's figures, as `lines` reports them."""
    size: int
    prefault: bool
    dtoh: float  # raw pinned bandwidth, bytes/s
    htod: float
    sleeps: list[float]  # seconds, the first one first
    wakes: list[float]
    naive_down: float
    naive_up: float
    level2_sleep: float
    level2_wake: float
    engine_left: int  # device bytes while asleep
    daemon_left: int
    pin_seconds: float | None = None  # the pool's pinning at the daemon's start, before any clock here


def lines(measured: Measured) -> list[str]:
    """The report: what tests/gpu/figures.py reads back and the acceptance run judges."""
    m = measured
    out = [f"raw pinned copy: DtoH {m.dtoh / GiB:.1f} GiB/s, HtoD {m.htod / GiB:.1f} GiB/s", "",
           f"{format_size(m.size)} of weights in {m.size // TENSOR_BYTES} tensors, pool "
           f"{'' if m.prefault else 'not '}pre-faulted:"]
    rows = [("first sleep (DtoH)", m.sleeps[0], m.dtoh),
            ("later sleeps, median", statistics.median(m.sleeps[1:]), m.dtoh),
            ("first wake (HtoD)", m.wakes[0], m.htod),
            ("later wakes, median", statistics.median(m.wakes[1:]), m.htod)]
    for name, seconds, raw in rows:
        out.append(f"  {name:22} {seconds:7.3f} s  {m.size / seconds / GiB:6.1f} GiB/s  "
                   f"{m.size / seconds / raw:5.2f} x pinned")
    out += [f"  naive per-tensor offload {m.naive_down:7.3f} s, restore {m.naive_up:.3f} s; "
            f"first sleep is {m.naive_down / m.sleeps[0]:.1f} x faster, first wake {m.naive_up / m.wakes[0]:.1f} x",
            f"  level 2: sleep {m.level2_sleep * 1000:.1f} ms, wake {m.level2_wake * 1000:.1f} ms",
            f"  device memory left while asleep: engine {format_size(m.engine_left)} (its CUDA context and "
            f"torch's own), daemon {format_size(m.daemon_left)}"]
    if m.pin_seconds is not None:  # the naive offload pins as it goes; sleepd's pool was pinned before
        out.append(f"  the pool was pinned at the daemon's start, before these clocks: {m.pin_seconds:.1f} s")
    return out


def pin_seconds(daemon_log: str) -> float | None:
    """How long the daemon's movers took to pin the pool, as its log says."""
    found = re.search(r"pinned for \d+ device\(s\) in ([0-9.]+) s", daemon_log)
    return float(found[1]) if found else None


def run(args) -> int:
    reason = _C.cuda_unavailable_reason()
    if reason:
        print(f"no GPU benchmark here: {reason}")
        return 2
    import os

    import torch

    from sleepd.client import SleepClient

    size = parse_size(args.size) // TENSOR_BYTES * TENSOR_BYTES
    dtoh, htod = pinned_bandwidth(min(size, 2 * GiB))

    flags = ["--backend", "cuda", "--host-pool-budget", str(size + GiB)]
    if not args.no_prefault:
        flags.append("--host-pool-prefault")
    with LocalDaemon(None, *flags) as daemon, SleepClient.connect("bench", socket=daemon.socket) as client:
        with client.pool("weights"):
            tensors = [torch.empty(TENSOR_BYTES, dtype=torch.uint8, device="cuda").fill_(7)
                       for _ in range(size // TENSOR_BYTES)]
        torch.cuda.synchronize()
        sleeps, wakes = [], []
        for _ in range(1 + args.rounds):
            sleeps.append(client.sleep(level=1).seconds)
            if len(sleeps) == 1:
                engine_left = process_device_bytes(os.getpid())
                daemon_left = process_device_bytes(daemon.pid)
            wakes.append(client.wake().seconds)
        level2_sleep = client.sleep(level=2).seconds
        level2_wake = client.wake().seconds
        del tensors  # alive until here: the pool's memory is theirs
        pinned = pin_seconds(daemon.log())

    naive_down, naive_up = naive_seconds([torch.empty(TENSOR_BYTES, dtype=torch.uint8, device="cuda")
                                          for _ in range(size // TENSOR_BYTES)])
    print("\n".join(lines(Measured(size, not args.no_prefault, dtoh, htod, sleeps, wakes, naive_down, naive_up,
                                   level2_sleep, level2_wake, engine_left, daemon_left, pinned))))
    return 0
