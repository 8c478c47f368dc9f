"""Waker: what a process imports that serves a model's requests without being its
controller (a second front end of the same engine: vLLM's --api-server-count).

    waker = Waker("qwen")
    waker.ensure_awake()   # before each request

The daemon wakes the model through its controller, as for any other request.
A daemon restart invalidates the connection's credentials; the next call
connects again.
"""

import threading

import grpc

from sleepd.common import paths
from sleepd.proto import sleepd_pb2 as pb
from sleepd.proto import sleepd_pb2_grpc as pb_grpc

from .awake import ensure_awake_request
from .control import control_channel
from .errors import SleepdError, as_sleepd_error

# What a call meets when the connection outlived its daemon (its credentials died with it): it connects again once.
STALE = (grpc.StatusCode.UNAUTHENTICATED,)


class Waker:
    def __init__(self, model: str, socket: str | None = None):
        self.model = model
        self._socket_path = paths.client_socket(socket)
        self._lock = threading.Lock()
        self._connection = None  # (channel, fd socket connection, stub), opened at the first call

    def ensure_awake(self, evict: bool = True, wake: bool | None = None, timeout: float = 0.0) -> pb.EnsureAwakeReply:
        """As SleepClient.ensure_awake."""
        request = ensure_awake_request(self.model, evict, wake, timeout)
        stub = self._stub()  # SleepdError UNAVAILABLE where no daemon answers
        try:
            return self._call(stub, request)
        except SleepdError as error:
            if error.code not in STALE:
                raise
            return self._call(self._stub(stale=stub), request)

    @staticmethod
    def _call(stub, request: pb.EnsureAwakeRequest) -> pb.EnsureAwakeReply:
        with as_sleepd_error():
            return stub.EnsureAwake(request)

    def _stub(self, stale=None):
        """The current connection's stub; a new connection if there is none, or if `stale` is still the
        current one (threads that met the same stale connection together connect again once)."""
        with self._lock:
            if self._connection is None or self._connection[2] is stale:
                self._close()
                channel, fd_socket = control_channel(self._socket_path)
                self._connection = channel, fd_socket, pb_grpc.SleepdStub(channel)
            return self._connection[2]

    def close(self) -> None:
        with self._lock:
            self._close()

    def _close(self) -> None:
        if self._connection is not None:
            channel, fd_socket, _ = self._connection
            self._connection = None
            fd_socket.close()
            channel.close()
