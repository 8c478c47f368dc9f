"""Room on devices: what each model may still get, what is missing for a request,
what a swap in progress has set aside, and the one-line refusals that say all of
it. Which models to evict, and in what order, the planner decides (planner.py);
the executor evicts them.
"""

import contextlib
import threading

from sleepd.common.sizes import format_size

from .auth import Authorizer, Peer
from .backends import DaemonBackend
from .errors import exhausted
from .events import EventBus
from .model import Model
from .planner import needed_by_device
from .regions import Region
from .registry import Registry

class Room:
    def __init__(self, registry: Registry, backend: DaemonBackend, authorizer: Authorizer, events: EventBus):
        self._registry = registry
        self._backend = backend
        self._authorizer = authorizer
        self._events = events
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

    def refuse(self, model: Model, message: str):
        self._events.publish("refused", model, message)
        raise exhausted(message)
