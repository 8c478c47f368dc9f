"""A region's life: its states, and the transitions that are the only code
changing a region's state, its device-memory handle and its host backup.

    state       handle (device memory)   backup (host pool)
    MAPPED      held                     none
    OFFLOADING  held                     being written
    OFFLOADED   none                     holds the contents
    RESTORING   none, then held          kept until restored
    DISCARDED   none                     none

    from        event            to                                   handle      backup
    MAPPED      offload          OFFLOADING                           kept        allocated
    OFFLOADING  cancel_offload   MAPPED                               kept        freed
    OFFLOADING  release          OFFLOADED                            released    kept
    MAPPED      release          DISCARDED                            released    none
    OFFLOADED   begin_restore    RESTORING                            none        kept
    DISCARDED   begin_restore    RESTORING                            none        none
    RESTORING   created          RESTORING                            created     kept
    RESTORING   restored         MAPPED                               kept        freed
    RESTORING   cancel_restore   OFFLOADED with a backup, else DISCARDED  released    kept

"release" means every engine acked its unmap and the daemon dropped its own
handle: only then is the device memory gone. Each transition hands the caller
whatever it takes out of the region (a handle to release, a backup to free),
so that nothing is dropped without being given back.

After a daemon restart a region is rebuilt from the state file (`recovered`),
with no handle: the engine hands back the memory of each region it still maps
(`handed_back`: mapped, whatever the file said, since a wake may have mapped it
before the old daemon could record so), and a region recorded as mapped that
the engine does not hand back is asleep (`unclaimed`).

A region of a weight set (weight_sets.py) belongs to the set. Each engine that
joined the set maps it through a view: a region of its own rank, with its own id
and address there, that holds no memory of its own but shares the set's
(`shares`). A view is mapped or not as that engine is awake or asleep, whatever
the set's memory does (after a restart, the views of a set the state file
recorded come back asleep: `recovered_view`):

    from        event            to           shares
    MAPPED      share            MAPPED       the set's region (a commit: its memory went to the set)
    MAPPED      view_unmapped    OFFLOADED    kept (the engine sleeps; the set's memory stays)
    OFFLOADED   view_mapped      MAPPED       kept
    MAPPED      leave            MAPPED       none: memory of its own, a copy (the write step)
    MAPPED or
    OFFLOADED   leave_asleep     DISCARDED    none: it wakes as a private region (a level-2 sleep)

A transition the table does not allow is a bug, never a failed operation: see
`IllegalTransition`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from enum import IntEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # a plain type here: the planner reads regions' states without the pool's threads
    from .pool import Backup

log = logging.getLogger(__name__)

# What the daemon exits with when its own state machine breaks (EX_SOFTWARE):
# systemd restarts it, and recovery runs from the state file.
EXIT_BUG = 70


class RegionState(IntEnum):
    # Values match sleepd.v1.RegionState.
    MAPPED = 1
    OFFLOADING = 2
    OFFLOADED = 3
    RESTORING = 4
    DISCARDED = 5

    @property
    def label(self) -> str:
        return self.name.lower()


ASLEEP = (RegionState.OFFLOADED, RegionState.DISCARDED)

# (state, event) -> the state after it; cancel_restore and unclaimed depend on the backup.
TRANSITIONS = {
    (RegionState.MAPPED, "offload"): RegionState.OFFLOADING,
    (RegionState.OFFLOADING, "cancel_offload"): RegionState.MAPPED,
    (RegionState.OFFLOADING, "release"): RegionState.OFFLOADED,
    (RegionState.MAPPED, "release"): RegionState.DISCARDED,
    (RegionState.OFFLOADED, "begin_restore"): RegionState.RESTORING,
    (RegionState.DISCARDED, "begin_restore"): RegionState.RESTORING,
    (RegionState.RESTORING, "created"): RegionState.RESTORING,
    (RegionState.RESTORING, "restored"): RegionState.MAPPED,
    (RegionState.RESTORING, "cancel_restore"): None,
    (RegionState.MAPPED, "handed_back"): RegionState.MAPPED,
    # A wake had mapped it again when the old daemon died, before recording so.
    (RegionState.OFFLOADED, "handed_back"): RegionState.MAPPED,
    (RegionState.DISCARDED, "handed_back"): RegionState.MAPPED,
    (RegionState.MAPPED, "unclaimed"): None,
    # Views of a weight set's regions.
    (RegionState.MAPPED, "share"): RegionState.MAPPED,
    (RegionState.MAPPED, "view_unmapped"): RegionState.OFFLOADED,
    (RegionState.OFFLOADED, "view_mapped"): RegionState.MAPPED,
    (RegionState.MAPPED, "leave"): RegionState.MAPPED,
    (RegionState.MAPPED, "leave_asleep"): RegionState.DISCARDED,
    (RegionState.OFFLOADED, "leave_asleep"): RegionState.DISCARDED,
}


class IllegalTransition(Exception):
    """A transition the table does not allow: a bug in the daemon."""


def _stop_the_daemon(error: IllegalTransition) -> None:
    log.critical("%s; stopping: a broken state machine must not be rolled back as if it were a failed "
                 "operation (the restarted daemon recovers from its state file)", error)
    logging.shutdown()
    os._exit(EXIT_BUG)


# What a broken transition does: the daemon installs stop_on_bugs(); elsewhere (unit tests) it raises.
_on_bug = None


def stop_on_bugs() -> None:
    """From now on an illegal transition in this process logs and exits EXIT_BUG at once,
    so that no rollback path can catch it and carry on."""
    global _on_bug
    _on_bug = _stop_the_daemon


def bug(message: str) -> None:
    """Reports a broken invariant of any of the daemon's state machines."""
    error = IllegalTransition(message)
    if _on_bug is not None:
        _on_bug(error)
    raise error


@dataclass(eq=False)
class Region:
    id: int
    tag: str
    size: int          # what the engine asked for
    mapped_size: int   # rounded up to the device's granularity
    device: int
    session: "object"  # the owner: a rank's sessions.Session, or a weight_sets.WeightSet
    persist: bool = False  # outlives its engine process; see Model.orphans
    # The state and the data that goes with it: written only by the transitions below.
    state: RegionState = field(default=RegionState.RESTORING)
    handle: int | None = None
    backup: Backup | None = None
    shares: "Region | None" = None  # a view: the weight set's region whose memory it maps

    @classmethod
    def new(cls, region_id: int, tag: str, size: int, mapped_size: int, device: int, session,
            persist: bool) -> "Region":
        """A region about to get its first device memory: RESTORING with nothing to restore."""
        return cls(region_id, tag, size, mapped_size, device, session, persist)

    @classmethod
    def recovered(cls, region_id: int, tag: str, size: int, mapped_size: int, device: int, session,
                  persist: bool, state: RegionState, backup: Backup | None) -> "Region":
        """As a restarted daemon's state file recorded it. In-flight states resolve when
        the engine hands back what it maps: until then an offload in progress counts as
        mapped (its backup kept), a restore in progress as asleep."""
        if state is RegionState.OFFLOADING:
            state = RegionState.MAPPED
        elif state is RegionState.RESTORING:
            state = RegionState.OFFLOADED if backup else RegionState.DISCARDED
        return cls(region_id, tag, size, mapped_size, device, session, persist, state, None, backup)

    @classmethod
    def view_of(cls, region_id: int, shared: "Region", session) -> "Region":
        """A view an engine joining a weight set maps `shared` through: mapped, as the set's memory is."""
        return cls(region_id, shared.tag, shared.size, shared.mapped_size, shared.device, session,
                   state=RegionState.MAPPED, shares=shared)

    @classmethod
    def recovered_view(cls, region_id: int, shared: "Region", session) -> "Region":
        """After a restart, a view the state file recorded: of a set in the host pool, so asleep, as its
        engine had unmapped it before the set could go there."""
        return cls(region_id, shared.tag, shared.size, shared.mapped_size, shared.device, session,
                   state=RegionState.OFFLOADED, shares=shared)

    @classmethod
    def committed(cls, region_id: int, view: "Region", owner, handle: int) -> "Region":
        """A weight set's region, holding the memory its committing engine loaded into `view`."""
        return cls(region_id, view.tag, view.size, view.mapped_size, view.device, owner,
                   state=RegionState.MAPPED, handle=handle)

    @property
    def shared(self) -> bool:
        """A view of a weight set's region: its memory is the set's, never its own."""
        return self.shares is not None

    @property
    def weight_set(self) -> str:
        """The id of the weight set a view's memory is, or ""."""
        return self.shares.session.id if self.shared else ""

    @property
    def holds_memory(self) -> bool:
        """Whether device memory exists for the region now (the daemon holds its handle)."""
        return self.handle is not None

    @property
    def model(self) -> str:
        return self.session.model

    def describe(self) -> str:
        return f"region {self.id} ({self.tag}) of {self.session.describe()}"

    @property
    def label(self) -> str:
        """What new memory for it is called where the system shows it (memfd names): its model's."""
        return f"sleepd:{self.model}:r{self.session.rank}:{self.tag}:{self.id}"

    # ---- transitions ----

    def _move(self, event: str, after: RegionState | None = None) -> None:
        if (self.state, event) not in TRANSITIONS:
            bug(f"{self.describe()}: no transition from {self.state.label} on {event}")
        self.state = after or TRANSITIONS[(self.state, event)]

    def _require(self, event: str, holds: bool) -> None:
        if self.holds_memory is not holds:
            bug(f"{self.describe()}: {event} while {self.state.label} "
                f"{'without' if holds else 'with'} device memory")

    def created(self, handle: int) -> None:
        """New device memory exists for a region being restored (or first allocated)."""
        self._require("created", holds=False)
        self._move("created")
        self.handle = handle

    def offload(self, backup: Backup) -> None:
        """Its contents are being copied into `backup`."""
        self._move("offload")
        self.backup = backup

    def cancel_offload(self) -> Backup | None:
        """The offload did not finish: mapped as before; returns the backup to free."""
        self._move("cancel_offload")
        backup, self.backup = self.backup, None
        return backup

    def release(self) -> int:
        """Every engine unmapped it: asleep; returns the handle, for the daemon to release."""
        self._require("release", holds=True)
        self._move("release")
        handle, self.handle = self.handle, None
        return handle

    def begin_restore(self) -> None:
        self._move("begin_restore")

    def restored(self) -> Backup | None:
        """Mapped again with its contents: returns the backup, now free to go."""
        self._require("restored", holds=True)
        self._move("restored")
        backup, self.backup = self.backup, None
        return backup

    def cancel_restore(self) -> int | None:
        """The restore did not finish: asleep as before, its backup kept; returns the handle
        of memory created for it (to release), if any."""
        self._move("cancel_restore", RegionState.OFFLOADED if self.backup else RegionState.DISCARDED)
        handle, self.handle = self.handle, None
        return handle

    def handed_back(self, handle: int) -> None:
        """After a restart: the engine handed back the memory it maps; the daemon holds it again."""
        self._require("handed_back", holds=False)
        self._move("handed_back")
        self.handle = handle

    def kept_backup(self) -> Backup | None:
        """After a restart: an offload had copied it out but the engine kept it mapped, so it is
        awake; returns the backup to free."""
        self._require("kept_backup", holds=True)
        backup, self.backup = self.backup, None
        return backup

    def unclaimed(self) -> None:
        """After a restart: the engine did not hand it back, so it no longer maps it (it did so on
        the old daemon's word): asleep, with its backup if one was recorded, else discarded."""
        self._require("unclaimed", holds=False)
        self._move("unclaimed", RegionState.OFFLOADED if self.backup else RegionState.DISCARDED)

    # ---- a view's transitions ----

    def _require_view(self, event: str, view: bool) -> None:
        if self.shared is not view:
            bug(f"{self.describe()}: {event} on a region that is {'not ' if view else ''}a weight set's view")

    def share(self, shared: "Region") -> None:
        """Committed: its memory, handle and all, is now `shared`'s, the set's region."""
        self._require_view("share", False)
        self._require("share", holds=True)
        if self.backup is not None or self.persist or shared.handle != self.handle:
            bug(f"{self.describe()}: shared with a backup, as a persistent region or into other memory")
        self._move("share")
        self.handle, self.shares = None, shared

    def view_unmapped(self) -> None:
        """Its engine let go of the set's memory (it sleeps); the set keeps it."""
        self._require_view("view_unmapped", True)
        self._move("view_unmapped")

    def view_mapped(self) -> None:
        """Its engine maps the set's memory again."""
        self._require_view("view_mapped", True)
        if not self.shares.holds_memory:
            bug(f"{self.describe()}: mapped while its weight set's region {self.shares.id} has no memory")
        self._move("view_mapped")

    def leave(self, handle: int) -> None:
        """The write step: it now maps `handle`, memory of its own holding a copy of the set's."""
        self._require_view("leave", True)
        self._move("leave")
        self.handle, self.shares = handle, None

    def leave_asleep(self) -> None:
        """A level-2 sleep: it leaves the set and wakes later as a private region, zeroed."""
        self._require_view("leave_asleep", True)
        self._move("leave_asleep")
        self.shares = None

    def dropped(self) -> tuple[int | None, Backup | None]:
        """The region goes away: returns its handle and backup, for the daemon to release and free."""
        taken = (self.handle, self.backup)
        self.handle = self.backup = None
        return taken
