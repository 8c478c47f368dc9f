"""Sleep, wake and ensure-awake as the gRPC service receives them: from one of the
model's own ranks they run here directly; from anyone else they go through the
model's controller where it has one (controllers.py says who runs what). And a
request's wait for its model to be awake, which the wake-wait metric measures.
"""

import time

from . import planner
from .auth import Peer
from .errors import Code, SleepdError
from .model import Model
from .operations import Operations
from .rules import Action
from .views import OperationResult


def sleep(ops: Operations, model_name: str, level: int, tags: list[str], actions: dict[str, Action],
          from_rank: bool) -> OperationResult:
    model = ops.registry.model(model_name)
    what = f"sleep {model_name}"
    controller = None if from_rank else ops.controllers.route(model, what)
    if controller is None:
        return ops.sleep(model_name, level, tags, actions)
    _check(ops, model, level, list(tags) + list(actions))
    return ops.controllers.sleep(model, controller, level, tags, actions, what)


def wake(ops: Operations, model_name: str, tags: list[str], evict: bool, caller: Peer,
         from_rank: bool) -> OperationResult:
    model = ops.registry.model(model_name)
    what = f"wake {model_name}"
    # Waking behind a sleeping engine unmaps nothing under it: without a controller it runs here.
    controller = None if from_rank else ops.controllers.route(model, what, refuse=False)
    if controller is None:
        return ops.wake(model_name, tags, evict, caller)
    _check(ops, model, 1, tags)
    # The engine's ranks wake without eviction (its API cannot ask for it): room is made first.
    evicted = ops.make_room(model, tags, caller) if evict else []
    result = ops.controllers.wake(model, controller, tags, evict, what)
    result.evicted = evicted
    return result


def ensure_awake(ops: Operations, model_name: str, evict: bool, wait_only: bool, timeout: float, caller: Peer,
                 from_rank: bool, wait_limit: float) -> tuple[float, bool]:
    """Returns once the model is awake: (seconds this request waited, whether it woke it). A
    request that found it asleep is observed in sleepd_wake_wait_seconds, by how it got awake.
    `wait_limit` (wake_wait_limit) bounds a wait for someone else's wake, whatever `timeout` asks."""
    model = ops.registry.model(model_name)
    model.touch()
    if not _asleep(ops, model):
        return 0.0, False
    started = time.monotonic()
    if wait_only:
        _wait_until_awake(ops, model, min(timeout or wait_limit, wait_limit))
    else:
        wake(ops, model_name, [], evict, caller, from_rank)
    waited = time.monotonic() - started
    if ops.reporter.metrics:
        ops.reporter.metrics.waited_for_wake(model, not wait_only, waited)
    return waited, not wait_only


def _wait_until_awake(ops: Operations, model: Model, limit: float) -> None:
    events = ops.reporter.events.subscribe(model.name)
    try:
        deadline = time.monotonic() + limit
        while _asleep(ops, ops.registry.model(model.name)):
            left = deadline - time.monotonic()
            if left <= 0:
                raise SleepdError(Code.DEADLINE_EXCEEDED,
                                  f"ensure {model.name} awake: still asleep after {limit:g} s, and this request "
                                  "waits for a wake instead of waking it (wake_on_request off); wake it with "
                                  f"sleepctl wake --model {model.name}")
            events.get(timeout=min(left, 0.5))  # woken by any event of the model; checked again at least twice a second
    finally:
        events.close()


def _asleep(ops: Operations, model: Model) -> bool:
    """Whether the model sleeps, read without its lock (a wake may hold it for long)."""
    return ops.registry.view(model).sleeping


def _check(ops: Operations, model: Model, level: int, tags: list[str]) -> None:
    """Refuses what the engine's ranks would refuse, before the controller is asked."""
    ops.rules.plan(level, set(), {})
    planner.check_tags(ops.registry.view(model), tags)
