"""What the daemon knows: regions, models and their policy, and the read-only
views and results it hands out."""

import threading
import time
from dataclasses import dataclass, field

from .lifecycle import RegionState
from .pool import Backup
from .sessions import Session


@dataclass(eq=False)
class Region:
    id: int
    tag: str
    size: int          # what the engine asked for
    mapped_size: int   # rounded up to the device's granularity
    device: int
    session: Session
    handle: int | None  # the daemon's handle to the device memory; None while asleep
    state: RegionState = RegionState.MAPPED
    backup: Backup | None = None
    persist: bool = False  # outlives its engine process; see Model.orphans


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
    lock: threading.Lock = field(default_factory=threading.Lock)
    # True from the sleep hooks until every region is mapped again and the wake hooks ran.
    sleeping: bool = False
    policy: Policy = field(default_factory=Policy)
    last_active: float = field(default_factory=time.monotonic)

    def sessions(self) -> list[Session]:
        """Live ranks and orphaned ones alike."""
        return [*self.ranks.values(), *self.orphans.values()]

    def regions(self) -> list[Region]:
        return [region for session in self.sessions() for region in session.regions.values()]

    def devices(self) -> set[int]:
        return {session.device for session in self.sessions()}

    def held_on(self, device: int) -> int:
        """Device memory this model holds on `device` now."""
        return sum(r.mapped_size for r in self.regions() if r.device == device and r.handle is not None)

    def touch(self) -> None:
        self.last_active = time.monotonic()


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
    detached: bool = False


@dataclass(frozen=True)
class ModelView:
    name: str
    owner_uid: int
    sleeping: bool
    ranks: list[RankView]
    policy: Policy
    idle_seconds: float


@dataclass
class OperationResult:
    model: str
    bytes_offloaded: int = 0
    bytes_discarded: int = 0
    bytes_restored: int = 0
    bytes_zeroed: int = 0
    regions: int = 0
    seconds: float = 0.0
    sleeping: bool = False
    evicted: list[str] = field(default_factory=list)


@dataclass
class SwapResult:
    slept: list[OperationResult]
    woke: OperationResult
    seconds: float
    sequential_estimate_seconds: float
