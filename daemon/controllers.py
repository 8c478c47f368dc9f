"""A model's controller: the process that owns its engine's front end and can
pause its scheduler, and the forwarding to it of the sleeps and wakes asked
from outside the engine.

Some engines (vLLM) must run their own sleep: memory unmapped behind a running
scheduler faults it. Their ranks say so when they attach (needs_controller).
Who runs a sleep or wake of a model then depends on who asks:

    asked by                                 controller attached       none attached
    the model's own ranks (the engine's API) runs directly             runs directly
    anyone else (sleepctl, swap, eviction,   forwarded to the          a sleep is refused
      idle sleep, EnsureAwake)               controller                (FAILED_PRECONDITION),
                                                                       a wake runs directly

A forwarded request returns when the controller answers: its engine has had its
ranks call Sleep or Wake, which is what changes the regions, so the result is
read from the regions' states before and after. One forwarded request per
model at a time, each bounded by the controller timeout. A controller's lease
is its Control stream; it ends when the stream does, or when its model goes.
"""

import queue
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

from sleepd.proto import sleepd_pb2 as pb

from .auth import Authorizer, Peer
from .errors import Code, SleepdError, precondition, unavailable
from .events import EventBus
from .model import Model
from .regions import RegionState
from .registry import Registry
from .replies import Replies
from .rules import Action
from .views import ModelView, OperationResult


class ControllerGone(Exception):
    """The controller's stream ended while a request waited for its answer."""


class Controller:
    def __init__(self, peer: Peer, model: str):
        self.peer, self.pid, self.model = peer, peer.pid, model
        self.outbox: "queue.Queue[pb.ControlRequest | None]" = queue.Queue()
        self.ended: str | None = None
        self.busy = threading.Lock()  # one forwarded request at a time; see the lock order in operations.py
        self._replies = Replies()
        self._lock = threading.Lock()

    def describe(self) -> str:
        return f"the controller of {self.model} (pid {self.pid})"

    def ask(self, request: pb.ControlRequest) -> tuple[int, Future]:
        """Queues a request; the future resolves with the controller's ControlDone."""
        request.request_id, future = self._replies.expect()
        if request.request_id:
            self.outbox.put(request)
        return request.request_id, future

    def forget(self, request_id: int) -> None:
        self._replies.forget(request_id)

    def answer(self, done: pb.ControlDone) -> None:
        self._replies.deliver(done.request_id, done)

    def end(self, reason: str) -> bool:
        """Ends the lease and fails every request waiting on it; True the first time."""
        with self._lock:
            if self.ended:
                return False
            self.ended = reason
        self._replies.fail_all(ControllerGone, f"{self.describe()} is gone: {reason}")
        self.outbox.put(None)
        return True


class Controllers:
    def __init__(self, registry: Registry, authorizer: Authorizer, events: EventBus, timeout: float):
        self._registry = registry
        self._authorizer = authorizer
        self._events = events
        self.timeout = timeout

    def attach(self, peer: Peer, model_name: str) -> Controller:
        """`peer` (already authorised as the model's owner or an admin) becomes its controller."""
        controller = Controller(peer, model_name)
        model = self._registry.take_controller(model_name, controller)
        self._events.publish("attached", model, f"controller pid {peer.pid}")
        return controller

    def end(self, controller: Controller, reason: str) -> None:
        if controller.ended is None:
            self._registry.drop_controller(controller)
        controller.end(reason)

    def route(self, model: Model, what: str, refuse: bool = True) -> Controller | None:
        """The controller an outside request on `model` goes through; None: it runs directly.
        Where the engine needs one and has none, a sleep (`refuse`) is refused."""
        controller = model.controller
        if controller is not None and self._authorizer.sees(controller.peer, model.owner_uid):
            return controller
        if refuse and model.needs_controller:
            message = (f"{what}: model {model.name}'s engine runs its own sleep and has no controller attached; "
                       "sleep it through the engine's own API, or start the engine's front end, which attaches "
                       "as its controller")
            self._events.publish("refused", model, message)
            raise precondition(message)
        return None

    def sleep(self, model: Model, controller: Controller, level: int, tags: list[str],
              actions: dict[str, Action], what: str, answer_within: float | None = None) -> OperationResult:
        """With `answer_within` (eviction_answer_seconds), the controller has that long instead of
        the controller timeout: an eviction goes on to another model rather than wait."""
        request = pb.ControlRequest(sleep=pb.SleepRequest(model=model.name, level=level, tags=tags, actions=[
            pb.TagAction(tag=tag, action=pb.Action.Value(action.name)) for tag, action in actions.items()]))
        limit = None if answer_within is None else (min(answer_within, self.timeout), "eviction_answer_seconds")
        return self._forward(model, controller, request, what, asleep=True, limit=limit)

    def wake(self, model: Model, controller: Controller, tags: list[str], evict: bool, what: str) -> OperationResult:
        request = pb.ControlRequest(wake=pb.WakeRequest(model=model.name, tags=tags, evict=evict))
        return self._forward(model, controller, request, what, asleep=False, tags=tags)

    def _forward(self, model: Model, controller: Controller, request: pb.ControlRequest, what: str, asleep: bool,
                 tags: list[str] = (), limit: tuple[float, str] | None = None) -> OperationResult:
        """Waits for the answer within `limit`: (seconds, the setting that says so), the controller
        timeout without. A request given up on may still run: its engine's ranks then sleep or wake
        through their own calls, which change the regions as any such call does."""
        timeout, setting = limit or (self.timeout, "controller_timeout")
        started = time.perf_counter()
        deadline = time.monotonic() + timeout
        if not controller.busy.acquire(timeout=timeout):
            raise unavailable(f"{what}: {controller.describe()} is still running another request after "
                              f"{timeout:g} s; try again")
        try:
            before = self._registry.view(model)
            request_id, future = controller.ask(request)
            try:
                done = future.result(timeout=max(0.0, deadline - time.monotonic()))
            except FutureTimeout:
                controller.forget(request_id)
                raise SleepdError(Code.DEADLINE_EXCEEDED,
                                  f"{what}: {controller.describe()} did not answer within {timeout:g} s "
                                  f"({setting}); its engine may still finish (see sleepctl status)") from None
            except ControllerGone as error:
                raise unavailable(f"{what}: {error}") from None
            after = self._registry.view(model)
        finally:
            controller.busy.release()
        if not done.ok:
            raise SleepdError(Code.ABORTED, f"{what}: {controller.describe()} answered that its engine "
                              f"failed: {done.error or 'no reason given'}")
        selected = [r.state for r in after.regions() if not tags or r.tag in tags]
        finished = after.sleeping if asleep else \
            all(s is RegionState.MAPPED for s in selected) and (bool(tags) or not after.paused)
        if not finished:
            raise SleepdError(Code.ABORTED,
                              f"{what}: {controller.describe()} answered done, but the model is still "
                              f"{'awake' if asleep else 'asleep'}: its engine did not run it through sleepd "
                              "(are its ranks attached with needs_controller?)")
        return _result(model, before, after, time.perf_counter() - started)


# (state before, state after) -> the OperationResult field it counts in.
_COUNTED = {
    (RegionState.MAPPED, RegionState.OFFLOADED): "bytes_offloaded",
    (RegionState.MAPPED, RegionState.DISCARDED): "bytes_discarded",
    (RegionState.OFFLOADED, RegionState.MAPPED): "bytes_restored",
    (RegionState.DISCARDED, RegionState.MAPPED): "bytes_zeroed",
}


def _result(model: Model, before: ModelView, after: ModelView, seconds: float) -> OperationResult:
    """What the engine's own operation changed, read from the regions' states."""
    result = OperationResult(model.name, seconds=seconds, sleeping=after.sleeping)
    was = {region.id: region.state for region in before.regions()}
    for region in after.regions():
        field = _COUNTED.get((was.get(region.id), region.state))
        if field:
            setattr(result, field, getattr(result, field) + region.mapped_size)
            result.region_count += 1
    return result
