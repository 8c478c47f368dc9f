"""Swap time (A out, B in, overlapped) as a ratio to sleep(A) followed by
wake(B), both measured in the same run on the same daemon; and, with room for
both models, a sleep of A and a wake of B sent at once against one after the
other."""

import contextlib
import statistics
import threading
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
    parser.add_argument("--backend", default="host", choices=["host", "cuda", "acl"],
                        help="cuda needs a GPU, acl an Ascend NPU (both allocate raw regions, no torch)")


@contextlib.contextmanager
def _two_models(args, room_for: int):
    """A daemon whose device has room for `room_for` models and a little, with
    model A awake and model B asleep (level 1), and a credentialed stub."""
    region_size = parse_size(args.region_size)
    count = max(1, parse_size(args.size) // region_size)
    size = count * region_size
    room = room_for * size + 4 * region_size
    flags = ["--backend", args.backend, "--host-pool-budget", str(3 * size), "--host-pool-prefault"]
    if args.backend == "host":
        flags += ["--host-device-capacity", str(room)]
    else:  # a GPU holds both models at once: a reserve leaves the budget at the room asked for
        capacity = _device_capacity(args.backend)
        if capacity < room:
            raise SystemExit(f"the device has {format_size(capacity)}; two models of {format_size(size)} need "
                             f"{format_size(room)}: choose a smaller --size")
        flags += ["--device-reserve", str(capacity - room)]
    with LocalDaemon(None, *flags) as daemon, contextlib.ExitStack() as stack:
        a = stack.enter_context(SleepClient.connect("a", socket=daemon.socket))
        b = stack.enter_context(SleepClient.connect("b", socket=daemon.socket))
        channel, fd_socket = control_channel(daemon.socket)  # Swap, like every request, carries our credentials
        stack.callback(fd_socket.close)
        stack.enter_context(channel)
        for client in (b, a):
            for _ in range(count):
                region = client.alloc(region_size, "weights")
                region.write(b"\x5a" * region_size)
            if client is b:
                client.sleep(level=1)
        stub = pb_grpc.SleepdStub(channel)
        yield a, b, stub, count, region_size, stub.Status(pb.StatusRequest()).devices[0].budget


def _device_capacity(backend: str) -> int:
    """The first device's capacity as a daemon on `backend` counts it (NVML's total, or the driver's)."""
    with LocalDaemon(None, "--backend", backend) as daemon:
        channel, fd_socket = control_channel(daemon.socket)
        with channel:
            capacity = pb_grpc.SleepdStub(channel).Status(pb.StatusRequest()).devices[0].capacity
        fd_socket.close()
    return capacity


def _timed(work) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def _at_once(*works) -> None:
    """Runs `works` in threads started together; raises the first error any of them met."""
    errors = []

    def run(work):
        try:
            work()
        except Exception as error:
            errors.append(error)

    threads = [threading.Thread(target=run, args=(work,)) for work in works]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def _against_one_by_one(rounds: int, a, b, together) -> tuple[float, float]:
    """Medians of sleep(A) then wake(B), and of `together` doing the same, in
    alternating rounds; each round starts with A awake and B asleep."""
    apart, joint = [], []
    for _ in range(rounds):
        for times, work in ((apart, lambda: (a.sleep(level=1), b.wake())), (joint, together)):
            times.append(_timed(work))
            b.sleep(level=1)
            a.wake()
    return statistics.median(apart), statistics.median(joint)


def run(args) -> int:
    # Room for one model: B can come in only as A goes out.
    with _two_models(args, room_for=1) as (a, b, stub, count, region_size, budget):
        seq, swap = _against_one_by_one(args.rounds, a, b,
                                        lambda: stub.Swap(pb.SwapRequest(to_model="b", from_models=["a"])))
    # Room for both: a sleep of A and a wake of B, sent as two requests at once.
    with _two_models(args, room_for=2) as (a, b, stub, count, region_size, _):
        apart, at_once = _against_one_by_one(args.rounds, a, b, lambda: _at_once(lambda: a.sleep(level=1), b.wake))
    size = count * region_size
    print(f"{args.backend} backend, two models of {count} x {format_size(region_size)} ({format_size(size)}), "
          f"{args.rounds} rounds, medians:")
    print(f"  device room for one model (a budget of {format_size(budget)}, {budget} bytes):")
    print(f"    sleep(A) then wake(B): {seq:.3f} s")
    print(f"    swap A -> B:           {swap:.3f} s")
    print(f"    swap / sequential:     {swap / seq:.2f}")
    print("  device room for both, sleep(A) and wake(B) as two requests:")
    print(f"    one after the other:   {apart:.3f} s")
    print(f"    at the same time:      {at_once:.3f} s")
    print(f"    together / apart:      {at_once / apart:.2f}")
    return 0
