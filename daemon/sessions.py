"""An engine process's session: its credentials, its regions, and the command
channel through which the daemon asks it to quiesce, unmap, remap and resume.

A session begins when the process connects to the handle socket (where the
kernel tells us its pid and uid), becomes a rank of a model when its gRPC stream
attaches, and ends when either connection breaks. Liveness is derived from the
connections, never from a flag the engine sets.
"""

import itertools
import queue
import secrets
import threading
from concurrent.futures import Future

from sleepd.proto import sleepd_pb2 as pb


class RankLost(Exception):
    """The engine process went away while the daemon waited for it."""


class Session:
    def __init__(self, peer):
        self.peer = peer                    # who the kernel says is at the other end (auth.Peer)
        self.pid, self.uid = peer.pid, peer.uid
        self.token = secrets.token_hex(16)  # proves the stream and the handle socket are one process
        self.id = secrets.token_hex(16)     # names the session in region requests
        self.model: str | None = None
        self.rank: int | None = None
        self.device: int | None = None
        self.regions: dict = {}             # region id -> Region, guarded by the model's lock
        self.outbox: "queue.Queue[pb.DaemonCommand | None]" = queue.Queue()
        self._pending: dict[int, Future] = {}
        self._op_ids = itertools.count(1)
        self._lock = threading.Lock()
        self.lost: str | None = None        # why the session ended, once it has
        self.detached = False               # the engine said goodbye before its lease ended
        # After a daemon restart: a placeholder for a rank whose engine has not come back
        # (recovering), then the engine's session until it has handed its memory back (resuming).
        self.recovering = False
        self.resuming = False

    @property
    def attached(self) -> bool:
        return self.model is not None

    def describe(self) -> str:
        return f"{self.model} rank {self.rank} (pid {self.pid})"

    def send(self, **command) -> Future:
        """Queues a command for the engine; the future resolves with its Ack."""
        future: Future = Future()
        with self._lock:
            if self.lost:
                future.set_exception(RankLost(f"{self.describe()} is gone: {self.lost}"))
                return future
            op_id = next(self._op_ids)
            self._pending[op_id] = future
        self.outbox.put(pb.DaemonCommand(op_id=op_id, **command))
        return future

    def acknowledge(self, ack: pb.Ack) -> None:
        with self._lock:
            future = self._pending.pop(ack.op_id, None)
        if future is not None and not future.done():
            future.set_result(ack)

    def end(self, reason: str) -> bool:
        """Marks the session lost and fails everything waiting on it; True the first time."""
        with self._lock:
            if self.lost:
                return False
            self.lost = reason
            pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(RankLost(f"{self.describe()} is gone: {reason}"))
        self.outbox.put(None)
        return True
