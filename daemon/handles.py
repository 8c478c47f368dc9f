"""The handle socket: where engines get file descriptors for their regions.

It sits beside the gRPC socket. The kernel tells us each peer's pid and uid
(SO_PEERCRED); a connection becomes a session, and the token it is given here is
what ties the engine's gRPC stream to these credentials. Requests, one packet
each: {"op": "hello"} and {"op": "fetch", "region": id}; after a daemon restart
also {"op": "return", "region": id} with the region's descriptor and then
{"op": "resumed"}. A peer that sends anything malformed loses its connection;
the daemon keeps running. Descriptors the daemon did not ask for are closed unread.
"""

import logging
import os
import socket
import struct
import threading

from sleepd.common import wire

from .auth import Peer
from .errors import SleepdError

log = logging.getLogger(__name__)


def peer_credentials(conn: socket.socket) -> tuple[int, int, int]:
    data = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", data)


class HandleServer:
    def __init__(self, path: str, core, mode: int = 0o666):
        self._core = core
        self.path = path
        if os.path.exists(path):
            os.unlink(path)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._listener.bind(path)
        os.chmod(path, mode)
        self._listener.listen(128)
        self._thread = threading.Thread(target=self._accept, name="handle-accept", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._listener.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # listener closed
            threading.Thread(target=self._serve, args=(conn,), name="handle-conn", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        session = self._core.registry.open_session(Peer.of_process(*peer_credentials(conn)))
        reason = "handle socket closed"
        try:
            while True:
                message, fds = wire.recv(conn)
                try:
                    if message is None:
                        break
                    self._answer(conn, session, message, fds)
                finally:
                    wire.close_all(fds)  # whatever we keep, we keep as our own handle, never this fd
        except wire.ProtocolError as error:
            reason = f"malformed request on the handle socket: {error}"
            log.warning("dropping handle connection of pid %d: %s", session.pid, error)
        except OSError as error:
            reason = f"handle socket error: {error}"
        finally:
            conn.close()
            self._core.operations.end_session(session, reason)

    def _answer(self, conn: socket.socket, session, message: dict, fds: list[int]) -> None:
        op = message.get("op")
        if op in ("return", "resumed"):
            self._resume(conn, session, message, fds)
        elif fds:
            raise wire.ProtocolError(f"{op!r} takes no descriptors")
        elif op == "hello":
            wire.send(conn, {"ok": True, "token": session.token, "pid": session.pid, "uid": session.uid})
        elif op == "fetch":
            region_id = message.get("region")
            if not isinstance(region_id, int):
                wire.send(conn, {"ok": False, "code": "INVALID_ARGUMENT", "error": "fetch needs an integer region"})
                return
            try:
                fd, region = self._core.registry.export(session, region_id)
            except SleepdError as error:
                wire.send(conn, {"ok": False, "code": error.code.name, "error": error.message})
                return
            try:
                wire.send(conn, {"ok": True, "region": region.id, "size": region.mapped_size}, [fd])
            finally:
                os.close(fd)  # the sender's copy must not pin memory
        else:
            raise wire.ProtocolError(f"unknown operation {op!r}")

    def _resume(self, conn: socket.socket, session, message: dict, fds: list[int]) -> None:
        """After a daemon restart: an engine hands back the memory it maps, then says it is done."""
        try:
            if message["op"] == "resumed":
                self._core.recovery.finish_hand_back(session)
            else:
                region_id = message.get("region")
                if not isinstance(region_id, int) or len(fds) != 1:
                    wire.send(conn, {"ok": False, "code": "INVALID_ARGUMENT",
                                     "error": "return needs an integer region and exactly one descriptor"})
                    return
                self._core.recovery.hand_back(session, region_id, fds[0])
        except SleepdError as error:
            wire.send(conn, {"ok": False, "code": error.code.name, "error": error.message})
            return
        wire.send(conn, {"ok": True})
