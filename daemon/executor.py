"""Carries plans out (plans.py): applies each step in order and, when one fails,
applies the plan's compensations, so that a failed operation leaves every model
as it was, or says in its error which model could not be put back. No other
module rolls anything back.

It owns the device locks, the fan-out of engine steps to ranks (fanout.py), the
copies (the movers), the checkpoints and eviction. The caller holds the lock of
each model a plan changes (operations.py); see there for the lock order.
"""

import contextlib
import logging
import time

from sleepd import _C
from sleepd.common.sizes import format_size

from . import planner
from .auth import DAEMON, Peer
from .backup_checks import BackupChecks
from .backends import ZEROED_ON_CREATE, DaemonBackend
from .errors import SleepdError, data_loss, exhausted
from .fanout import Fanout, rank_failure
from .locks import DEVICE, OrderedLock
from .model import Model
from .mover import OFFLOAD, RESTORE, ZERO, BackupDamaged, CopyJob, Mover
from .plans import (CancelOffload, CancelRestore, Drop, FinishRestore, KeepAwake, MakeRoom, Materialize, Offload,
                    Overlapped, Pause, Plan, Quiesce, Release, Remap, Resume, ResumeIfAwake, TagsAwake, Unclaim,
                    Unmap, WakeAgain)
from .pool import HostPool
from .regions import Region, RegionState
from .registry import Registry
from .restorer import Restorer
from .room import Room
from .views import OperationResult
from .weight_sets import WeightSet

log = logging.getLogger(__name__)


class _Failed(Exception):
    """Where a plan failed: the step, and within an Overlapped step the outgoing step (None: its restores)."""

    def __init__(self, error: Exception, step: int, within: int | None = None):
        super().__init__(str(error))
        self.error, self.step, self.within = error, step, within


class Executor:
    def __init__(self, registry: Registry, room: Room, fanout: Fanout, backend: DaemonBackend, pool: HostPool,
                 movers: dict[int, Mover], checkpoints, authorizer, events, metrics, put_to_sleep,
                 eviction_answer_seconds: float = 5.0, backup_checks: BackupChecks | None = None):
        self._registry = registry
        # host_pool.check_backups: whether a restore's copy checks a backup, or the daemon after the resume
        self.backup_checks = backup_checks or BackupChecks(pool, metrics, events)
        self._room = room
        self.fanout = fanout
        self._backend = backend
        self._pool = pool
        self.movers = movers
        self.checkpoint = checkpoints.save  # records the state on disk before it returns
        self.checkpoint_soon = checkpoints.save_soon  # records it in the background: for the end of an operation
        self._authorizer = authorizer
        self._events = events
        self._metrics = metrics
        # put_to_sleep(victim, reason, answer_within) -> result, or None where the victim is busy (operations.py)
        self._put_to_sleep = put_to_sleep
        # How long an eviction waits for a model's ranks or controller to answer before it skips
        # that model: one slow or hostile engine delays only itself.
        self._answer_seconds = eviction_answer_seconds
        self._device_locks = {device.index: OrderedLock(DEVICE, device.index) for device in backend.devices}
        # evict_kept(device) -> the name of a kept weight set it moved off the device, or None (operations.py sets it)
        self.evict_kept = lambda device: None

    # ---- a plan ----

    def run(self, plan: Plan, caller: Peer = DAEMON, answer_within: float | None = None) -> dict[str, OperationResult]:
        """Applies the plan's steps; on a failure, its compensations, then raises. With `answer_within`
        (an eviction's bound), each rank has that long to answer each step. Returns the results by model."""
        results = {name: OperationResult(name, **counts) for name, counts in plan.counts.items()}
        run = _Run(plan, caller, answer_within, results)
        try:
            with self._set_aside(plan):
                for index, step in enumerate(plan.steps):
                    run.step = index
                    if isinstance(step.do, Overlapped):
                        self._overlapped(step.do, run)
                    else:
                        self._apply(step.do, run)
        except Exception as error:
            failed = error if isinstance(error, _Failed) else _Failed(error, run.step)
            left_asleep = self._compensate(plan.compensations(failed.step, failed.within), run)
            raise _outcome(plan, failed.error, left_asleep) from None
        return results

    @contextlib.contextmanager
    def _set_aside(self, plan: Plan):
        """Until a swap ends (not during its rollback), the room it frees is its target's."""
        if not plan.set_aside:
            yield
            return
        name, needed = plan.set_aside
        with self._room.set_aside(self._registry.model(name), dict(needed)):
            yield

    def _compensate(self, undos: list, run: "_Run") -> dict[str, str]:
        """Applies each compensation; one that fails does not stop the others. Returns the models left
        asleep, with why."""
        left_asleep = {}
        for undo in undos:
            try:
                self._apply(undo, run, undoing=True)
            except Exception as error:
                if isinstance(undo, WakeAgain):  # it stays asleep, its backups intact, until woken
                    left_asleep[undo.model] = error.message if isinstance(error, SleepdError) else str(error)
                else:
                    log.exception("%s: undoing %s failed", run.plan.what, type(undo).__name__)
        return left_asleep

    def _apply(self, action, run: "_Run", undoing: bool = False) -> None:
        """One action; `undoing`: as a compensation, where an engine step's failures are not the error."""
        model = self._registry.holder(action.model)
        timeout = run.answer_within
        match action:
            case Quiesce(level=level):
                self._quiesce(model, level, timeout)
            case Resume(regions=ids):
                regions = self._registry.regions(ids)
                if model.paused and all(r.state is RegionState.MAPPED for r in regions):
                    model.unpause()
                    self.fanout.resume(model.ranks.values(), timeout)
            case ResumeIfAwake():
                if model.paused and all(r.state is RegionState.MAPPED for r in model.regions()):
                    model.unpause()
                    failures, _ = self.fanout.resume(model.ranks.values())
                    if failures:
                        raise rank_failure(f"woke {model.name}, but its wake hooks failed", failures)
            case Offload(regions=ids):
                regions = self._registry.regions(ids)
                for region in regions:
                    region.offload(self._pool.allocate(region.mapped_size))
                self.copy([CopyJob(OFFLOAD, r.device, r.handle, r.mapped_size, r.backup) for r in regions])
                self.checkpoint()  # the backups are on disk's record before any engine lets go of the memory
            case CancelOffload(regions=ids):
                for region in self._registry.regions(ids):
                    if region.state is RegionState.OFFLOADING:
                        backup = region.cancel_offload()
                        if backup is not None:
                            self._pool.free(backup)
            case Unmap(after=after, ranks=ranks):
                regions = self._registry.regions([region_id for region_id, _ in after])
                states = dict(after)
                with self.devices_locked(_devices(regions)):
                    failures, _ = self.fanout.unmap(_asked(model, ranks), {r: states[r.id] for r in regions}, timeout)
                if failures and not undoing:
                    raise rank_failure(f"sleep {model.name}", failures)
            case Remap(regions=ids, ranks=ranks):
                regions = self._registry.regions(ids)
                with self.devices_locked(_devices(regions)):
                    failures, _ = self.fanout.remap(_asked(model, ranks), regions, timeout)
                if failures and not undoing:
                    raise rank_failure(f"wake {model.name}", failures)
            case Release(regions=ids, leaving=leaving):
                regions = self._registry.regions(ids)
                own = [region for region in regions if not region.shared]
                for view in (region for region in regions if region.shared):
                    self._let_go_of_shared(view, view.id in leaving)
                with self.devices_locked(_devices(own)):
                    # Every engine has dropped its references; the daemon's handle is the last one.
                    self._backend.native.release_all([region.release() for region in own])
                self.checkpoint_soon()
            case MakeRoom(needed=needed, evict=evict):
                run.result(model).evicted += self.make_room(model, dict(needed), f"wake {model.name}", evict,
                                                            run.caller)
            case Materialize(regions=ids):
                self.materialize(model, self._registry.regions(ids), run.caller)
            case CancelRestore(regions=ids):
                regions = self._registry.regions(ids)
                with self.devices_locked(_devices(regions)):
                    for region in regions:
                        if region.state is RegionState.RESTORING:
                            handle = region.cancel_restore()
                            if handle is not None:
                                self._backend.native.release(handle)
            case TagsAwake(regions=ids, ranks=ranks):
                failures, _ = self.fanout.tags_awake(_asked(model, ranks), self._registry.regions(ids))
                if failures:
                    raise rank_failure(f"wake {model.name}", failures)
            case FinishRestore(regions=ids):
                result = run.result(model)
                restored = []
                for region in self._registry.regions(ids):
                    if region.shared:
                        region.view_mapped()
                        result.region_count += 1
                        continue
                    backup = region.restored()
                    if backup is not None:
                        result.bytes_restored += region.mapped_size
                        restored.append((region, backup))
                    else:
                        result.bytes_zeroed += region.mapped_size
                    result.region_count += 1
                if isinstance(model, WeightSet):
                    # The state file forgets a set's backups before the pool frees them: no engine hands a
                    # set's memory back after a crash, so a file that still named them would be believed.
                    self.checkpoint()
                for region, backup in restored:  # freed, after_resume once checked now that the model runs
                    self.backup_checks.restored(model, region.describe(), region.mapped_size, backup)
                self.checkpoint_soon()
            case WakeAgain(regions=ids):
                self.run(planner.wake_again(model.view(), ids))
            case Drop(regions=ids):
                for region in self._registry.regions(ids):
                    self.drop_region(region)
            case Unclaim(regions=ids):
                for region in self._registry.regions(ids):
                    region.unclaimed()
            case KeepAwake(regions=ids):
                for region in self._registry.regions(ids):
                    self._pool.free(region.kept_backup())
            case Pause():
                model.pause()
            case _:
                raise TypeError(f"no such step: {action!r}")

    # ---- the steps that take more than a few lines ----

    def _let_go_of_shared(self, view: Region, leaving: bool) -> None:
        """Its engine unmapped a weight set's memory: the set keeps it, or, `leaving`, the view leaves the set."""
        if not leaving:
            view.view_unmapped()
            return
        weight_set = view.shares.session
        view.leave_asleep()
        self._registry.left(weight_set, view)

    def _quiesce(self, model: Model, level: int, timeout: float | None) -> None:
        failures, done = self.fanout.quiesce(model.ranks.values(), level, timeout)
        if failures:
            self.fanout.resume(done, timeout)
            # A rank that did not answer in time may still quiesce: a resume queued behind its
            # quiesce wakes it then, as the model is counted awake. Nobody waits for that one.
            self.fanout.resume([session for session, error in failures if isinstance(error, TimeoutError)], 0)
            raise rank_failure(f"sleep {model.name}", failures)
        model.pause()

    def materialize(self, model: Model, regions: list[Region], caller: Peer) -> None:
        """Creates device memory for asleep regions and fills it (backup or zeros)."""
        for region in regions:
            region.begin_restore()
        try:
            self.create_all(regions, f"wake {model.name}", caller)
        except _C.OutOfMemoryError as error:
            raise exhausted(f"wake {model.name}: out of device memory midway ({error}); "
                            "it is asleep as before, its backups intact") from None
        jobs = self.backup_checks.restore_jobs(f"wake {model.name}", regions)
        if self._backend.name not in ZEROED_ON_CREATE:
            jobs += [CopyJob(ZERO, r.device, r.handle, r.mapped_size) for r in regions if r.backup is None]
        try:
            self.copy(jobs)
        except BackupDamaged as damaged:  # rolled back: the region stays asleep, its backup kept as it is
            region = next(region for region in regions if region.handle == damaged.job.handle)
            if self._metrics:
                self._metrics.damaged_backups.inc()
            error = data_loss(f"wake {model.name}: {region.describe()}: its backup {damaged.what}; it stays "
                              "asleep with the backup kept for inspection")
            log.error("%s", error.message)
            raise error from None

    def _overlapped(self, overlapped: Overlapped, run: "_Run") -> None:
        """The outgoing steps in order, while a restorer thread materializes the incoming regions as
        the released bytes make room for them."""
        target = self._registry.model(overlapped.incoming.model)
        restorer = Restorer(self.materialize, self._room, target, self._registry.regions(overlapped.incoming.regions),
                            run.caller)
        restorer.start()
        within = None
        try:
            for within, inner in enumerate(overlapped.outgoing):
                self._apply(inner.do, run)
                if isinstance(inner.do, Release):
                    restorer.room_changed()
            within = None
        except Exception as error:
            restorer.finish()
            raise _Failed(error, run.step, within) from None
        restorer.finish()
        if restorer.error:
            raise _Failed(restorer.error, run.step, None)

    # ---- eviction ----

    def make_room(self, model: Model, needed: dict[int, int], what: str, evict: bool, caller: Peer) -> list[str]:
        """Makes `needed` bytes fit on each device, evicting other models `caller` may act on when `evict`
        allows; a model that is busy, refuses or does not answer within eviction_answer_seconds is
        skipped. Refuses naming the bytes missing, what holds them and who was skipped and why
        otherwise. Returns the models evicted."""
        evicted: list[str] = []
        skipped: dict[str, str] = {}  # model name -> why it was not evicted; each is tried once
        while True:
            short = self._room.shortfall(model.name, needed)
            if not short:
                return evicted
            device, missing = min(short.items())
            name = self._backend.devices[device].name
            kept = self.evict_kept(device)  # weight sets no engine joined give way first, evict or not
            if kept is not None:
                evicted.append(kept)
                continue
            if not evict:
                self._room.refuse(model, f"{what}: needs {format_size(needed[device])} on {name}, "
                                  f"{format_size(missing)} more than its {self._room.describe(device, caller)}; put a "
                                  "model to sleep or allow eviction (--evict)")
            victim = self._evict_one(model, short, caller, skipped)
            if victim is None:
                tried = "skipped " + ", ".join(f"{n} ({why})" for n, why in skipped.items()) + "; " if skipped else ""
                self._room.refuse(model, f"{what}: needs {format_size(missing)} more on {name} "
                                  f"({self._room.describe(device, caller)}) and no model may be evicted ({tried}the "
                                  "rest are pinned, already asleep, other users' or run their own sleep with no "
                                  "controller attached)")
            evicted.append(victim)

    def eviction_order(self, requester: Model, devices, caller: Peer) -> list[Model]:
        views = self._registry.snapshot()
        mine = next((view for view in views if view.name == requester.name), None) or requester.view()
        names = planner.eviction_order(mine, views, devices, lambda owner: self._authorizer.sees(caller, owner))
        return [model for model in (self._registry.find(name) for name in names) if model is not None]

    def _evict_one(self, requester: Model, short: dict[int, int], caller: Peer, skipped: dict[str, str]) -> str | None:
        """Puts the first candidate not yet `skipped` to sleep; one that cannot be goes into `skipped`."""
        for victim in self.eviction_order(requester, short, caller):
            if victim.name in skipped:
                continue
            idle = time.monotonic() - victim.last_active
            try:
                slept = self._put_to_sleep(victim, f"evicted for {requester.name}", self._answer_seconds)
            except SleepdError as error:  # its sleep was rolled back, or given up on: it is as it was
                skipped[victim.name] = " ".join(error.message.split())
                log.warning("eviction for %s skipped %s: %s", requester.name, victim.name, skipped[victim.name])
                continue
            if slept is None:
                skipped[victim.name] = "busy with another operation"
                continue
            log.warning("evicted %s (priority %d, idle %.0f s) to make room for %s", victim.name,
                        victim.policy.priority, idle, requester.name)
            self._events.publish("evicted", victim, f"room for {requester.name}")
            if self._metrics:
                self._metrics.evicted(victim, "room")
            return victim.name
        return None

    # ---- devices, memory and copies ----

    @contextlib.contextmanager
    def devices_locked(self, devices: set[int]):
        with contextlib.ExitStack() as stack:
            for device in sorted(devices):
                stack.enter_context(self._device_locks[device])
            yield

    def create_all(self, regions: list[Region], what: str, caller: Peer) -> None:
        """New device memory for each region, named so that it shows in /proc as the
        model's. The room is checked again under the device locks."""
        model_name = regions[0].model if regions else ""
        with self.devices_locked(_devices(regions)):
            self._room.check_created_fit(model_name, regions, what, caller)
            handles = self._backend.native.create_all([
                (r.device, r.mapped_size, r.label) for r in regions])
            for region, handle in zip(regions, handles):
                region.created(handle)

    def copy_into_own_memory(self, model: Model, views: list[Region], what: str, caller: Peer) -> None:
        """The write step: new memory for each of a weight set's views, a copy of the set's memory (through
        the host pool, checked on the way), which the views then hold as their own."""
        needed = planner.needed_by_device(views)
        self.make_room(model, needed, what, True, caller)
        with self.devices_locked(set(needed)):
            self._room.check_created_fit(model.name, views, what, caller)
            handles = self._backend.native.create_all([
                (v.device, v.mapped_size, v.label) for v in views])
        backups = []
        try:
            for view in views:
                backups.append(self._pool.allocate(view.mapped_size))
            self.copy([CopyJob(OFFLOAD, v.device, v.shares.handle, v.mapped_size, b) for v, b in zip(views, backups)])
            self.copy([CopyJob(RESTORE, v.device, h, v.mapped_size, b) for v, h, b in zip(views, handles, backups)])
        except BaseException:
            self._backend.native.release_all(handles)
            raise
        finally:
            for backup in backups:
                self._pool.free(backup)
        for view, handle in zip(views, handles):
            view.leave(handle)

    def drop_region(self, region: Region) -> None:
        self._registry.remove_region(region)
        handle, backup = region.dropped()
        if handle is not None:
            self._backend.native.release(handle)
        if backup is not None:
            self._pool.free(backup)

    def copy(self, jobs: list[CopyJob]) -> None:
        by_device: dict[int, list[CopyJob]] = {}
        for job in jobs:
            by_device.setdefault(job.device, []).append(job)
        checking = 0.0
        for device, device_jobs in sorted(by_device.items()):
            checking += self.movers[device].run(device_jobs)
        if self._metrics:
            self._metrics.verify_seconds.inc(checking)
            for job in jobs:
                self._metrics.bytes_moved.labels(direction=job.direction).inc(job.size)
                if job.direction == RESTORE and job.check and job.backup.checksums:
                    self._metrics.verified_bytes.inc(job.size)


class _Run:
    """One plan being carried out: where it is, and what it has counted."""

    def __init__(self, plan: Plan, caller: Peer, answer_within: float | None, results: dict[str, OperationResult]):
        self.plan, self.caller, self.answer_within, self.results = plan, caller, answer_within, results
        self.step = 0

    def result(self, model: Model) -> OperationResult:
        return self.results.setdefault(model.name, OperationResult(model.name))


def _asked(model: Model, ranks) -> list:
    """The live sessions of `ranks`: a rank that ended meanwhile maps nothing, so there is no one to ask."""
    sessions = [model.ranks.get(rank) for rank in ranks]
    return [session for session in sessions if session is not None and session.ended is None]


def _devices(regions) -> set[int]:
    return {region.device for region in regions}


def _outcome(plan: Plan, error: Exception, left_asleep: dict[str, str]) -> Exception:
    """The error a failed plan raises: where it put models back (a swap's victims), which came back."""
    if not plan.put_back or not isinstance(error, SleepdError):
        return error
    woken = [name for name in plan.put_back if name not in left_asleep]
    outcome = [f"{', '.join(woken)} woken again"] if woken else []
    outcome += [f"{name} left asleep with its backups ({why})" for name, why in left_asleep.items()]
    return SleepdError(error.code, f"{plan.what} failed; {'; '.join(outcome)}: {error.message}")
