"""Who may act on what.

Identity comes from the kernel: the handle socket reads each peer's pid, uid
and gid (SO_PEERCRED) and its supplementary groups (/proc/PID/status), and
hands it a token. Control requests carry that token, so the daemon knows the
caller's uid without trusting anything the caller says about itself.

A model belongs to the uid of its first rank. A uid may act only on its own
models; root and members of the admin group may act on all.
"""

import grp
import logging
from dataclasses import dataclass

import grpc

from .errors import SleepdError, denied

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int
    groups: frozenset[int]

    @classmethod
    def of_process(cls, pid: int, uid: int, gid: int) -> "Peer":
        return cls(pid, uid, gid, frozenset(_supplementary_groups(pid)) | {gid})

    def describe(self) -> str:
        return f"uid {self.uid} (pid {self.pid})"


def _supplementary_groups(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("Groups:"):
                    return [int(gid) for gid in line.split()[1:]]
    except OSError:  # the peer is gone already, or in another pid namespace
        pass
    return []


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

    def check(self, peer: Peer | None, owner_uid: int, what: str) -> None:
        """Raises PERMISSION_DENIED unless `peer` owns the model or is an admin."""
        if peer is None:
            raise SleepdError(grpc.StatusCode.UNAUTHENTICATED,
                              f"{what}: the request carries no credentials; connect through the handle socket "
                              "to prove who you are (sleepctl and SleepClient do)")
        if peer.uid != owner_uid and not self.is_admin(peer):
            raise denied(f"{what}: {peer.describe()} may not act on a model uid {owner_uid} owns; "
                         f"ask its owner, root, or a member of group {self.admin_group!r}")
