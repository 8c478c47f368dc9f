"""Controller: what the process owning an engine's front end imports, for engines
that run their own sleep (their ranks connect with needs_controller=True).

    ctl = Controller.connect("qwen", on_sleep=lambda level, tags, actions: engine.sleep(level),
                             on_wake=lambda tags: engine.wake_up(tags))

The daemon forwards to it every sleep and wake of the model asked from outside
the engine (sleepctl, eviction, swap, idle sleep); a background thread runs the
callback, which has the engine pause its scheduler and run its own sleep or
wake (its ranks then call SleepClient.sleep / wake), and answers when it
returns. A callback that raises fails the outside request with ABORTED.
The stream is the controller's lease; if the daemon restarts, it attaches again.
When the daemon ends the lease (the model's last rank ended), it does not: the next
engine of that name has its own front end.
"""

import atexit
import logging
import threading
from typing import Callable

import grpc

from sleepd.common import paths
from sleepd.proto import sleepd_pb2 as pb

from . import timing
from .awake import ensure_awake_request
from .errors import as_sleepd_error
from .lease import Lease, attach_again

log = logging.getLogger(__name__)

SleepCallback = Callable[[int, list[str], dict[str, str]], None]  # (level, tags, {tag: "offload" | "discard"})
WakeCallback = Callable[[list[str]], None]                         # (tags; empty: all)


class Controller:
    def __init__(self, model: str, on_sleep: SleepCallback, on_wake: WakeCallback, socket_path: str,
                 reconnect_seconds: float | None = None):
        self.model = model
        self.reconnect_seconds = timing.seconds(reconnect_seconds, timing.RECONNECT)
        self._on_sleep, self._on_wake = on_sleep, on_wake
        self._socket_path = socket_path
        self._closed = False
        self._swap = threading.Lock()  # close() and a reconnect's swap of the lease, one at a time
        self._lease = self._attach()
        self._thread = threading.Thread(target=self._serve, name="sleepd-controller", daemon=True)
        self._thread.start()
        # Ended before the interpreter finalises, so its thread never opens a channel while gRPC shuts down.
        atexit.register(self.close)

    @classmethod
    def connect(cls, model: str, on_sleep: SleepCallback, on_wake: WakeCallback,
                socket: str | None = None, reconnect_seconds: float | None = None) -> "Controller":
        """Attaches this process as `model`'s controller (the model's owner uid or an admin only;
        one per model; its ranks attach first). `reconnect_seconds` ($SLEEPD_RECONNECT_SECONDS, 120):
        how long to try attaching again after the daemon went away."""
        return cls(model, on_sleep, on_wake, paths.client_socket(socket), reconnect_seconds)

    def _attach(self) -> Lease:
        return Lease(self._socket_path, "Control",
                     lambda fd_socket: pb.ControllerMessage(attach=pb.ControllerAttach(model=self.model)))

    def __enter__(self) -> "Controller":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def ensure_awake(self, evict: bool = True, wake: bool | None = None, timeout: float = 0.0) -> pb.EnsureAwakeReply:
        """As SleepClient.ensure_awake; a wake it starts comes back to this controller's on_wake."""
        with as_sleepd_error():
            return self._lease.stub.EnsureAwake(ensure_awake_request(self.model, evict, wake, timeout))

    def status(self) -> pb.ModelStatus:
        with as_sleepd_error():
            return self._lease.stub.Status(pb.StatusRequest(model=self.model)).models[0]

    def close(self) -> None:
        """Ends the lease: outside sleeps of a model that needs a controller are refused again."""
        with self._swap:
            if self._closed:
                return
            self._closed = True
            atexit.unregister(self.close)
            self._lease.outgoing.put(None)
            self._lease.stream.cancel()
        self._thread.join(timeout=5)
        with self._swap:
            self._lease.close()

    def _serve(self) -> None:
        while True:
            try:
                for request in self._lease.stream:
                    self._lease.outgoing.put(pb.ControllerMessage(done=self._run(request)))
            except grpc.RpcError as error:
                if self._closed:
                    return
                if error.code() == grpc.StatusCode.FAILED_PRECONDITION:  # the daemon ended the lease (no ranks left)
                    log.info("sleepd ended %s's controller: %s", self.model, error.details())
                    return
                log.warning("sleepd controller stream of %s broke (%s); attaching again", self.model,
                            error.details())
            if self._closed or not self._reconnect():
                return

    def _run(self, request: pb.ControlRequest) -> pb.ControlDone:
        kind = request.WhichOneof("kind")
        try:
            if kind == "sleep":
                actions = {item.tag: pb.Action.Name(item.action).lower() for item in request.sleep.actions}
                level = request.sleep.level if request.sleep.HasField("level") else 1
                self._on_sleep(level, list(request.sleep.tags), actions)
            elif kind == "wake":
                self._on_wake(list(request.wake.tags))
            else:
                raise ValueError(f"unknown request {kind!r}")
        except Exception as error:  # reported to the daemon, which fails the outside request
            log.exception("sleepd controller: %s of %s failed", kind, self.model)
            return pb.ControlDone(request_id=request.request_id, ok=False, error=f"{type(error).__name__}: {error}")
        return pb.ControlDone(request_id=request.request_id, ok=True)

    def _reconnect(self) -> bool:
        try:
            lease = attach_again(self._attach, self.reconnect_seconds, lambda: self._closed)
        except TimeoutError as error:
            log.error("%s's controller could not attach again within %g s (last: %s)", self.model,
                      self.reconnect_seconds, error)
            return False
        if lease is None:
            return False
        with self._swap:
            if self._closed:  # closed while this attached: the new lease ends at once
                lease.stream.cancel()
                lease.close()
                return False
            old, self._lease = self._lease, lease
        old.close()
        log.info("%s's controller attached again", self.model)
        return True
