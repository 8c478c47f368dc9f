"""A weight set's life: memory that outlives the engine that loaded it, shared
read-only by the engines that join it, and the transitions that are the only
code changing who has joined it.

An engine loads its weights into regions of its own, then commits them with a
key (everything that decides their bytes, which the daemon compares and never
interprets) and a manifest (where each tensor lies, which the daemon keeps for
the engines that join). From then on the set owns that memory (its regions),
and every engine that has joined it, the committer included, maps it through
views (regions.py), read-only. An engine about to write its weights leaves the
set first, and its views become memory of its own with the same bytes.

    condition  how it comes about
    joined     at least one engine has a view of it
    kept       no engine has: kept by policy (a per-device budget, least
               recently used out first), and the first that eviction takes

A set's memory is on the device while any engine that joined it is awake, and
may go to the host pool once none is; it comes back when the first wakes.

A set in the host pool outlives the daemon (recovery.py records it): the next
daemon has it under the same id, in the pool, with the views of the engines that
had joined it, all asleep (kept, if none had). A clean stop first moves kept sets
that are only on the device there (WeightSetOperations.save_kept_for_restart); a
set only on the device when the daemon dies is gone, though engines that map it
keep mapping it, unknown to the next daemon.
"""

import secrets
import time

from .locks import WEIGHT_SET, OrderedLock
from .regions import Region, RegionState, bug
from .views import ModelView, Policy


class WeightSet:
    def __init__(self, key: bytes, manifest: bytes, owner_uid: int, device: int, set_id: str = ""):
        self.id = set_id or secrets.token_hex(6)  # short: what sleepctl shows and drops
        self.key = key
        self.manifest = manifest
        self.owner_uid = owner_uid
        self.device = device
        self.regions: dict[int, Region] = {}  # its memory: region id -> Region, in the committer's order
        self.views: dict[int, Region] = {}    # the views of the engines that joined: view id -> Region
        self.lock = OrderedLock(WEIGHT_SET, self.id)
        self.last_used = time.monotonic()

    @classmethod
    def recovered(cls, set_id: str, key: bytes, manifest: bytes, owner_uid: int, device: int) -> "WeightSet":
        """As the state file of the daemon before a restart recorded it, without its regions yet."""
        return cls(key, manifest, owner_uid, device, set_id)

    # What a Region asks of its owner.
    @property
    def name(self) -> str:
        return f"weight set {self.id}"

    model = name
    rank = 0
    pid = 0

    @property
    def uid(self) -> int:
        return self.owner_uid

    def describe(self) -> str:
        return self.name

    def view(self) -> ModelView:
        """As eviction sees whoever asks for room: a holder of no model's regions, owned by its uid."""
        return ModelView(self.name, self.owner_uid, False, [], Policy(), 0.0)

    # ---- what it is ----

    @property
    def kept(self) -> bool:
        return not self.views

    @property
    def awake_views(self) -> list[Region]:
        return [view for view in list(self.views.values()) if view.state is RegionState.MAPPED]

    @property
    def on_device(self) -> bool:
        return bool(self.regions) and all(region.holds_memory for region in self.regions.values())

    @property
    def size(self) -> int:
        return sum(region.mapped_size for region in self.regions.values())

    def where(self) -> str:
        if self.on_device:
            return "device"
        return "host" if all(region.backup is not None for region in self.regions.values()) else "nowhere"

    def sessions(self) -> list:
        """The live engines that joined it, once each."""
        return list({id(view.session): view.session for view in list(self.views.values())}.values())

    # ---- transitions ----

    def add_region(self, region: Region) -> None:
        if region.session is not self or region.id in self.regions:
            bug(f"{self.name}: region {region.id} added twice or to the wrong set")
        self.regions[region.id] = region

    def remove_region(self, region: Region) -> None:
        self.regions.pop(region.id, None)

    def joined(self, views: list[Region]) -> None:
        """An engine's views of every region of the set, in the set's order."""
        if [view.shares for view in views] != list(self.regions.values()):
            bug(f"{self.name}: joined with views of other regions")
        for view in views:
            self.views[view.id] = view
        self.last_used = time.monotonic()

    def view_recovered(self, view: Region) -> None:
        """After a restart: a view the state file recorded, of an engine that had joined the set before."""
        if view.shares is None or view.shares.session is not self:
            bug(f"{self.name}: recovered a view of another set's region")
        self.views[view.id] = view

    def view_gone(self, view: Region) -> None:
        """A view left the set (the write step, a level-2 sleep) or went with its engine."""
        if self.views.pop(view.id, None) is not None and self.kept:
            self.last_used = time.monotonic()
