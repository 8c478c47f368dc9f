"""Room on devices: what each model may still get, what is missing for a request,
what a swap in progress has set aside, which models to evict and in what order,
and the one-line refusals that say all of it.
"""

import contextlib
import logging
import threading
import time

from sleepd.common.sizes import format_size

from .auth import Authorizer, Peer
from .backends import DaemonBackend
from .errors import SleepdError, exhausted
from .events import EventBus
from .model import Model
from .regions import Region
from .registry import Registry

log = logging.getLogger(__name__)

# How long eviction waits for another model's lock before trying the next model.
VICTIM_LOCK_SECONDS = 0.5


def needed_by_device(regions: list[Region]) -> dict[int, int]:
    needed: dict[int, int] = {}
    for region in regions:
        needed[region.device] = needed.get(region.device, 0) + region.mapped_size
    return needed


class Room:
    def __init__(self, registry: Registry, backend: DaemonBackend, authorizer: Authorizer, events: EventBus,
                 metrics=None, answer_seconds: float = 5.0):
        self._registry = registry
        # How long an eviction waits for a model's ranks or controller to answer before it skips
        # that model (eviction_answer_seconds): one slow or hostile engine delays only itself.
        self.answer_seconds = answer_seconds
        self._backend = backend
        self._authorizer = authorizer
        self._events = events
        self._metrics = metrics
        self._lock = threading.Lock()
        # Room a swap in progress has set aside for the model it brings in: {model: {device: bytes}}.
        self._promised: dict[Model, dict[int, int]] = {}

    def committed(self, device: int) -> int:
        """Device memory in use plus what sleeping models need to wake."""
        asleep = sum(r.mapped_size for r in self._registry.regions_on(device) if not r.holds_memory)
        return self._backend.used(device) + asleep

    def room_for(self, model_name: str, device: int) -> int:
        """What `model_name` may still get on the device: its free room less what
        swaps in progress have set aside for other models."""
        with self._lock:
            promised = sum(p.get(device, 0) for model, p in self._promised.items() if model.name != model_name)
        return max(0, self._backend.free(device) - promised)

    def shortfall(self, model_name: str, needed: dict[int, int], freed: dict[int, int] | None = None) -> dict[int, int]:
        """{device: bytes missing} for `needed` to fit, counting `freed` bytes as room too."""
        room = {d: self.room_for(model_name, d) + (freed or {}).get(d, 0) for d in needed}
        return {d: n - room[d] for d, n in needed.items() if n > room[d]}

    @contextlib.contextmanager
    def set_aside(self, model: Model, needed: dict[int, int]):
        """Keeps `needed` bytes per device for `model` while the block runs:
        room freed for it goes to it, not to whichever operation asks first."""
        with self._lock:
            self._promised[model] = dict(needed)
        try:
            yield
        finally:
            with self._lock:
                self._promised.pop(model, None)

    def describe(self, device: int, viewer: Peer) -> str:
        """The device's room in words: free, budget, who holds it, what is set aside, what is outside
        sleepd. Models `viewer` may not see are counted together, unnamed."""
        budget = self._backend.devices[device].budget
        room = (f"{format_size(self._backend.free(device))} free of its {format_size(budget)} budget "
                f"(held by {self._holders(device, viewer)})")
        with self._lock:
            promised = {model: p[device] for model, p in self._promised.items() if p.get(device)}
        for model, size in sorted(promised.items(), key=lambda item: item[0].name):
            name = model.name if self._authorizer.sees(viewer, model.owner_uid) else "another user's model"
            room += f"; {format_size(size)} set aside for swapping in {name}"
        driver = self._backend.driver_memory(device)
        if driver is not None and driver.free < budget - self._backend.used(device):
            outside = max(0, driver.used - self._backend.used(device))
            room += f"; the driver reports {format_size(outside)} held outside sleepd"
        return room

    def _holders(self, device: int, viewer: Peer) -> str:
        named, others = [], 0
        for (name, owner_uid), size in sorted(self._registry.holders(device).items()):
            if self._authorizer.sees(viewer, owner_uid):
                named.append(f"{name} {format_size(size)}")
            else:
                others += size
        if others:
            named.append(f"other users' models {format_size(others)}")
        return ", ".join(named) or "nothing"

    def check_created_fit(self, model_name: str, regions: list[Region], what: str, viewer: Peer) -> None:
        """Refuses `regions` whose memory no longer fits: checked under the device locks, so
        that an operation running beside this one cannot have taken the room since."""
        for device, needed in needed_by_device(regions).items():
            if needed > self.room_for(model_name, device):
                raise exhausted(f"{what}: needs {format_size(needed)} on {self._backend.devices[device].name}, "
                                f"more than its {self.describe(device, viewer)}; the room went meanwhile to another "
                                "operation or process")

    # ---- eviction ----

    def ensure(self, model: Model, needed: dict[int, int], what: str, evict: bool, put_to_sleep,
               caller: Peer) -> list[str]:
        """Makes `needed` bytes fit on each device, evicting other models `caller` may act on
        with `put_to_sleep(victim, reason, answer_within)` (None: busy) when allowed; a model that is busy,
        refuses or does not answer in time is skipped. Refuses naming the bytes missing, what holds them
        and who was skipped and why otherwise. Returns the models evicted."""
        evicted: list[str] = []
        skipped: dict[str, str] = {}  # model name -> why it was not evicted; each is tried once
        while True:
            short = self.shortfall(model.name, needed)
            if not short:
                return evicted
            device, missing = next(iter(sorted(short.items())))
            name = self._backend.devices[device].name
            if not evict:
                self.refuse(model, f"{what}: needs {format_size(needed[device])} on {name}, "
                            f"{format_size(missing)} more than its {self.describe(device, caller)}; put a model "
                            "to sleep or allow eviction (--evict)")
            victim = self._evict_one(model, short, put_to_sleep, caller, skipped)
            if victim is None:
                tried = "skipped " + ", ".join(f"{n} ({why})" for n, why in skipped.items()) + "; " if skipped else ""
                self.refuse(model, f"{what}: needs {format_size(missing)} more on {name} "
                            f"({self.describe(device, caller)}) and no model may be evicted ({tried}the rest are "
                            "pinned, already asleep, other users' or run their own sleep with no controller attached)")
            evicted.append(victim)

    def eviction_candidates(self, requester: Model, devices, caller: Peer) -> list[Model]:
        """Models that could give memory back on `devices`, in eviction order. Only an admin's
        request evicts other users' models; an engine that runs its own sleep is evicted only
        through its controller, never behind its scheduler (controllers.py)."""
        candidates = [m for m in self._registry.models() if m is not requester and not m.policy.pinned
                      and m.policy.eviction_level > 0 and any(m.held_on(d) for d in devices)
                      and not any(s.returning for s in m.sessions()) and self._authorizer.sees(caller, m.owner_uid)
                      and (m.controller is not None or not m.needs_controller)]
        return sorted(candidates, key=lambda m: (m.policy.priority, m.last_active))

    def _evict_one(self, requester: Model, short: dict[int, int], put_to_sleep, caller: Peer,
                   skipped: dict[str, str]) -> str | None:
        """Puts the first candidate not yet `skipped` to sleep; one that cannot be goes into `skipped`."""
        for victim in self.eviction_candidates(requester, short, caller):
            if victim.name in skipped:
                continue
            idle = time.monotonic() - victim.last_active
            try:
                slept = put_to_sleep(victim, f"evicted for {requester.name}", self.answer_seconds)
            except SleepdError as error:  # its sleep was rolled back, or given up on: it is as it was
                skipped[victim.name] = " ".join(error.message.split())
                log.warning("eviction for %s skipped %s: %s", requester.name, victim.name, skipped[victim.name])
                continue
            if slept is None:
                skipped[victim.name] = "busy with another operation"
                continue
            log.warning("evicted %s (priority %d, idle %.0f s) to make room for %s", victim.name,
                        victim.policy.priority, idle, requester.name)
            self._events.publish("evicted", victim, f"room for {requester.name}")
            if self._metrics:
                self._metrics.evicted(victim, "room")
            return victim.name
        return None

    def refuse(self, model: Model, message: str):
        self._events.publish("refused", model, message)
        raise exhausted(message)
