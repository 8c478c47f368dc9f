"""The control plane's core: models, ranks and regions, and the sleep and wake
operations that move them between states.

Locking, outermost first: a model's lock (one operation per model at a time),
then the locks of the devices it touches, taken in index order (one VMM-heavy
operation per device at a time), then the registry lock, held only briefly to
read or change the maps below. A session's handle-socket requests take only the
registry lock, so an engine can fetch memory while an operation waits on it.
"""

import contextlib
import itertools
import logging
import re
import threading
import time
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field

import grpc

from sleepd import _C
from sleepd.common.sizes import format_size
from sleepd.proto import sleepd_pb2 as pb

from .backends import ZEROED_ON_CREATE, DaemonBackend
from .errors import SleepdError, denied, exhausted, invalid, not_found, precondition
from .lifecycle import RegionState, advance
from .mover import OFFLOAD, RESTORE, ZERO, CopyJob, Mover
from .pool import Backup, HostPool
from .rules import Action, SleepRules
from .sessions import RankLost, Session

log = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")
_TAG = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


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


@dataclass(eq=False)
class Model:
    name: str
    ranks: dict[int, Session] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    # True from the sleep hooks until every region is mapped again and the wake hooks ran.
    sleeping: bool = False

    def regions(self) -> list[Region]:
        return [region for session in self.ranks.values() for region in session.regions.values()]

    def devices(self) -> set[int]:
        return {session.device for session in self.ranks.values()}


@dataclass(frozen=True)
class RegionView:
    id: int
    tag: str
    size: int
    mapped_size: int
    device: int
    state: RegionState


@dataclass(frozen=True)
class RankView:
    rank: int
    device: int
    pid: int
    regions: list[RegionView]


@dataclass(frozen=True)
class ModelView:
    name: str
    sleeping: bool
    ranks: list[RankView]


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


class MemoryManager:
    def __init__(self, backend: DaemonBackend, pool: HostPool, movers: dict[int, Mover],
                 rules: SleepRules, hook_timeout: float, metrics=None):
        self.backend = backend
        self.pool = pool
        self._movers = movers
        self._rules = rules
        self._hook_timeout = hook_timeout
        self._metrics = metrics
        self._registry = threading.Lock()
        self._pending_sessions: dict[str, Session] = {}  # by token, until attached
        self._sessions: dict[str, Session] = {}          # by session id, once attached
        self._models: dict[str, Model] = {}
        self._regions: dict[int, Region] = {}
        self._region_ids = itertools.count(1)
        self._device_locks = {device.index: threading.Lock() for device in backend.devices}

    # ---- sessions ----

    def open_session(self, pid: int, uid: int, gid: int) -> Session:
        session = Session(pid, uid, gid)
        with self._registry:
            self._pending_sessions[session.token] = session
        return session

    def attach(self, token: str, model_name: str, rank: int, device: int) -> Session:
        _check_name(model_name)
        if device >= len(self.backend.devices):
            raise invalid(f"device {device} does not exist; this daemon has {len(self.backend.devices)} "
                          f"({', '.join(d.name for d in self.backend.devices)})")
        with self._registry:
            session = self._pending_sessions.get(token)
            if session is None:
                raise denied("unknown session token; connect to the handle socket first")
            model = self._models.get(model_name) or Model(model_name)
            holder = model.ranks.get(rank)
            if holder is not None:
                raise SleepdError(grpc.StatusCode.ALREADY_EXISTS,
                                  f"{model_name} rank {rank} is already attached (pid {holder.pid})")
            del self._pending_sessions[token]
            session.model, session.rank, session.device = model_name, rank, device
            model.ranks[rank] = session
            self._models[model_name] = model
            self._sessions[session.id] = session
        log.info("attached %s on %s", session.describe(), self.backend.devices[device].name)
        return session

    def end_session(self, session: Session, reason: str) -> None:
        """Reclaims every reference a session held. Safe to call more than once."""
        if not session.end(reason):
            return
        with self._registry:
            self._pending_sessions.pop(session.token, None)
            self._sessions.pop(session.id, None)
            model = self._models.get(session.model) if session.attached else None
        if model is None:
            return
        # Waiters on this session have already failed, so any operation holding
        # the model's lock finishes its rollback and lets us in.
        with model.lock:
            freed = sum(region.mapped_size for region in session.regions.values() if region.handle is not None)
            for region in list(session.regions.values()):
                self._drop_region(region)
            with self._registry:
                if model.ranks.get(session.rank) is session:
                    del model.ranks[session.rank]
                if not model.ranks and self._models.get(model.name) is model:
                    del self._models[model.name]
        log.info("session of %s ended (%s); reclaimed %s", session.describe(), reason, format_size(freed))

    def export(self, session: Session, region_id: int) -> tuple[int, Region]:
        """A new descriptor for a region's memory, for the session that owns it."""
        with self._registry:
            region = self._owned_region(session, region_id)
            if region.handle is None:
                raise precondition(f"region {region_id} is {region.state.label}; wake the model first")
            return self.backend.native.export_handle(region.handle), region

    # ---- regions ----

    def allocate(self, session_id: str, size: int, tag: str) -> Region:
        session = self._session(session_id)
        if size <= 0:
            raise invalid(f"allocation size must be positive, got {size}")
        if not _TAG.match(tag):
            raise invalid(f"tag {tag!r} is not valid; use 1-64 letters, digits, '_', '.' or '-'")
        device = self.backend.devices[session.device]
        granularity = self.backend.native.granularity(device.index)
        mapped_size = -(-size // granularity) * granularity
        if mapped_size > device.capacity:
            raise exhausted(f"allocate {format_size(size)} on {device.name}: larger than its whole capacity "
                            f"of {format_size(device.capacity)}")
        model = self._model(session.model)
        with model.lock, self._devices_locked({device.index}):
            region = Region(next(self._region_ids), tag, size, mapped_size, device.index, session, handle=None)
            try:
                region.handle = self._create(region)
            except _C.OutOfMemoryError:
                raise exhausted(f"allocate {format_size(mapped_size)} for {session.describe()} on {device.name}: "
                                f"{self._room(device.index)}; free regions or put a model to sleep") from None
            with self._registry:
                self._regions[region.id] = region
                session.regions[region.id] = region
        return region

    def free(self, session_id: str, region_id: int) -> None:
        session = self._session(session_id)
        with self._registry:
            region = self._owned_region(session, region_id)
        with self._model(session.model).lock:
            self._drop_region(region)

    # ---- sleep and wake ----

    def sleep(self, model_name: str, level: int, tags: list[str], actions: dict[str, Action]) -> OperationResult:
        started = time.perf_counter()
        model = self._model(model_name)
        with model.lock:
            regions = model.regions()
            self._check_tags(model, regions, list(tags) + list(actions))
            selected = set(tags) | set(actions) or {region.tag for region in regions}
            plan = self._rules.plan(level, selected, actions)
            work = [(r, plan[r.tag]) for r in regions if plan and r.tag in plan and r.state is RegionState.MAPPED]
            result = OperationResult(model_name)
            if not work and model.sleeping:
                result.sleeping = True
                return result  # already asleep: sleeping again is a no-op
            offload_bytes = sum(r.mapped_size for r, action in work if action is Action.OFFLOAD)
            if offload_bytes > self.pool.available:
                raise exhausted(f"sleep {model_name}: offloading needs {format_size(offload_bytes)} of host pool, "
                                f"{format_size(self.pool.available)} free of {format_size(self.pool.budget)}; "
                                "raise --host-pool-budget or use a level that discards")
            with self._devices_locked(model.devices()):
                quiesced_here = not model.sleeping
                if quiesced_here:
                    self._quiesce(model, level)
                try:
                    self._offload_and_unmap(model, work)
                except BaseException:
                    if quiesced_here:
                        self._resume(model, best_effort=True)
                    raise
                model.sleeping = True
            for region, action in work:
                if action is Action.OFFLOAD:
                    result.bytes_offloaded += region.mapped_size
                else:
                    result.bytes_discarded += region.mapped_size
            result.regions = len(work)
            result.sleeping = True
        result.seconds = time.perf_counter() - started
        if self._metrics:
            self._metrics.observe("sleep", model_name, str(level), result)
        log.info("slept %s at level %d: %d regions, %s offloaded, %s discarded, %.3f s", model_name, level,
                 result.regions, format_size(result.bytes_offloaded), format_size(result.bytes_discarded),
                 result.seconds)
        return result

    def wake(self, model_name: str, tags: list[str]) -> OperationResult:
        started = time.perf_counter()
        model = self._model(model_name)
        result = OperationResult(model_name)
        with model.lock:
            regions = model.regions()
            self._check_tags(model, regions, tags)
            asleep = (RegionState.OFFLOADED, RegionState.DISCARDED)
            targets = [r for r in regions if r.state in asleep and (not tags or r.tag in tags)]
            if targets:
                self._check_room(model, targets)
                with self._devices_locked(model.devices()):
                    self._restore_and_remap(model, targets)
                for region in targets:
                    if region.backup is not None:
                        result.bytes_restored += region.mapped_size
                        self.pool.free(region.backup)
                        region.backup = None
                    else:
                        result.bytes_zeroed += region.mapped_size
            result.regions = len(targets)
            if model.sleeping and all(r.state is RegionState.MAPPED for r in model.regions()):
                model.sleeping = False
                self._resume(model, best_effort=False)
            result.sleeping = model.sleeping
        result.seconds = time.perf_counter() - started
        if self._metrics:
            self._metrics.observe("wake", model_name, ",".join(sorted(tags)) or "all", result)
        log.info("woke %s (%s): %d regions, %s restored, %s zero-filled, %.3f s", model_name,
                 ",".join(tags) or "all tags", result.regions, format_size(result.bytes_restored),
                 format_size(result.bytes_zeroed), result.seconds)
        return result

    # ---- status ----

    def snapshot(self, model_name: str = "") -> list[ModelView]:
        """A consistent copy of every model (or one), for status and metrics."""
        with self._registry:
            models = sorted(self._models.values(), key=lambda model: model.name)
            views = [ModelView(model.name, model.sleeping, [
                RankView(rank, session.device, session.pid, [
                    RegionView(r.id, r.tag, r.size, r.mapped_size, r.device, r.state)
                    for r in sorted(session.regions.values(), key=lambda r: r.id)])
                for rank, session in sorted(model.ranks.items())])
                for model in models if not model_name or model.name == model_name]
        if model_name and not views:
            self._model(model_name)  # raises NOT_FOUND, naming the attached models
        return views

    def is_sleeping(self, model_name: str) -> bool:
        return self._model(model_name).sleeping

    def session_count(self) -> int:
        with self._registry:
            return len(self._sessions)

    # ---- the steps of an operation ----

    def _quiesce(self, model: Model, level: int) -> None:
        failures, done = self._command_all(model, lambda s: {"quiesce": pb.Quiesce(level=level)})
        if failures:
            self._command_all(model, lambda s: {"resume": pb.Resume()}, only=done)
            raise _rank_failure(f"sleep {model.name}", failures)

    def _resume(self, model: Model, best_effort: bool) -> None:
        failures, _ = self._command_all(model, lambda s: {"resume": pb.Resume()})
        if failures and not best_effort:
            raise _rank_failure(f"woke {model.name}, but its wake hooks failed", failures)

    def _offload_and_unmap(self, model: Model, work: list[tuple[Region, Action]]) -> None:
        offloads = [region for region, action in work if action is Action.OFFLOAD]
        unmapped: list[Session] = []
        try:
            for region in offloads:
                region.backup = self.pool.allocate(region.mapped_size)
                advance(region, "begin_offload")
            self._copy([CopyJob(OFFLOAD, r.device, r.handle, r.mapped_size, r.backup) for r in offloads])
            failures, unmapped = self._command_all(model, lambda session: {"unmap": pb.Unmap(regions=[
                pb.RegionChange(region_id=r.id, state=_state_after(action))
                for r, action in work if r.session is session])})
            if failures:
                raise _rank_failure(f"sleep {model.name}", failures)
        except BaseException:
            # Nothing was released yet: every engine that unmapped maps the same memory again.
            self._remap(model, {r for r, _ in work}, only=unmapped)
            for region in offloads:
                if region.state is RegionState.OFFLOADING:
                    advance(region, "abort")
                if region.backup is not None:
                    self.pool.free(region.backup)
                    region.backup = None
            raise
        # Every engine has dropped its references; the daemon's handle is the last one.
        for region, _ in work:
            self.backend.native.release(region.handle)
            region.handle = None
            advance(region, "released")

    def _restore_and_remap(self, model: Model, targets: list[Region]) -> None:
        remapped: list[Session] = []
        try:
            for region in targets:
                advance(region, "begin_restore")
                region.handle = self._create(region)
            jobs = [CopyJob(RESTORE, r.device, r.handle, r.mapped_size, r.backup) for r in targets if r.backup is not None]
            if self.backend.name not in ZEROED_ON_CREATE:
                jobs += [CopyJob(ZERO, r.device, r.handle, r.mapped_size) for r in targets if r.backup is None]
            self._copy(jobs)
            failures, remapped = self._remap(model, set(targets))
            if failures:
                raise _rank_failure(f"wake {model.name}", failures)
        except _C.OutOfMemoryError as error:
            self._undo_restore(model, targets, remapped)
            raise exhausted(f"wake {model.name}: out of device memory midway ({error}); "
                            "it is asleep as before, its backups intact") from None
        except BaseException:
            self._undo_restore(model, targets, remapped)
            raise
        for region in targets:
            advance(region, "restored")

    def _undo_restore(self, model: Model, targets: list[Region], remapped: list[Session]) -> None:
        self._command_all(model, lambda session: {"unmap": pb.Unmap(regions=[
            pb.RegionChange(region_id=r.id, state=RegionState.OFFLOADED if r.backup else RegionState.DISCARDED)
            for r in targets if r.session is session])}, only=remapped)
        for region in targets:
            if region.handle is not None:
                self.backend.native.release(region.handle)
                region.handle = None
            if region.state is RegionState.RESTORING:
                advance(region, "abort")

    def _create(self, region: Region) -> int:
        """New device memory for a region, named so that it shows in /proc as the model's."""
        label = f"sleepd:{region.session.model}:r{region.session.rank}:{region.tag}:{region.id}"
        return self.backend.native.create(region.device, region.mapped_size, label)

    def _remap(self, model: Model, regions: set[Region], only=None):
        return self._command_all(model, lambda session: {"remap": pb.Remap(
            region_ids=sorted(r.id for r in regions if r.session is session))}, only=only)

    def _copy(self, jobs: list[CopyJob]) -> None:
        by_device: dict[int, list[CopyJob]] = {}
        for job in jobs:
            by_device.setdefault(job.device, []).append(job)
        for device, device_jobs in sorted(by_device.items()):
            self._movers[device].run(device_jobs)
        if self._metrics:
            for job in jobs:
                self._metrics.bytes_moved.labels(direction=job.direction).inc(job.size)

    def _command_all(self, model: Model, command, only=None) -> tuple[list[tuple[Session, Exception]], list[Session]]:
        """Sends a command to every rank (or to `only`) and waits for all acks.

        Returns the failures and the sessions that acknowledged success.
        """
        sessions = list(model.ranks.values()) if only is None else list(only)
        futures = [(session, session.send(**command(session))) for session in sessions]
        deadline = time.monotonic() + self._hook_timeout
        failures, done = [], []
        for session, future in futures:
            try:
                ack = future.result(timeout=max(0.0, deadline - time.monotonic()))
            except FutureTimeout:
                failures.append((session, TimeoutError(f"did not answer within {self._hook_timeout:g} s")))
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

    # ---- lookups and checks ----

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

    def _check_room(self, model: Model, targets: list[Region]) -> None:
        needed: dict[int, int] = {}
        for region in targets:
            needed[region.device] = needed.get(region.device, 0) + region.mapped_size
        for device, size in sorted(needed.items()):
            if size > self.backend.free(device):
                raise exhausted(f"wake {model.name}: needs {format_size(size)} on "
                                f"{self.backend.devices[device].name}, {self._room(device)}; "
                                "put another model to sleep first")

    def _room(self, device: int) -> str:
        holders: dict[str, int] = {}
        with self._registry:
            for region in self._regions.values():
                if region.device == device and region.handle is not None:
                    model = region.session.model
                    holders[model] = holders.get(model, 0) + region.mapped_size
        held = ", ".join(f"{name} {format_size(size)}" for name, size in sorted(holders.items())) or "nothing"
        capacity = self.backend.devices[device].capacity
        return f"{format_size(self.backend.free(device))} free of {format_size(capacity)} (held by {held})"

    @contextlib.contextmanager
    def _devices_locked(self, devices: set[int]):
        with contextlib.ExitStack() as stack:
            for device in sorted(devices):
                stack.enter_context(self._device_locks[device])
            yield


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
