"""What an operation will do, decided before anything moves: pure functions from a
request and a snapshot of the models (views.py) to a plan (plans.py), or a refusal.
No locks, no threads, no transport: the executor (executor.py) carries plans out.

Sleep, wake, swap, eviction's order, idle sleep, and what a session's end or a
daemon restart does to each region are all planned here.
"""

from dataclasses import dataclass

from sleepd.common.sizes import format_size

from .errors import exhausted, not_found, precondition
from .plans import (CancelOffload, CancelRestore, Drop, FinishRestore, KeepAwake, MakeRoom, Materialize, Offload,
                    Overlapped, Pause, Plan, Quiesce, Release, Remap, Reserve, Resume, ResumeIfAwake, Step,
                    TagsAwake, Unclaim, Unmap, WakeAgain)
from .regions import ASLEEP, RegionState
from .rules import Action, SleepRules
from .views import ModelView, RankView, RegionView

Work = list[tuple[RegionView, Action]]


@dataclass(frozen=True)
class PoolRoom:
    """The host pool as a plan sees it."""
    available: int
    budget: int


# ---- checks ----

def check_ready(model: ModelView, what: str) -> None:
    """Refuses operations on a model some of whose ranks are still coming back from a daemon restart."""
    waiting = [rank for rank in model.ranks if rank.returning]
    if waiting:
        names = ", ".join(f"{model.name} rank {rank.rank} (pid {rank.pid})" for rank in waiting)
        raise precondition(f"{what} {model.name}: {names} has not handed its memory back since the daemon "
                           "restarted; try again shortly")


def check_tags(model: ModelView, tags) -> None:
    """Refuses a tag none of the model's regions has."""
    known = {region.tag for region in model.regions()}
    for tag in tags:
        if tag not in known:
            raise not_found(f"model {model.name} has no region tagged {tag!r} "
                            f"(its tags: {', '.join(sorted(known)) or 'none'})")


def asleep_regions(model: ModelView, tags) -> list[RegionView]:
    """The model's asleep regions of `tags` (all, without): what a wake brings back."""
    return [r for r in model.regions() if r.state in ASLEEP and (not tags or r.tag in tags)]


def needed_by_device(regions) -> dict[int, int]:
    needed: dict[int, int] = {}
    for region in regions:
        needed[region.device] = needed.get(region.device, 0) + region.mapped_size
    return needed


# ---- sleep ----

def sleep_work(model: ModelView, level: int, tags, actions: dict[str, Action], rules: SleepRules, pool: PoolRoom,
               discard_if_short: bool = False) -> Work:
    """[(region, action)] for the model's mapped regions, by the rules and the caller's tags and actions.
    Where the pool is short and `discard_if_short`, tags some rule discards anyway are discarded instead,
    largest first; refused where that is not enough."""
    regions = model.regions()
    check_tags(model, list(tags) + list(actions))
    selected = set(tags) | set(actions) or {region.tag for region in regions}
    actions_by_tag = rules.plan(level, selected, actions)
    work = [(r, actions_by_tag[r.tag]) for r in regions
            if actions_by_tag and r.tag in actions_by_tag and r.state is RegionState.MAPPED]
    offload_bytes = _offload_bytes(work)
    if offload_bytes <= pool.available:
        return work
    fallback = sorted(((r, a) for r, a in work if a is Action.OFFLOAD and rules.discardable(r.tag) and not r.shared
                       and r.tag not in actions and discard_if_short), key=lambda item: -item[0].mapped_size)
    demoted = set()
    for region, _ in fallback:
        if offload_bytes <= pool.available:
            break
        demoted.add(region.id)
        offload_bytes -= region.mapped_size
    if offload_bytes > pool.available:
        raise exhausted(f"sleep {model.name}: offloading needs {format_size(offload_bytes)} of host pool, "
                        f"{format_size(pool.available)} free of {format_size(pool.budget)}, "
                        "and no more of it may be discarded; raise --host-pool-budget or use a level "
                        "that discards" + ("" if discard_if_short else
                                           " (a sleep sleepd starts itself never discards what it would offload)"))
    return [(r, Action.DISCARD if r.id in demoted else a) for r, a in work]


def demoted(work: Work, level: int, actions: dict[str, Action], rules: SleepRules) -> list[str]:
    """The tags a short host pool had discarded instead of offloaded."""
    return sorted({r.tag for r, action in work if action is Action.DISCARD and r.tag not in actions
                   and rules.action(level, r.tag) is Action.OFFLOAD})


def sleep(model: ModelView, level: int, work: Work) -> Plan | None:
    """Quiesce (unless paused already), then the work's steps. None: already asleep, nothing to do."""
    if not work and model.sleeping:
        return None
    ids = tuple(r.id for r, _ in work)
    steps = () if model.paused else (Step(Quiesce(model.name, level), (Resume(model.name, ids),)),)
    return Plan(f"sleep {model.name}", steps + _going_out(model, work),
                reserve=(Reserve(model.name, "host_pool", _offload_bytes(work)),),
                counts={model.name: _sleep_counts(work)})


def _going_out(model: ModelView, work: Work, released_undo: bool = False) -> tuple[Step, ...]:
    """Copy the offloads out, have every rank unmap, release. Until the release, each step's
    compensation puts things back as they were; a swap undoes a release by waking the regions again.
    A weight set's views move nothing: offloaded, the engine lets go of the set's memory (the set
    offloads once no engine maps it); discarded, the view leaves the set, never its memory."""
    if not work:
        return ()
    ids = tuple(r.id for r, _ in work)
    offloads = tuple(r.id for r, action in work if action is Action.OFFLOAD and not r.shared)
    leaving = tuple(r.id for r, action in work if action is Action.DISCARD and r.shared)
    ranks = model.live_ranks(ids)
    after = tuple((r.id, RegionState.OFFLOADED if action is Action.OFFLOAD else RegionState.DISCARDED)
                  for r, action in work)
    steps = (Step(Offload(model.name, offloads), (CancelOffload(model.name, offloads),)),) if offloads else ()
    release_undo = (WakeAgain(model.name, ids),) if released_undo else ()
    return steps + (Step(Unmap(model.name, after, ranks), (Remap(model.name, ids, ranks),)),
                    Step(Release(model.name, ids, leaving), release_undo, commits=not released_undo))


def _offload_bytes(work: Work) -> int:
    return sum(r.mapped_size for r, action in work if action is Action.OFFLOAD and not r.shared)


def _sleep_counts(work: Work) -> dict:
    return {"bytes_offloaded": _offload_bytes(work), "region_count": len(work),
            "bytes_discarded": sum(r.mapped_size for r, action in work if action is Action.DISCARD and not r.shared)}


def weight_sets_of(regions) -> set[str]:
    """The weight sets these regions view."""
    return {r.weight_set for r in regions if r.shared}


# ---- wake ----

def wake(model: ModelView, tags, evict: bool) -> Plan:
    """Room first (evicting if `evict`), then the asleep regions of `tags` created, filled, mapped
    and their wake hooks run; the model's wake hooks once every region is mapped."""
    check_ready(model, "wake")
    check_tags(model, tags)
    targets = asleep_regions(model, tags)
    own = [r for r in targets if not r.shared]  # views need the set's memory, which the set's own wake brings
    room = (Step(MakeRoom(model.name, tuple(sorted(needed_by_device(own).items())), evict)),) if own else ()
    return Plan(f"wake {model.name}", room + _coming_in(model, targets) + (Step(ResumeIfAwake(model.name)),),
                reserve=(Reserve(model.name, "device", sum(r.mapped_size for r in own)),),
                counts={model.name: {}})


def _coming_in(model: ModelView, targets: list[RegionView], materialized: bool = False) -> tuple[Step, ...]:
    """Create and fill (unless `materialized` beside other steps), map again, run the tags' wake
    hooks, free the backups. Until then, each compensation leaves the regions asleep as before."""
    if not targets:
        return ()
    ids = tuple(r.id for r in targets)
    own = tuple(r.id for r in targets if not r.shared)
    ranks = model.live_ranks(ids)
    asleep = tuple((r.id, RegionState.OFFLOADED if r.backed_up or r.shared else RegionState.DISCARDED)
                   for r in targets)
    create = () if materialized or not own else (Step(Materialize(model.name, own), (CancelRestore(model.name, own),)),)
    return create + (Step(Remap(model.name, ids, ranks), (Unmap(model.name, asleep, ranks),)),
                     Step(TagsAwake(model.name, ids, ranks)),
                     Step(FinishRestore(model.name, ids), commits=True))


def wake_again(model: ModelView, ids) -> Plan:
    """A swap's compensation for a victim: the regions of `ids` it released come back."""
    wanted = set(ids)
    return Plan(f"wake {model.name}", _coming_in(model, [r for r in asleep_regions(model, []) if r.id in wanted]))


# ---- weight sets ----

def wake_weight_set(name: str, regions: list[RegionView]) -> Plan:
    """A set's memory back on the device (room made as the waking engine may evict), before an engine maps it."""
    asleep = [r for r in regions if not r.holds_memory]
    ids = tuple(r.id for r in asleep)
    return Plan(f"wake {name}", (Step(MakeRoom(name, tuple(sorted(needed_by_device(asleep).items())), True)),
                                 Step(Materialize(name, ids), (CancelRestore(name, ids),)),
                                 Step(FinishRestore(name, ids), commits=True)))


def offload_weight_set(name: str, regions: list[RegionView]) -> Plan:
    """A set no engine maps, to the host pool: there is no engine to ask."""
    ids = tuple(r.id for r in regions if r.holds_memory)
    return Plan(f"offload {name}", (Step(Offload(name, ids), (CancelOffload(name, ids),)),
                                    Step(Release(name, ids), commits=True)))


def drop_weight_set(name: str, regions: list[RegionView]) -> Plan:
    """A set nobody joined goes, memory, backups and all."""
    return Plan(f"drop {name}", (Step(Drop(name, tuple(r.id for r in regions))),))


# ---- swap and eviction ----

def eviction_order(requester: ModelView, models: list[ModelView], devices, may_act_on) -> list[str]:
    """Models that could give memory back on `devices`, in eviction order (lowest priority, then
    longest idle, first). `may_act_on(owner_uid)`: only an admin's request evicts other users'
    models. An engine that runs its own sleep is evicted only through its controller."""
    candidates = [m for m in models if m.name != requester.name and not m.policy.pinned
                  and m.policy.eviction_level > 0 and any(m.held_on(d) for d in devices)
                  and not any(rank.returning for rank in m.ranks) and may_act_on(m.owner_uid)
                  and (m.controller_pid or not m.needs_controller)]
    return [m.name for m in sorted(candidates, key=lambda m: (m.policy.priority, -m.idle_seconds))]


def choose_victims(candidates: list[ModelView], needed: dict[int, int], room: dict[int, int]) -> list[ModelView]:
    """Candidates, in order, until the memory they hold makes `needed` fit in `room` ({device: bytes})."""
    victims, freed = [], {}
    for candidate in candidates:
        if not _short(needed, room, freed):
            break
        victims.append(candidate)
        for device in needed:
            freed[device] = freed.get(device, 0) + candidate.held_on(device)
    return victims


def swap_shortfall(target: ModelView, victims: list[ModelView], needed: dict[int, int], room: dict[int, int],
                   device_names: list[str]) -> str | None:
    """Why sleeping `victims` cannot make room for `target`, or None where it can. A pinned victim is refused."""
    freed: dict[int, int] = {}
    for victim in victims:
        if victim.policy.pinned:
            raise exhausted(f"swap to {target.name}: {victim.name} is pinned and is never put to sleep for room")
        for device in needed:
            freed[device] = freed.get(device, 0) + victim.held_on(device)
    short = _short(needed, room, freed)
    if not short:
        return None
    device, missing = min(short.items())
    names = ", ".join(victim.name for victim in victims) or "no model that may be evicted"
    return (f"swap to {target.name}: needs {format_size(needed[device])} on {device_names[device]}; sleeping "
            f"{names} leaves it {format_size(missing)} short")


def _short(needed: dict[int, int], room: dict[int, int], freed: dict[int, int]) -> dict[int, int]:
    have = {d: room.get(d, 0) + freed.get(d, 0) for d in needed}
    return {d: n - have[d] for d, n in needed.items() if n > have[d]}


def swap(target: ModelView, victims: list[ModelView], rules: SleepRules, pool: PoolRoom,
         batch_bytes: int) -> Plan:
    """The victims quiesced, then their memory going out in batches of about `batch_bytes` while the
    target's comes in as room appears (both copy directions at once); then the target mapped again.
    Until the target is awake, a failure wakes each victim again."""
    targets = asleep_regions(target, [])
    works = {victim.name: sleep_work(victim, victim.policy.eviction_level, [], {}, rules, pool) for victim in victims}
    offload_bytes = sum(_offload_bytes(work) for work in works.values())
    if offload_bytes > pool.available:
        raise exhausted(f"swap to {target.name}: the models going to sleep need {format_size(offload_bytes)} of "
                        f"host pool, {format_size(pool.available)} free")
    quiesce = tuple(Step(Quiesce(v.name, v.policy.eviction_level), (Resume(v.name, tuple(r.id for r, _ in
                    works[v.name])),)) for v in victims if not v.paused)
    outgoing = tuple(step for victim in victims for batch in _batches(works[victim.name], batch_bytes)
                     for step in _going_out(victim, batch, released_undo=True))
    own = [r for r in targets if not r.shared]  # the target's weight sets are awake before the swap runs
    ids = tuple(r.id for r in own)
    overlapped = Step(Overlapped(outgoing, Materialize(target.name, ids)), (CancelRestore(target.name, ids),))
    needed = needed_by_device(own)
    freed_for_owner = sum(v.held_on(d) for v in victims if v.owner_uid == target.owner_uid for d in needed)
    reserve = (Reserve(target.name, "device", max(0, sum(needed.values()) - freed_for_owner)),
               *(Reserve(v.name, "host_pool", _offload_bytes(works[v.name])) for v in victims))
    return Plan(f"swap to {target.name}", quiesce + (overlapped,) + _coming_in(target, targets, materialized=True)
                + (Step(ResumeIfAwake(target.name)),), reserve=reserve, set_aside=(target.name, tuple(sorted(needed.items()))),
                put_back=tuple(v.name for v in victims),
                counts={target.name: {}, **{v.name: _sleep_counts(works[v.name]) for v in victims}})


def _batches(work: Work, batch_bytes: int):
    """Small enough that restores start early, large enough to keep copies efficient."""
    batch, size = [], 0
    for item in work:
        batch.append(item)
        size += item[0].mapped_size
        if size >= batch_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


# ---- idle sleep ----

def idle_due(models: list[ModelView]) -> list[ModelView]:
    """Models awake and idle for their policy's idle_seconds: they go to their eviction level by themselves."""
    return [m for m in models if m.policy.idle_seconds and m.idle_seconds >= m.policy.idle_seconds and not m.sleeping]


# ---- a session's end and a daemon restart ----

def _rank(model: ModelView, rank: int) -> RankView:
    return next(view for view in model.ranks if view.rank == rank)


def reclaim(model: ModelView, rank: int) -> Plan:
    """An ended rank's regions are released, but for persistent ones: the rank keeps those as an orphan."""
    regions = _rank(model, rank).regions
    return Plan(f"reclaim {model.name} rank {rank}",
                (Step(Drop(model.name, tuple(r.id for r in regions if not r.persist))),))


def hand_back_finished(model: ModelView, rank: int) -> Plan:
    """The engine handed back what it maps and has unmapped the rest, on the old daemon's word. A region
    handed back though copied out is awake, its backup freed; one recorded as mapped and not handed back
    is asleep (with its backup if one was recorded, else discarded). A model with asleep regions is paused:
    its sleep hooks ran before the restart, and a wake resumes it."""
    regions = _rank(model, rank).regions
    kept = tuple(r.id for r in regions if r.holds_memory and r.backed_up)
    unclaimed = tuple(r.id for r in regions if not r.holds_memory and r.state is RegionState.MAPPED and not r.shared)
    asleep = any(not r.holds_memory for r in regions)
    steps = (Step(KeepAwake(model.name, kept)), Step(Unclaim(model.name, unclaimed)))
    return Plan(f"hand back {model.name} rank {rank}",
                steps + ((Step(Pause(model.name)),) if asleep and not model.paused else ()))


def expired(model: ModelView, rank: int) -> Plan:
    """A rank whose engine did not come back after a restart: its persistent regions with a backup wait as an
    orphan's, asleep; everything else is released."""
    regions = _rank(model, rank).regions
    waiting = [r for r in regions if r.persist and r.backed_up]
    return Plan(f"expire {model.name} rank {rank}", (
        Step(Drop(model.name, tuple(r.id for r in regions if r not in waiting))),
        Step(Unclaim(model.name, tuple(r.id for r in waiting if r.state is RegionState.MAPPED)))))
