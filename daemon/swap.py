"""Swapping models on devices: put some models to sleep and wake another in
their place, with the two copy directions overlapped.

The victims' memory is offloaded and released in batches; the target's memory
is created region by region as soon as the released bytes make room for it,
and restored on the mover's other channel while the next batch goes out. The
device never holds more than its budget. If the target cannot be woken, the
victims are woken again: a failed swap leaves the target asleep, its backups
intact, and each victim awake again, or, where its memory cannot come back (the
room went elsewhere), asleep with its backups and named in the error.

It works through the operations' interface (operations.py), like any other operation.
"""

import contextlib
import threading
import time

from sleepd.common.sizes import format_size

from . import external
from .errors import SleepdError, exhausted, invalid, unavailable
from .auth import DAEMON, Peer
from .model import Model, OperationResult, SwapResult
from .mover import OFFLOAD, RESTORE
from .operations import Operations
from .regions import ASLEEP, Region
from .room import needed_by_device
from .rules import Action


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
    candidates = named or ops.room.eviction_candidates(target, target.devices(), caller)
    if any(m.controller is not None or m.needs_controller for m in (target, *candidates)):
        return _one_by_one(ops, target, named, caller, started)
    with target.lock:
        for model in (target, *named):
            ops.check_ready(model, "swap")
        target.touch()
        targets = [r for r in target.regions() if r.state in ASLEEP]
        needed = needed_by_device(targets)
        victims = named or _choose_victims(ops, target, needed, caller)
        _check_enough(ops, target, victims, needed)
        freed_for_owner = sum(v.held_on(d) for v in victims if v.owner_uid == target.owner_uid for d in needed)
        with contextlib.ExitStack() as held:
            held.enter_context(ops.quotas.reserve(target, "device", max(0, sum(needed.values()) - freed_for_owner),
                                                  f"swap to {to_name}"))
            for victim in sorted(victims, key=lambda model: model.name):
                if not victim.lock.acquire(timeout=ops.fanout.hook_timeout):
                    raise unavailable(f"swap to {to_name}: {victim.name} is busy with another operation; try again")
                held.callback(victim.lock.release)
            works = {victim: ops.plan_sleep(victim, victim.policy.eviction_level, [], {}) for victim in victims}
            for victim, work in works.items():
                held.enter_context(ops.quotas.reserve(
                    victim, "host_pool", sum(r.mapped_size for r, a in work if a is Action.OFFLOAD),
                    f"swap to {to_name}: sleep {victim.name}"))
            result = _overlapped(ops, target, works, targets, caller, batch_bytes)
    result.seconds = time.perf_counter() - started
    for victim in victims:
        ops.reporter.events.publish("evicted", victim, f"swapped out for {to_name}")
    return result


def _one_by_one(ops: Operations, target: Model, named: list[Model], caller: Peer, started: float) -> SwapResult:
    """A swap where some engine runs its own sleep: its controller runs it, and its ranks take its
    model's lock, so this swap holds none. It puts the named models to sleep one after the other, then
    wakes the target (evicting, where none were named); the copy directions do not overlap."""
    for model in (target, *named):
        ops.check_ready(model, "swap")
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


def _choose_victims(ops: Operations, target: Model, needed: dict[int, int], caller: Peer) -> list[Model]:
    """Models in eviction order until their memory makes the target fit."""
    victims, freed = [], {}
    for candidate in ops.room.eviction_candidates(target, needed, caller):
        if not ops.room.shortfall(target.name, needed, freed):
            break
        victims.append(candidate)
        for device in needed:
            freed[device] = freed.get(device, 0) + candidate.held_on(device)
    return victims


def _check_enough(ops: Operations, target: Model, victims: list[Model], needed: dict[int, int]) -> None:
    freed: dict[int, int] = {}
    for victim in victims:
        if victim.policy.pinned:
            raise exhausted(f"swap to {target.name}: {victim.name} is pinned and is never put to sleep for room")
        for device in needed:
            freed[device] = freed.get(device, 0) + victim.held_on(device)
    short = ops.room.shortfall(target.name, needed, freed)
    if short:
        device, missing = next(iter(sorted(short.items())))
        names = ", ".join(victim.name for victim in victims) or "no model that may be evicted"
        message = (f"swap to {target.name}: needs {format_size(needed[device])} on "
                   f"{ops.backend.devices[device].name}; sleeping {names} leaves it "
                   f"{format_size(missing)} short")
        ops.room.refuse(target, message)


def _batches(work, batch_bytes: int):
    batch, size = [], 0
    for item in work:
        batch.append(item)
        size += item[0].mapped_size
        if size >= batch_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


class _Restorer(threading.Thread):
    """Creates and fills the target's regions as room appears."""

    def __init__(self, ops: Operations, target: Model, regions: list[Region], room: threading.Condition,
                 caller: Peer):
        super().__init__(name=f"swap-restore-{target.name}", daemon=True)
        self.ops, self.target, self.regions, self.room, self.caller = ops, target, regions, room, caller
        self.done: list[Region] = []
        self.error: Exception | None = None
        self.senders_done = False

    def run(self) -> None:
        try:
            pending = list(self.regions)
            while pending:
                with self.room:
                    self.room.wait_for(lambda: self._fitting(pending) or self.senders_done)
                    batch = self._fitting(pending)
                    if not batch:
                        raise exhausted(f"swap to {self.target.name}: no room for region {pending[0].id} after "
                                        "the other models slept")
                # Everything that fits now goes in one request: fewer round trips to the mover.
                self.ops.materialize(self.target, batch, self.caller)
                self.done += batch
                pending = pending[len(batch):]
        except Exception as error:  # reported by the swap, which rolls back
            self.error = error

    def _fitting(self, pending: list[Region]) -> list[Region]:
        """The longest prefix of `pending` that fits in the room there is now."""
        free = {device: self.ops.room.room_for(self.target.name, device) for device in {r.device for r in pending}}
        batch = []
        for region in pending:
            if free[region.device] < region.mapped_size:
                break
            free[region.device] -= region.mapped_size
            batch.append(region)
        return batch


def _overlapped(ops: Operations, target: Model, works: dict[Model, list], targets: list[Region],
                caller: Peer, batch_bytes: int) -> SwapResult:
    victims = list(works)
    offload_bytes = sum(r.mapped_size for work in works.values() for r, a in work if a is Action.OFFLOAD)
    if offload_bytes > ops.pool.available:
        raise exhausted(f"swap to {target.name}: the models going to sleep need {format_size(offload_bytes)} of "
                        f"host pool, {format_size(ops.pool.available)} free")
    devices = set(target.devices()).union(*(victim.devices() for victim in victims))
    slept = {victim: OperationResult(victim.name, sleeping=True) for victim in victims}
    woke = OperationResult(target.name)
    quiesced: list[Model] = []
    room = threading.Condition()
    restorer = _Restorer(ops, target, targets, room, caller)
    try:
        # Until the swap ends (not during a rollback), the room it frees is the target's.
        with ops.room.set_aside(target, needed_by_device(targets)):
            for victim in victims:
                if not victim.paused:
                    ops.quiesce(victim, victim.policy.eviction_level)
                    quiesced.append(victim)
            restorer.start()
            for victim, work in works.items():
                for batch in _batches(work, batch_bytes):
                    ops.offload_and_unmap(victim, batch)
                    with room:
                        room.notify_all()
                    for region, action in batch:
                        if action is Action.OFFLOAD:
                            slept[victim].bytes_offloaded += region.mapped_size
                        else:
                            slept[victim].bytes_discarded += region.mapped_size
                        slept[victim].region_count += 1
            with room:
                restorer.senders_done = True
                room.notify_all()
            restorer.join()
            if restorer.error:
                raise restorer.error
            ops.remap_or_undo(target, targets, woke)
    except Exception as error:
        with room:
            restorer.senders_done = True
            room.notify_all()
        if restorer.is_alive():
            restorer.join()
        ops.undo_restore(target, restorer.done, remapped=[])
        left_asleep = _wake_again(ops, victims, works, quiesced)
        if isinstance(error, SleepdError):
            woken = [v.name for v in victims if v.name not in left_asleep]
            outcome = [f"{', '.join(woken)} woken again"] if woken else []
            outcome += [f"{name} left asleep with its backups ({why})" for name, why in left_asleep.items()]
            raise SleepdError(error.code, f"swap to {target.name} failed; {'; '.join(outcome)}: "
                              f"{error.message}") from None
        raise
    ops.finish_wake(target, targets, woke)
    for victim in victims:
        ops.reporter.slept(victim, victim.policy.eviction_level, slept[victim],
                           reason=f"swapped out for {target.name}")
    ops.reporter.woke(target, [], woke, reason="swapped in")
    return SwapResult(list(slept.values()), woke, 0.0, _sequential_estimate(ops, slept.values(), woke, devices))


def _wake_again(ops: Operations, victims: list[Model], works, quiesced: list[Model]) -> dict[str, str]:
    """Rollback: every region a victim released in this swap comes back, and its
    ranks resume. A victim that cannot have its memory back (the room went
    elsewhere) stays asleep, backups intact, until woken; returns those, with why."""
    left_asleep = {}
    for victim in victims:
        released = [r for r, _ in works[victim] if r.state in ASLEEP]
        try:
            if released:
                ops.materialize(victim, released, DAEMON)
                ops.remap_or_undo(victim, released, OperationResult(victim.name))
        except Exception as error:  # the next victims still get theirs back; a wake brings the rest back
            left_asleep[victim.name] = error.message if isinstance(error, SleepdError) else str(error)
            continue
        if victim.paused and (victim in quiesced or released):
            ops.resume(victim, best_effort=True)
    return left_asleep


def _sequential_estimate(ops: Operations, slept, woke: OperationResult, devices: set[int]) -> float:
    """The same bytes moved one direction after the other at the movers' measured throughput (0: unknown)."""
    out_bytes = sum(result.bytes_offloaded for result in slept)
    in_bytes = woke.bytes_restored
    rates = [ops.movers[d].throughput for d in devices]
    out_rate = max((rate[OFFLOAD] for rate in rates), default=0.0)
    in_rate = max((rate[RESTORE] for rate in rates), default=0.0)
    if (out_bytes and not out_rate) or (in_bytes and not in_rate):
        return 0.0
    return (out_bytes / out_rate if out_bytes else 0.0) + (in_bytes / in_rate if in_bytes else 0.0)
