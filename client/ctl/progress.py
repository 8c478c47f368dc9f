"""The progress bar of a sleep, wake or swap that takes a while, on a terminal."""

import sys
import time

import grpc

from sleepd.proto import sleepd_pb2 as pb

from .render import console, regions

_ASLEEP = (pb.OFFLOADED, pb.DISCARDED)
# A sleep, wake or swap still running after this many seconds gets a progress bar.
PROGRESS_AFTER = 1.0
POLL_SECONDS = 0.1


class Tracker:
    """How far an operation is, from the region states Status reports.

    The RPCs are unary: the daemon reports nothing until the end. What it does
    show meanwhile is each region's state, so progress is the bytes of the
    operation's regions that have reached their end state (asleep for a model
    going to sleep, mapped for one waking), out of those that started elsewhere.
    """

    def __init__(self, before: pb.StatusReply, going_out: set[str], coming_in: set[str], tags: set[str],
                 others_may_go: bool):
        self._out, self._in, self._tags = going_out, coming_in, tags
        self._sizes: dict[int, int] = {}
        self._direction: dict[int, str] = {}
        self._candidates: dict[int, int] = {}
        for model in before.models:
            for region in regions(model):
                if model.name in self._out and region.state == pb.MAPPED and self._wanted(region):
                    self._track(region, "out")
                elif model.name in self._in and region.state in _ASLEEP and self._wanted(region):
                    self._track(region, "in")
                elif others_may_go and region.state == pb.MAPPED and model.name not in coming_in:
                    # Eviction (wake --evict, swap without --from) picks whom: counted once they move.
                    self._candidates[region.id] = region.size
        self.phase = ""

    def _wanted(self, region) -> bool:
        return not self._tags or region.tag in self._tags

    def _track(self, region, direction: str) -> None:
        self._sizes[region.id] = region.size
        self._direction[region.id] = direction

    @property
    def total(self) -> int:
        return sum(self._sizes.values())

    def done(self, now: pb.StatusReply) -> int:
        states = {}
        for model in now.models:
            for region in regions(model):
                states[region.id] = region.state
                if region.id in self._candidates and region.state != pb.MAPPED:
                    self._track(region, "out")  # eviction picked this model
                    del self._candidates[region.id]
        done, moving, started = 0, False, False
        for region_id, direction in self._direction.items():
            state = states.get(region_id)
            finished = state is None or (state in _ASLEEP if direction == "out" else state == pb.MAPPED)
            if finished:
                done += self._sizes[region_id]
            moving |= state in (pb.OFFLOADING, pb.RESTORING)
            started |= finished or state in (pb.OFFLOADING, pb.RESTORING)
        if moving:
            self.phase = "copying"
        elif started:
            self.phase = "finishing"
        else:  # a sleep waits for the engines' hooks; a wake may first make room
            self.phase = "waiting for the engines" if self._out else "starting"
        return done


def _rate(bytes_per_second: float) -> str:
    for unit, scale in (("GB/s", 1e9), ("MB/s", 1e6), ("kB/s", 1e3)):
        if bytes_per_second >= scale:
            return f"{bytes_per_second / scale:.2f} {unit}"
    return f"{bytes_per_second:.0f} B/s"


def with_progress(stub, args, call, request, title: str, tracker_for):
    """Runs a unary operation; after PROGRESS_AFTER seconds on a terminal, shows a bar
    fed by polling Status (never with --json, never when stdout is not a terminal)."""
    if args.json or not sys.stdout.isatty():
        return call(request, timeout=args.timeout)
    try:
        before = stub.Status(pb.StatusRequest(), timeout=min(args.timeout, 5))
    except grpc.RpcError:
        return call(request, timeout=args.timeout)  # the operation itself reports what is wrong
    future = call.future(request, timeout=args.timeout)
    started = time.monotonic()
    try:
        return future.result(timeout=PROGRESS_AFTER)
    except grpc.FutureTimeoutError:
        pass
    from rich.progress import BarColumn, DownloadColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
    from rich.text import Text

    class Rate(ProgressColumn):
        """Bytes done over the time since the request went out (decimal units, as bandwidth is quoted)."""

        def render(self, task):
            elapsed = time.monotonic() - started
            return Text(_rate(task.completed / elapsed if elapsed > 0 else 0.0))

    tracker = tracker_for(before)
    progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(binary_units=True), Rate(),
                        TimeElapsedColumn(), TextColumn("{task.fields[phase]}"), console=console())
    with progress:
        task = progress.add_task(title, total=tracker.total or None, phase="", completed=0)
        while not future.done():
            try:
                done = tracker.done(stub.Status(pb.StatusRequest(), timeout=5))
                progress.update(task, total=tracker.total or None, completed=done, phase=tracker.phase)
            except grpc.RpcError:
                pass
            try:
                future.result(timeout=POLL_SECONDS)
            except grpc.FutureTimeoutError:
                continue
            except grpc.RpcError:
                break
        failed = future.exception() is not None
        progress.update(task, total=tracker.total or 1, completed=(tracker.total or 1) if not failed else
                        progress.tasks[0].completed, phase="failed" if failed else "done")
    return future.result()
