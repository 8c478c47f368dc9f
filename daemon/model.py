"""A model's life: its ranks and the orphans its dead ranks left, and the
transitions that are the only code changing them.

A model is a name, its ranks, and the orphans its dead ranks left. The one
fact it stores is whether its engine is paused: the sleep hooks ran and the
wake hooks have not yet (a level-0 sleep moves no memory, so this cannot follow
from the regions). Whether it sleeps is derived:

    sleeping = paused, or some region is not mapped

`pause` and `unpause` are the only code that changes it; `add_rank`,
`remove_rank`, `claim_orphan` and `add_orphan` the only code that changes who
its ranks and orphans are.

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
from .views import ModelView, Policy, RankView, RegionView


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

    def view(self, now: float | None = None) -> ModelView:
        """A copy of the model as it is now, for status and for the planner; the caller holds the
        model's lock or the registry's."""
        now = time.monotonic() if now is None else now
        return ModelView(self.name, self.owner_uid, self.sleeping, [
            RankView(rank, session.device, session.pid, [
                RegionView.of(r) for r in sorted(session.regions.values(), key=lambda r: r.id)],
                orphaned=session.ended is not None, returning=session.returning)
            for rank, session in sorted({**self.ranks, **self.orphans}.items())], Policy(**vars(self.policy)),
            now - self.last_active, self.needs_controller,
            self.controller.pid if self.controller is not None else 0, self.paused)

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

    def add_rank(self, session: Session) -> None:
        """`session` became the rank it attached as, taking over that rank's orphan, if any."""
        if session.rank in self.ranks:
            bug(f"model {self.name}: rank {session.rank} attached twice")
        self.orphans.pop(session.rank, None)
        self.ranks[session.rank] = session

    def remove_rank(self, session: Session, kept: dict) -> None:
        """An ended rank leaves; with persistent regions `kept`, it stays an orphan."""
        if self.ranks.get(session.rank) is not session:
            return
        del self.ranks[session.rank]
        if kept:
            session.keep_only(kept)
            self.orphans[session.rank] = session

    def add_orphan(self, session: Session) -> None:
        """A rank whose engine is gone (or has not come back since a restart) keeps its regions."""
        if session.rank in self.orphans:
            bug(f"model {self.name}: a second orphan of rank {session.rank}")
        self.orphans[session.rank] = session

    def claim_orphan(self, rank: int, session: Session) -> bool:
        """Takes `session` out of the orphans, unless an attach took it over first."""
        if self.orphans.get(rank) is not session:
            return False
        del self.orphans[rank]
        return True

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
