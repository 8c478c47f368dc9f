"""A model's life, and the read-only views and results the daemon hands out.

A model is a name, its ranks, and the orphans its dead ranks left. The one
fact it stores is whether its engine is paused: the sleep hooks ran and the
wake hooks have not yet (a level-0 sleep moves no memory, so this cannot follow
from the regions). Whether it sleeps is derived:

    sleeping = paused, or some region is not mapped

`pause` and `unpause` are the only code that changes it.

It also knows its controller (controllers.py), the process that runs its
engine's own sleep for requests from outside the engine, while one is attached;
`take_controller` and `drop_controller` change it. Whether it needs one is
derived from its live ranks (each says so when it attaches).
"""

import time
from dataclasses import dataclass, field

from .locks import MODEL, OrderedLock
from .regions import Region, RegionState, bug
from .sessions import Session


@dataclass
class Policy:
    """Eviction order: lower priority first, then least recently active; pinned: never."""
    priority: int = 0
    pinned: bool = False
    eviction_level: int = 1
    idle_seconds: float = 0.0  # 0: never sleeps by itself


@dataclass(eq=False)
class Model:
    name: str
    owner_uid: int  # the uid of its first rank; see auth.py
    ranks: dict[int, Session] = field(default_factory=dict)
    # Ranks whose process died leaving persistent regions: rank -> the ended session, until re-attached.
    orphans: dict[int, Session] = field(default_factory=dict)
    lock: OrderedLock = field(init=False)  # one operation on the model at a time
    policy: Policy = field(default_factory=Policy)
    last_active: float = field(default_factory=time.monotonic)
    paused: bool = False
    controller: "object | None" = None  # the attached controllers.Controller, if any

    def __post_init__(self):
        self.lock = OrderedLock(MODEL, self.name)

    @property
    def sleeping(self) -> bool:
        return self.paused or any(region.state is not RegionState.MAPPED for region in self.regions())

    @property
    def needs_controller(self) -> bool:
        """Some live rank's engine runs its own sleep: outside requests must go through a controller."""
        return any(session.needs_controller for session in self.ranks.values())

    def sessions(self) -> list[Session]:
        """Live ranks and orphaned ones alike."""
        return [*self.ranks.values(), *self.orphans.values()]

    def regions(self) -> list[Region]:
        return [region for session in self.sessions() for region in session.regions.values()]

    def devices(self) -> set[int]:
        return {session.device for session in self.sessions()}

    def held_on(self, device: int) -> int:
        """Device memory this model holds on `device` now."""
        return sum(r.mapped_size for r in self.regions() if r.device == device and r.holds_memory)

    def touch(self) -> None:
        self.last_active = time.monotonic()

    # ---- transitions ----

    def pause(self) -> None:
        """Its ranks ran their sleep hooks."""
        if self.paused:
            bug(f"model {self.name}: paused twice")
        self.paused = True

    def unpause(self) -> None:
        """Its ranks are told to run their wake hooks."""
        if not self.paused:
            bug(f"model {self.name}: unpaused while running")
        self.paused = False

    def take_controller(self, controller) -> None:
        if self.controller is not None:
            bug(f"model {self.name}: a second controller taken")
        self.controller = controller

    def drop_controller(self, controller) -> None:
        """`controller`'s lease ended; a newer controller (if any) stays."""
        if self.controller is controller:
            self.controller = None

    def change_policy(self, **changes) -> None:
        for name, value in changes.items():
            if value is not None:
                setattr(self.policy, name, value)


@dataclass(frozen=True)
class RegionView:
    id: int
    tag: str
    size: int
    mapped_size: int
    device: int
    state: RegionState
    persist: bool = False


@dataclass(frozen=True)
class RankView:
    rank: int
    device: int
    pid: int
    regions: list[RegionView]
    orphaned: bool = False  # its process is gone; its persistent regions wait for the rank to attach again


@dataclass(frozen=True)
class ModelView:
    name: str
    owner_uid: int
    sleeping: bool
    ranks: list[RankView]
    policy: Policy
    idle_seconds: float
    needs_controller: bool = False
    controller_pid: int = 0  # 0: no controller attached


@dataclass
class OperationResult:
    model: str
    bytes_offloaded: int = 0
    bytes_discarded: int = 0
    bytes_restored: int = 0
    bytes_zeroed: int = 0
    region_count: int = 0
    seconds: float = 0.0
    sleeping: bool = False
    evicted: list[str] = field(default_factory=list)


@dataclass
class SwapResult:
    slept: list[OperationResult]
    woke: OperationResult
    seconds: float
    sequential_estimate_seconds: float
