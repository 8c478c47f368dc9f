"""The requests on models as the edges hand them in: attach, allocate and free
regions, sleep, wake, set a policy, end a session. Each takes its model's lock,
reads a snapshot, has the planner (planner.py) decide and the executor
(executor.py) carry it out, then reports. Nothing here changes a region or
undoes a step itself.

Lock order, outermost first (locks.py checks it under SLEEPD_CHECK_LOCKS=1):
  0. a controller's busy lock (controllers.py), held while the engine runs its own
     sleep, whose ranks then take their model's lock; taken with a timeout;
  1. a model's lock: one operation per model at a time. Eviction and swap take
     other models' locks only with a timeout, skipping or refusing a busy one,
     so two operations evicting each other cannot deadlock;
  2. the lock of each weight set a step maps, wakes or puts to sleep (weight_sets.py),
     in id order; eviction takes a kept set's lock only with a timeout;
  3. the locks of the devices a step touches, in index order (executor.py). A device's
     lock serialises the daemon's creating and releasing of device memory and the
     rounds in which engines map or unmap it (concurrent VMM calls from several
     processes on one GPU are a known source of driver crashes). It is not held
     across hooks or copies: the mover has one channel per direction, so one
     model's offload and another's restore run at the same time;
  4. the registry lock, held only to read or change its maps.
A session's fd-socket requests take only the registry lock, so an engine
can fetch memory while an operation waits on it; but `allocate` (a torch
pool's refill) takes its model's lock, waiting briefly (the setting
fd_socket.allocate_wait_seconds), and the engine tries again while a sleep or wake runs.
"""

import contextlib
import logging
import time

from sleepd import _C
from sleepd.common.limits import MAX_LEVEL
from sleepd.common.sizes import format_size

from . import planner
from .auth import Peer
from .backends import DaemonBackend
from .config_model import sharing_pairs
from .controllers import Controllers
from .errors import aborted, exhausted, invalid
from .executor import Executor
from .fanout import Fanout
from .model import Model
from .model_work import ModelWork
from .mover import Mover
from .plans import Plan
from .pool import HostPool
from .quotas import Quotas
from .regions import Region
from .registry import Registry, check_tag
from .reporting import Reporter
from .room import Room
from .rules import Action, SleepRules
from .sessions import Condition, Session
from .views import OperationResult, Policy
from .weight_set_operations import WeightSetOperations

log = logging.getLogger(__name__)

# How long eviction waits for another model's lock before trying the next model.
VICTIM_LOCK_SECONDS = 0.5


class Operations:
    def __init__(self, registry: Registry, room: Room, fanout: Fanout, backend: DaemonBackend, pool: HostPool,
                 movers: dict[int, Mover], rules: SleepRules, reporter: Reporter, quotas: Quotas, checkpoints,
                 controllers: Controllers, authorizer, eviction_answer_seconds: float = 5.0,
                 weight_sets: dict | None = None, backup_checks=None):
        """`backup_checks`: what becomes of restored backups (host_pool.check_backups), backup_checks.py."""
        self.registry = registry
        self.room = room
        self.backend = backend
        self.pool = pool
        self.rules = rules
        self.reporter = reporter
        self.quotas = quotas
        self.controllers = controllers
        self.executor = Executor(registry, room, fanout, backend, pool, movers, checkpoints, authorizer,
                                 reporter.events, reporter.metrics, self.put_to_sleep, eviction_answer_seconds,
                                 backup_checks)
        self.checkpoint = checkpoints.save
        settings = weight_sets or {}
        shared_with: dict[int, set[int]] = {}
        for owner, user in sharing_pairs(settings.get("shared_with", "")):
            shared_with.setdefault(owner, set()).add(user)
        budget = settings.get("kept_budget") or 0
        self.weight_sets = WeightSetOperations(registry, self.executor, pool, authorizer, shared_with,
                                               {d.index: budget for d in backend.devices} if budget else {},
                                               self.checkpoint, reporter.metrics)
        self.executor.evict_kept = self.weight_sets.evict_kept
        quotas.evict_kept_of = self.weight_sets.evict_kept_of
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
            freed = sum(r.mapped_size for r in session.regions.values() if r.holds_memory and not r.persist)
            joined = any(region.shared for region in session.regions.values())
            self.executor.run(planner.reclaim(model.view(), session.rank))
            self.registry.remove_rank(model, session, dict(session.regions))
        if joined:  # its weight sets may now be kept: within their budget
            self.weight_sets.keep_within_budget(session.device)
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
        """With `wait_for_model` seconds (the fd socket's: it must not hold its worker for a
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
                evicted = self.executor.make_room(model, {device.index: mapped_size}, what, evict, session.peer)
                region = Region.new(self.registry.new_region_id(), tag, size, mapped_size, device.index, session,
                                    persist)
                try:
                    self.executor.create_all([region], what, session.peer)
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
            self.executor.drop_region(region)
        self.checkpoint()

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
        started = time.perf_counter()
        view = model.view()
        planner.check_ready(view, "sleep")
        pool = planner.PoolRoom(self.pool.available, self.pool.budget)
        work = planner.sleep_work(view, level, tags, actions, self.rules, pool, discard_if_short)
        demoted = planner.demoted(work, level, actions, self.rules)
        if demoted:
            log.warning("sleep %s: host pool short; discarding %s instead of offloading them", model.name,
                        ", ".join(demoted))
        plan = planner.sleep(view, level, work)
        if plan is None:
            return OperationResult(model.name, sleeping=True)  # already asleep: sleeping again is a no-op
        with self.reserved(plan):
            result = self.executor.run(plan, answer_within=answer_within)[model.name]
        self.weight_sets.settle(planner.weight_sets_of(region for region, _ in work))
        result.sleeping = True
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

    def wake(self, model_name: str, tags: list[str], evict: bool, caller: Peer) -> OperationResult:
        """Wakes the model's regions of `tags` (all without), evicting models `caller` may act on
        when `evict` allows and room is short."""
        started = time.perf_counter()
        model = self.registry.model(model_name)
        with model.lock:
            model.touch()
            view = model.view()
            plan = planner.wake(view, tags, evict)
            shared = planner.weight_sets_of(planner.asleep_regions(view, tags))
            with self.reserved(plan), self.weight_sets.awake(shared, caller) as restored_for_it:
                result = self.executor.run(plan, caller)[model.name]
            result.bytes_restored += restored_for_it
            result.sleeping = model.sleeping
        result.seconds = time.perf_counter() - started
        self.reporter.woke(model, tags, result)
        return result

    def make_room(self, model: Model, tags: list[str], caller: Peer) -> list[str]:
        """Evicts what a wake of the model's `tags` needs, without waking it (its controller will)."""
        with model.lock:
            targets = planner.asleep_regions(model.view(), tags)
            return self.executor.make_room(model, planner.needed_by_device(targets), f"wake {model.name}", True,
                                           caller)

    @contextlib.contextmanager
    def reserved(self, plan: Plan):
        """Holds the plan's quota reservations while the block runs."""
        with contextlib.ExitStack() as stack:
            for reserve in plan.reserve:
                what = plan.what if plan.what.endswith(reserve.model) else f"{plan.what}: sleep {reserve.model}"
                stack.enter_context(self.quotas.reserve(self.registry.model(reserve.model), reserve.kind,
                                                        reserve.bytes, what))
            yield

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
