"""The fd socket: where engines get file descriptors for their regions.

It sits beside the gRPC socket. The kernel tells us each peer's pid and uid
(SO_PEERCRED); a connection becomes a session, and the token it is given here is
what ties the engine's gRPC stream to these credentials. The requests and their
replies are common/fd_messages.py's.

Every local uid may connect, so:
- a peer that sends something that is no request (or a descriptor with a
  request that takes none) loses its connection; one whose request has bad
  arguments is refused; the daemon keeps running either way. Descriptors the
  daemon did not ask for are closed unread;
- each uid may hold connections_per_uid connections, and all uids but root
  `connections` together; a connection over a cap is refused
  (RESOURCE_EXHAUSTED) and closed at once;
- when accept() finds the daemon short of descriptors or memory, the socket
  stops accepting for a moment and tries again, until it can;
- one thread waits on every connection and reads the requests; `workers` threads
  answer them, since the daemon's calls may wait for a model's lock. A
  connection has one request in flight at most, so its replies go out in order,
  and a peer that does not read them is dropped rather than waited for.
The numbers are the [fd_socket] settings (FdSocketLimits).
"""

import contextlib
import errno
import functools
import logging
import os
import queue
import select
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass

from sleepd.common import wire
from sleepd.common.fd_messages import (Allocate, Allocated, Done, Fetch, Fetched, HandBack, HandedBack, Hello,
                                           InvalidArguments, REQUEST_OPS, Refused, Replace, Reply, Welcome,
                                           decode_request)
from sleepd.common.shown import shown

from .auth import Peer
from .errors import SleepdError, aborted, exhausted, invalid
from .logs import Throttled
from .sessions import Session
from .token_access import TokenAccess

log = logging.getLogger(__name__)

# accept() calls per wakeup, so that a flood of connects cannot starve the open connections.
_ACCEPTS_PER_ROUND = 64
_FIRST_RETRY, _LAST_RETRY = 0.01, 1.0  # seconds before accept() is tried again, doubling
_ARMED = select.EPOLLIN | select.EPOLLONESHOT


@dataclass(frozen=True)
class FdSocketLimits:
    """The [fd_socket] settings, named as there (docs/configuration.md)."""
    connections_per_uid: int
    connections: int  # of every uid but root, which only its own cap limits
    workers: int
    # An allocate (a torch pool's refill) waits allocate_wait_seconds for its model's lock, then is refused
    # ABORTED and sent again by the engine: a worker is never held for a whole sleep or wake. Each uid may
    # have allocates_per_uid allocates in a worker at once, so one user's stalled model cannot take every
    # worker from the others.
    allocates_per_uid: int
    allocate_wait_seconds: float


def _refused(error: SleepdError) -> Refused:
    return Refused(error.code.name, error.message)


@dataclass(eq=False)
class _Connection:
    sock: socket.socket
    fd: int
    uid: int
    session: Session
    closing: str | None = None  # why the socket thread is to close it, once a worker has decided so


def _drop(connection: _Connection, why: str) -> None:
    why = shown(why)  # it may quote the peer's malformed request
    log.warning("dropping fd socket connection of pid %d: %s", connection.session.pid, why)
    connection.closing = why


class _Caps:
    """Connections per uid, held against the caps. Refusals are logged once a
    minute per uid at most, each line with the count of those it stood for."""

    def __init__(self, per_uid: int, total: int):
        self._per_uid, self._total = per_uid, total
        self._open: Counter[int] = Counter()
        self._unprivileged = 0
        self._refusals = Throttled(log)

    def admit(self, uid: int) -> SleepdError | None:
        if self._open[uid] >= self._per_uid:
            why = (f"uid {uid} has {self._open[uid]} connections open to sleepd's fd socket, the most one uid "
                   "may have; close some")
        elif uid != 0 and self._unprivileged >= self._total:
            why = (f"sleepd's fd socket has {self._unprivileged} connections open, the most it takes from "
                   "uids other than root; try again later")
        else:
            self._open[uid] += 1
            self._unprivileged += uid != 0
            return None
        self._refusals.warn(uid, f"fd socket: refused a connection: {why}")
        return exhausted(why)

    def release(self, uid: int) -> None:
        self._open[uid] -= 1
        if not self._open[uid]:
            del self._open[uid]
        self._unprivileged -= uid != 0


class FdServer:
    def __init__(self, path: str, core, limits: FdSocketLimits, mode: int = 0o666):
        self._core = core
        self._limits = limits
        native = core.backend.native
        self._token_access = TokenAccess(native) if native.shares_tokens else None
        self.path = path
        if os.path.exists(path):
            os.unlink(path)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._listener.bind(path)
        os.chmod(path, mode)
        self._listener.listen(128)
        self._listener.setblocking(False)
        self._caps = _Caps(limits.connections_per_uid, limits.connections)
        self._allocating: Counter[int] = Counter()  # allocates in a worker, by uid
        self._allocating_lock = threading.Lock()
        self._epoll = select.epoll()
        self._epoll.register(self._listener.fileno(), select.EPOLLIN)
        self._wake_read, self._wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._epoll.register(self._wake_read, select.EPOLLIN)
        self._connections: dict[int, _Connection] = {}  # by fd; the socket thread's alone
        self._answered: "queue.SimpleQueue[_Connection]" = queue.SimpleQueue()
        self._jobs: "queue.SimpleQueue" = queue.SimpleQueue()
        # When accept() first failed, until the backlog it left has been drained.
        self._accept_failing_since: float | None = None
        self._retry_at: float | None = None
        self._retry_delay = _FIRST_RETRY
        self._stopping = False
        self._thread = threading.Thread(target=self._serve, name="fd-socket", daemon=True)
        self._workers = [threading.Thread(target=self._work, name="fd-worker", daemon=True)
                         for _ in range(limits.workers)]

    def start(self) -> None:
        self._thread.start()
        for worker in self._workers:
            worker.start()

    def stop(self) -> None:
        self._stopping = True
        self._wake()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        for _ in self._workers:
            self._jobs.put(None)
        self._epoll.close()
        self._listener.close()  # the wake pipe stays open: a worker may still be finishing a request
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    # ---- the socket thread ----

    def _serve(self) -> None:
        while not self._stopping:
            timeout = -1 if self._retry_at is None else max(0.0, self._retry_at - time.monotonic())
            for fd, _ in self._epoll.poll(timeout):
                if fd == self._listener.fileno():
                    self._accept()
                elif fd == self._wake_read:
                    self._collect_answered()
                else:
                    self._jobs.put(functools.partial(self._answer, self._connections[fd]))
            if self._retry_at is not None and time.monotonic() >= self._retry_at:
                self._retry_at = None
                self._epoll.modify(self._listener.fileno(), select.EPOLLIN)

    def _accept(self) -> None:
        for _ in range(_ACCEPTS_PER_ROUND):
            try:
                sock, _ = self._listener.accept()
            except BlockingIOError:  # the backlog is empty: whatever stopped us is over
                if self._accept_failing_since is not None:
                    failed_for = time.monotonic() - self._accept_failing_since
                    log.warning("fd socket: accepting again after %.1f s", failed_for)
                    self._accept_failing_since = None
                return
            except ConnectionAbortedError:  # the peer gave up while it waited in the backlog
                continue
            except OSError as error:  # EMFILE, ENFILE, ENOBUFS, ENOMEM: wait for the flood to end, never give up
                self._pause_accepting(error)
                return
            self._retry_delay = _FIRST_RETRY
            self._admit(sock)

    def _pause_accepting(self, error: OSError) -> None:
        if self._accept_failing_since is None:
            log.warning("fd socket: cannot accept connections (%s: %s); retrying until it can",
                        errno.errorcode.get(error.errno, error.errno), error.strerror)
            self._accept_failing_since = time.monotonic()
        self._epoll.modify(self._listener.fileno(), 0)
        self._retry_at = time.monotonic() + self._retry_delay
        self._retry_delay = min(2 * self._retry_delay, _LAST_RETRY)

    def _admit(self, sock: socket.socket) -> None:
        try:
            peer = Peer.of_connection(sock)  # now, while the connection's credentials are the peer's
            sock.setblocking(False)
        except OSError:
            sock.close()
            return
        uid = peer.uid
        refusal = self._caps.admit(uid)
        if refusal is not None:
            with contextlib.suppress(OSError):
                wire.send(sock, *_refused(refusal).encode())  # its first request reads why
            sock.close()
            return
        session = self._core.registry.open_session(peer)
        connection = _Connection(sock, sock.fileno(), uid, session)
        self._connections[connection.fd] = connection
        self._epoll.register(connection.fd, _ARMED)

    def _collect_answered(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wake_read, 4096):
                pass
        while True:
            try:
                connection = self._answered.get_nowait()
            except queue.Empty:
                return
            if connection.closing:
                self._close(connection, connection.closing)
            else:
                self._epoll.modify(connection.fd, _ARMED)

    def _close(self, connection: _Connection, reason: str) -> None:
        self._epoll.unregister(connection.fd)
        del self._connections[connection.fd]
        connection.sock.close()
        self._caps.release(connection.uid)
        self._jobs.put(functools.partial(self._core.operations.end_session, connection.session, reason))

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError):  # a full pipe will wake the socket thread anyway
            os.write(self._wake_write, b"\0")

    # ---- the workers ----

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                job()
            except Exception:  # a worker outlives any one request
                log.exception("fd socket: a request failed")

    def _answer(self, connection: _Connection) -> None:
        fds: list[int] = []
        try:
            frame, fds = wire.recv(connection.sock)
            if frame is None:
                connection.closing = "fd socket closed"
            else:
                reply = self._reply(connection.session, frame, fds)
                if isinstance(reply, Refused):
                    self._count_refusal(frame, reply)
                self._send(connection, reply)
        except BlockingIOError:
            pass  # woken with nothing to read: wait again
        except wire.ProtocolError as error:
            _drop(connection, f"malformed request on the fd socket: {error}")
        except OSError as error:
            connection.closing = f"fd socket error: {error}"
        except Exception:
            log.exception("fd socket: answering pid %d failed", connection.session.pid)
            connection.closing = "sleepd failed to answer a request on the fd socket"
        finally:
            wire.close_all(fds)  # whatever we keep, we keep as our own handle, never this fd
            self._answered.put(connection)
            self._wake()

    def _count_refusal(self, frame: dict, refused: Refused) -> None:
        """Counts a refusal in /metrics beside the gRPC calls' (operation fd_socket_OP); an op the
        protocol does not have is counted as fd_socket_unknown, so a client cannot add series."""
        if self._core.metrics:
            op = frame.get("op")
            known = op if isinstance(op, str) and op in REQUEST_OPS else "unknown"
            self._core.metrics.errors.labels(operation=f"fd_socket_{known}", code=refused.code).inc()

    def _reply(self, session: Session, frame: dict, fds: list[int]) -> Reply:
        """The answer to one request: what it asked for, or why not."""
        try:
            match decode_request(frame, fds):
                case Hello():
                    return Welcome(session.token, session.pid, session.uid)
                case Fetch(regions=region_ids, device_pid=device_pid) if self._token_access:
                    return self._tokens(session, region_ids, self._token_access.check(session.pid, device_pid))
                case Fetch(regions=region_ids):
                    return self._fetched(session, region_ids)
                case HandBack(region=region_id, fd=fd):  # after a daemon restart
                    self._core.recovery.hand_back(session, region_id, fd)
                    return Done()
                case Replace(region=region_id, device_pid=device_pid) if self._token_access:  # after a restart
                    device_pid = self._token_access.check(session.pid, device_pid)
                    region = self._core.recovery.replace(session, region_id)
                    return self._tokens(session, (region.id,), device_pid)
                case Replace():
                    raise invalid(f"{self._core.backend.name} memory is handed back, not replaced")
                case HandedBack():
                    self._core.recovery.finish_hand_back(session)
                    return Done()
                case Allocate(size=size, tag=tag, device_pid=device_pid):
                    if self._token_access:
                        device_pid = self._token_access.check(session.pid, device_pid)
                    return self._allocated(session, size, tag, device_pid)
        except InvalidArguments as error:
            return _refused(invalid(str(error)))
        except SleepdError as error:
            return _refused(error)

    def _allocated(self, session: Session, size: int, tag: str, device_pid: int | None) -> Allocated:
        """A new region and its memory."""
        with self._allocating_lock:
            if self._allocating[session.uid] >= self._limits.allocates_per_uid:
                raise aborted(f"uid {session.uid} has {self._limits.allocates_per_uid} allocations waiting "
                              "already; allocate again")
            self._allocating[session.uid] += 1
        try:
            region = self._core.operations.allocate(session.id, size, tag,
                                                    wait_for_model=self._limits.allocate_wait_seconds)
        finally:
            with self._allocating_lock:
                self._allocating[session.uid] -= 1
        return self._send_memory(session, region, device_pid)

    def _send_memory(self, session: Session, region, device_pid: int | None) -> Allocated:
        """The new region's memory; if it cannot be sent, the region is freed again."""
        try:
            if self._token_access:
                token, _ = self._core.registry.export_token(session, region.id, device_pid)
                return Allocated(region.id, region.size, region.mapped_size, token=token)
            fd, _ = self._core.registry.export(session, region.id)
            return Allocated(region.id, region.size, region.mapped_size, fd=fd)
        except BaseException:
            self._core.operations.free(session.id, region.id)
            raise

    def _fetched(self, session: Session, region_ids: tuple[int, ...]) -> Fetched:
        """A descriptor for each region, or none at all: a refusal of one refuses the request."""
        sizes, fds = [], []
        try:
            for region_id in region_ids:
                fd, region = self._core.registry.export(session, region_id)
                fds.append(fd)
                sizes.append(region.mapped_size)
        except BaseException:
            wire.close_all(fds)
            raise
        return Fetched(tuple(sizes), tuple(fds))

    def _tokens(self, session: Session, region_ids: tuple[int, ...], device_pid: int) -> Fetched:
        """Each region's token, once `device_pid` may import it; a refusal of one refuses the request."""
        sizes, tokens = [], []
        for region_id in region_ids:
            token, region = self._core.registry.export_token(session, region_id, device_pid)
            tokens.append(token)
            sizes.append(region.mapped_size)
        return Fetched(tuple(sizes), tokens=tuple(tokens))

    @staticmethod
    def _send(connection: _Connection, reply: Reply) -> None:
        try:
            wire.send(connection.sock, *reply.encode())
        except BlockingIOError:
            _drop(connection, "it does not read its replies on the fd socket")
        finally:
            if isinstance(reply, Fetched):
                wire.close_all(reply.fds)  # the sender's copies must not pin memory
            elif isinstance(reply, Allocated) and reply.fd is not None:
                wire.close_all([reply.fd])
