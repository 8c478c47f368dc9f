"""Who may act on what.

Identity comes from the kernel: the fd socket reads each peer's pid, uid
and gid (SO_PEERCRED) and its supplementary groups (/proc/PID/status), and
hands it a token. Control requests carry that token, so the daemon knows the
caller's uid without trusting anything the caller says about itself.

A model belongs to the uid of its first rank. A uid may act only on its own
models; root and members of the admin group may act on all. RIGHTS says which
right each request needs; Authorizer.require checks what it can before a lookup,
and a lookup (Registry.model with Authorizer.sees) answers a model its caller may
not see as it answers one that does not exist: NOT_FOUND, in the same words, so
that no one learns who uses which name. Only attaching to a taken name tells
that it is taken (registry.py), without saying whose it is.
"""

import errno
import grp
import logging
import socket
import struct
from dataclasses import dataclass
from enum import Enum

from .errors import Code, SleepdError, denied

log = logging.getLogger(__name__)


class Right(Enum):
    SESSION = "session"  # holds the session id the request names: an engine acting on its own regions
    ANYONE = "anyone"    # any local process
    OWNER = "owner"      # owns every model the request names, or is an admin (see is_admin)


RIGHTS = {
    "Allocate": Right.SESSION, "Free": Right.SESSION, "Touch": Right.SESSION,
    "Sleep": Right.OWNER, "Wake": Right.OWNER, "Swap": Right.OWNER, "SetPolicy": Right.OWNER,
    "EnsureAwake": Right.OWNER, "Control": Right.OWNER,
    "Status": Right.ANYONE, "Events": Right.ANYONE,
    "CommitWeights": Right.SESSION, "JoinWeights": Right.SESSION, "LeaveWeights": Right.SESSION,
    "ListWeightSets": Right.ANYONE, "DropWeightSet": Right.ANYONE,  # a set the caller may not see is not found
}


def _admin_only_policy(changes: dict) -> list[str]:
    """The policy settings among `changes` that decide over other users' models: priority and
    pinning order everyone's evictions; eviction level 0 makes a model unevictable."""
    named = {"priority": "priority", "pinned": "pinning"}
    found = [named[field] for field in named if changes.get(field) is not None]
    if changes.get("eviction_level") == 0:
        found.append("eviction level 0")
    return found


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int
    groups: frozenset[int]

    @classmethod
    def of_connection(cls, conn: socket.socket) -> "Peer":
        """The process at the other end of a Unix socket, as the kernel recorded it when it
        connected: pid, uid, gid (SO_PEERCRED) and supplementary groups (SO_PEERGROUPS). Read
        from the connection, never from /proc by pid, which a reused pid could answer for."""
        pid, uid, gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                            struct.calcsize("3i")))
        return cls(pid, uid, gid, frozenset(_peer_groups(conn)) | {gid})

    def describe(self) -> str:
        return f"uid {self.uid} (pid {self.pid})"


# The daemon acting on its own behalf (idle sleep): it may act on and see every model.
DAEMON = Peer(pid=0, uid=0, gid=0, groups=frozenset())


SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux 4.13; Python names it only on some builds


def _peer_groups(conn: socket.socket) -> tuple[int, ...]:
    size = 64
    while True:
        try:
            data = conn.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, size * 4)
        except OSError as error:
            if error.errno != errno.ERANGE or size >= 65536:
                raise
            size *= 16  # the kernel says the buffer was short: a peer in many groups
            continue
        return struct.unpack(f"{len(data) // 4}I", data)


class Authorizer:
    def __init__(self, admin_group: str):
        self.admin_group = admin_group
        try:
            self.admin_gid: int | None = grp.getgrnam(admin_group).gr_gid
        except KeyError:
            self.admin_gid = None
            log.info("admin group %r does not exist; only root may act on every model", admin_group)

    def is_admin(self, peer: Peer) -> bool:
        return peer.uid == 0 or (self.admin_gid is not None and self.admin_gid in peer.groups)

    def sees(self, viewer: Peer | None, owner_uid: int) -> bool:
        """Whether `viewer` may see a model of `owner_uid` at all: in status, events and refusals."""
        return viewer is not None and (viewer.uid == owner_uid or self.is_admin(viewer))

    def require(self, peer: Peer | None, operation: str, models: list[str], policy_changes=None) -> None:
        """Refuses `operation` on `models` unless `peer` has the right RIGHTS gives it, as far
        as it can be told before the models are looked up: credentials first, so that no
        answer to a caller without them depends on which models exist. `policy_changes`
        are the policy settings a SetPolicy request changes ({field: value}). Whether the
        peer owns the models is the lookup's to say (sees): another uid's model is as
        missing to it as one that does not exist."""
        if RIGHTS[operation] in (Right.SESSION, Right.ANYONE):
            return
        if peer is None:
            raise SleepdError(Code.UNAUTHENTICATED,
                              f"{_VERBS.get(operation, operation)} {', '.join(models)}: the request carries no "
                              "credentials; connect through the fd socket to prove who you are (sleepctl and "
                              "SleepClient do)")
        admin_only = _admin_only_policy(policy_changes or {})
        if admin_only and not self.is_admin(peer):
            what = " and ".join(admin_only) + f" of {', '.join(models)} decide over other users' models"
            raise denied(f"{what}; only root or group {self.admin_group!r} may set them")


# How a refusal names each operation ("sleep qwen: ...").
_VERBS = {"Sleep": "sleep", "Wake": "wake", "Swap": "swap", "SetPolicy": "set the policy of",
          "EnsureAwake": "ensure awake", "Control": "become the controller of"}
