"""Swapping models on devices: which models a swap puts to sleep for which, and
how. Where every engine lets sleepd run its sleep, one plan (planner.swap)
offloads the victims in batches while the target's memory is created and
restored as soon as the released bytes make room for it, both copy directions
at once, and the device never holds more than its budget; the executor wakes the
victims again if the target cannot be woken. Where some engine runs its own
sleep, the swap goes one model after the other, through the controllers.
"""

import contextlib
import time

from . import external, planner
from .auth import Peer
from .errors import SleepdError, exhausted, invalid, unavailable
from .model import Model
from .mover import OFFLOAD, RESTORE
from .operations import Operations
from .views import OperationResult, SwapResult

def swap(ops: Operations, to_name: str, from_names: list[str], caller: Peer, batch_bytes: int) -> SwapResult:
    """Puts `from_names` (or, without any, the models `caller` may evict, in eviction order)
    to sleep and wakes `to_name` in their room. The victims' memory goes out in batches of
    `batch_bytes` (swap.batch): small enough that restores start early, large enough to keep
    copies efficient and the engines' unmap rounds few."""
    started = time.perf_counter()
    if to_name in from_names:
        raise invalid(f"swap: {to_name} cannot be swapped out for itself")
    target = ops.registry.model(to_name)
    named = [ops.registry.model(name) for name in dict.fromkeys(from_names)]
    candidates = named or ops.executor.eviction_order(target, target.devices(), caller)
    if any(m.controller is not None or m.needs_controller for m in (target, *candidates)):
        return _one_by_one(ops, target, named, caller, started)
    with target.lock:
        for model in (target, *named):
            planner.check_ready(model.view(), "swap")
        target.touch()
        needed = planner.needed_by_device(planner.asleep_regions(target.view(), []))
        room = {device: ops.room.room_for(target.name, device) for device in needed}
        by_name = {model.name: model for model in named or ops.executor.eviction_order(target, needed, caller)}
        chosen = [m.view() for m in by_name.values()]
        victims = [by_name[view.name] for view in (chosen if named else planner.choose_victims(chosen, needed, room))]
        refusal = planner.swap_shortfall(target.view(), [v.view() for v in victims], needed, room,
                                         [device.name for device in ops.backend.devices])
        if refusal:
            ops.room.refuse(target, refusal)
        with contextlib.ExitStack() as held:
            for victim in sorted(victims, key=lambda model: model.name):
                if not victim.lock.acquire(timeout=ops.executor.fanout.hook_timeout):
                    raise unavailable(f"swap to {to_name}: {victim.name} is busy with another operation; try again")
                held.callback(victim.lock.release)
            plan = planner.swap(target.view(), [v.view() for v in victims], ops.rules,
                                planner.PoolRoom(ops.pool.available, ops.pool.budget), batch_bytes)
            # The target's weight sets come back first; the victims' go to the pool after, if no one maps them.
            shared = planner.weight_sets_of(planner.asleep_regions(target.view(), []))
            theirs = planner.weight_sets_of(r for v in victims for r in v.view().regions())
            with ops.reserved(plan), ops.weight_sets.awake(shared, caller) as restored_for_it:
                results = ops.executor.run(plan, caller)
            results[target.name].bytes_restored += restored_for_it
            ops.weight_sets.settle(theirs)
            woke = results[target.name]
            woke.sleeping = target.sleeping
            slept = [results[victim.name] for victim in victims]
            for victim, result in zip(victims, slept):
                result.sleeping = True
    for victim, result in zip(victims, slept):
        ops.reporter.slept(victim, victim.policy.eviction_level, result, reason=f"swapped out for {to_name}")
        ops.reporter.events.publish("evicted", victim, f"swapped out for {to_name}")
    ops.reporter.woke(target, [], woke, reason="swapped in")
    devices = set(target.devices()).union(*(victim.devices() for victim in victims))
    return SwapResult(slept, woke, time.perf_counter() - started, _sequential_estimate(ops, slept, woke, devices))


def _one_by_one(ops: Operations, target: Model, named: list[Model], caller: Peer, started: float) -> SwapResult:
    """A swap where some engine runs its own sleep: its controller runs it, and its ranks take its
    model's lock, so this swap holds none. It puts the named models to sleep one after the other, then
    wakes the target (evicting, where none were named); the copy directions do not overlap."""
    for model in (target, *named):
        planner.check_ready(model.view(), "swap")
    slept = []
    for victim in named:
        if victim.policy.pinned:
            raise exhausted(f"swap to {target.name}: {victim.name} is pinned and is never put to sleep for room")
        result = ops.put_to_sleep(victim, f"swapped out for {target.name}")
        if result is None:
            raise unavailable(f"swap to {target.name}: {victim.name} is busy with another operation; try again")
        slept.append(result)
        ops.reporter.events.publish("evicted", victim, f"swapped out for {target.name}")
    try:
        woke = external.wake(ops, target.name, [], not named, caller, from_rank=False)
    except SleepdError as error:
        if not slept:
            raise
        raise SleepdError(error.code, f"swap to {target.name} failed after {', '.join(r.model for r in slept)} "
                          f"slept, which stay asleep (wake them with sleepctl wake): {error.message}") from None
    return SwapResult(slept, woke, time.perf_counter() - started, 0.0)


def _sequential_estimate(ops: Operations, slept: list[OperationResult], woke: OperationResult,
                         devices: set[int]) -> float:
    """The same bytes moved one direction after the other at the movers' measured throughput (0: unknown)."""
    out_bytes = sum(result.bytes_offloaded for result in slept)
    in_bytes = woke.bytes_restored
    rates = [ops.executor.movers[d].throughput for d in devices]
    out_rate = max((rate[OFFLOAD] for rate in rates), default=0.0)
    in_rate = max((rate[RESTORE] for rate in rates), default=0.0)
    if (out_bytes and not out_rate) or (in_bytes and not in_rate):
        return 0.0
    return (out_bytes / out_rate if out_bytes else 0.0) + (in_bytes / in_rate if in_bytes else 0.0)
