"""The requests on weight sets (weight_sets.py) as the edges hand them in: commit,
join, leave (the write step), list and drop; and what the daemon does to sets by
itself: waking a set before a joined engine maps it again, offloading one no
engine maps, keeping kept sets within their budget, and evicting them first
when a device needs room. Each takes the locks of operations.py's order (a
model's, then the set's), has the planner decide and the executor carry out.
"""

import contextlib
import logging
import time

from sleepd.common.sizes import format_size

from . import planner
from .auth import Authorizer, Peer
from .errors import Code, SleepdError, invalid, not_found, precondition
from .regions import Region, RegionState
from .registry import Registry
from .views import RegionView
from .weight_sets import WeightSet

log = logging.getLogger(__name__)

# How long eviction waits for a kept set's lock (a join or drop holds it) before it tries the next.
KEPT_LOCK_SECONDS = 0.5

MAX_KEY_BYTES = 4096
MAX_MANIFEST_BYTES = 1 << 20


class WeightSetOperations:
    def __init__(self, registry: Registry, executor, pool, authorizer: Authorizer, shared_with: dict[int, set[int]],
                 kept_budget: dict[int, int], checkpoint, metrics=None):
        self._registry = registry
        self._executor = executor
        self._pool = pool
        self._authorizer = authorizer
        # The operator's [weight_sets] shared_with: owner uid -> the other uids that may join its sets.
        self._shared_with = shared_with
        self._kept_budget = kept_budget  # device -> bytes that kept sets may hold there
        self._checkpoint = checkpoint
        self._metrics = metrics

    def may_join(self, peer: Peer, owner_uid: int) -> bool:
        return peer.uid == owner_uid or peer.uid in self._shared_with.get(owner_uid, set())

    # ---- an engine's requests ----

    def commit(self, session, model, region_ids: list[int], key: bytes, manifest: bytes) -> WeightSet:
        """The session's regions of `region_ids` become a weight set keyed `key`, which the session joins."""
        _check_key(key)
        if len(manifest) > MAX_MANIFEST_BYTES:
            raise invalid(f"a manifest of {len(manifest)} bytes is larger than the {MAX_MANIFEST_BYTES} allowed")
        if not region_ids or len(set(region_ids)) != len(region_ids):
            raise invalid("commit names no regions, or one region twice")
        self._check_backend()
        with model.lock:
            self._check_attached(session, "commit weights")
            regions = [self._registry.owned_region(session, region_id) for region_id in region_ids]
            for region in regions:
                if (region.shared or region.persist or region.state is not RegionState.MAPPED or region.backup
                        or not region.holds_memory):
                    raise precondition(f"region {region.id} ({region.tag}) cannot go into a weight set: only "
                                       "awake regions of the engine's own, not persistent, can")
            existing = self._registry.find_weight_set(key, session.device, lambda owner: owner == session.uid)
            if existing is not None:
                raise SleepdError(Code.ALREADY_EXISTS, f"{existing.name} has this key already; join it instead")
            weight_set = self._registry.commit(session, regions, key, manifest)
        self._checkpoint()
        log.info("%s committed %s: %d regions, %s", session.describe(), weight_set.name, len(regions),
                 format_size(weight_set.size))
        return weight_set

    def join(self, session, model, key: bytes) -> tuple[WeightSet, list[Region]] | None:
        """The session's new views of the newest set keyed `key` it may use on its device; None where there
        is none. A set whose memory is in the host pool comes back to the device first."""
        _check_key(key)
        self._check_backend()
        weight_set = self._registry.find_weight_set(key, session.device,
                                                    lambda owner: self.may_join(session.peer, owner))
        if weight_set is None:
            return None
        with model.lock, weight_set.lock:
            self._check_attached(session, "join weights")
            if not self._registry.knows(weight_set):  # dropped or evicted away while this waited
                return None
            self._bring_back(weight_set, session.peer)
            views = self._registry.join(session, weight_set)
            if self._metrics:
                self._metrics.weight_set_joins.inc()
        log.info("%s joined %s", session.describe(), weight_set.name)
        return weight_set, views

    def leave(self, session, model, set_id: str) -> list[Region]:
        """The write step: the session's views of the set get memory of their own, a copy of the set's, at
        the same ids; the set keeps its memory for the engines still joined, or as a kept set."""
        weight_set = self._registry.weight_set(set_id, lambda owner: self.may_join(session.peer, owner))
        with model.lock, weight_set.lock:
            self._check_attached(session, "leave weights")
            views = [v for v in list(weight_set.views.values()) if v.session is session]
            if not views:
                raise not_found(f"this engine has not joined {weight_set.name}")
            if any(view.state is not RegionState.MAPPED for view in views):
                raise precondition(f"{model.name} is asleep; wake it before it leaves {weight_set.name} (a "
                                   "level-2 sleep leaves it by itself)")
            self._executor.copy_into_own_memory(model, views, f"leave {weight_set.name}", session.peer)
            for view in views:
                self._registry.left(weight_set, view)
        self._checkpoint()
        log.info("%s left %s: its weights are its own", session.describe(), weight_set.name)
        self.keep_within_budget(weight_set.device)  # best effort: the leave has happened
        return views

    # ---- an operator's requests ----

    def drop(self, set_id: str, caller: Peer) -> WeightSet:
        weight_set = self._registry.weight_set(set_id, lambda owner: self._authorizer.sees(caller, owner))
        with weight_set.lock:
            if not self._registry.knows(weight_set):
                raise not_found(f"{weight_set.name} was dropped meanwhile")
            if not weight_set.kept:
                raise precondition(f"{weight_set.name} is joined by {_engines(weight_set)}; a set is dropped only "
                                   "once no engine has joined it")
            self._forget(weight_set)
        return weight_set

    def listed(self, caller: Peer) -> list[WeightSet]:
        return [s for s in self._registry.weight_sets() if self._authorizer.sees(caller, s.owner_uid)]

    # ---- what sleep, wake and eviction do to sets ----

    @contextlib.contextmanager
    def awake(self, set_ids, caller: Peer):
        """While the block runs (a wake of engines that joined them), the sets are on the device and stay there.
        Yields the bytes brought back from the host pool for it."""
        sets = [s for s in self._registry.weight_sets() if s.id in set_ids]
        with contextlib.ExitStack() as stack:
            restored = 0
            for weight_set in sets:
                stack.enter_context(weight_set.lock)
                restored += self._bring_back(weight_set, caller)
            yield restored

    def settle(self, set_ids) -> None:
        """After engines slept: each set none of its engines maps any longer goes to the host pool. One that
        does not fit stays on the device (nothing is lost). Best effort, and it never waits: the set's lock
        may be held by this very thread (a wake that evicted the sleeper) or by a join."""
        for weight_set in [s for s in self._registry.weight_sets() if s.id in set_ids]:
            if not weight_set.lock.acquire(blocking=False):
                log.info("%s stays where it is for now: another operation holds it", weight_set.name)
                continue
            try:
                if (self._registry.knows(weight_set) and weight_set.views and not weight_set.awake_views
                        and weight_set.on_device):
                    self._offload(weight_set, "no engine that joined it is awake")
            except Exception:  # the sleep happened; the set merely stays on the device
                log.exception("%s could not go to the host pool; it stays on the device", weight_set.name)
            finally:
                weight_set.lock.release()

    def keep_within_budget(self, device: int) -> None:
        """Kept sets over the device's kept budget leave the device, least recently used first."""
        budget = self._kept_budget.get(device)
        if budget is None:
            return
        for weight_set in self._kept_on(device):
            held = sum(s.size for s in self._kept_on(device))
            if held <= budget:
                return
            if weight_set.lock.acquire(timeout=KEPT_LOCK_SECONDS):
                try:
                    if self._still_kept(weight_set):  # a join may have taken it while this waited
                        self._evict(weight_set, f"kept sets hold {format_size(held)}, over their budget of "
                                                f"{format_size(budget)}")
                except Exception:  # best effort: what called this has happened already
                    log.exception("%s could not leave the device for the kept budget", weight_set.name)
                finally:
                    weight_set.lock.release()

    def evict_kept(self, device: int) -> str | None:
        """Room on `device`: the least recently used kept set there leaves it, to the host pool where it fits,
        else dropped. Returns its name, or None where none could."""
        return self._evict_first(self._kept_on(device))

    def evict_kept_of(self, uid: int) -> bool:
        """Room in `uid`'s device quota: as evict_kept, among that uid's kept sets on any device."""
        kept = [s for device in self._registry.backend.devices for s in self._kept_on(device.index)]
        return self._evict_first(sorted((s for s in kept if s.owner_uid == uid), key=lambda s: s.last_used)) is not None

    def _evict_first(self, candidates: list[WeightSet]) -> str | None:
        for weight_set in candidates:
            if not weight_set.lock.acquire(timeout=KEPT_LOCK_SECONDS):
                continue
            try:
                if self._still_kept(weight_set):
                    self._evict(weight_set, "room for an allocation or a wake")
                    return weight_set.name
            finally:
                weight_set.lock.release()
        return None

    def _still_kept(self, weight_set: WeightSet) -> bool:
        """Under its lock: still the registry's, joined by no engine, and on the device."""
        return self._registry.knows(weight_set) and weight_set.kept and weight_set.on_device

    def save_kept_for_restart(self, seconds: float) -> None:
        """A clean stop: kept sets that are only on the device go to the host pool, where the next daemon finds
        them (device memory dies with this one), the most recently used first. One whose turn comes after
        `seconds`, or that does not fit the pool, is lost; a copy begun in time is finished."""
        deadline = time.monotonic() + seconds
        kept = sorted((s for s in self._registry.weight_sets() if s.kept and s.on_device),
                      key=lambda s: s.last_used, reverse=True)
        for at, weight_set in enumerate(kept):
            if time.monotonic() >= deadline:
                log.warning("stopping: %d kept weight sets stay on the device and are lost, %s spent moving the "
                            "others to the host pool", len(kept) - at, f"{seconds:g} s")
                return
            if not weight_set.lock.acquire(timeout=KEPT_LOCK_SECONDS):
                continue
            try:
                if weight_set.kept and weight_set.on_device:
                    self._offload(weight_set, "the daemon is stopping; the next one has it")
            except SleepdError as error:  # rolled back: it stays on the device; the others may still go
                log.warning("%s could not go to the host pool as the daemon stops: %s", weight_set.name,
                            error.message)
            finally:
                weight_set.lock.release()

    # ---- how ----

    @staticmethod
    def _check_attached(session, what: str) -> None:
        """Under the model's lock: the session is a live rank that has handed back what it maps after a
        restart (until then its regions' memory is not the daemon's to share), and has not ended."""
        if session.ended is not None or session.returning:
            raise precondition(f"{what}: {session.describe()} is "
                               f"{'gone' if session.ended else 'still handing its memory back after a restart'}")

    def _check_backend(self) -> None:
        backend = self._registry.backend
        if backend.native.shares_tokens:
            raise precondition(f"{backend.name} shares memory by tokens, each for one process: weight sets, which "
                               "several engines map, need a backend that shares descriptors (host, cuda)")

    def _kept_on(self, device: int) -> list[WeightSet]:
        return sorted((s for s in self._registry.weight_sets() if s.kept and s.device == device and s.on_device),
                      key=lambda s: s.last_used)

    def _bring_back(self, weight_set: WeightSet, caller: Peer) -> int:
        """The set's memory on the device again (the caller holds its lock); returns the bytes restored."""
        regions = _snapshot(weight_set)
        if all(region.holds_memory for region in regions):
            return 0
        results = self._executor.run(planner.wake_weight_set(weight_set.name, regions), caller)
        return results[weight_set.name].bytes_restored

    def _offload(self, weight_set: WeightSet, why: str) -> bool:
        """To the host pool (the caller holds its lock); False where the pool has no room."""
        if weight_set.size > self._pool.available:
            log.warning("%s stays on the device (%s): the host pool has %s free, it needs %s", weight_set.name, why,
                        format_size(self._pool.available), format_size(weight_set.size))
            return False
        self._executor.run(planner.offload_weight_set(weight_set.name, _snapshot(weight_set)))
        log.info("%s went to the host pool: %s", weight_set.name, why)
        return True

    def _evict(self, weight_set: WeightSet, why: str) -> None:
        if not self._offload(weight_set, why):
            log.warning("%s dropped: %s, and the host pool has no room for it", weight_set.name, why)
            self._forget(weight_set)
        if self._metrics:
            self._metrics.weight_set_evictions.inc()

    def _forget(self, weight_set: WeightSet) -> None:
        self._executor.run(planner.drop_weight_set(weight_set.name, _snapshot(weight_set)))
        self._registry.forget_weight_set(weight_set)
        self._checkpoint()
        log.info("%s dropped", weight_set.name)


def _check_key(key: bytes) -> None:
    if not key or len(key) > MAX_KEY_BYTES:
        raise invalid(f"a weight set's key must be 1 to {MAX_KEY_BYTES} bytes, got {len(key)}")


def _engines(weight_set: WeightSet) -> str:
    return ", ".join(session.describe() for session in weight_set.sessions())


def _snapshot(weight_set: WeightSet) -> list[RegionView]:
    return [RegionView.of(r) for r in weight_set.regions.values()]
