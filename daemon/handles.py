"""The handle socket: where engines get file descriptors for their regions.

It sits beside the gRPC socket. The kernel tells us each peer's pid and uid
(SO_PEERCRED); a connection becomes a session, and the token it is given here is
what ties the engine's gRPC stream to these credentials. Requests, one packet
each: {"op": "hello"} and {"op": "fetch", "region": id}. A peer that sends
anything malformed loses its connection; the daemon keeps running. Descriptors
sent to the daemon are closed unread.
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
    def __init__(self, path: str, manager, mode: int = 0o666):
        self._manager = manager
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
        session = self._manager.open_session(Peer.of_process(*peer_credentials(conn)))
        reason = "handle socket closed"
        try:
            while True:
                message, fds = wire.recv(conn)
                wire.close_all(fds)  # engines never send us memory
                if message is None:
                    break
                self._answer(conn, session, message)
        except wire.ProtocolError as error:
            reason = f"malformed request on the handle socket: {error}"
            log.warning("dropping handle connection of pid %d: %s", session.pid, error)
        except OSError as error:
            reason = f"handle socket error: {error}"
        finally:
            conn.close()
            self._manager.end_session(session, reason)

    def _answer(self, conn: socket.socket, session, message: dict) -> None:
        op = message.get("op")
        if op == "hello":
            wire.send(conn, {"ok": True, "token": session.token, "pid": session.pid, "uid": session.uid})
        elif op == "fetch":
            region_id = message.get("region")
            if not isinstance(region_id, int):
                wire.send(conn, {"ok": False, "code": "INVALID_ARGUMENT", "error": "fetch needs an integer region"})
                return
            try:
                fd, region = self._manager.export(session, region_id)
            except SleepdError as error:
                wire.send(conn, {"ok": False, "code": error.code.name, "error": error.message})
                return
            try:
                wire.send(conn, {"ok": True, "region": region.id, "size": region.mapped_size}, [fd])
            finally:
                os.close(fd)  # the sender's copy must not pin memory
        else:
            raise wire.ProtocolError(f"unknown operation {op!r}")
