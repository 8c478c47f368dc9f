"""How many gRPC calls each caller may have in progress on the Unix socket.

Every call holds one of the server's worker threads from the moment it arrives
until its handler returns, and an Events or Session stream holds it for as long
as the caller keeps it open. So that no caller can take them all and starve
the rest, root's `sleepctl status` and engines' wakes included, each call counts against its caller until its handler returns:

| caller | calls at once | of which Events streams | Session streams, apart |
|---|---|---|---|
| a non-admin uid (by the token in the call's metadata) | calls_per_uid | event_streams_per_uid | sessions_per_uid |
| every caller without a valid token, together | anonymous_calls | anonymous_event_streams | (within the calls) |
| root and the admin group | no limit of their own | | |

Besides, non-admin callers together never take the last admin_reserve of the workers. The numbers are
the [grpc] settings (CallLimits).
The health service's Check (what probes call, with no token) is not counted: it
answers at once and holds no worker, so a flood never makes a probe fail.
A call over a limit is refused at once with RESOURCE_EXHAUSTED naming the
limit; it never waits for a worker.
"""

import logging
import threading
from collections import Counter
from dataclasses import dataclass

import grpc

from sleepd.common.wire import TOKEN_METADATA
from sleepd.proto import sleepd_pb2

from .auth import Authorizer, Peer
from .logs import Throttled

log = logging.getLogger(__name__)

_SERVICE = sleepd_pb2.DESCRIPTOR.services_by_name["Sleepd"].full_name
EVENTS, SESSION = f"/{_SERVICE}/Events", f"/{_SERVICE}/Session"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
ANONYMOUS = "anonymous"
WARN_EVERY_SECONDS = 60.0  # a flood is logged, not every call of it


@dataclass(frozen=True)
class CallLimits:
    """The [grpc] settings, named as there (docs/configuration.md)."""
    workers: int  # the server's thread pool
    admin_reserve: int
    calls_per_uid: int
    event_streams_per_uid: int
    sessions_per_uid: int  # one per engine process
    anonymous_calls: int
    anonymous_event_streams: int

    def most(self, key: tuple) -> int:
        """How many calls of the kind `key` names its caller may have in progress at once. A Session
        stream without a token is counted as one of the anonymous callers' calls (_keys)."""
        who, kind = key
        if who == ANONYMOUS:
            return {"calls": self.anonymous_calls, "events": self.anonymous_event_streams}[kind]
        return {"calls": self.calls_per_uid, "events": self.event_streams_per_uid,
                "sessions": self.sessions_per_uid}[kind]


class CallCaps(grpc.ServerInterceptor):
    def __init__(self, identify, authorizer: Authorizer, limits: CallLimits):
        self._identify = identify  # a token -> the Peer it was given to, or None
        self._authorizer = authorizer
        self._limits = limits
        self._lock = threading.Lock()  # guards the counts only; nothing else is done under it
        self._held: Counter = Counter()  # (uid or ANONYMOUS, "calls" | "events" | "sessions") -> in progress
        self._busy = 0  # every admitted call in progress, admins' included
        self._refusals = Throttled(log, WARN_EVERY_SECONDS)

    def intercept_service(self, continuation, handler_call_details):
        # Runs on the server's polling thread, before any worker is taken.
        handler = continuation(handler_call_details)
        if handler is None:  # unknown method: gRPC answers UNIMPLEMENTED without a worker
            return None
        method = handler_call_details.method
        if method == HEALTH_CHECK:  # answers at once, holding no worker: probes pass during a flood
            return handler
        token = dict(handler_call_details.invocation_metadata).get(TOKEN_METADATA)
        peer = self._identify(token) if token else None
        keys = self._keys(peer, method)
        refusal = self._take(keys, admin=peer is not None and self._authorizer.is_admin(peer))
        if refusal is not None:
            self._refusals.warn(keys[0][0], f"refusing calls: {refusal}")
            return refusing(refusal)
        return _holding(handler, method, lambda: self._release(keys))

    @staticmethod
    def _keys(peer: Peer | None, method: str) -> list[tuple]:
        """What the call counts against: its caller's calls (or sessions), and its Events streams."""
        who = peer.uid if peer is not None else ANONYMOUS
        if method == SESSION and peer is not None:
            return [(who, "sessions")]
        return [(who, "calls"), (who, "events")] if method == EVENTS else [(who, "calls")]

    def _take(self, keys: list[tuple], admin: bool) -> str | None:
        """Counts the call in, or says which limit it would pass."""
        with self._lock:
            if not admin:
                for key in keys:
                    if self._held[key] >= self._limits.most(key):
                        return _refusal(key, self._held[key])
                if self._busy >= self._limits.workers - self._limits.admin_reserve:
                    return (f"{self._busy} of the daemon's {self._limits.workers} gRPC workers are busy and the "
                            f"last {self._limits.admin_reserve} are kept for root and group "
                            f"{self._authorizer.admin_group!r}; try again shortly")
            for key in keys:
                self._held[key] += 1
            self._busy += 1
        return None

    def _release(self, keys: list[tuple]) -> None:
        with self._lock:
            for key in keys:
                self._held[key] -= 1
                if not self._held[key]:
                    del self._held[key]
            self._busy -= 1


_WHAT = {"calls": ("calls in progress (streams included)", "wait for some to end"),
         "events": ("Events streams open", "close some"),
         "sessions": ("engine sessions open", "end some of its engines first")}


def _refusal(key: tuple, held: int) -> str:
    who, kind = key
    what, remedy = _WHAT[kind]
    if who == ANONYMOUS:
        return (f"callers without a token have {held} {what}, the most they may together; {remedy}, or call "
                "with a token from the fd socket (sleepctl and SleepClient do) to count as your own uid")
    return f"uid {who} has {held} {what}, the most a non-admin may; {remedy}"


def refusing(message: str, code: grpc.StatusCode = grpc.StatusCode.RESOURCE_EXHAUSTED) -> grpc.RpcMethodHandler:
    """A handler that refuses without reading a request: a caller that never sends
    one cannot keep the worker that answers it."""
    def refuse(requests, context):
        context.abort(code, message)

    return grpc.stream_stream_rpc_method_handler(refuse)


def _holding(handler: grpc.RpcMethodHandler, method: str, release) -> grpc.RpcMethodHandler:
    """`handler`, calling `release` when its behavior returns.

    It reads its request as a stream even where the method takes one message: for a
    one-message handler gRPC waits for the message before it runs the behavior, and
    never runs it if the caller gives up first, so the count would never be given back.
    A stream handler's behavior always runs. (A non-blocking handler, health's Watch,
    becomes a blocking one, which its servicer supports.)"""
    options = {"request_deserializer": handler.request_deserializer,
               "response_serializer": handler.response_serializer}
    if handler.response_streaming:
        inner = handler.stream_stream if handler.request_streaming else handler.unary_stream

        def stream(requests, context):
            try:
                argument = requests if handler.request_streaming else _one_request(requests, context, method)
                yield from inner(argument, context)
            finally:
                release()

        return grpc.stream_stream_rpc_method_handler(stream, **options)
    inner = handler.stream_unary if handler.request_streaming else handler.unary_unary

    def unary(requests, context):
        try:
            return inner(requests if handler.request_streaming else _one_request(requests, context, method), context)
        finally:
            release()

    return grpc.stream_unary_rpc_method_handler(unary, **options)


def _one_request(requests, context, method: str):
    """The one request a unary method takes (the caller cancelling raises grpc.RpcError)."""
    request = next(requests, None)
    if request is None:  # what gRPC itself answers when a unary call ends without one
        context.abort(grpc.StatusCode.UNIMPLEMENTED, f'"{method}" requires exactly one request message.')
    return request
