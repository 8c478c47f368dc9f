"""The operations on models: allocate and free regions, sleep, wake, set a
policy, end a session; and the steps they are made of, which swap.py and idle
sleep use too. Every state change they make goes through the state machines
(regions.py, sessions.py, model.py).

Lock order, outermost first (locks.py checks it under SLEEPD_CHECK_LOCKS=1):
  0. a controller's busy lock (controllers.py), held while the engine runs its own
     sleep, whose ranks then take their model's lock; taken with a timeout;
  1. a model's lock: one operation per model at a time. Eviction and swap take
     other models' locks only with a timeout, skipping or refusing a busy one,
     so two operations evicting each other cannot deadlock;
  2. the locks of the devices a step touches, in index order. A device's lock
     serialises the daemon's creating and releasing of device memory and the
     rounds in which engines map or unmap it (concurrent VMM calls from several
     processes on one GPU are a known source of driver crashes). It is not held
     across hooks or copies: the mover has one channel per direction, so one
     model's offload and another's restore run at the same time;
  3. the registry lock, held only to read or change its maps.
A session's handle-socket requests take only the registry lock, so an engine
can fetch memory while an operation waits on it; but `allocate` (a torch
pool's refill) takes its model's lock, waiting briefly (the setting
handles.allocate_wait_seconds), and the engine tries again while a sleep or wake runs.
"""

import contextlib
import logging
import time

from sleepd import _C
from sleepd.common.limits import MAX_LEVEL
from sleepd.common.sizes import format_size

from .auth import Peer
from .backends import ZEROED_ON_CREATE, DaemonBackend
from .controllers import Controllers
from .errors import aborted, exhausted, invalid, precondition
from .fanout import Fanout, owners, rank_failure
from .locks import DEVICE, OrderedLock
from .model import Model, OperationResult, Policy
from .model_work import ModelWork
from .mover import OFFLOAD, RESTORE, ZERO, CopyJob, Mover
from .pool import HostPool
from .quotas import Quotas
from .regions import ASLEEP, Region, RegionState
from .registry import Registry, check_tag
from .reporting import Reporter
from .room import VICTIM_LOCK_SECONDS, Room, needed_by_device
from .rules import Action, SleepRules
from .sessions import Condition, Session
from .sleep_plan import check_tags, plan_sleep

log = logging.getLogger(__name__)


class Operations:
    def __init__(self, registry: Registry, room: Room, fanout: Fanout, backend: DaemonBackend, pool: HostPool,
                 movers: dict[int, Mover], rules: SleepRules, reporter: Reporter, quotas: Quotas, checkpoints,
                 controllers: Controllers):
        self.registry = registry
        self.room = room
        self.fanout = fanout
        self.backend = backend
        self.pool = pool
        self.movers = movers
        self.rules = rules
        self.reporter = reporter
        self.quotas = quotas
        self.checkpoint = checkpoints.save  # records the state on disk before it returns
        self.checkpoint_soon = checkpoints.save_soon  # records it in the background: for the end of an operation
        self.controllers = controllers
        self._device_locks = {device.index: OrderedLock(DEVICE, device.index) for device in backend.devices}
        self._frozen = False
        self._model_work = ModelWork()

    # ---- sessions ----

    def freeze(self) -> None:
        """The daemon is stopping: sessions that end from now on are not reclaimed,
        so that the state file keeps them for the next daemon to recover."""
        self._frozen = True

    def attach(self, token: str, model_name: str, rank: int, ordinal: int, uuid: str = "",
               needs_controller: bool = False) -> Session:
        session = self.registry.attach(token, model_name, rank, ordinal, uuid, needs_controller,
                                       may_own=self.quotas.check_model_cap)
        self.checkpoint()
        self.reporter.events.publish("attached", self.registry.model(model_name), f"rank {rank} pid {session.pid} on "
                                                            f"{self.backend.devices[session.device].name}")
        return session

    def end_session(self, session: Session, reason: str) -> None:
        """Ends a session at once and queues the reclaiming of every reference it held for its
        model (model_work.py), so that the caller never waits on the model's lock. Safe to call
        more than once."""
        if self._frozen:
            session.end(reason)
            return
        # Forgotten before it ends: an attach finds it either not at all, or whole and attached before this.
        model = self.registry.forget_session(session)
        if not session.end(reason) or model is None:
            return
        self._model_work.submit(model, lambda: self._reclaim(model, session, reason))

    def _reclaim(self, model: Model, session: Session, reason: str) -> None:
        # Waiters on this session have already failed, so any operation holding
        # the model's lock finishes its rollback and lets us in.
        with model.lock:
            if self._frozen:  # stopping since the session ended: the state file keeps it
                return
            kept = {r.id: r for r in session.regions.values() if r.persist}
            freed = sum(r.mapped_size for r in session.regions.values() if r.holds_memory and not r.persist)
            for region in list(session.regions.values()):
                if not region.persist:
                    self.drop_region(region)
            self.registry.remove_rank(model, session, kept)
        self.checkpoint()
        log.info("session of %s ended (%s); reclaimed %s", session.describe(), reason, format_size(freed))
        detail = f"rank {session.rank} pid {session.pid}"
        if session.condition is Condition.DETACHED:
            self.reporter.events.publish("detached", model, detail, freed)
        else:
            self.reporter.events.publish("rank_lost", model, f"{detail}: {reason}", freed)
            if self.reporter.metrics:
                self.reporter.metrics.rank_lost(model)

    def touch(self, session_id: str) -> None:
        self.registry.model(self.registry.session(session_id).model).touch()

    # ---- regions ----

    def allocate(self, session_id: str, size: int, tag: str, evict: bool = False, persist: bool = False,
                 wait_for_model: float = -1) -> Region:
        """With `wait_for_model` seconds (the handle socket's: it must not hold its worker for a
        whole sleep), ABORTED if the model's lock stays taken that long."""
        session = self.registry.session(session_id)
        if size <= 0:
            raise invalid(f"allocation size must be positive, got {size}")
        check_tag(tag)
        device = self.backend.devices[session.device]
        granularity = self.backend.native.granularity(device.index)
        mapped_size = -(-size // granularity) * granularity
        if mapped_size > device.budget:
            raise exhausted(f"allocate {format_size(size)} on {device.name}: larger than its whole budget "
                            f"of {format_size(device.budget)}")
        model = self.registry.model(session.model)
        if not model.lock.acquire(timeout=wait_for_model):
            raise aborted(f"model {model.name} is busy (a sleep or wake is running); allocate again")
        try:
            model.touch()
            what = f"allocate {format_size(mapped_size)} for {session.describe()}"
            self.quotas.check_region_cap(model, what)
            with self.quotas.reserve(model, "device", mapped_size, what):
                evicted = self.room.ensure(model, {device.index: mapped_size}, what, evict, self.put_to_sleep,
                                          session.peer)
                region = Region.new(self.registry.new_region_id(), tag, size, mapped_size, device.index, session,
                                    persist)
                try:
                    self._create_all([region], what, session.peer)
                except _C.OutOfMemoryError as error:
                    raise exhausted(f"{what} on {device.name}: the device refused ({error}); "
                                    f"{self.room.describe(device.index, session.peer)}") from None
                region.restored()
                self.registry.add_region(region)
        finally:
            model.lock.release()
        self.checkpoint()
        if evicted:
            log.info("%s: evicted %s", what, ", ".join(evicted))
        return region

    def free(self, session_id: str, region_id: int) -> None:
        session = self.registry.session(session_id)
        region = self.registry.owned_region(session, region_id)
        model = self.registry.model(session.model)
        with model.lock:
            model.touch()
            self.drop_region(region)
        self.checkpoint()

    def drop_region(self, region: Region) -> None:
        self.registry.remove_region(region)
        handle, backup = region.dropped()
        if handle is not None:
            self.backend.native.release(handle)
        if backup is not None:
            self.pool.free(backup)

    # ---- sleep and wake ----

    def sleep(self, model_name: str, level: int, tags: list[str], actions: dict[str, Action]) -> OperationResult:
        """A sleep its owner (or an admin) asked for: where the host pool is short, tags a rule
        discards at some level may be discarded instead of offloaded."""
        model = self.registry.model(model_name)
        with model.lock:
            return self.sleep_locked(model, level, tags, actions, discard_if_short=True)

    def sleep_locked(self, model: Model, level: int, tags: list[str], actions: dict[str, Action],
                     reason: str = "", discard_if_short: bool = False,
                     answer_within: float | None = None) -> OperationResult:
        """Sleep with the model's lock already held (by the caller, or by eviction). A sleep the
        daemon starts on someone's behalf (eviction, idle) never discards what the rules would
        offload: it is refused instead. With `answer_within`, each rank has that long (if shorter
        than the hook timeout) to answer each step."""
        self.check_ready(model, "sleep")
        started = time.perf_counter()
        work = self.plan_sleep(model, level, tags, actions, discard_if_short)
        result = OperationResult(model.name, sleeping=True)
        if not work and model.sleeping:
            return result  # already asleep: sleeping again is a no-op
        with self.quotas.reserve(model, "host_pool", sum(r.mapped_size for r, a in work if a is Action.OFFLOAD),
                                 f"sleep {model.name}"):
            quiesced_here = not model.paused
            if quiesced_here:
                self.quiesce(model, level, answer_within)
            try:
                self.offload_and_unmap(model, work, answer_within)
            except Exception:
                if quiesced_here:
                    self.resume(model, best_effort=True, timeout=answer_within)
                raise
        for region, action in work:
            if action is Action.OFFLOAD:
                result.bytes_offloaded += region.mapped_size
            else:
                result.bytes_discarded += region.mapped_size
        result.region_count = len(work)
        result.seconds = time.perf_counter() - started
        self.reporter.slept(model, level, result, reason)
        return result

    def put_to_sleep(self, victim: Model, reason: str, answer_within: float | None = None) -> OperationResult | None:
        """A sleep the daemon starts (eviction, swap, idle) at the victim's eviction level; None where
        the victim is busy. An engine that runs its own sleep is asked through its controller, without
        the victim's lock, which its ranks take (refused where it has no controller). With
        `answer_within` (eviction), its ranks or its controller must answer within that bound."""
        what = f"sleep {victim.name} ({reason})"
        controller = self.controllers.route(victim, what)
        if controller is not None:
            return self.controllers.sleep(victim, controller, victim.policy.eviction_level, [], {}, what,
                                          answer_within)
        if not victim.lock.acquire(timeout=VICTIM_LOCK_SECONDS):
            return None
        try:
            return self.sleep_locked(victim, victim.policy.eviction_level, [], {}, reason=reason,
                                     answer_within=answer_within)
        finally:
            victim.lock.release()

    def plan_sleep(self, model: Model, level: int, tags: list[str], actions: dict[str, Action],
                   discard_if_short: bool = False) -> list[tuple[Region, Action]]:
        return plan_sleep(model, level, tags, actions, self.rules, self.pool, discard_if_short)

    def wake(self, model_name: str, tags: list[str], evict: bool, caller: Peer) -> OperationResult:
        """Wakes the model's regions of `tags` (all without), evicting models `caller` may act on
        when `evict` allows and room is short."""
        started = time.perf_counter()
        model = self.registry.model(model_name)
        result = OperationResult(model_name)
        with model.lock:
            self.check_ready(model, "wake")
            model.touch()
            regions = model.regions()
            check_tags(model, regions, tags)
            targets = [r for r in regions if r.state in ASLEEP and (not tags or r.tag in tags)]
            if targets:
                with self.quotas.reserve(model, "device", sum(r.mapped_size for r in targets), f"wake {model.name}"):
                    result.evicted = self.room.ensure(model, needed_by_device(targets), f"wake {model.name}", evict,
                                                      self.put_to_sleep, caller)
                    self.materialize(model, targets, caller)
                    self.remap_or_undo(model, targets, result)
            self.finish_wake(model, targets, result)
        result.seconds = time.perf_counter() - started
        self.reporter.woke(model, tags, result)
        return result

    def set_policy(self, model_name: str, **changes) -> Policy:
        model = self.registry.model(model_name)
        level = changes.get("eviction_level")
        if level is not None and not 0 <= level <= MAX_LEVEL:
            raise invalid(f"eviction level {level} does not exist; use 0, 1 or 2")
        if (changes.get("idle_seconds") or 0) < 0:
            raise invalid("idle_seconds must be zero (never) or positive")
        model.change_policy(**changes)
        self.checkpoint()
        log.info("policy of %s: %s", model_name, model.policy)
        return model.policy

    def check_ready(self, model: Model, what: str) -> None:
        """Refuses operations on a model some of whose ranks are still coming back from a daemon restart."""
        waiting = [s for s in model.sessions() if s.returning]
        if waiting:
            raise precondition(f"{what} {model.name}: {', '.join(s.describe() for s in waiting)} has not "
                               "handed its memory back since the daemon restarted; try again shortly")

    # ---- the steps of an operation (also used by swap) ----

    def quiesce(self, model: Model, level: int, timeout: float | None = None) -> None:
        failures, done = self.fanout.quiesce(model.ranks.values(), level, timeout)
        if failures:
            self.fanout.resume(done, timeout)
            # A rank that did not answer in time may still quiesce: a resume queued behind its
            # quiesce wakes it then, as the model is counted awake. Nobody waits for that one.
            self.fanout.resume([session for session, error in failures if isinstance(error, TimeoutError)], 0)
            raise rank_failure(f"sleep {model.name}", failures)
        model.pause()

    def resume(self, model: Model, best_effort: bool, timeout: float | None = None) -> None:
        model.unpause()
        failures, _ = self.fanout.resume(model.ranks.values(), timeout)
        if failures and not best_effort:
            raise rank_failure(f"woke {model.name}, but its wake hooks failed", failures)

    def offload_and_unmap(self, model: Model, work: list[tuple[Region, Action]], timeout: float | None = None) -> None:
        """Copies the offloads out, has every rank unmap (each answering within `timeout`, if shorter
        than the hook timeout), then releases the memory; on any failure before the release, puts
        everything back as it was."""
        offloads = [region for region, action in work if action is Action.OFFLOAD]
        try:
            for region in offloads:
                region.offload(self.pool.allocate(region.mapped_size))
            if offloads:
                self._copy([CopyJob(OFFLOAD, r.device, r.handle, r.mapped_size, r.backup) for r in offloads])
                self.checkpoint()  # the backups are on disk's record before any engine lets go of the memory
        except Exception:
            self._cancel_offloads(offloads)
            raise
        regions = [region for region, _ in work]
        after = {region: _state_after(action) for region, action in work}
        with self.devices_locked(_devices(regions)):
            asked = owners(regions)  # each rank told to unmap may have done some of it
            try:
                failures, _ = self.fanout.unmap(asked, after, timeout)
                if failures:
                    raise rank_failure(f"sleep {model.name}", failures)
            except Exception:
                # Nothing was released yet: every engine that unmapped maps the same memory again (one
                # that answers late gets the remap after its unmap, in order).
                self.fanout.remap(asked, regions, timeout)
                self._cancel_offloads(offloads)
                raise
            # Every engine has dropped its references; the daemon's handle is the last one.
            self.backend.native.release_all([region.release() for region in regions])
        self.checkpoint_soon()

    def _cancel_offloads(self, offloads: list[Region]) -> None:
        for region in offloads:
            if region.state is RegionState.OFFLOADING:
                backup = region.cancel_offload()
                if backup is not None:
                    self.pool.free(backup)

    def materialize(self, model: Model, targets: list[Region], caller: Peer) -> None:
        """Creates device memory for sleeping regions and fills it (backup or zeros);
        on failure releases what it created and leaves them asleep."""
        try:
            for region in targets:
                region.begin_restore()
            self._create_all(targets, f"wake {model.name}", caller)
            jobs = [CopyJob(RESTORE, r.device, r.handle, r.mapped_size, r.backup) for r in targets if r.backup]
            if self.backend.name not in ZEROED_ON_CREATE:
                jobs += [CopyJob(ZERO, r.device, r.handle, r.mapped_size) for r in targets if r.backup is None]
            self._copy(jobs)
        except _C.OutOfMemoryError as error:
            self.undo_restore(model, targets, remapped=[])
            raise exhausted(f"wake {model.name}: out of device memory midway ({error}); "
                            "it is asleep as before, its backups intact") from None
        except Exception:
            self.undo_restore(model, targets, remapped=[])
            raise

    def remap_or_undo(self, model: Model, targets: list[Region], result: OperationResult) -> None:
        """Has every rank map `targets` again and then (the device no longer held) run the wake
        hooks of their tags, then frees their backups, counting the bytes restored and
        zero-filled into `result`; on failure, leaves them asleep as before."""
        asked = owners(targets)
        with self.devices_locked(_devices(targets)):
            failures, _ = self.fanout.remap(asked, targets)
        if not failures:
            failures, _ = self.fanout.tags_awake(asked, targets)
        if failures:
            # A rank that failed may have mapped some regions before it did: every rank asked unmaps again.
            self.undo_restore(model, targets, remapped=asked)
            raise rank_failure(f"wake {model.name}", failures)
        for region in targets:
            backup = region.restored()
            if backup is not None:
                result.bytes_restored += region.mapped_size
                self.pool.free(backup)
            else:
                result.bytes_zeroed += region.mapped_size
        self.checkpoint_soon()

    def finish_wake(self, model: Model, targets: list[Region], result: OperationResult) -> None:
        """Once every region of the model is mapped again, its wake hooks run."""
        result.region_count = len(targets)
        if model.paused and all(r.state is RegionState.MAPPED for r in model.regions()):
            self.resume(model, best_effort=False)
        result.sleeping = model.sleeping

    def undo_restore(self, model: Model, targets: list[Region], remapped: list[Session]) -> None:
        """Puts regions being restored back to sleep, their backups intact: ranks in `remapped`
        unmap them again, and memory created for them is released."""
        with self.devices_locked(_devices(targets)):
            self.fanout.unmap(remapped, {r: RegionState.OFFLOADED if r.backup else RegionState.DISCARDED
                                         for r in targets})
            for region in targets:
                if region.state is RegionState.RESTORING:
                    handle = region.cancel_restore()
                    if handle is not None:
                        self.backend.native.release(handle)

    # ---- devices ----

    @contextlib.contextmanager
    def devices_locked(self, devices: set[int]):
        with contextlib.ExitStack() as stack:
            for device in sorted(devices):
                stack.enter_context(self._device_locks[device])
            yield

    def _create_all(self, regions: list[Region], what: str, caller: Peer) -> None:
        """New device memory for each region, named so that it shows in /proc as the
        model's. The room is checked again under the device locks."""
        model_name = regions[0].model if regions else ""
        with self.devices_locked(_devices(regions)):
            self.room.check_created_fit(model_name, regions, what, caller)
            handles = self.backend.native.create_all([
                (r.device, r.mapped_size, f"sleepd:{r.model}:r{r.session.rank}:{r.tag}:{r.id}") for r in regions])
            for region, handle in zip(regions, handles):
                region.created(handle)

    def _copy(self, jobs: list[CopyJob]) -> None:
        by_device: dict[int, list[CopyJob]] = {}
        for job in jobs:
            by_device.setdefault(job.device, []).append(job)
        for device, device_jobs in sorted(by_device.items()):
            self.movers[device].run(device_jobs)
        if self.reporter.metrics:
            for job in jobs:
                self.reporter.metrics.bytes_moved.labels(direction=job.direction).inc(job.size)


def _devices(regions) -> set[int]:
    return {region.device for region in regions}


def _state_after(action: Action) -> RegionState:
    return RegionState.OFFLOADED if action is Action.OFFLOAD else RegionState.DISCARDED
