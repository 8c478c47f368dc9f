"""The engine's end of the fd socket: says hello (the daemon reads our
credentials there), fetches region memory as file descriptors (or tokens, on ACL) and, after a
daemon restart, hands back the memory this process maps.

The connection is a native FdChannel, which torch pools' refills (csrc/daemon_refill.cpp)
share from C++: the connection is the session, and the channel's lock keeps one request in
flight whichever side sends it."""

import os
import socket
import struct

import grpc

from sleepd import _C
from sleepd.common import wire
from sleepd.common.fd_messages import (FETCH_BATCH, Done, Fetch, Fetched, HandBack, HandedBack, Hello, Refused, Replace,
                                           Welcome, decode_reply)

from .errors import SleepdError


# A uid the user trusts to run sleepd, besides root and itself (a daemon run by a service account).
TRUSTED_UID_ENV = "SLEEPD_DAEMON_UID"
# How long a request on the fd socket waits for the daemon's answer: every one is a short step
# under the registry lock, so a daemon silent this long is stuck (or stopped), and waiting on hangs the engine.
ANSWER_SECONDS = 30.0


def trusted_uids() -> set[int]:
    trusted = {0, os.getuid()}
    if os.environ.get(TRUSTED_UID_ENV, "").isdigit():
        trusted.add(int(os.environ[TRUSTED_UID_ENV]))
    return trusted


def check_server(sock: socket.socket, path: str) -> None:
    """Refuses a daemon this process does not trust before anything is sent to it: the process
    answering must run as root, as this uid, or as $SLEEPD_DAEMON_UID, and the sockets' directory
    must be one only such a uid may change (else another user could put a socket of theirs there)."""
    trusted = trusted_uids()
    uid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))[1]
    directory = os.stat(os.path.dirname(os.path.abspath(path)))
    if uid not in trusted:
        why = f"the process answering at {path} runs as uid {uid}"
    elif directory.st_uid not in trusted or directory.st_mode & 0o022:
        why = f"{os.path.dirname(path)} belongs to uid {directory.st_uid} or others may write it"
    else:
        return
    raise SleepdError(grpc.StatusCode.PERMISSION_DENIED,
                      f"refusing to talk to sleepd at {path}: {why}, not root or you; if you trust it, "
                      f"set {TRUSTED_UID_ENV}={uid if uid not in trusted else directory.st_uid}")


class FdConnection:
    def __init__(self, path: str):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # Blocking, with a send timeout: a connect that finds the daemon's backlog full (a flood of
        # connections it is still draining) waits up to ANSWER_SECONDS for room instead of failing
        # at once with EAGAIN, as a socket with a Python timeout would.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", int(ANSWER_SECONDS), 0))
        try:
            sock.connect(path)
            check_server(sock, path)
        except OSError as error:
            sock.close()
            raise SleepdError(grpc.StatusCode.UNAVAILABLE,
                              f"cannot reach sleepd's fd socket {path}: {error.strerror}; is sleepd running?") from None
        except SleepdError:
            sock.close()
            raise
        self.channel = _C.FdChannel(sock.detach())
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

    def fetch_tokens(self, region_ids: list[int], device_pid: int) -> list[tuple[int, int]]:
        """On a token backend (ACL): for each region, its token, which the daemon has let the
        process the runtime knows as `device_pid` (this one) import, and its mapped size."""
        fetched: list[tuple[int, int]] = []
        for start in range(0, len(region_ids), FETCH_BATCH):
            reply = self._request(Fetch(tuple(region_ids[start:start + FETCH_BATCH]), device_pid), Fetched)
            fetched += zip(reply.tokens, reply.sizes)
        return fetched

    def hand_back(self, region_id: int, fd: int) -> None:
        """After a daemon restart: hands the daemon the memory of a region this process maps."""
        self._request(HandBack(region_id, fd), Done)

    def replace(self, region_id: int, device_pid: int) -> tuple[int, int]:
        """After a daemon restart, on a token backend: the token and size of new memory for a
        region this process maps, to copy the region into."""
        reply = self._request(Replace(region_id, device_pid), Fetched)
        return reply.tokens[0], reply.sizes[0]

    def handed_back(self) -> None:
        """After a daemon restart: everything this process maps has been handed back."""
        self._request(HandedBack(), Done)

    def close(self) -> None:
        self.channel.close()

    def _request(self, request, expected: type):
        frame, fds = request.encode()
        try:
            frame, fds = wire.decode(*self.channel.exchange(wire.encode(frame, fds), fds, ANSWER_SECONDS))
            if frame is None:
                raise SleepdError(grpc.StatusCode.UNAVAILABLE, "sleepd closed the fd socket")
            try:
                reply = decode_reply(frame, fds, expected)
            except wire.ProtocolError:
                wire.close_all(fds)
                raise
        except _C.ChannelTimeout:  # the channel closed itself: a late answer would be taken for the next's
            raise SleepdError(grpc.StatusCode.DEADLINE_EXCEEDED, f"sleepd did not answer {request.OP} on its "
                              f"fd socket within {ANSWER_SECONDS:g} s; closed the connection") from None
        except wire.ProtocolError as error:
            raise SleepdError(grpc.StatusCode.INTERNAL,
                              f"sleepd's fd socket answered {request.OP} with nonsense: {error}") from None
        if isinstance(reply, Refused):
            raise SleepdError(grpc.StatusCode.__members__.get(reply.code, grpc.StatusCode.UNKNOWN), reply.error)
        return reply
