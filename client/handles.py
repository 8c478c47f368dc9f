"""The engine's end of the handle socket: says hello (the daemon reads our
credentials there) and fetches region memory as file descriptors."""

import socket
import threading

import grpc

from sleepd.common import wire

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
        self.token = self._request({"op": "hello"})[0]["token"]

    def fetch(self, region_id: int) -> tuple[int, int]:
        """A descriptor for the region's memory (the caller closes it) and its mapped size."""
        reply, fds = self._request({"op": "fetch", "region": region_id})
        if len(fds) != 1:
            wire.close_all(fds)
            raise SleepdError(grpc.StatusCode.INTERNAL, f"fetch of region {region_id} brought {len(fds)} descriptors")
        return fds[0], reply["size"]

    def give_back(self, region_id: int, fd: int) -> None:
        """After a daemon restart: hands the daemon the memory of a region this process maps."""
        self._request({"op": "return", "region": region_id}, [fd])

    def resumed(self) -> None:
        """After a daemon restart: everything this process maps has been handed back."""
        self._request({"op": "resumed"})

    def close(self) -> None:
        self._sock.close()

    def _request(self, message: dict, fds: list[int] = ()) -> tuple[dict, list[int]]:
        with self._lock:
            wire.send(self._sock, message, fds)
            reply, fds = wire.recv(self._sock)
        if reply is None:
            raise SleepdError(grpc.StatusCode.UNAVAILABLE, "sleepd closed the handle socket")
        if not reply.get("ok"):
            wire.close_all(fds)
            code = getattr(grpc.StatusCode, reply.get("code", "UNKNOWN"), grpc.StatusCode.UNKNOWN)
            raise SleepdError(code, reply.get("error", "request refused"))
        return reply, fds
