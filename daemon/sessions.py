"""A rank's life: an engine process's session, from the fd socket's
connection to its end, and the transitions that are the only code changing it.

A session begins when the process connects to the fd socket (where the
kernel tells us its pid and uid), becomes a rank of a model when its gRPC stream
attaches, and ends when either connection breaks: the two connections are its
lease, and its condition follows from them and from what the engine said.

    condition     how it comes about
    connected     fd socket open, no stream attached yet
    attached      a rank of a model
    handing_back  attached after a daemon restart, handing back the memory it maps
    recovering    a placeholder from the state file: the rank's engine has not come back
    detached      ended after the engine said goodbye
    lost          ended otherwise (a crash, a broken connection, a timeout)

A rank whose session ended with persistent regions stays in its model as an
orphan until a process of the same rank attaches and takes them over. Which
regions a rank owns changes only here too (`attach`, `keep_only`, `add_region`,
`remove_region`).
"""

import queue
import secrets
import threading
from concurrent.futures import Future
from enum import Enum

from sleepd.proto import sleepd_pb2 as pb

from .regions import bug
from .replies import Replies


class RankLost(Exception):
    """The engine process went away while the daemon waited for it."""


class Condition(Enum):
    CONNECTED = "connected"
    ATTACHED = "attached"
    HANDING_BACK = "handing_back"
    RECOVERING = "recovering"
    DETACHED = "detached"
    LOST = "lost"


class Session:
    def __init__(self, peer):
        self.peer = peer                    # who the kernel says is at the other end (auth.Peer)
        self.pid, self.uid = peer.pid, peer.uid
        self.token = secrets.token_hex(16)  # proves the stream and the fd socket are one process
        self.id = secrets.token_hex(16)     # names the session in region requests
        self.model: str | None = None
        self.rank: int | None = None
        self.device: int | None = None
        self.needs_controller = False       # its engine runs its own sleep (see controllers.py)
        self.regions: dict = {}             # region id -> Region, guarded by the model's lock
        self.outbox: "queue.Queue[pb.DaemonCommand | None]" = queue.Queue()
        self._replies = Replies()
        self._lock = threading.Lock()
        # The facts the condition follows from, each written by one transition below.
        self.ended: str | None = None       # why the session ended, once it has
        self._goodbye = False
        self._placeholder = False           # rebuilt from the state file, waiting for its engine
        self._handing_back = False

    @classmethod
    def recovered(cls, peer, model: str, rank: int, device: int) -> "Session":
        """A rank the state file names, waiting for its engine to attach again."""
        session = cls(peer)
        session.model, session.rank, session.device = model, rank, device
        session.ended = "its engine has not attached since the daemon restarted"
        session._replies.fail_all(RankLost, f"{session.describe()} is gone: {session.ended}")
        session.outbox.put(None)
        session._placeholder = True
        return session

    @property
    def condition(self) -> Condition:
        if self._placeholder:
            return Condition.RECOVERING
        if self.ended is not None:
            return Condition.DETACHED if self._goodbye else Condition.LOST
        if self.model is None:
            return Condition.CONNECTED
        return Condition.HANDING_BACK if self._handing_back else Condition.ATTACHED

    @property
    def attached(self) -> bool:
        return self.model is not None

    @property
    def returning(self) -> bool:
        """Still coming back from a daemon restart: recovering or handing back."""
        return self.condition in (Condition.RECOVERING, Condition.HANDING_BACK)

    def describe(self) -> str:
        return f"{self.model} rank {self.rank} (pid {self.pid})"

    # ---- transitions ----

    def attach(self, model: str, rank: int, device: int, orphan: "Session | None",
               needs_controller: bool = False) -> None:
        """Becomes `model`'s rank on `device`, taking over the regions an earlier process of
        the rank left (`orphan`); after a daemon restart it must hand their memory back."""
        if self.condition is not Condition.CONNECTED:
            bug(f"session of pid {self.pid}: attach while {self.condition.value}")
        self.model, self.rank, self.device = model, rank, device
        self.needs_controller = needs_controller
        if orphan is not None:
            for region in orphan.regions.values():
                region.session = self
            self.regions, orphan.regions = orphan.regions, {}
            self._handing_back = orphan._placeholder

    def say_goodbye(self) -> None:
        """The engine detaches on purpose; its lease ends with its connections."""
        self._goodbye = True

    def handed_back(self) -> None:
        """After a daemon restart: the engine has handed back all the memory it maps."""
        if self.condition is not Condition.HANDING_BACK:
            bug(f"{self.describe()}: hand-back finished while {self.condition.value}")
        self._handing_back = False

    def stop_waiting(self) -> None:
        """A placeholder's engine did not come back in time: an orphan like any other."""
        if self.condition is not Condition.RECOVERING:
            bug(f"{self.describe()}: stop waiting while {self.condition.value}")
        self._placeholder = False

    def keep_only(self, regions: dict) -> None:
        """An ending rank keeps its persistent regions as an orphan."""
        self.regions = regions

    def add_region(self, region) -> None:
        if region.session is not self or region.id in self.regions:
            bug(f"{self.describe()}: region {region.id} added twice or to the wrong rank")
        self.regions[region.id] = region

    def remove_region(self, region) -> None:
        self.regions.pop(region.id, None)

    def end(self, reason: str) -> bool:
        """Marks the session ended and fails everything waiting on it; True the first time."""
        with self._lock:
            if self.ended:
                return False
            self.ended = reason
        self._replies.fail_all(RankLost, f"{self.describe()} is gone: {reason}")
        self.outbox.put(None)
        return True

    # ---- commands (built by fanout.py) ----

    def send(self, command: pb.DaemonCommand) -> Future:
        """Queues a command for the engine; the future resolves with its Ack."""
        command.op_id, future = self._replies.expect()
        if command.op_id:
            self.outbox.put(command)
        return future

    def acknowledge(self, ack: pb.Ack) -> None:
        self._replies.deliver(ack.op_id, ack)
