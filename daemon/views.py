"""The daemon's own read-only types: a model's policy, the views of models, ranks
and regions that status, metrics and the planner read, and the results of
operations. Plain data: no locks, no transport."""

from dataclasses import dataclass, field

from .regions import RegionState


@dataclass
class Policy:
    """Eviction order: lower priority first, then least recently active; pinned: never."""
    priority: int = 0
    pinned: bool = False
    eviction_level: int = 1
    idle_seconds: float = 0.0  # 0: never sleeps by itself


@dataclass(frozen=True)
class RegionView:
    id: int
    tag: str
    size: int
    mapped_size: int
    device: int
    state: RegionState
    persist: bool = False
    backed_up: bool = False  # a backup in the host pool holds its contents
    holds_memory: bool = False  # device memory exists for it now (the daemon holds its handle)
    weight_set: str = ""  # a view of this weight set's region (its memory is the set's): see regions.py

    @property
    def shared(self) -> bool:
        return bool(self.weight_set)

    @classmethod
    def of(cls, r) -> "RegionView":
        """A copy of regions.Region `r` as it is now."""
        return cls(r.id, r.tag, r.size, r.mapped_size, r.device, r.state, r.persist, r.backup is not None,
                   r.holds_memory, r.weight_set)


@dataclass(frozen=True)
class RankView:
    rank: int
    device: int
    pid: int
    regions: list[RegionView]
    orphaned: bool = False  # its process is gone; its persistent regions wait for the rank to attach again
    returning: bool = False  # coming back from a daemon restart: it has not handed its memory back yet


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
    paused: bool = False  # its sleep hooks ran and its wake hooks have not

    def regions(self) -> list[RegionView]:
        return [region for rank in self.ranks for region in rank.regions]

    def live_ranks(self, region_ids) -> tuple[int, ...]:
        """The live ranks owning any of `region_ids`, in rank order: those an engine step asks.
        An orphaned rank's regions are mapped by nobody, so there is no one to ask."""
        wanted = set(region_ids)
        return tuple(rank.rank for rank in self.ranks
                     if not rank.orphaned and any(r.id in wanted for r in rank.regions))

    def held_on(self, device: int) -> int:
        return sum(r.mapped_size for r in self.regions() if r.device == device and r.holds_memory)

    def devices(self) -> set[int]:
        return {rank.device for rank in self.ranks}


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
