"""Swap time (A out, B in, overlapped) as a ratio to sleep(A) followed by
wake(B), both measured in the same run on the same daemon."""

import contextlib
import statistics
import time

from sleepd.client import SleepClient
from sleepd.client.control import control_channel
from sleepd.common.sizes import format_size, parse_size
from sleepd.proto import sleepd_pb2 as pb
from sleepd.proto import sleepd_pb2_grpc as pb_grpc

from .local import LocalDaemon


def add_arguments(parser) -> None:
    parser.add_argument("--size", default="512MiB", help="bytes of weights per model (default 512MiB)")
    parser.add_argument("--region-size", default="32MiB", help="size of each region")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--backend", default="host", choices=["host", "cuda"],
                        help="cuda needs a GPU (and allocates raw regions, no torch)")


def run(args) -> int:
    region_size = parse_size(args.region_size)
    count = max(1, parse_size(args.size) // region_size)
    size = count * region_size
    # The device holds one model and a little: B can come in only as A goes out.
    flags = ["--backend", args.backend, "--host-pool-budget", str(3 * size), "--host-pool-prefault"]
    if args.backend == "host":
        flags += ["--host-device-capacity", str(size + 4 * region_size)]
    else:
        flags += ["--device-reserve", "0"]
    with LocalDaemon(None, *flags) as daemon, contextlib.ExitStack() as stack:
        a = stack.enter_context(SleepClient.connect("a", socket=daemon.socket))
        b = stack.enter_context(SleepClient.connect("b", socket=daemon.socket))
        channel, handles = control_channel(daemon.socket)  # Swap, like every request, carries our credentials
        stack.callback(handles.close)
        stack.enter_context(channel)
        stub = pb_grpc.SleepdStub(channel)
        for client in (b, a):
            for _ in range(count):
                region = client.alloc(region_size, "weights")
                region.write(b"\x5a" * region_size)
            if client is b:
                client.sleep(level=1)
        sequential, overlapped = [], []
        for _ in range(args.rounds):
            started = time.perf_counter()
            a.sleep(level=1)
            b.wake()
            sequential.append(time.perf_counter() - started)
            b.sleep(level=1)
            a.wake()
            started = time.perf_counter()
            stub.Swap(pb.SwapRequest(to_model="b", from_models=["a"]))
            overlapped.append(time.perf_counter() - started)
            stub.Swap(pb.SwapRequest(to_model="a", from_models=["b"]))
    seq, swap = statistics.median(sequential), statistics.median(overlapped)
    print(f"{args.backend} backend, two models of {count} x {format_size(region_size)} ({format_size(size)}), "
          f"device room for one, {args.rounds} rounds:")
    print(f"  sleep(A) then wake(B): {seq:.3f} s (median)")
    print(f"  swap A -> B:           {swap:.3f} s (median)")
    print(f"  swap / sequential:     {swap / seq:.2f}")
    return 0
