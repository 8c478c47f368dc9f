"""Per-uid quotas: how much device memory and host-pool space one uid's models may
hold together, and how many models it may own and regions they may hold (its
caps), configured per user or group with a default ([quotas] in the
configuration). A request past a quota or cap is refused RESOURCE_EXHAUSTED, naming it.
Every request that charges a byte quota reserves its bytes first (Quotas.reserve), so
concurrent requests of one uid are counted together.

A uid's quota of each kind is its user entry's, else the largest of its groups'
entries, else the default; admins (root and the admin group) have no default
quota, only what an entry of their own or of their groups sets.
"""

import contextlib
import threading
from collections import Counter
from dataclasses import dataclass

from sleepd.common.sizes import format_size

from .auth import Authorizer, Peer
from .errors import exhausted
from .model import Model
from .registry import Registry

KINDS = {"device": "device memory", "host_pool": "host pool"}


@dataclass(frozen=True)
class Limit:
    bytes: int   # for the caps (models, regions): a count
    source: str  # the configuration table it comes from


class Quotas:
    def __init__(self, configured: dict, registry: Registry, authorizer: Authorizer):
        self._configured = configured or {"default": {}, "users": {}, "groups": {}}
        self._registry = registry
        self._authorizer = authorizer
        self._lock = threading.Lock()  # taken before the registry lock, never while waiting on anything else
        self._reserved: Counter[tuple[int, str]] = Counter()  # (uid, kind) -> bytes of requests under way
        # evict_kept_of(uid) -> whether one of the uid's kept weight sets left the device (operations.py sets it):
        # what a uid's sets keep yields before that uid's own request is refused.
        self.evict_kept_of = lambda uid: False

    def limit(self, owner: Peer, kind: str) -> Limit | None:
        users, groups = self._configured["users"], self._configured["groups"]
        if kind in users.get(owner.uid, {}):
            return Limit(users[owner.uid][kind], f"[quotas.users.{owner.uid}]")
        by_group = [(limits[kind], gid) for gid, limits in groups.items() if gid in owner.groups and kind in limits]
        if by_group:
            size, gid = max(by_group)
            return Limit(size, f"[quotas.groups.{gid}]")
        if kind in self._configured["default"] and not self._authorizer.is_admin(owner):
            return Limit(self._configured["default"][kind], "[quotas.default]")
        return None

    @contextlib.contextmanager
    def reserve(self, model: Model, kind: str, extra: int, what: str):
        """Checks `extra` more bytes of `kind` for `model` against its owner's quota and holds
        them for the uid until the block ends, by when they are counted as held (or were never
        taken). Check and charge are one step for the whole uid, so two requests of one uid
        cannot both pass a check that only one of them fits; a request that fails returns its
        bytes as it leaves. While a request is under way its bytes may count twice (reserved
        and held), which can refuse a concurrent request at the quota's edge, never admit one past it."""
        owner = _owner(model)
        limit = self.limit(owner, kind)
        if limit is None or not extra:
            yield
            return
        key = (owner.uid, kind)
        while True:
            with self._lock:
                held, pending = self._registry.usage(owner.uid)[kind], self._reserved[key]
                if held + pending + extra <= limit.bytes:
                    self._reserved[key] += extra
                    break
            if kind != "device" or not self.evict_kept_of(owner.uid):
                in_flight = f" (and {format_size(pending)} more is being taken)" if pending else ""
                raise exhausted(f"{what}: uid {owner.uid}'s {KINDS[kind]} quota is {format_size(limit.bytes)} "
                                f"({limit.source}); its models hold {format_size(held)}{in_flight} and this needs "
                                f"{format_size(extra)} more; free some, or put a model to sleep")
        try:
            yield
        finally:
            with self._lock:
                self._reserved[key] -= extra

    def check_model_cap(self, owner: Peer, owned: int, name: str) -> None:
        """Refuses `owner` a new model `name` past its cap; `owned`: how many it owns now."""
        cap = self.limit(owner, "models")
        if cap is not None and owned >= cap.bytes:
            raise exhausted(f"attach {name}: uid {owner.uid} may own {cap.bytes} models ({cap.source} models) "
                            f"and owns {owned}; detach one of them first, or ask the operator to raise the cap")

    def check_region_cap(self, model: Model, what: str) -> None:
        """Refuses one more region for `model` past its owner's cap."""
        owner = _owner(model)
        cap = self.limit(owner, "regions")
        if cap is None:
            return
        held = self._registry.region_count(owner.uid)
        if held >= cap.bytes:
            raise exhausted(f"{what}: uid {owner.uid}'s models may hold {cap.bytes} regions ({cap.source} regions) "
                            f"and hold {held}; free some, or allocate fewer, larger regions")


def _owner(model: Model) -> Peer:
    """Who the model's quota is counted for: its owner, with the groups a live rank of it has."""
    for session in model.ranks.values():
        return session.peer
    return Peer(pid=0, uid=model.owner_uid, gid=-1, groups=frozenset())
