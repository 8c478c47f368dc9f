"""What a sleep will do, decided before anything moves: for each mapped region of
the model, offload or discard, by the rules and the caller's tags and actions,
and refused when the host pool cannot take the offloads."""

import logging

from sleepd.common.sizes import format_size

from .errors import exhausted, not_found
from .model import Model
from .pool import HostPool
from .regions import Region, RegionState
from .rules import Action, SleepRules

log = logging.getLogger(__name__)


def plan_sleep(model: Model, level: int, tags: list[str], actions: dict[str, Action], rules: SleepRules,
               pool: HostPool, discard_if_short: bool = False) -> list[tuple[Region, Action]]:
    """[(region, action)] for the model's mapped regions. Where the pool is short and
    `discard_if_short`, tags some rule discards anyway are discarded instead, largest first."""
    regions = model.regions()
    check_tags(model, regions, list(tags) + list(actions))
    selected = set(tags) | set(actions) or {region.tag for region in regions}
    plan = rules.plan(level, selected, actions)
    work = [(r, plan[r.tag]) for r in regions if plan and r.tag in plan and r.state is RegionState.MAPPED]
    offload_bytes = sum(r.mapped_size for r, action in work if action is Action.OFFLOAD)
    if offload_bytes <= pool.available:
        return work
    fallback = sorted(((r, a) for r, a in work if a is Action.OFFLOAD and rules.discardable(r.tag)
                       and r.tag not in actions and discard_if_short), key=lambda item: -item[0].mapped_size)
    demoted = set()
    for region, _ in fallback:
        if offload_bytes <= pool.available:
            break
        demoted.add(region)
        offload_bytes -= region.mapped_size
    if offload_bytes > pool.available:
        raise exhausted(f"sleep {model.name}: offloading needs {format_size(offload_bytes)} of host pool, "
                        f"{format_size(pool.available)} free of {format_size(pool.budget)}, "
                        "and no more of it may be discarded; raise --host-pool-budget or use a level "
                        "that discards" + ("" if discard_if_short else
                                           " (a sleep sleepd starts itself never discards what it would offload)"))
    log.warning("sleep %s: host pool short; discarding %s instead of offloading them", model.name,
                ", ".join(sorted({r.tag for r in demoted})))
    return [(r, Action.DISCARD if r in demoted else a) for r, a in work]


def check_tags(model: Model, regions: list[Region], tags) -> None:
    """Refuses a tag none of the model's regions has."""
    known = {region.tag for region in regions}
    for tag in tags:
        if tag not in known:
            raise not_found(f"model {model.name} has no region tagged {tag!r} "
                            f"(its tags: {', '.join(sorted(known)) or 'none'})")
