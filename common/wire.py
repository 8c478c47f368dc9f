"""Messages on sleepd's Unix SEQPACKET sockets: one JSON object per packet, with
any file descriptors attached to that same packet (SCM_RIGHTS).

SEQPACKET keeps message boundaries, so a descriptor can never arrive detached
from the message that explains it. What each message holds is said in
common/fd_messages.py (the fd socket) and daemon/mover_messages.py.
"""

import json
import os
import socket

MAX_MESSAGE = 64 * 1024
# gRPC metadata key under which control requests carry the token a hello on the
# fd socket returned: how the daemon learns the caller's uid (daemon/auth.py).
TOKEN_METADATA = "sleepd-token"
MAX_FDS = 253  # the kernel's SCM_MAX_FD


class ProtocolError(Exception):
    """The peer sent something that is not a sleepd message."""


def decode_by_op(frame: dict, fds: list[int], kinds: dict):
    """The request `frame` is, by its "op" among `kinds` ({op: message class with decode})."""
    kind = kinds.get(frame.get("op")) if isinstance(frame.get("op"), str) else None
    if kind is None:
        raise ProtocolError(f"unknown operation {frame.get('op')!r}")
    return kind.decode(frame, fds)


def encode(message: dict, fds=()) -> bytes:
    """`message` as one packet's bytes, once it and its descriptors are within the limits."""
    data = json.dumps(message, separators=(",", ":")).encode()
    if len(data) > MAX_MESSAGE:
        raise ProtocolError(f"message of {len(data)} bytes exceeds {MAX_MESSAGE}")
    if len(fds) > MAX_FDS:
        raise ProtocolError(f"{len(fds)} descriptors in one message exceed {MAX_FDS}")
    return data


def send(sock: socket.socket, message: dict, fds: list[int] = ()) -> None:
    socket.send_fds(sock, [encode(message, fds)], list(fds))


def recv(sock: socket.socket) -> tuple[dict | None, list[int]]:
    """The next message and its descriptors, or (None, []) when the peer has gone.

    The caller owns the returned descriptors. On a malformed message every
    descriptor that came with it is closed before ProtocolError is raised, so
    nothing a peer sends can pin memory here.
    """
    data, fds, flags, _ = socket.recv_fds(sock, MAX_MESSAGE + 1, MAX_FDS)
    return decode(data, fds, bool(flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC)))


def decode(data: bytes, fds: list[int], truncated: bool) -> tuple[dict | None, list[int]]:
    """A received packet as recv() returns it, whoever read it off the socket."""
    if not data and not fds:
        return None, []
    try:
        if truncated or len(data) > MAX_MESSAGE:
            raise ProtocolError("message or its descriptors were truncated")
        try:
            message = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ProtocolError(f"not JSON: {error}") from None
        if not isinstance(message, dict):
            raise ProtocolError("a message must be a JSON object")
    except ProtocolError:
        close_all(fds)
        raise
    return message, fds


def close_all(fds) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
