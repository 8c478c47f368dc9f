"""The control plane's core: models, ranks and regions, and the sleep and wake
operations that move them between states.

Locking, outermost first: a model's lock (one operation per model at a time),
then the locks of the devices a step touches, taken in index order, then the
registry lock, held only briefly to read or change the maps below.

A device's lock serialises the daemon's creating and releasing of device memory
and the rounds in which engines map or unmap it (concurrent VMM calls from
several engine processes on one GPU are a known source of driver crashes). It is
not held across hooks or copies: the mover has one channel per direction, so one
model's offload and another's restore run at the same time (the mover's own
short-lived import and mapping for a copy happen outside it). Room is checked
again under the lock when memory is created, so two operations racing for the
same bytes cannot both have them; a swap sets aside the room it frees for the
model it brings in.

A session's handle-socket requests take only the registry lock, so an engine
can fetch memory while an operation waits on it. Eviction takes another model's
lock only with a timeout, skipping a busy one, so two operations evicting each
other cannot deadlock.
"""

import contextlib
import itertools
import logging
import re
import threading
import time
from concurrent.futures import TimeoutError as FutureTimeout

import grpc

from sleepd import _C
from sleepd.common.sizes import format_size
from sleepd.proto import sleepd_pb2 as pb

from .auth import Authorizer, Peer
from .backends import ZEROED_ON_CREATE, DaemonBackend
from .errors import SleepdError, denied, exhausted, invalid, not_found, precondition
from .events import EventBus
from .lifecycle import RegionState, advance
from .model import Model, ModelView, OperationResult, Policy, RankView, Region, RegionView
from .mover import OFFLOAD, RESTORE, ZERO, CopyJob, Mover
from .pool import HostPool, Piece
from .rules import MAX_LEVEL, Action, SleepRules
from .sessions import RankLost, Session
from .state import StateStore

log = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")
_TAG = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
# How long eviction waits for another model's lock before trying the next model.
_VICTIM_LOCK_SECONDS = 0.5


class MemoryManager:
    def __init__(self, backend: DaemonBackend, pool: HostPool, movers: dict[int, Mover],
                 rules: SleepRules, hook_timeout: float, metrics=None, events: EventBus | None = None,
                 authorizer: Authorizer | None = None, store: StateStore | None = None,
                 default_policies: dict[str, dict] | None = None):
        self.backend = backend
        self.authorizer = authorizer or Authorizer("sleepd")
        self.pool = pool
        self.movers = movers
        self.rules = rules
        self.events = events or EventBus()
        self.hook_timeout = hook_timeout
        self.metrics = metrics
        self._registry = threading.Lock()
        self._by_token: dict[str, Session] = {}          # every live session, attached or not
        self._sessions: dict[str, Session] = {}          # by session id, once attached
        self._models: dict[str, Model] = {}
        self._regions: dict[int, Region] = {}
        self._next_region_id = 1
        self._store = store
        self._frozen = False
        # Per-model policy from the configuration, applied when the model first attaches.
        self._default_policies = default_policies or {}
        self._state_sequence = itertools.count(1)
        self._device_locks = {device.index: threading.Lock() for device in backend.devices}
        # Room a swap in progress has set aside for the model it brings in: {model: {device: bytes}}.
        self._promised: dict[str, dict[int, int]] = {}

    # ---- sessions ----

    def open_session(self, peer: Peer) -> Session:
        session = Session(peer)
        with self._registry:
            self._by_token[session.token] = session
        return session

    def caller(self, token: str) -> Peer | None:
        """The peer a control request's token stands for, or None."""
        with self._registry:
            session = self._by_token.get(token)
        return session.peer if session else None

    def authorize(self, caller: Peer | None, model_name: str, what: str) -> Model:
        """The model, if `caller` may act on it."""
        model = self._model(model_name)
        self.authorizer.check(caller, model.owner_uid, f"{what} {model_name}")
        return model

    def attach(self, token: str, model_name: str, rank: int, ordinal: int, uuid: str = "") -> Session:
        _check_name(model_name)
        device = self._device_index(ordinal, uuid)
        with self._registry:
            session = self._by_token.get(token)
            if session is None or session.attached:
                raise denied("unknown session token; connect to the handle socket first")
            model = self._models.get(model_name) or Model(
                model_name, owner_uid=session.uid, policy=Policy(**self._default_policies.get(model_name, {})))
            self.authorizer.check(session.peer, model.owner_uid, f"attach to {model_name}")
            holder = model.ranks.get(rank)
            if holder is not None:
                raise SleepdError(grpc.StatusCode.ALREADY_EXISTS,
                                  f"{model_name} rank {rank} is already attached (pid {holder.pid})")
            orphan = model.orphans.get(rank)
            if orphan is not None and orphan.device != device:
                raise invalid(f"{model_name} rank {rank} left persistent regions on "
                              f"{self.backend.devices[orphan.device].name}; attach it there")
            session.model, session.rank, session.device = model_name, rank, device
            if orphan is not None:
                # The previous process of this rank died, or the daemon restarted: its regions are this one's now.
                del model.orphans[rank]
                for region in orphan.regions.values():
                    region.session = session
                session.regions = orphan.regions
                session.resuming = orphan.recovering
            model.ranks[rank] = session
            model.touch()
            self._models[model_name] = model
            self._sessions[session.id] = session
        self.persist()
        log.info("attached %s on %s%s%s", session.describe(), self.backend.devices[device].name,
                 f" (its device {ordinal})" if ordinal != device else "",
                 " (resuming after a daemon restart)" if session.resuming else "")
        self.events.publish("attached", model_name, f"rank {rank} pid {session.pid} on "
                                                    f"{self.backend.devices[device].name}")
        return session

    def _device_index(self, ordinal: int, uuid: str) -> int:
        """The daemon's index of an engine's device: found by GPU UUID where both
        know one, since an engine's ordinals are its own (CUDA_VISIBLE_DEVICES,
        containers); else the engine's ordinal is the daemon's (host backend)."""
        devices = self.backend.devices
        by_uuid = {d.uuid: d.index for d in devices if d.uuid}
        if uuid and by_uuid:
            if uuid not in by_uuid:
                raise precondition(f"this process's device {ordinal} is GPU {uuid}, which this daemon does not "
                                   f"manage (it has {', '.join(f'{d.name} {d.uuid}' for d in devices)}); "
                                   "give the daemon that GPU, or attach to the daemon that has it")
            return by_uuid[uuid]
        if ordinal >= len(devices):
            raise invalid(f"device {ordinal} does not exist; this daemon has {len(devices)} "
                          f"({', '.join(d.name for d in devices)})")
        return ordinal

    def freeze(self) -> None:
        """The daemon is stopping: sessions that end from now on are not reclaimed,
        so that the state file keeps them for the next daemon to recover."""
        self._frozen = True

    def end_session(self, session: Session, reason: str) -> None:
        """Reclaims every reference a session held. Safe to call more than once."""
        if not session.end(reason) or self._frozen:
            return
        with self._registry:
            self._by_token.pop(session.token, None)
            self._sessions.pop(session.id, None)
            model = self._models.get(session.model) if session.attached else None
        if model is None:
            return
        # Waiters on this session have already failed, so any operation holding
        # the model's lock finishes its rollback and lets us in.
        with model.lock:
            kept = {r.id: r for r in session.regions.values() if r.persist}
            freed = sum(r.mapped_size for r in session.regions.values() if r.handle is not None and not r.persist)
            for region in list(session.regions.values()):
                if not region.persist:
                    self._drop_region(region)
            with self._registry:
                if model.ranks.get(session.rank) is session:
                    del model.ranks[session.rank]
                    if kept:
                        session.regions = kept
                        model.orphans[session.rank] = session
                if not model.ranks and not model.orphans and self._models.get(model.name) is model:
                    del self._models[model.name]
        self.persist()
        log.info("session of %s ended (%s); reclaimed %s", session.describe(), reason, format_size(freed))
        if session.detached:
            self.events.publish("detached", model.name, f"rank {session.rank} pid {session.pid}", freed)
        else:
            self.events.publish("rank_lost", model.name, f"rank {session.rank} pid {session.pid}: {reason}", freed)
            if self.metrics:
                self.metrics.ranks_lost.labels(model=model.name).inc()

    def export(self, session: Session, region_id: int) -> tuple[int, Region]:
        """A new descriptor for a region's memory, for the session that owns it."""
        with self._registry:
            region = self._owned_region(session, region_id)
            if region.handle is None:
                raise precondition(f"region {region_id} is {region.state.label}; wake the model first")
            return self.backend.native.export_handle(region.handle), region

    def touch(self, session_id: str) -> None:
        self._model(self._session(session_id).model).touch()

    # ---- regions ----

    def allocate(self, session_id: str, size: int, tag: str, evict: bool = False, persist: bool = False) -> Region:
        session = self._session(session_id)
        if size <= 0:
            raise invalid(f"allocation size must be positive, got {size}")
        if not _TAG.match(tag):
            raise invalid(f"tag {tag!r} is not valid; use 1-64 letters, digits, '_', '.' or '-'")
        device = self.backend.devices[session.device]
        granularity = self.backend.native.granularity(device.index)
        mapped_size = -(-size // granularity) * granularity
        if mapped_size > device.budget:
            raise exhausted(f"allocate {format_size(size)} on {device.name}: larger than its whole budget "
                            f"of {format_size(device.budget)}")
        model = self._model(session.model)
        with model.lock:
            model.touch()
            what = f"allocate {format_size(mapped_size)} for {session.describe()}"
            evicted = self._ensure_room(model, {device.index: mapped_size}, what, evict)
            region = Region(self._new_region_id(), tag, size, mapped_size, device.index, session, handle=None,
                            persist=persist)
            try:
                self._create_all([region], what)
            except _C.OutOfMemoryError as error:
                raise exhausted(f"{what} on {device.name}: the device refused ({error}); "
                                f"{self._room(device.index)}") from None
            with self._registry:
                self._regions[region.id] = region
                session.regions[region.id] = region
        self.persist()
        if evicted:
            log.info("%s: evicted %s", what, ", ".join(evicted))
        return region

    def free(self, session_id: str, region_id: int) -> None:
        session = self._session(session_id)
        with self._registry:
            region = self._owned_region(session, region_id)
        model = self._model(session.model)
        with model.lock:
            model.touch()
            self._drop_region(region)
        self.persist()

    # ---- sleep and wake ----

    def sleep(self, model_name: str, level: int, tags: list[str], actions: dict[str, Action],
              reason: str = "") -> OperationResult:
        model = self._model(model_name)
        with model.lock:
            return self.sleep_locked(model, level, tags, actions, reason)

    def sleep_locked(self, model: Model, level: int, tags: list[str], actions: dict[str, Action],
                     reason: str = "") -> OperationResult:
        """Sleep with the model's lock already held (by the caller, or by eviction)."""
        self.check_ready(model, "sleep")
        started = time.perf_counter()
        work = self.plan_sleep(model, level, tags, actions)
        result = OperationResult(model.name, sleeping=True)
        if not work and model.sleeping:
            return result  # already asleep: sleeping again is a no-op
        quiesced_here = not model.sleeping
        if quiesced_here:
            self.quiesce(model, level)
        try:
            self.offload_and_unmap(model, work)
        except BaseException:
            if quiesced_here:
                self.resume(model, best_effort=True)
            raise
        model.sleeping = True
        for region, action in work:
            if action is Action.OFFLOAD:
                result.bytes_offloaded += region.mapped_size
            else:
                result.bytes_discarded += region.mapped_size
        result.regions = len(work)
        result.seconds = time.perf_counter() - started
        self.record("sleep", model.name, str(level), result, reason)
        return result

    def plan_sleep(self, model: Model, level: int, tags: list[str], actions: dict[str, Action]):
        """[(region, action)] for the model's mapped regions, refused before anything moves
        when the host pool cannot take the offloads even after discarding what may be discarded."""
        regions = model.regions()
        self._check_tags(model, regions, list(tags) + list(actions))
        selected = set(tags) | set(actions) or {region.tag for region in regions}
        plan = self.rules.plan(level, selected, actions)
        work = [(r, plan[r.tag]) for r in regions if plan and r.tag in plan and r.state is RegionState.MAPPED]
        offload_bytes = sum(r.mapped_size for r, action in work if action is Action.OFFLOAD)
        if offload_bytes <= self.pool.available:
            return work
        # The pool is too small: discard instead, largest first, only tags some rule discards anyway.
        fallback = sorted(((r, a) for r, a in work if a is Action.OFFLOAD and self.rules.discardable(r.tag)
                           and r.tag not in actions), key=lambda item: -item[0].mapped_size)
        demoted = set()
        for region, _ in fallback:
            if offload_bytes <= self.pool.available:
                break
            demoted.add(region)
            offload_bytes -= region.mapped_size
        if offload_bytes > self.pool.available:
            raise exhausted(f"sleep {model.name}: offloading needs {format_size(offload_bytes)} of host pool, "
                            f"{format_size(self.pool.available)} free of {format_size(self.pool.budget)}, "
                            "and no more of it may be discarded; raise --host-pool-budget or use a level "
                            "that discards")
        log.warning("sleep %s: host pool short; discarding %s instead of offloading them", model.name,
                    ", ".join(sorted({r.tag for r in demoted})))
        return [(r, Action.DISCARD if r in demoted else a) for r, a in work]

    def wake(self, model_name: str, tags: list[str], evict: bool = False) -> OperationResult:
        started = time.perf_counter()
        model = self._model(model_name)
        result = OperationResult(model_name)
        with model.lock:
            self.check_ready(model, "wake")
            model.touch()
            regions = model.regions()
            self._check_tags(model, regions, tags)
            asleep = (RegionState.OFFLOADED, RegionState.DISCARDED)
            targets = [r for r in regions if r.state in asleep and (not tags or r.tag in tags)]
            if targets:
                result.evicted = self._ensure_room(model, needed_by_device(targets), f"wake {model.name}", evict)
                self.materialize(model, targets)
                self.remap_or_undo(model, targets)
            self.finish_wake(model, targets, result)
        result.seconds = time.perf_counter() - started
        self.record("wake", model_name, ",".join(sorted(tags)) or "all", result)
        return result

    def set_policy(self, model_name: str, **changes) -> Policy:
        model = self._model(model_name)
        level = changes.get("eviction_level")
        if level is not None and not 0 <= level <= MAX_LEVEL:
            raise invalid(f"eviction level {level} does not exist; use 0, 1 or 2")
        if (changes.get("idle_seconds") or 0) < 0:
            raise invalid("idle_seconds must be zero (never) or positive")
        for name, value in changes.items():
            if value is not None:
                setattr(model.policy, name, value)
        self.persist()
        log.info("policy of %s: %s", model_name, model.policy)
        return model.policy

    # ---- surviving a daemon restart ----

    def persist(self) -> None:
        """Records the state on disk (see state.py); a no-op without a store."""
        if self._store is None:
            return
        with self._registry:
            sequence = next(self._state_sequence)
            state = {"backend": self.backend.name, "next_region_id": self._next_region_id, "models": [
                {"name": model.name, "owner_uid": model.owner_uid, "sleeping": model.sleeping,
                 "policy": vars(model.policy), "ranks": [
                     {"rank": rank, "device": session.device, "pid": session.pid, "uid": session.uid,
                      "regions": [{"id": r.id, "tag": r.tag, "size": r.size, "mapped_size": r.mapped_size,
                                   "device": r.device, "state": r.state.label, "persist": r.persist,
                                   "backup": [[p.slab, p.offset, p.length] for p in r.backup.pieces]
                                   if r.backup else None} for r in session.regions.values()]}
                     for rank, session in {**model.ranks, **model.orphans}.items()]}
                for model in self._models.values()]}
        self._store.save(state, sequence)

    def recover(self, state: dict) -> None:
        """Rebuilds models from a restarted daemon's state file. Every rank waits for
        its engine (a recovering orphan) until it attaches again or expire_recovery()."""
        restored = 0
        with self._registry:
            self._next_region_id = state["next_region_id"]
            for entry in state["models"]:
                model = Model(entry["name"], owner_uid=entry["owner_uid"], sleeping=entry["sleeping"],
                              policy=Policy(**entry["policy"]))
                for rank in entry["ranks"]:
                    session = Session(Peer(rank["pid"], rank["uid"], rank["uid"], frozenset()))
                    session.model, session.rank, session.device = model.name, rank["rank"], rank["device"]
                    session.end("its engine has not attached since the daemon restarted")
                    session.recovering = True
                    for saved in rank["regions"]:
                        region = _recovered_region(saved, session, self.pool)
                        session.regions[region.id] = region
                        self._regions[region.id] = region
                        restored += 1
                    model.orphans[session.rank] = session
                self._models[model.name] = model
        log.info("recovered %d models with %d regions from the state file; waiting for their engines",
                 len(state["models"]), restored)

    def take_back(self, session: Session, region_id: int, fd: int) -> None:
        """An engine hands back memory it maps, after a daemon restart."""
        with self._registry:
            region = self._owned_region(session, region_id)
            if not session.resuming or region.handle is not None:
                raise precondition(f"region {region_id} is not waiting to be handed back")
            region.handle = self.backend.native.adopt_handle(fd, region.device, region.mapped_size)
            region.state = RegionState.MAPPED

    def finish_resume(self, session: Session) -> None:
        """The engine has handed back all it maps. What it did not hand back it has
        unmapped, on our word before the restart: asleep, with its backup if one was
        recorded (an offload), else discarded."""
        model = self._model(session.model)
        with model.lock:
            for region in session.regions.values():
                if region.handle is not None:
                    if region.backup is not None:  # copied out, but the engine kept it: it is awake
                        self.pool.free(region.backup)
                        region.backup = None
                else:
                    region.state = RegionState.OFFLOADED if region.backup is not None else RegionState.DISCARDED
                    model.sleeping = True  # its sleep hooks ran before the restart; wake will resume it
            session.resuming = False
        self.persist()

    def expire_recovery(self) -> None:
        """Ranks whose engine did not come back: their persistent asleep regions wait
        as orphans; everything else is released."""
        for model in self.models():
            with model.lock:
                for rank, session in list(model.orphans.items()):
                    if not session.recovering:
                        continue
                    for region in list(session.regions.values()):
                        if not (region.persist and region.backup is not None):
                            self._drop_region(region)
                        else:
                            region.state = RegionState.OFFLOADED
                    session.recovering = False
                    with self._registry:
                        if not session.regions:
                            del model.orphans[rank]
                        if not model.ranks and not model.orphans:
                            self._models.pop(model.name, None)
                    log.warning("%s did not come back after the daemon restarted; released its regions",
                                session.describe())
        self.persist()

    def _new_region_id(self) -> int:
        with self._registry:
            region_id = self._next_region_id
            self._next_region_id += 1
        return region_id

    def check_ready(self, model: Model, what: str) -> None:
        """Refuses operations on a model some of whose ranks are still coming back from a daemon restart."""
        waiting = [s for s in model.sessions() if s.recovering or s.resuming]
        if waiting:
            raise precondition(f"{what} {model.name}: {', '.join(s.describe() for s in waiting)} has not "
                               "handed its memory back since the daemon restarted; try again shortly")

    # ---- status ----

    def snapshot(self, model_name: str = "") -> list[ModelView]:
        """A consistent copy of every model (or one), for status and metrics."""
        now = time.monotonic()
        with self._registry:
            models = sorted(self._models.values(), key=lambda model: model.name)
            views = [ModelView(model.name, model.owner_uid, model.sleeping, [
                RankView(rank, session.device, session.pid, [
                    RegionView(r.id, r.tag, r.size, r.mapped_size, r.device, r.state, r.persist)
                    for r in sorted(session.regions.values(), key=lambda r: r.id)], detached=session.lost is not None)
                for rank, session in sorted({**model.ranks, **model.orphans}.items())], Policy(**vars(model.policy)),
                now - model.last_active)
                for model in models if not model_name or model.name == model_name]
        if model_name and not views:
            self._model(model_name)  # raises NOT_FOUND, naming the attached models
        return views

    def committed(self, device: int) -> int:
        """Device memory in use plus what sleeping models need to wake."""
        with self._registry:
            asleep = sum(r.mapped_size for r in self._regions.values() if r.device == device and r.handle is None)
        return self.backend.used(device) + asleep

    def room_for(self, model_name: str, device: int) -> int:
        """What `model_name` may still get on the device: its free room less what
        swaps in progress have set aside for other models."""
        with self._registry:
            promised = sum(p.get(device, 0) for name, p in self._promised.items() if name != model_name)
        return max(0, self.backend.free(device) - promised)

    def shortfall(self, model_name: str, needed: dict[int, int], freed: dict[int, int] | None = None) -> dict[int, int]:
        """{device: bytes missing} for `needed` to fit, counting `freed` bytes as room too."""
        room = {d: self.room_for(model_name, d) + (freed or {}).get(d, 0) for d in needed}
        return {d: n - room[d] for d, n in needed.items() if n > room[d]}

    @contextlib.contextmanager
    def set_aside(self, model_name: str, needed: dict[int, int]):
        """Keeps `needed` bytes per device for `model_name` while the block runs:
        room freed for it goes to it, not to whichever operation asks first."""
        with self._registry:
            self._promised[model_name] = dict(needed)
        try:
            yield
        finally:
            with self._registry:
                self._promised.pop(model_name, None)

    def models(self) -> list[Model]:
        with self._registry:
            return list(self._models.values())

    def is_sleeping(self, model_name: str) -> bool:
        return self._model(model_name).sleeping

    def session_count(self) -> int:
        with self._registry:
            return len(self._sessions)

    def model(self, name: str) -> Model:
        return self._model(name)

    # ---- the steps of an operation (also used by swap) ----

    def quiesce(self, model: Model, level: int) -> None:
        failures, done = self._command_all(model, lambda s: {"quiesce": pb.Quiesce(level=level)})
        if failures:
            self._command_all(model, lambda s: {"resume": pb.Resume()}, only=done)
            raise _rank_failure(f"sleep {model.name}", failures)

    def resume(self, model: Model, best_effort: bool) -> None:
        failures, _ = self._command_all(model, lambda s: {"resume": pb.Resume()})
        if failures and not best_effort:
            raise _rank_failure(f"woke {model.name}, but its wake hooks failed", failures)

    def offload_and_unmap(self, model: Model, work: list[tuple[Region, Action]]) -> None:
        """Copies the offloads out, has every rank unmap, then releases the memory;
        on any failure before the release, puts everything back as it was."""
        offloads = [region for region, action in work if action is Action.OFFLOAD]
        try:
            for region in offloads:
                region.backup = self.pool.allocate(region.mapped_size)
                advance(region, "begin_offload")
            self._copy([CopyJob(OFFLOAD, r.device, r.handle, r.mapped_size, r.backup) for r in offloads])
            self.persist()  # the backups are on disk's record before any engine lets go of the memory
        except BaseException:
            self._abort_offload(offloads)
            raise
        regions = [region for region, _ in work]
        with self.devices_locked(_devices(regions)):
            asked = _owners(regions)  # each rank told to unmap may have done some of it
            try:
                failures, _ = self._command_all(model, lambda session: {"unmap": pb.Unmap(regions=[
                    pb.RegionChange(region_id=r.id, state=_state_after(action))
                    for r, action in work if r.session is session])}, only=asked)
                if failures:
                    raise _rank_failure(f"sleep {model.name}", failures)
            except BaseException:
                # Nothing was released yet: every engine that unmapped maps the same memory again.
                self._remap(model, set(regions), only=asked)
                self._abort_offload(offloads)
                raise
            # Every engine has dropped its references; the daemon's handle is the last one.
            for region in regions:
                self.backend.native.release(region.handle)
                region.handle = None
                advance(region, "released")
        self.persist()

    def _abort_offload(self, offloads: list[Region]) -> None:
        for region in offloads:
            if region.state is RegionState.OFFLOADING:
                advance(region, "abort")
            if region.backup is not None:
                self.pool.free(region.backup)
                region.backup = None

    def materialize(self, model: Model, targets: list[Region]) -> None:
        """Creates device memory for sleeping regions and fills it (backup or zeros);
        on failure releases what it created and leaves them asleep."""
        try:
            for region in targets:
                advance(region, "begin_restore")
            self._create_all(targets, f"wake {model.name}")
            jobs = [CopyJob(RESTORE, r.device, r.handle, r.mapped_size, r.backup) for r in targets if r.backup]
            if self.backend.name not in ZEROED_ON_CREATE:
                jobs += [CopyJob(ZERO, r.device, r.handle, r.mapped_size) for r in targets if r.backup is None]
            self._copy(jobs)
        except _C.OutOfMemoryError as error:
            self.undo_restore(model, targets, remapped=[])
            raise exhausted(f"wake {model.name}: out of device memory midway ({error}); "
                            "it is asleep as before, its backups intact") from None
        except BaseException:
            self.undo_restore(model, targets, remapped=[])
            raise

    def remap_or_undo(self, model: Model, targets: list[Region]) -> None:
        asked = _owners(targets)
        with self.devices_locked(_devices(targets)):
            failures, _ = self._remap(model, set(targets), only=asked)
        if failures:
            # A rank that failed may have mapped some regions before it did: every rank asked unmaps again.
            self.undo_restore(model, targets, remapped=asked)
            raise _rank_failure(f"wake {model.name}", failures)
        for region in targets:
            advance(region, "restored")

    def finish_wake(self, model: Model, targets: list[Region], result: OperationResult) -> None:
        """After `targets` are mapped again: backups freed, and once every region
        of the model is back, its wake hooks run."""
        self.commit_restore(targets, result)
        result.regions = len(targets)
        if model.sleeping and all(r.state is RegionState.MAPPED for r in model.regions()):
            model.sleeping = False
            self.resume(model, best_effort=False)
        result.sleeping = model.sleeping

    def commit_restore(self, targets: list[Region], result: OperationResult) -> None:
        """Frees the backups of regions that are mapped again, counting the bytes."""
        for region in targets:
            if region.backup is not None:
                result.bytes_restored += region.mapped_size
                self.pool.free(region.backup)
                region.backup = None
            else:
                result.bytes_zeroed += region.mapped_size
        self.persist()

    def undo_restore(self, model: Model, targets: list[Region], remapped: list[Session]) -> None:
        with self.devices_locked(_devices(targets)):
            self._command_all(model, lambda session: {"unmap": pb.Unmap(regions=[
                pb.RegionChange(region_id=r.id, state=RegionState.OFFLOADED if r.backup else RegionState.DISCARDED)
                for r in targets if r.session is session])}, only=remapped)
            for region in targets:
                if region.handle is not None:
                    self.backend.native.release(region.handle)
                    region.handle = None
                if region.state is RegionState.RESTORING:
                    advance(region, "abort")

    # ---- room on devices ----

    def _ensure_room(self, model: Model, needed: dict[int, int], what: str, evict: bool) -> list[str]:
        """Makes `needed` bytes fit on each device, evicting other models when
        allowed; refuses naming the bytes missing and what holds them otherwise."""
        evicted: list[str] = []
        while True:
            short = self.shortfall(model.name, needed)
            if not short:
                return evicted
            device, missing = next(iter(sorted(short.items())))
            if not evict:
                self._refuse(model.name, f"{what}: needs {format_size(needed[device])} on "
                             f"{self.backend.devices[device].name}, {format_size(missing)} more than its "
                             f"{self._room(device)}; put a model to sleep or allow eviction (--evict)")
            victim = self._evict_one(model, short)
            if victim is None:
                self._refuse(model.name, f"{what}: needs {format_size(missing)} more on "
                             f"{self.backend.devices[device].name} ({self._room(device)}) and no model may be "
                             "evicted (the rest are pinned, busy or already asleep)")
            evicted.append(victim)

    def eviction_candidates(self, requester: Model, devices) -> list[Model]:
        """Models that could give memory back on `devices`, in eviction order."""
        candidates = [m for m in self.models() if m is not requester and not m.policy.pinned
                      and m.policy.eviction_level > 0 and any(m.held_on(d) for d in devices)
                      and not any(s.recovering or s.resuming for s in m.sessions())]
        return sorted(candidates, key=lambda m: (m.policy.priority, m.last_active))

    def _evict_one(self, requester: Model, short: dict[int, int]) -> str | None:
        for victim in self.eviction_candidates(requester, short):
            if not victim.lock.acquire(timeout=_VICTIM_LOCK_SECONDS):
                continue  # busy with its own operation; try the next
            idle = time.monotonic() - victim.last_active
            try:
                self.sleep_locked(victim, victim.policy.eviction_level, [], {}, reason=f"evicted for {requester.name}")
            finally:
                victim.lock.release()
            log.warning("evicted %s (priority %d, idle %.0f s) to make room for %s", victim.name,
                        victim.policy.priority, idle, requester.name)
            self.events.publish("evicted", victim.name, f"room for {requester.name}")
            if self.metrics:
                self.metrics.evictions.labels(model=victim.name, reason="room").inc()
            return victim.name
        return None

    def _refuse(self, model_name: str, message: str):
        self.events.publish("refused", model_name, message)
        raise exhausted(message)

    # ---- internals ----

    def record(self, operation: str, model: str, detail: str, result: OperationResult, reason: str = "") -> None:
        if self.metrics:
            self.metrics.observe(operation, model, detail, result)
        # One line per operation, with the same facts as fields for --log-format json.
        fields = {"operation": operation, "model": model, "reason": reason or None, "regions": result.regions,
                  "seconds": round(result.seconds, 6)}
        if operation == "sleep":
            freed = result.bytes_offloaded + result.bytes_discarded
            fields.update(sleep_level=int(detail), bytes_freed=freed, bytes_offloaded=result.bytes_offloaded,
                          bytes_discarded=result.bytes_discarded)
            log.info("slept %s at level %s%s: %d regions, %s freed (%s offloaded, %s discarded), %.3f s", model,
                     detail, f" ({reason})" if reason else "", result.regions, format_size(freed),
                     format_size(result.bytes_offloaded), format_size(result.bytes_discarded), result.seconds,
                     extra=fields)
            self.events.publish("slept", model, f"level {detail}" + (f", {reason}" if reason else ""), freed)
        else:
            fields.update(tags=[] if detail == "all" else detail.split(","), bytes_restored=result.bytes_restored,
                          bytes_zeroed=result.bytes_zeroed, evicted=list(result.evicted))
            log.info("woke %s (%s): %d regions, %s restored, %s zero-filled, %.3f s", model,
                     detail if detail != "all" else "all tags", result.regions, format_size(result.bytes_restored),
                     format_size(result.bytes_zeroed), result.seconds, extra=fields)
            self.events.publish("woke", model, detail, result.bytes_restored + result.bytes_zeroed)

    def _create_all(self, regions: list[Region], what: str) -> None:
        """New device memory for each region, named so that it shows in /proc as the
        model's. The room is checked under the device locks, so that an operation
        running beside this one cannot have taken it since this one checked."""
        model_name = regions[0].session.model if regions else ""
        with self.devices_locked(_devices(regions)):
            for device, needed in needed_by_device(regions).items():
                if needed > self.room_for(model_name, device):
                    raise exhausted(f"{what}: needs {format_size(needed)} on {self.backend.devices[device].name}, "
                                    f"more than its {self._room(device)}; the room went meanwhile to another "
                                    "operation or process")
            for region in regions:
                label = f"sleepd:{region.session.model}:r{region.session.rank}:{region.tag}:{region.id}"
                region.handle = self.backend.native.create(region.device, region.mapped_size, label)

    def _remap(self, model: Model, regions: set[Region], only=None):
        return self._command_all(model, lambda session: {"remap": pb.Remap(
            region_ids=sorted(r.id for r in regions if r.session is session))}, only=only)

    def _copy(self, jobs: list[CopyJob]) -> None:
        by_device: dict[int, list[CopyJob]] = {}
        for job in jobs:
            by_device.setdefault(job.device, []).append(job)
        for device, device_jobs in sorted(by_device.items()):
            self.movers[device].run(device_jobs)
        if self.metrics:
            for job in jobs:
                self.metrics.bytes_moved.labels(direction=job.direction).inc(job.size)

    def _command_all(self, model: Model, command, only=None) -> tuple[list[tuple[Session, Exception]], list[Session]]:
        """Sends a command to every rank (or to `only`) and waits for all acks.

        Returns the failures and the sessions that acknowledged success.
        """
        sessions = list(model.ranks.values()) if only is None else list(only)
        futures = [(session, session.send(**command(session))) for session in sessions]
        deadline = time.monotonic() + self.hook_timeout
        failures, done = [], []
        for session, future in futures:
            try:
                ack = future.result(timeout=max(0.0, deadline - time.monotonic()))
            except FutureTimeout:
                failures.append((session, TimeoutError(f"did not answer within {self.hook_timeout:g} s")))
                continue
            except RankLost as error:
                failures.append((session, error))
                continue
            if ack.ok:
                done.append(session)
            else:
                failures.append((session, RuntimeError(ack.error)))
        return failures, done

    def _drop_region(self, region: Region) -> None:
        with self._registry:
            self._regions.pop(region.id, None)
            region.session.regions.pop(region.id, None)
        if region.handle is not None:
            self.backend.native.release(region.handle)
            region.handle = None
        if region.backup is not None:
            self.pool.free(region.backup)
            region.backup = None

    def _session(self, session_id: str) -> Session:
        with self._registry:
            session = self._sessions.get(session_id)
        if session is None:
            raise not_found("unknown session; attach first")
        return session

    def _owned_region(self, session: Session, region_id: int) -> Region:
        """The region, if it exists and belongs to `session`; the caller holds the registry lock."""
        region = self._regions.get(region_id)
        if region is None:
            raise not_found(f"region {region_id} does not exist")
        if region.session is not session:
            raise denied(f"region {region_id} belongs to {region.session.describe()}, not to this session")
        return region

    def _model(self, name: str) -> Model:
        with self._registry:
            model = self._models.get(name)
            known = ", ".join(sorted(self._models)) or "none"
        if model is None:
            raise not_found(f"model {name!r} is not attached (attached: {known})")
        return model

    @staticmethod
    def _check_tags(model: Model, regions: list[Region], tags) -> None:
        known = {region.tag for region in regions}
        for tag in tags:
            if tag not in known:
                raise not_found(f"model {model.name} has no region tagged {tag!r} "
                                f"(its tags: {', '.join(sorted(known)) or 'none'})")

    def _room(self, device: int) -> str:
        holders: dict[str, int] = {}
        with self._registry:
            for region in self._regions.values():
                if region.device == device and region.handle is not None:
                    model = region.session.model
                    holders[model] = holders.get(model, 0) + region.mapped_size
        held = ", ".join(f"{name} {format_size(size)}" for name, size in sorted(holders.items())) or "nothing"
        budget = self.backend.devices[device].budget
        room = f"{format_size(self.backend.free(device))} free of its {format_size(budget)} budget (held by {held})"
        with self._registry:
            promised = {name: p[device] for name, p in self._promised.items() if p.get(device)}
        if promised:
            room += "; " + ", ".join(f"{format_size(size)} set aside for swapping in {name}"
                                     for name, size in sorted(promised.items()))
        driver = self.backend.driver_memory(device)
        if driver is not None and driver.free < budget - self.backend.used(device):
            outside = max(0, driver.used - self.backend.used(device))
            room += f"; the driver reports {format_size(outside)} held outside sleepd"
        return room

    @contextlib.contextmanager
    def devices_locked(self, devices: set[int]):
        with contextlib.ExitStack() as stack:
            for device in sorted(devices):
                stack.enter_context(self._device_locks[device])
            yield


def _recovered_region(saved: dict, session: Session, pool: HostPool) -> Region:
    """A region as the state file recorded it. In-flight states resolve when the
    engine hands back what it maps: until then an offload in progress counts as
    mapped (its backup kept), a restore in progress as asleep."""
    backup = pool.recovered([Piece(*piece) for piece in saved["backup"]]) if saved["backup"] else None
    state = RegionState[saved["state"].upper()]
    if state is RegionState.OFFLOADING:
        state = RegionState.MAPPED
    elif state is RegionState.RESTORING:
        state = RegionState.OFFLOADED if backup else RegionState.DISCARDED
    return Region(saved["id"], saved["tag"], saved["size"], saved["mapped_size"], saved["device"], session,
                  handle=None, state=state, backup=backup, persist=saved["persist"])


def _owners(regions) -> list[Session]:
    """The live sessions owning `regions`, each once, in a stable order. An
    orphaned rank's regions are mapped by nobody, so there is no one to ask."""
    return list({r.session.id: r.session for r in regions if r.session.lost is None}.values())


def _devices(regions) -> set[int]:
    return {region.device for region in regions}


def needed_by_device(regions: list[Region]) -> dict[int, int]:
    needed: dict[int, int] = {}
    for region in regions:
        needed[region.device] = needed.get(region.device, 0) + region.mapped_size
    return needed


def _check_name(name: str) -> None:
    if not _NAME.match(name):
        raise invalid(f"model name {name!r} is not valid; use up to 128 letters, digits, '.', '_', ':', '/' or '-'")


def _state_after(action: Action) -> RegionState:
    return RegionState.OFFLOADED if action is Action.OFFLOAD else RegionState.DISCARDED


def _rank_failure(what: str, failures: list[tuple[Session, Exception]]) -> SleepdError:
    details = "; ".join(f"{session.describe()}: {error}" for session, error in failures)
    if any(isinstance(error, TimeoutError) for _, error in failures):
        code = grpc.StatusCode.DEADLINE_EXCEEDED
    elif any(isinstance(error, RankLost) for _, error in failures):
        code = grpc.StatusCode.UNAVAILABLE
    else:
        code = grpc.StatusCode.ABORTED
    return SleepdError(code, f"{what} failed and was rolled back: {details}")
