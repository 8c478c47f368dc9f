"""The per-device mover: a child process that does every bulk copy for one device.

The daemon keeps no mappings of device memory and (on a GPU) no context; it
sends the mover each region's memory as a descriptor, with the pieces of the
host backup pool to copy to or from. The mover maps every pool slab once and
keeps it. If the mover dies mid-copy, the operation fails and nothing is lost:
the daemon releases device memory only after the mover has confirmed the copy.

Run by the daemon as `python -m sleepd.daemon.mover --socket-fd N --backend B`.
"""

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

from sleepd import _C
from sleepd.common import wire
from sleepd.common.native import engine_backend

from .errors import unavailable
from .pool import Backup, HostPool

log = logging.getLogger(__name__)

OFFLOAD, RESTORE, ZERO = "offload", "restore", "zero"
# Descriptors per message stay well under the kernel's limit of 253.
_BATCH = 128


@dataclass
class CopyJob:
    direction: str  # OFFLOAD, RESTORE or ZERO
    device: int
    handle: int  # the daemon's backend handle of the region's device memory
    size: int
    backup: Backup | None = None


class Mover:
    """The daemon's end of one device's mover process."""

    def __init__(self, backend, backend_name: str, device: int, pool: HostPool):
        self._backend = backend
        self._backend_name = backend_name
        self.device = device
        self._pool = pool
        self._lock = threading.Lock()
        self._process: subprocess.Popen | None = None
        self._socket: socket.socket | None = None
        self._registered: set[int] = set()

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def start(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        command = [sys.executable, "-m", "sleepd.daemon.mover", "--socket-fd", str(theirs.fileno()),
                   "--backend", self._backend_name, "--device", str(self.device)]
        # exec, never a bare fork: gRPC objects do not survive fork().
        self._process = subprocess.Popen(command, pass_fds=[theirs.fileno()])
        theirs.close()
        self._socket = ours
        self._registered = set()

    def run(self, jobs: list[CopyJob]) -> None:
        """Runs the copies, raising SleepdError(UNAVAILABLE) if the mover fails or dies."""
        self._call(lambda: [self._run_batch(jobs[first:first + _BATCH]) for first in range(0, len(jobs), _BATCH)])

    def register_pool(self) -> None:
        """Hands the mover every pool slab now (it maps and pins each once), rather than at the first sleep."""
        self._call(lambda: None)

    def _call(self, work) -> None:
        with self._lock:
            if self._process is None or self._process.poll() is not None:
                if self._process is not None:
                    log.warning("mover for device %d had exited (%s); starting a new one",
                                self.device, self._process.returncode)
                self.start()
            try:
                self._register_slabs()
                work()
            except (OSError, wire.ProtocolError) as error:
                self._stop()
                raise unavailable(f"mover for device {self.device} failed during the copy ({error}); "
                                  "nothing was released; try again") from None

    def close(self) -> None:
        with self._lock:
            self._stop()

    def _stop(self) -> None:
        if self._socket:
            self._socket.close()
            self._socket = None
        if self._process and self._process.poll() is None:
            self._process.kill()
        if self._process:
            self._process.wait()

    def _register_slabs(self) -> None:
        for slab in self._pool.slabs():
            if slab.index not in self._registered:
                self._request({"op": "add_slab", "slab": slab.index, "size": slab.size}, [slab.fd])
                self._registered.add(slab.index)

    def _run_batch(self, jobs: list[CopyJob]) -> None:
        fds = [self._backend.export_handle(job.handle) for job in jobs]
        try:
            message = {"op": "copy", "jobs": [
                {"direction": job.direction, "size": job.size,
                 "pieces": [[p.slab, p.offset, p.length] for p in (job.backup.pieces if job.backup else [])]}
                for job in jobs]}
            self._request(message, fds)
        finally:
            # Our copies must not outlive the request: an open fd pins memory.
            wire.close_all(fds)

    def _request(self, message: dict, fds: list[int]) -> dict:
        wire.send(self._socket, message, fds)
        reply, stray = wire.recv(self._socket)
        wire.close_all(stray)
        if reply is None:
            raise OSError(f"mover exited ({self._process.wait()})")
        if not reply.get("ok"):
            raise OSError(reply.get("error", "mover refused the request"))
        return reply


# ---- the mover process ----

class _MoverProcess:
    def __init__(self, backend, device: int):
        self._backend = backend
        self._device = device
        self._slabs: dict[int, int] = {}  # slab index -> mapped address

    def add_slab(self, message: dict, fds: list[int]) -> None:
        """Maps a pool slab for good and registers it once (pinned, on a GPU)."""
        size = message["size"]
        address = _C.map_file(fds[0], size)
        self._backend.register_host(address, size)
        self._slabs[message["slab"]] = address

    def copy(self, message: dict, fds: list[int]) -> None:
        for job, fd in zip(message["jobs"], fds, strict=True):
            handle = self._backend.import_handle(fd, self._device, job["size"])
            try:
                self._move(job, handle)
            finally:
                self._backend.release(handle)

    def _move(self, job: dict, handle: int) -> None:
        size = job["size"]
        if job["direction"] == ZERO:
            self._backend.zero(handle, 0, size)
            return
        offset = 0
        for slab, slab_offset, length in job["pieces"]:
            length = min(length, size - offset)
            host = self._slabs[slab] + slab_offset
            if job["direction"] == OFFLOAD:
                self._backend.copy_to_host(handle, offset, host, length)
            else:
                self._backend.copy_from_host(handle, offset, host, length)
            offset += length
        if offset != size:
            raise RuntimeError(f"backup pieces cover {offset} of {size} bytes")


def _serve(sock: socket.socket, process: _MoverProcess) -> None:
    handlers = {"add_slab": process.add_slab, "copy": process.copy}
    while True:
        message, fds = wire.recv(sock)
        if message is None:
            return
        started = time.perf_counter()
        try:
            handlers[message["op"]](message, fds)
            reply = {"ok": True, "seconds": time.perf_counter() - started}
        except Exception as error:  # reported to the daemon, which fails the operation
            reply = {"ok": False, "error": f"{type(error).__name__}: {error}"}
        finally:
            wire.close_all(fds)
        wire.send(sock, reply)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="sleepd-mover")
    parser.add_argument("--socket-fd", type=int, required=True)
    parser.add_argument("--backend", required=True)
    parser.add_argument("--device", type=int, required=True)
    args = parser.parse_args(argv)
    # The daemon decides when a mover stops; a Ctrl-C meant for it must not kill a copy.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sock = socket.socket(fileno=args.socket_fd)
    try:
        _serve(sock, _MoverProcess(engine_backend(args.backend, args.device), args.device))
    finally:
        sock.close()
        os._exit(0)


if __name__ == "__main__":
    main()
