"""What a plan is made of: the actions the executor carries out, in order, and
the compensation that undoes each. Plain data, built by the planner
(planner.py) from a snapshot of the models, carried out by the executor
(executor.py); regions are named by id, engines by rank.

A compensation undoes whatever part of its step happened, so it runs for the
step that failed too, then for every step before it, latest first, back to the
step that commits the operation (a sleep's release, a wake's freeing of its
backups): once that step begins, nothing is undone. A step that
ran beside others (a swap's restores, `Overlapped`) is undone before the steps
it ran beside: the room its restores took is what the others need back.
"""

from dataclasses import dataclass, field

from .regions import RegionState

Ids = tuple[int, ...]


# ---- what the executor does ----

@dataclass(frozen=True)
class OnRegions:
    """An action on some of a model's regions (each action below without fields of its own is one)."""
    model: str
    regions: Ids


@dataclass(frozen=True)
class Quiesce:
    """The model's ranks run their sleep hooks; then it is paused."""
    model: str
    level: int


@dataclass(frozen=True)
class Resume:
    """The model's ranks run their wake hooks, once every region of `regions` is mapped (best
    effort: a compensation). A model left with some of them asleep stays paused."""
    model: str
    regions: Ids = ()


@dataclass(frozen=True)
class ResumeIfAwake:
    """A wake's last step: once every region of the model is mapped, its wake hooks run."""
    model: str


class Offload(OnRegions):
    """Backups from the host pool, the regions copied into them, and the state file told."""


class CancelOffload(OnRegions):
    """Regions being offloaded stay mapped; their backups go back to the pool."""


@dataclass(frozen=True)
class Unmap:
    """Each rank among `ranks` unmaps its regions among `after`, which says the state each goes to.
    As a compensation (of a remap), regions stay as they are: only the engines let go."""
    model: str
    after: tuple[tuple[int, RegionState], ...]
    ranks: tuple[int, ...]


@dataclass(frozen=True)
class Remap(OnRegions):
    """Each rank among `ranks` maps its regions among `regions` again."""
    ranks: tuple[int, ...]


@dataclass(frozen=True)
class Release(OnRegions):
    """Every engine let go: the daemon drops its handles, and the device memory is gone. Views of
    a weight set hold none: they are unmapped while the set keeps its memory, or, among `leaving`,
    leave the set."""
    leaving: Ids = ()


@dataclass(frozen=True)
class MakeRoom:
    """Room for `needed` ({device: bytes}) on the model's devices, evicting other models if `evict`."""
    model: str
    needed: tuple[tuple[int, int], ...]
    evict: bool


class Materialize(OnRegions):
    """New device memory for asleep regions, filled from their backups (or zeroed)."""


class CancelRestore(OnRegions):
    """Regions being restored go back to sleep, their backups intact; memory created for them is released."""


@dataclass(frozen=True)
class TagsAwake(OnRegions):
    """Each rank runs the wake hooks of its regions' tags among `regions`, mapped again."""
    ranks: tuple[int, ...]


class FinishRestore(OnRegions):
    """The regions are mapped: their backups go back to the pool (views: mapped again)."""


class WakeAgain(OnRegions):
    """A swap's compensation: a victim's released regions are materialized, remapped and restored. One
    that cannot come back (the room went elsewhere) stays asleep with its backup, named in the error."""


class Drop(OnRegions):
    """Regions nobody will map again: their memory and backups are released, and they are forgotten."""


class Unclaim(OnRegions):
    """After a restart, regions recorded as mapped that no engine handed back: asleep."""


class KeepAwake(OnRegions):
    """After a restart, regions an engine handed back though they had been copied out: awake,
    their backups freed."""


@dataclass(frozen=True)
class Pause:
    """After a restart: the model's sleep hooks ran before it."""
    model: str


@dataclass(frozen=True)
class Step:
    do: object
    undo: tuple = ()
    # Once this step begins the operation has happened: a failure from then on undoes nothing.
    commits: bool = False


@dataclass(frozen=True)
class Overlapped:
    """A swap's copies: `outgoing` (the victims' steps) runs in order while `incoming` (the
    target's regions) is materialized beside it, region by region, as room appears."""
    outgoing: tuple[Step, ...]
    incoming: Materialize


# ---- a plan ----

@dataclass(frozen=True)
class Reserve:
    """Quota held for the plan's length: `bytes` more of `kind` for `model`'s owner."""
    model: str
    kind: str
    bytes: int


@dataclass(frozen=True)
class Plan:
    what: str  # "sleep qwen": what a refusal or a rollback's error starts with
    steps: tuple[Step, ...]
    reserve: tuple[Reserve, ...] = ()
    # A swap's: the room its victims free is set aside for its target while it runs: (target, {device: bytes}).
    set_aside: tuple = ()
    # Models put back by the compensations (a swap's victims): the error says which came back.
    put_back: tuple[str, ...] = ()
    counts: dict = field(default_factory=dict, compare=False)  # bytes a success reports, by result field

    def compensations(self, failed: int, within: int | None = None) -> list:
        """The undo actions to run, in order, when step `failed` fails (or, in an `Overlapped`
        step, its outgoing step `within`; None: all of them ran, and the incoming restores failed)."""
        undos = []
        for index in range(failed, -1, -1):
            step = self.steps[index]
            if step.commits:  # once begun, it happened: neither it nor anything before it is undone
                break
            undos += step.undo
            if isinstance(step.do, Overlapped):
                last = len(step.do.outgoing) - 1 if index != failed or within is None else within
                for inner in reversed(step.do.outgoing[:last + 1]):
                    undos += inner.undo
        return undos
