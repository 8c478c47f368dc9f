"""Who and what the daemon knows: sessions, models and regions, their lookups
and consistent snapshots, and which session becomes which model's rank.

Its lock (the registry lock) is the innermost of the daemon's locks (see
operations.py), held only to read or change the maps here; it never waits on
an engine, a copy or another lock.
"""

import logging
import os
import threading
import time
from typing import Callable

from sleepd.common.limits import MODEL_NAME, MODEL_NAME_RULE, TAG_NAME, TAG_NAME_RULE
from sleepd.common.shown import shown

from .auth import Authorizer, Peer
from .backends import DaemonBackend
from .errors import Code, SleepdError, denied, invalid, not_found, precondition
from .model import Model
from .regions import Region, bug
from .sessions import Session
from .views import ModelView, Policy
from .weight_sets import WeightSet

log = logging.getLogger(__name__)


class Registry:
    def __init__(self, backend: DaemonBackend, authorizer: Authorizer, default_policies: dict[str, dict],
                 forgotten: Callable[[Model], None] = lambda model: None):
        self.backend = backend
        self.authorizer = authorizer
        self.lock = threading.Lock()
        self._by_token: dict[str, Session] = {}          # every live session, attached or not
        self._sessions: dict[str, Session] = {}          # by session id, once attached
        self._models: dict[str, Model] = {}
        self._regions: dict[int, Region] = {}
        self._weight_sets: dict[str, WeightSet] = {}
        self.next_region_id = 1
        # Per-model policy from the configuration, applied when the model first attaches.
        self._default_policies = default_policies
        # Told, under the registry lock, of each model forgotten (metrics drop its series): it takes no other lock.
        self._forgotten = forgotten

    # ---- sessions and ranks ----

    def open_session(self, peer: Peer) -> Session:
        session = Session(peer)
        with self.lock:
            self._by_token[session.token] = session
        return session

    def rank_of(self, token: str, model_name: str) -> Session | None:
        """The live rank of `model_name` that holds `token`, or None: a request from the model's own engine."""
        with self.lock:
            session = self._by_token.get(token)
        return session if session is not None and session.model == model_name and session.ended is None else None

    def take_controller(self, model_name: str, controller) -> Model:
        """`controller` becomes the model's; one at a time."""
        with self.lock:
            model = self._models.get(model_name)
            if model is None:
                raise not_found(f"model {model_name!r} is not attached; its ranks attach first")
            if model.controller is not None:
                raise SleepdError(Code.ALREADY_EXISTS, f"{model_name} already has a controller "
                                  f"(pid {model.controller.pid}); a model has one at a time")
            model.take_controller(controller)
        return model

    def drop_controller(self, controller) -> None:
        with self.lock:
            model = self._models.get(controller.model)
            if model is not None:
                model.drop_controller(controller)

    def caller(self, token: str) -> Peer | None:
        """The peer a control request's token stands for, or None."""
        with self.lock:
            session = self._by_token.get(token)
        return session.peer if session else None

    def attach(self, token: str, model_name: str, rank: int, ordinal: int, uuid: str = "",
               needs_controller: bool = False,
               may_own: Callable[[Peer, int, str], None] = lambda peer, owned, name: None) -> Session:
        """Makes the session holding `token` a rank of `model_name`, taking over what an earlier
        process of that rank left behind. A new model is first offered to `may_own` (peer, how
        many models its uid owns, the name), which raises to refuse it."""
        check_model_name(model_name)
        device = self._device_index(ordinal, uuid)
        with self.lock:
            session = self._by_token.get(token)
            if session is None or session.attached:
                raise denied("unknown session token; connect to the fd socket first")
            if session.ended is not None:  # its end runs (or a stopping daemon keeps it for the state file)
                raise precondition(f"attach {model_name} rank {rank}: the session of pid {session.pid} has ended "
                                   f"({session.ended}); connect to the fd socket again")
            model = self._models.get(model_name)
            if model is None:
                may_own(session.peer, sum(m.owner_uid == session.uid for m in self._models.values()), model_name)
                model = Model(model_name, owner_uid=session.uid,
                              policy=self._configured_policy(model_name, session.peer))
            if model.owner_uid != session.uid:  # admins included: one model, one tenant
                whose = f"uid {model.owner_uid}" if self.authorizer.is_admin(session.peer) else "another user"
                raise denied(f"attach to {model_name}: the model belongs to {whose}, and ranks of different uids "
                             "never share a model; choose another name")
            holder = model.ranks.get(rank)
            if holder is not None:
                raise SleepdError(Code.ALREADY_EXISTS,
                                  f"{model_name} rank {rank} is already attached (pid {holder.pid})")
            orphan = model.orphans.get(rank)
            if orphan is not None and orphan.device != device:
                raise invalid(f"{model_name} rank {rank} left persistent regions on "
                              f"{self.backend.devices[orphan.device].name}; attach it there")
            session.attach(model_name, rank, device, orphan, needs_controller)
            model.add_rank(session)
            model.touch()
            self._models[model_name] = model
            self._sessions[session.id] = session
        log.info("attached %s on %s%s%s", session.describe(), self.backend.devices[device].name,
                 f" (its device {ordinal})" if ordinal != device else "",
                 " (handing back its memory after a daemon restart)" if session.returning else "")
        return session

    def _configured_policy(self, model_name: str, claimant: Peer) -> Policy:
        """The operator's [models.NAME] policy, for the model's first rank: only when the
        claimant is the owner the operator named, or, where none is named, an admin. A
        policy is no prize for whoever claims a name first."""
        configured = dict(self._default_policies.get(model_name, {}))
        owner = configured.pop("owner", None)
        if owner is None and self.authorizer.is_admin(claimant):
            return Policy(**configured)
        if owner is not None and owner == claimant.uid:
            return Policy(**configured)
        if configured:
            log.warning("%s claimed by uid %d: the configured policy of [models.%s] does not apply (its owner is "
                        "%s)", model_name, claimant.uid, model_name, f"uid {owner}" if owner is not None else
                        "not set, so only an admin gets it")
        return Policy()

    def _device_index(self, ordinal: int, uuid: str) -> int:
        """The daemon's index of an engine's device: found by GPU UUID where both
        know one, since an engine's ordinals are its own (CUDA_VISIBLE_DEVICES,
        containers); else the engine's ordinal is the daemon's (host backend)."""
        devices = self.backend.devices
        by_uuid = {d.uuid: d.index for d in devices if d.uuid}
        if uuid and by_uuid:
            if uuid not in by_uuid:
                raise precondition(f"this process's device {ordinal} is GPU {shown(uuid)}, which this daemon does not "
                                   f"manage (it has {', '.join(f'{d.name} {d.uuid}' for d in devices)}); "
                                   "give the daemon that GPU, or attach to the daemon that has it")
            return by_uuid[uuid]
        if ordinal >= len(devices):
            raise invalid(f"device {ordinal} does not exist; this daemon has {len(devices)} "
                          f"({', '.join(d.name for d in devices)})")
        return ordinal

    def forget_session(self, session: Session) -> Model | None:
        """The session's connections are gone: it is no longer found by token or id.
        Returns its model, if it was a rank of one."""
        with self.lock:
            self._by_token.pop(session.token, None)
            self._sessions.pop(session.id, None)
            return self._models.get(session.model) if session.attached else None

    def remove_rank(self, model: Model, session: Session, kept: dict) -> None:
        """An ended rank leaves its model; with persistent regions `kept`, it stays an orphan.
        A model with neither ranks nor orphans is forgotten."""
        with self.lock:
            model.remove_rank(session, kept)
            self._forget_if_empty(model)

    def claim_orphan(self, model: Model, rank: int, session: Session) -> bool:
        """Takes `session` out of the model's orphans, if an attach has not taken it over first:
        then the caller alone decides what becomes of it (give_back_orphan)."""
        with self.lock:
            return model.claim_orphan(rank, session)

    def give_back_orphan(self, model: Model, session: Session) -> bool:
        """A claimed orphan that still holds regions becomes the model's orphan again, unless a new
        process has attached as its rank meanwhile (False: the caller drops what it holds). A
        model left with neither ranks nor orphans is forgotten."""
        with self.lock:
            returned = bool(session.regions) and session.rank not in model.ranks
            if returned:
                model.add_orphan(session)
            self._forget_if_empty(model)
            return returned

    def _forget_if_empty(self, model: Model) -> None:
        if not model.ranks and not model.orphans and self._models.get(model.name) is model:
            del self._models[model.name]
            self._forgotten(model)
            if model.controller is not None:  # nothing left to control: its lease ends
                model.controller.end(f"model {model.name} has no ranks left")

    def add_recovered(self, model: Model) -> None:
        with self.lock:
            self._models[model.name] = model
            for region in model.regions():
                self._regions[region.id] = region

    # ---- regions ----

    def new_region_id(self) -> int:
        with self.lock:
            return self._next_region_id()

    def _next_region_id(self) -> int:
        region_id = self.next_region_id
        self.next_region_id += 1
        return region_id

    def add_region(self, region: Region) -> None:
        with self.lock:
            self._regions[region.id] = region
            region.session.add_region(region)

    def remove_region(self, region: Region) -> None:
        with self.lock:
            self._regions.pop(region.id, None)
            region.session.remove_region(region)
            if region.shared:
                region.shares.session.view_gone(region)

    # ---- weight sets ----

    def commit(self, session: Session, regions: list[Region], key: bytes, manifest: bytes) -> WeightSet:
        """`regions` (the session's, checked by the caller under the model's lock) become a new
        weight set's memory, and the session's views of it."""
        with self.lock:
            weight_set = WeightSet(key, manifest, session.uid, session.device)
            for view in regions:
                shared = Region.committed(self._next_region_id(), view, weight_set, view.handle)
                view.share(shared)
                weight_set.add_region(shared)
                self._regions[shared.id] = shared
            weight_set.joined(regions)
            self._weight_sets[weight_set.id] = weight_set
        return weight_set

    def join(self, session: Session, weight_set: WeightSet) -> list[Region]:
        """New views of every region of the set, for `session`; the set's memory is on the device."""
        with self.lock:
            views = [Region.view_of(self._next_region_id(), shared, session)
                     for shared in weight_set.regions.values()]
            for view in views:
                self._regions[view.id] = view
                session.add_region(view)
            weight_set.joined(views)
        return views

    def left(self, weight_set: WeightSet, view: Region) -> None:
        """`view` no longer shares the set's memory (a transition on the view did it)."""
        with self.lock:
            weight_set.view_gone(view)

    def find_weight_set(self, key: bytes, device: int, may_use: Callable[[int], bool]) -> WeightSet | None:
        """The newest set committed with `key` on `device` that `may_use(owner_uid)` allows."""
        with self.lock:
            found = [s for s in self._weight_sets.values() if s.key == key and s.device == device
                     and may_use(s.owner_uid)]
        return max(found, key=lambda s: s.last_used, default=None)

    def weight_set(self, set_id: str, visible: Callable[[int], bool]) -> WeightSet:
        with self.lock:
            weight_set = self._weight_sets.get(set_id)
        if weight_set is None or not visible(weight_set.owner_uid):
            raise not_found(f"no weight set {shown(set_id)!r} that you may see; `sleepctl sets` lists them")
        return weight_set

    def weight_sets(self) -> list[WeightSet]:
        with self.lock:
            return self.weight_sets_locked()

    def weight_sets_locked(self) -> list[WeightSet]:
        """The weight sets, by id, for a caller that holds the registry lock."""
        return sorted(self._weight_sets.values(), key=lambda s: s.id)

    def add_recovered_weight_set(self, weight_set: WeightSet) -> None:
        """A kept set from the state file of the daemon before a restart."""
        with self.lock:
            self._weight_sets[weight_set.id] = weight_set
            for region in weight_set.regions.values():
                self._regions[region.id] = region

    def knows(self, weight_set: WeightSet) -> bool:
        """Whether the set is still the registry's: one dropped while a request waited for its lock is not."""
        with self.lock:
            return self._weight_sets.get(weight_set.id) is weight_set

    def forget_weight_set(self, weight_set: WeightSet) -> None:
        """A kept set whose memory is gone leaves the registry."""
        with self.lock:
            if weight_set.views or any(r.holds_memory or r.backup for r in weight_set.regions.values()):
                bug(f"{weight_set.name}: forgotten while joined or holding memory")
            for region in weight_set.regions.values():
                self._regions.pop(region.id, None)
            self._weight_sets.pop(weight_set.id, None)

    def regions(self, ids) -> list[Region]:
        """The regions of `ids`, in that order; one gone meanwhile (its rank ended) is skipped."""
        with self.lock:
            return [self._regions[region_id] for region_id in ids if region_id in self._regions]

    def owned_region(self, session: Session, region_id: int) -> Region:
        """The region, if it exists and belongs to `session`."""
        with self.lock:
            return self._owned_region(session, region_id)

    def export(self, session: Session, region_id: int) -> tuple[int, Region]:
        """A new descriptor for a region's memory, for the session that owns it; for a view, the
        weight set's memory, read-only where the backend can say so in the descriptor."""
        with self.lock:
            region = self._owned_region(session, region_id)
            memory = region.shares or region
            if not memory.holds_memory:
                raise precondition(f"region {region_id} is {region.state.label}; wake the model first")
            fd = self.backend.native.export_handle(memory.handle)
            return (read_only(fd) if region.shared and self.backend.name == "host" else fd), region

    def export_token(self, session: Session, region_id: int, device_pid: int) -> tuple[int, Region]:
        """A region's token (token backends), once the process the runtime knows as
        `device_pid` is on its allow-list, for the session that owns it."""
        with self.lock:
            region = self._owned_region(session, region_id)
            if not region.holds_memory:  # a view holds none: token backends share no weight sets
                raise precondition(f"region {region_id} is {region.state.label}; wake the model first")
            self.backend.native.authorize(region.handle, device_pid)
            return self.backend.native.export_token(region.handle), region

    def _owned_region(self, session: Session, region_id: int) -> Region:
        """Another session's region is as missing as one that does not exist: region ids are
        handed out in order, so telling them apart would show other users' models to anyone counting."""
        region = self._regions.get(region_id)
        if region is None or region.session is not session:
            raise not_found(f"this session has no region {region_id}; it may fetch or free only its own")
        return region

    # ---- lookups ----

    def session(self, session_id: str) -> Session:
        with self.lock:
            session = self._sessions.get(session_id)
        if session is None:
            raise not_found("unknown session; attach first")
        return session

    def model(self, name: str, visible=None) -> Model:
        """The model called `name`. Given `visible(owner_uid)`, the caller's view: a model it does not
        allow is NOT_FOUND in the very words a missing one gets, and NOT_FOUND names the models it
        allows. Without it, every model is found, and NOT_FOUND names none."""
        with self.lock:
            model = self._models.get(name)
            known = sorted(m.name for m in self._models.values() if visible is not None and visible(m.owner_uid))
        if model is None or (visible is not None and not visible(model.owner_uid)):
            raise not_found(f"model {name!r} is not attached (attached: {', '.join(known) or 'none you may see'})")
        return model

    def holder(self, name: str) -> Model | WeightSet:
        """What a plan's steps name: a model, or a weight set (its name has a space, which no model's may)."""
        with self.lock:
            found = self._models.get(name) or next((s for s in self._weight_sets.values() if s.name == name), None)
        if found is None:
            raise not_found(f"{shown(name)} is gone")
        return found

    def find(self, name: str) -> Model | None:
        with self.lock:
            return self._models.get(name)

    def models(self) -> list[Model]:
        with self.lock:
            return self.models_locked()

    def models_locked(self) -> list[Model]:
        """The models, for a caller that holds the registry lock."""
        return list(self._models.values())

    def session_count(self) -> int:
        with self.lock:
            return len(self._sessions)

    def regions_on(self, device: int) -> list[Region]:
        """The regions whose memory is on `device`, or is to come back there: views, which hold none, left out."""
        with self.lock:
            return [region for region in self._regions.values() if region.device == device and not region.shared]

    def holders(self, device: int) -> dict[tuple[str, int], int]:
        """{(model, its owner's uid): device bytes it holds on `device`}."""
        held: dict[tuple[str, int], int] = {}
        for region in self.regions_on(device):
            if region.holds_memory:
                key = (region.model, region.session.uid)
                held[key] = held.get(key, 0) + region.mapped_size
        return held

    def usage(self, uid: int) -> dict[str, int]:
        """What the models `uid` owns hold: {"device": bytes of device memory, "host_pool": bytes of backups}."""
        with self.lock:
            regions = [r for model in self._models.values() if model.owner_uid == uid for r in model.regions()]
            regions += [r for s in self._weight_sets.values() if s.owner_uid == uid for r in s.regions.values()]
        return {"device": sum(r.mapped_size for r in regions if r.holds_memory),
                "host_pool": sum(r.backup.size for r in regions if r.backup is not None)}

    def region_count(self, uid: int) -> int:
        """How many regions the models `uid` owns hold."""
        with self.lock:
            return sum(len(session.regions) for model in self._models.values() if model.owner_uid == uid
                       for session in model.sessions())

    def snapshot(self) -> list[ModelView]:
        """A consistent copy of every model, for status and metrics."""
        now = time.monotonic()
        with self.lock:
            return [model.view(now) for model in sorted(self._models.values(), key=lambda model: model.name)]

    def view(self, model: Model) -> ModelView:
        """A consistent copy of one model, read without its lock."""
        with self.lock:
            return model.view()

def read_only(fd: int) -> int:
    """A descriptor of the same memory open for reading only, in place of `fd`: whoever
    receives it can map it PROT_READ and never for writing (the kernel refuses, EACCES)."""
    try:
        return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(fd)


def check_model_name(name: str) -> None:
    if not MODEL_NAME.match(name):
        raise invalid(f"model name '{shown(name)}' is not valid; use {MODEL_NAME_RULE}")


def check_tag(tag: str) -> None:
    if not TAG_NAME.match(tag):
        raise invalid(f"tag '{shown(tag)}' is not valid; use {TAG_NAME_RULE}")
