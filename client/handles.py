"""The engine's end of the handle socket: says hello (the daemon reads our
credentials there), fetches region memory as file descriptors and, after a
daemon restart, hands back the memory this process maps."""

import socket
import threading

import grpc

from sleepd.common import wire
from sleepd.common.handle_messages import (FETCH_BATCH, Done, Fetch, Fetched, HandBack, HandedBack, Hello, Refused, Welcome,
                                           decode_reply)

from .errors import SleepdError


class HandleConnection:
    def __init__(self, path: str):
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._sock.connect(path)
        except OSError as error:
            self._sock.close()
            raise SleepdError(grpc.StatusCode.UNAVAILABLE,
                              f"cannot reach sleepd's handle socket {path}: {error.strerror}; is sleepd running?") from None
        self._lock = threading.Lock()
        self.token = self._request(Hello(), Welcome).token

    def fetch(self, region_ids: list[int]) -> list[tuple[int, int]]:
        """For each region, a descriptor for its memory (the caller closes them) and its mapped
        size, in as few round trips as the batch limit allows."""
        fetched: list[tuple[int, int]] = []
        try:
            for start in range(0, len(region_ids), FETCH_BATCH):
                reply = self._request(Fetch(tuple(region_ids[start:start + FETCH_BATCH])), Fetched)
                fetched += zip(reply.fds, reply.sizes)
        except BaseException:
            wire.close_all([fd for fd, _ in fetched])
            raise
        return fetched

    def hand_back(self, region_id: int, fd: int) -> None:
        """After a daemon restart: hands the daemon the memory of a region this process maps."""
        self._request(HandBack(region_id, fd), Done)

    def handed_back(self) -> None:
        """After a daemon restart: everything this process maps has been handed back."""
        self._request(HandedBack(), Done)

    def close(self) -> None:
        self._sock.close()

    def _request(self, request, expected: type):
        with self._lock:
            try:
                wire.send(self._sock, *request.encode())
            except BrokenPipeError:
                pass  # sleepd refused this connection and closed it; why is waiting to be read
            try:
                frame, fds = wire.recv(self._sock)
            except ConnectionResetError:  # it closed with our request unread: the kernel reports that before the why
                frame, fds = wire.recv(self._sock)
        if frame is None:
            raise SleepdError(grpc.StatusCode.UNAVAILABLE, "sleepd closed the handle socket")
        try:
            reply = decode_reply(frame, fds, expected)
        except wire.ProtocolError as error:
            wire.close_all(fds)
            raise SleepdError(grpc.StatusCode.INTERNAL,
                              f"sleepd's handle socket answered {request.OP} with nonsense: {error}") from None
        if isinstance(reply, Refused):
            raise SleepdError(grpc.StatusCode.__members__.get(reply.code, grpc.StatusCode.UNKNOWN), reply.error)
        return reply
