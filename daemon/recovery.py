"""Surviving a daemon restart: the state file (its schema lives here alone), the
models rebuilt from it, and the engines handing back the memory they still map.

The state is one JSON file under the state directory, replaced atomically
(write, rename) after every change that matters:

    {"version": 1, "backend": NAME, "next_region_id": N,
     "models": [{"name", "owner_uid", "sleeping", "policy",
                 "ranks": [{"rank", "device", "pid", "uid", "regions": [REGION, ...]}]}],
     "weight_sets": [{"id", "key": BASE64, "manifest": BASE64, "owner_uid", "device",
                      "regions": [REGION, ...]}]}
    REGION: {"id", "tag", "size", "mapped_size", "device", "state", "persist",
             "backup": [[slab, offset, length], ...] or null, "checksums": HEX,
             "shares": the id of a weight set's region, for a view (absent otherwise)}

A weight set is recorded only once every one of its regions is offloaded: only
its backups outlive the daemon, since no engine hands a set's device memory back.
Its views are recorded with it (all asleep then, since no engine maps a set in
the pool); the views of a set that is not recorded are not either, and their
engines keep mapping them, unknown to the next daemon. Backups are recorded
before engines are told to unmap, so a crash at any point leaves a file that
names every backup whose region an engine may no longer hold. The last step of
a sleep or a wake reaches the file within SOON_SECONDS, from a background
thread: a file that misses it still names every backup, and recovery settles
each region by what its engine hands back.
"""

import base64
import itertools
import json
import logging
import os
import threading
import time

from sleepd import _C

from .auth import Peer
from .backends import DaemonBackend
from .errors import exhausted, invalid, precondition
from . import planner
from .model import Model
from .pool import HostPool, Piece, checksums_text, parse_checksums
from .private_paths import PrivateDirectory
from .regions import Region, RegionState
from .registry import Registry
from .sessions import Condition, Session
from .views import Policy
from .weight_sets import WeightSet

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
VERSION = 1
# How long the end of an operation may take to reach the state file (Checkpoints.save_soon).
SOON_SECONDS = 0.2


class StateStore:
    """The state file itself, in the daemon's private state directory."""

    def __init__(self, directory: PrivateDirectory):
        self._directory = directory
        self.path = os.path.join(directory.path, STATE_FILE)
        self._lock = threading.Lock()
        self._written = -1

    def load(self) -> dict | None:
        """The saved state, or None. Raises UnsafePath for a state file that may not be the daemon's own."""
        try:
            text = self._directory.read(STATE_FILE)
            if text is None:
                return None
            state = json.loads(text)
        except (OSError, ValueError) as error:  # ValueError: not UTF-8, or not JSON
            log.error("ignoring unreadable state file %s: %s", self.path, error)
            return None
        if state.get("version") != VERSION:
            log.error("ignoring state file %s of version %s", self.path, state.get("version"))
            return None
        return state

    def save(self, state: dict, sequence: int) -> None:
        """Writes `state` unless a newer snapshot (higher sequence) is on disk already."""
        with self._lock:
            if sequence <= self._written:
                return
            # dumps, not dump: only dumps uses the C encoder, ten times faster for a thousand regions.
            text = json.dumps({"version": VERSION, **state}, separators=(",", ":"))
            self._directory.replace(STATE_FILE, text.encode())
            self._written = sequence


def backup_pieces(state: dict) -> list[list[tuple[int, int, int]]]:
    """The (slab, offset, length) pieces of every backup the state records, models' and weight sets' alike:
    the pool keeps these and nothing else of an earlier daemon's slabs."""
    regions = [region for model in state["models"] for rank in model["ranks"] for region in rank["regions"]]
    regions += [region for weight_set in state.get("weight_sets", []) for region in weight_set["regions"]]
    return [[tuple(piece) for piece in region["backup"]] for region in regions if region["backup"]]


def _recorded_region(region: Region) -> dict:
    backup = region.backup
    recorded = {"id": region.id, "tag": region.tag, "size": region.size, "mapped_size": region.mapped_size,
                "device": region.device, "state": region.state.label, "persist": region.persist,
                "backup": [[p.slab, p.offset, p.length] for p in backup.pieces] if backup else None,
                "checksums": checksums_text(backup.checksums) if backup else ""}
    if region.shared:
        recorded["shares"] = region.shares.id
    return recorded


def _recorded_weight_set(weight_set: WeightSet) -> dict:
    return {"id": weight_set.id, "owner_uid": weight_set.owner_uid, "device": weight_set.device,
            "key": base64.b64encode(weight_set.key).decode(),
            "manifest": base64.b64encode(weight_set.manifest).decode(),
            "regions": [_recorded_region(r) for r in weight_set.regions.values()]}


def _in_the_pool(weight_set: WeightSet) -> bool:
    """Every region of the set is offloaded: its bytes are whole in the host pool, checksums and all."""
    return all(r.state is RegionState.OFFLOADED and r.backup is not None for r in weight_set.regions.values())


class Checkpoints:
    """Records the registry's state in the store after every change that matters."""

    def __init__(self, registry: Registry, backend_name: str, store: StateStore | None):
        self._registry = registry
        self._backend_name = backend_name
        self._store = store
        self._sequence = itertools.count(1)
        self._due = threading.Event()  # save_soon was asked since the background write began
        self._writer: threading.Thread | None = None
        self._writer_lock = threading.Lock()

    def save(self) -> None:
        """Records the state now: returns once it is on disk."""
        if self._store is not None:
            self._store.save(*self._snapshot())

    def save_soon(self) -> None:
        """Records the state within SOON_SECONDS, in a background thread, so that the operation
        that asks waits for neither the disk nor the encoding, and a burst of operations is
        written once. Only for the end of an operation: the file may then lag behind by
        operations' last steps, which recovery resolves (see regions.py); every step an engine
        relies on (a new region, a backup before an unmap) uses save()."""
        if self._store is None:
            return
        self._due.set()
        with self._writer_lock:
            if self._writer is None:
                self._writer = threading.Thread(target=self._write_when_due, name="checkpoints", daemon=True)
                self._writer.start()

    def _write_when_due(self) -> None:
        while True:
            self._due.wait()
            time.sleep(SOON_SECONDS)  # gathers the rest of a burst
            self._due.clear()
            try:
                self._store.save(*self._snapshot())  # skipped when a newer save() got there first
            except Exception:  # the next save retries with a newer state; the daemon keeps serving
                log.exception("could not write the state file %s", self._store.path)

    def _snapshot(self) -> tuple[dict, int]:
        with self._registry.lock:
            sequence = next(self._sequence)
            pooled = [s for s in self._registry.weight_sets_locked() if _in_the_pool(s)]
            recorded = {id(s) for s in pooled}
            state = {"backend": self._backend_name, "next_region_id": self._registry.next_region_id, "models": [
                {"name": model.name, "owner_uid": model.owner_uid, "sleeping": model.sleeping,
                 "policy": vars(model.policy), "ranks": [
                     {"rank": rank, "device": session.device, "pid": session.pid, "uid": session.uid,
                      "regions": [_recorded_region(r) for r in session.regions.values()
                                  if not r.shared or id(r.shares.session) in recorded]}
                     for rank, session in {**model.ranks, **model.orphans}.items()]}
                for model in self._registry.models_locked()],
                "weight_sets": [_recorded_weight_set(s) for s in pooled]}
        return state, sequence


class Recovery:
    def __init__(self, registry: Registry, backend: DaemonBackend, pool: HostPool, operations):
        self._registry = registry
        self._backend = backend
        self._pool = pool
        self._operations = operations

    def recover(self, state: dict) -> None:
        """Rebuilds models from a restarted daemon's state file. Every rank waits for
        its engine (a recovering orphan) until it attaches again or expire() runs."""
        restored = 0
        self._registry.next_region_id = state["next_region_id"]
        weight_sets = [self._weight_set(entry) for entry in state.get("weight_sets", [])]  # none before sets
        shared = {region.id: region for weight_set in weight_sets for region in weight_set.regions.values()}
        for entry in state["models"]:
            model = Model(entry["name"], owner_uid=entry["owner_uid"], paused=entry["sleeping"],
                          policy=Policy(**entry["policy"]))
            for rank in entry["ranks"]:
                session = Session.recovered(Peer(rank["pid"], rank["uid"], rank["uid"], frozenset()), model.name,
                                            rank["rank"], rank["device"])
                for saved in rank["regions"]:
                    region = self._region(saved, session, shared)
                    session.add_region(region)
                    if region.shared:
                        region.shares.session.view_recovered(region)
                    restored += 1
                model.add_orphan(session)
            self._registry.add_recovered(model)
        for weight_set in weight_sets:
            self._registry.add_recovered_weight_set(weight_set)
        log.info("recovered %d models with %d regions and %d weight sets in the host pool from the state file; "
                 "waiting for the models' engines", len(state["models"]), restored, len(weight_sets))

    def _region(self, saved: dict, session: Session, shared: dict[int, Region]) -> Region:
        if "shares" in saved:
            return Region.recovered_view(saved["id"], shared[saved["shares"]], session)
        # A file of a daemon before checksums has none: its backups are restored unchecked.
        backup = (self._pool.recovered([Piece(*piece) for piece in saved["backup"]],
                                       parse_checksums(saved.get("checksums", "")))
                  if saved["backup"] else None)
        return Region.recovered(saved["id"], saved["tag"], saved["size"], saved["mapped_size"], saved["device"],
                                session, saved["persist"], RegionState[saved["state"].upper()], backup)

    def _weight_set(self, entry: dict) -> WeightSet:
        """A set the state file records, in the host pool; the views of engines that joined it come with their
        ranks."""
        weight_set = WeightSet.recovered(entry["id"], base64.b64decode(entry["key"]),
                                         base64.b64decode(entry["manifest"]), entry["owner_uid"], entry["device"])
        for saved in entry["regions"]:
            backup = self._pool.recovered([Piece(*piece) for piece in saved["backup"]],
                                          parse_checksums(saved["checksums"]))
            weight_set.add_region(Region.recovered(saved["id"], saved["tag"], saved["size"], saved["mapped_size"],
                                                   saved["device"], weight_set, False, RegionState.OFFLOADED,
                                                   backup))
        return weight_set

    def hand_back(self, session: Session, region_id: int, fd: int) -> None:
        """An engine hands back memory it maps, after a daemon restart."""
        region = self._registry.owned_region(session, region_id)
        with self._registry.model(session.model).lock:  # a second rank's HandedBack may be finishing meanwhile
            self._require_waiting(session, region)
            try:
                handle = self._backend.native.adopt_handle(fd, region.device, region.mapped_size)
            except _C.BackendError as error:  # what the engine sent is no memory of the region's size
                raise invalid(f"region {region_id}: what was handed back is not its memory ({error}); hand back "
                              "the memory this process maps for it") from None
            region.handed_back(handle)

    def replace(self, session: Session, region_id: int) -> Region:
        """On a token backend, where an engine cannot hand back what it maps: new memory
        for the region, which the engine copies its bytes into."""
        region = self._registry.owned_region(session, region_id)
        with self._registry.model(session.model).lock:
            self._require_waiting(session, region)
            try:
                handle = self._backend.native.create(region.device, region.mapped_size, region.label)
            except MemoryError:  # the engine's copy still holds the old memory: it needs room for a second
                raise exhausted(f"region {region_id} needs {region.mapped_size} more bytes on "
                                f"{self._backend.devices[region.device].name} to be copied into memory of the "
                                "restarted daemon's; free some and attach again") from None
            region.handed_back(handle)
        return region

    def finish_hand_back(self, session: Session) -> None:
        """The engine has handed back all it maps. What it did not hand back it has
        unmapped, on our word before the restart: asleep, with its backup if one was
        recorded (an offload), else discarded."""
        self._require_handing_back(session)
        model = self._registry.model(session.model)
        with model.lock:
            self._require_handing_back(session)  # a second HandedBack may have finished it meanwhile
            self._operations.executor.run(planner.hand_back_finished(model.view(), session.rank))
            session.handed_back()
        self._operations.checkpoint()

    @staticmethod
    def _require_waiting(session: Session, region: Region) -> None:
        if session.condition is not Condition.HANDING_BACK or region.holds_memory:
            raise precondition(f"region {region.id} is not waiting to be handed back")
        if region.shared:  # its memory is the set's, in the host pool: what an engine sends is not it
            raise precondition(f"region {region.id} is a view of weight set {region.weight_set}, whose memory the "
                               "daemon holds; hand back only memory of the engine's own regions")

    @staticmethod
    def _require_handing_back(session: Session) -> None:
        """What the engine says is checked against its condition: a HandedBack from a session
        that is not handing back is refused, never reaches Session.handed_back's bug()."""
        if session.condition is not Condition.HANDING_BACK:
            raise precondition(f"pid {session.pid} is not handing back memory after a daemon restart "
                               f"(its session is {session.condition.value}); nothing to finish")

    def expire(self) -> None:
        """Ranks whose engine did not come back: their persistent asleep regions wait
        as orphans; everything else is released."""
        for model in self._registry.models():
            with model.lock:
                for rank, session in list(model.orphans.items()):
                    if session.condition is not Condition.RECOVERING:
                        continue
                    plan = planner.expired(model.view(), rank)
                    # Claimed first: an attach of that rank, which takes no model lock, cannot take it over meanwhile.
                    if not self._registry.claim_orphan(model, rank, session):
                        continue
                    self._operations.executor.run(plan)
                    session.stop_waiting()
                    if not self._registry.give_back_orphan(model, session):
                        for region in list(session.regions.values()):  # a new process of the rank started afresh
                            self._operations.executor.drop_region(region)
                    log.warning("%s did not come back after the daemon restarted; released its regions",
                                session.describe())
        self._operations.checkpoint()
