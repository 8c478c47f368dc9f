"""The per-device mover: a child process that does every bulk copy for one device.

The daemon keeps no mappings of device memory and (on a GPU) no context; it
sends the mover each region's memory as a descriptor, with the pieces of the
host backup pool to copy to or from. The mover maps every pool slab once and
keeps it. If the mover dies mid-copy, the operation fails and nothing is lost:
the daemon releases device memory only after the mover has confirmed the copy.
A GPU fault that breaks the mover's context for good (a sticky CUDA error) is
reported, and the mover exits: the daemon's next copy starts a new one.
The messages on its sockets are daemon/mover_messages.py's.

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
from .mover_messages import (OFFLOAD, RESTORE, ZERO, AddSlab, Copy, Done, Failed, Identified, Identify, Mismatch,
                             RegionCopy, decode_reply, decode_request)
from .pool import Backup, HostPool

log = logging.getLogger(__name__)

# Descriptors per message stay well under the kernel's limit of 253, and checksums (8 hex digits per
# CHECKSUM_BLOCK, 64 GiB in all) within half of a message's 64 KiB; a larger region goes alone.
_BATCH = 128
_BATCH_BLOCKS = 4096
# A mover's exit status once its device context broke for good (a GPU fault).
EXIT_CONTEXT_LOST = 3


@dataclass
class CopyJob:
    direction: str  # OFFLOAD, RESTORE or ZERO
    device: int
    handle: int  # the daemon's backend handle of the region's device memory
    size: int
    # An offload's gets the checksums of what the mover wrote into it; a restore checks them,
    backup: Backup | None = None
    # unless told not to (the daemon checks the pool's copy after the model resumed).
    check: bool = True


class BackupDamaged(Exception):
    """A restore found `job`'s backup not as its offload wrote it, from byte `offset` of the region;
    `what` says how and where in the pool. The copy stopped there."""

    def __init__(self, job: CopyJob, offset: int, what: str):
        super().__init__(what)
        self.job, self.offset, self.what = job, offset, what


class _Refused(Exception):
    """The mover answered that a request failed; unlike a broken channel, it is still fine,
    unless its device context broke (then it exits)."""

    def __init__(self, failed: Failed):
        super().__init__(failed.error)
        self.context_lost = failed.context_lost
        self.mismatch = failed.mismatch


class _Channel:
    """One request at a time on one socket; the mover serves each channel on its own thread."""

    def __init__(self):
        self.lock = threading.Lock()
        self.socket: socket.socket | None = None


class Mover:
    """The daemon's end of one device's mover process.

    Offloads and restores travel on separate channels, so that one model's
    offload and another's restore run at the same time, in both directions.
    """

    def __init__(self, backend, backend_name: str, device: int, pool: HostPool):
        self._backend = backend
        self._backend_name = backend_name
        self.device = device
        self._pool = pool
        self._process_lock = threading.Lock()
        self._process: subprocess.Popen | None = None
        self._channels = {OFFLOAD: _Channel(), RESTORE: _Channel()}
        self._registered: dict[str, set[int]] = {}  # per channel: slabs the mover has (mapped once, process-wide)
        self._device_pid: int | None = None  # on a token backend: what the runtime knows the mover process by
        self.throughput = {OFFLOAD: 0.0, RESTORE: 0.0}  # bytes/s, smoothed over recent copies

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def start(self) -> None:
        pairs = {direction: socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET) for direction in self._channels}
        command = [sys.executable, "-m", "sleepd.daemon.mover", "--backend", self._backend_name,
                   "--device", str(self.device)]
        for _, theirs in pairs.values():
            command += ["--socket-fd", str(theirs.fileno())]
        # exec, never a bare fork: gRPC objects do not survive fork().
        self._process = subprocess.Popen(command, pass_fds=[theirs.fileno() for _, theirs in pairs.values()])
        for direction, (ours, theirs) in pairs.items():
            theirs.close()
            self._channels[direction].socket = ours
        self._registered = {direction: set() for direction in self._channels}

    def run(self, jobs: list[CopyJob]) -> float:
        """Runs the copies, raising SleepdError(UNAVAILABLE) if the mover fails or dies, and
        BackupDamaged if a backup to restore is not as it was written. Returns the seconds the
        mover spent checking backups against their checksums."""
        for job in jobs:
            cut = self._pool.cut_short(job.backup) if job.direction == RESTORE else None
            if cut:  # the mover would fault reading past the end of the file
                raise BackupDamaged(job, cut[0], f"was cut short: {cut[1]}")
        checking = []
        for direction in (OFFLOAD, RESTORE):
            batch = [job for job in jobs if (job.direction == OFFLOAD) == (direction == OFFLOAD)]
            if batch:
                self._call(direction, lambda channel, batch=batch: checking.append(self._copy(channel, batch)))
        return sum(checking)

    def register_pool(self) -> None:
        """Hands the mover every pool slab now (it maps and pins each once), rather than at the first sleep."""
        self._call(OFFLOAD, lambda channel: None)

    def close(self) -> None:
        with self._process_lock:
            self._stop()

    def _call(self, direction: str, work) -> None:
        channel = self._channels[direction]
        with channel.lock:
            with self._process_lock:
                if self._process is None or self._process.poll() is not None:
                    if self._process is not None:
                        log.warning("mover for device %d had exited (%s); starting a new one",
                                    self.device, self._process.returncode)
                        self._stop()
                    self.start()
            try:
                if self._backend.shares_tokens and self._device_pid is None:
                    self._device_pid = self._request(channel, Identify()).device_pid
                self._register_slabs(direction)
                work(channel)
            except _Refused as error:
                if error.context_lost:
                    # It exits: every later call there would fail the same way. The next call starts a new one.
                    with self._process_lock:
                        self._stop()
                    raise unavailable(f"mover for device {self.device} lost its device context ({error}); "
                                      "it was replaced; nothing was released; try again") from None
                # The mover is alive and well (a driver call failed): the other channel's copy goes on.
                raise unavailable(f"mover for device {self.device} could not copy ({error}); "
                                  "nothing was released; try again") from None
            except (OSError, wire.ProtocolError) as error:
                with self._process_lock:
                    self._stop()
                raise unavailable(f"mover for device {self.device} failed during the copy ({error}); "
                                  "nothing was released; try again") from None

    def _stop(self) -> None:
        self._device_pid = None
        for channel in self._channels.values():
            if channel.socket:
                channel.socket.close()
                channel.socket = None
        if self._process and self._process.poll() is None:
            self._process.kill()
        if self._process:
            self._process.wait()

    def _register_slabs(self, direction: str) -> None:
        # Every slab once per channel message stream; the mover maps (and pins) a slab only the first time.
        for slab in self._pool.slabs():
            if slab.index not in self._registered[direction]:
                # A pre-faulted pool is mapped with its page tables built, so the first copy runs at full speed.
                if self._backend.pins_host_memory:
                    self._pool.pin(slab.index)  # before the pin exists, so no free punches under it
                self._request(self._channels[direction], AddSlab(slab.index, slab.size, self._pool.prefault, slab.fd))
                self._registered[direction].add(slab.index)

    def _copy(self, channel: _Channel, jobs: list[CopyJob]) -> float:
        """Returns the seconds spent checking checksums."""
        started = time.perf_counter()
        batch, blocks, checking = [], 0, 0.0
        for job in jobs:
            # At most one checksum per CHECKSUM_BLOCK of the region, plus one per piece for the piece's last.
            count = job.size // _C.CHECKSUM_BLOCK + (len(job.backup.pieces) if job.backup else 0)
            if batch and (len(batch) == _BATCH or blocks + count > _BATCH_BLOCKS):
                checking += self._run_batch(channel, batch)
                batch, blocks = [], 0
            batch.append(job)
            blocks += count
        if batch:
            checking += self._run_batch(channel, batch)
        elapsed = time.perf_counter() - started
        moved = sum(job.size for job in jobs)
        if elapsed > 0 and moved >= 16 << 20:  # small copies say more about latency than throughput
            direction = OFFLOAD if jobs[0].direction == OFFLOAD else RESTORE
            rate = moved / elapsed
            previous = self.throughput[direction]
            self.throughput[direction] = rate if not previous else 0.5 * previous + 0.5 * rate
        return checking

    def _run_batch(self, channel: _Channel, jobs: list[CopyJob]) -> float:
        def region_copy(job: CopyJob, **memory) -> RegionCopy:
            return RegionCopy(job.direction, job.size, tuple(job.backup.pieces if job.backup else ()), **memory,
                              checksums=job.backup.checksums if job.direction == RESTORE and job.check else ())

        fds = []
        try:
            if self._backend.shares_tokens:
                for job in jobs:
                    self._backend.authorize(job.handle, self._device_pid, mover=True)
                copy = Copy(tuple(region_copy(job, token=self._backend.export_token(job.handle)) for job in jobs))
            else:
                fds = [self._backend.export_handle(job.handle) for job in jobs]
                copy = Copy(tuple(region_copy(job, fd=fd) for job, fd in zip(jobs, fds)))
            done = self._request(channel, copy)
        except _Refused as refused:
            if refused.mismatch is None:
                raise
            job, mismatch = jobs[refused.mismatch.region], refused.mismatch
            piece, at = job.backup.locate(mismatch.offset)
            raise BackupDamaged(job, mismatch.offset, (
                f"does not match the checksums taken when it was written, in bytes [{mismatch.offset}, "
                f"{mismatch.offset + mismatch.length}) of the region ({self._pool.slab_path(piece.slab)} "
                f"at offset {at})")) from None
        finally:
            # Our copies must not outlive the request: an open fd pins memory.
            wire.close_all(fds)
        if len(done.checksums) != len(jobs):
            raise wire.ProtocolError(f"the mover answered {len(done.checksums)} regions' checksums for {len(jobs)}")
        for job, checksums in zip(jobs, done.checksums):
            if job.direction == OFFLOAD:
                job.backup.checksums = checksums
        return done.checking_seconds

    def _request(self, channel: _Channel, request: AddSlab | Identify | Copy) -> Done | Identified:
        wire.send(channel.socket, *request.encode())
        frame, stray = wire.recv(channel.socket)
        try:
            if frame is None:
                raise OSError(f"mover exited ({self._process.wait()})")
            reply = decode_reply(frame, stray)
        finally:
            wire.close_all(stray)
        if isinstance(reply, Failed):
            raise _Refused(reply)
        return reply


# ---- the mover process ----

class _MoverProcess:
    def __init__(self, backend, device: int):
        self._backend = backend
        self._device = device
        self._slabs: dict[int, int] = {}  # slab index -> mapped address
        self._lock = threading.Lock()

    def add_slab(self, request: AddSlab) -> None:
        """Maps a pool slab for good and registers it once (pinned, on a GPU)."""
        with self._lock:
            if request.slab in self._slabs:
                return  # already announced on the other channel
            address = _C.map_file(request.fd, request.size, populate=request.populate)
            self._backend.register_host(address, request.size)
            self._slabs[request.slab] = address

    def device_pid(self) -> int:
        return self._backend.device_pid()

    def copy(self, request: Copy) -> tuple[tuple[int, ...], ...]:
        """Copies each region; returns, per region, the checksums an offload took of what it wrote."""
        taken = []
        for index, region in enumerate(request.regions):
            handle = (self._backend.import_token(region.token, self._device, region.size) if region.token
                      else self._backend.import_handle(region.fd, self._device, region.size))
            try:
                taken.append(self._move(index, region, handle))
            finally:
                self._backend.release(handle)
        return tuple(taken)

    def _move(self, index: int, region: RegionCopy, handle: int) -> tuple[int, ...]:
        if region.direction == ZERO:
            self._backend.zero(handle, 0, region.size)
            return ()
        # Per piece: its offset in the region, its bytes in use, its checksums' place; checked before anything moves.
        parts, offset, blocks = [], 0, 0
        for piece in region.pieces:
            length = min(piece.length, region.size - offset)
            count = -(-length // _C.CHECKSUM_BLOCK)
            parts.append((piece, offset, length, slice(blocks, blocks + count)))
            offset += length
            blocks += count
        if offset != region.size:
            raise RuntimeError(f"backup pieces cover {offset} of {region.size} bytes")
        if region.checksums and len(region.checksums) != blocks:
            raise RuntimeError(f"a backup of {blocks} checksum blocks came with {len(region.checksums)} checksums")
        taken: list[int] = []
        for piece, offset, length, checksums in parts:
            host = self._slabs[piece.slab] + piece.offset
            if region.direction == OFFLOAD:
                taken += self._backend.copy_to_host(handle, offset, host, length)
                continue
            expected = region.checksums[checksums] if region.checksums else None
            try:
                self._backend.copy_from_host(handle, offset, host, length, expected)
            except _C.ChecksumMismatch as mismatch:
                start = offset + mismatch.block * _C.CHECKSUM_BLOCK
                raise _Damaged(str(mismatch), Mismatch(index, start, min(_C.CHECKSUM_BLOCK, offset + length - start)))
        return tuple(taken)


class _Damaged(Exception):
    """A backup to restore did not match its checksums: the copy stopped there."""

    def __init__(self, error: str, mismatch: Mismatch):
        super().__init__(error)
        self.mismatch = mismatch


def _serve(sock: socket.socket, process: _MoverProcess) -> None:
    while True:
        try:
            frame, fds = wire.recv(sock)
        except OSError:
            return
        if frame is None:
            return
        started = time.perf_counter()
        try:
            match decode_request(frame, fds):
                case AddSlab() as request:
                    process.add_slab(request)
                    reply = Done(time.perf_counter() - started)
                case Identify():
                    reply = Identified(process.device_pid())
                case Copy() as request:
                    # Only restores check, one at a time: what this process's counter gained is theirs.
                    checked_before = _C.checksum_checking_seconds()
                    checksums = process.copy(request)
                    reply = Done(time.perf_counter() - started, checksums,
                                 _C.checksum_checking_seconds() - checked_before)
        except _C.ContextLostError as error:  # a GPU fault: no later call in this process can succeed
            reply = Failed(f"{type(error).__name__}: {error}", context_lost=True)
        except _Damaged as damaged:
            reply = Failed(str(damaged), mismatch=damaged.mismatch)
        except Exception as error:  # reported to the daemon, which fails the operation
            reply = Failed(f"{type(error).__name__}: {error}")
        finally:
            wire.close_all(fds)
        wire.send(sock, *reply.encode())
        if isinstance(reply, Failed) and reply.context_lost:
            log.error("%s; exiting, for the daemon to start a new mover", reply.error)
            os._exit(EXIT_CONTEXT_LOST)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="sleepd-mover")
    parser.add_argument("--socket-fd", type=int, action="append", required=True, help="one per channel")
    parser.add_argument("--backend", required=True)
    parser.add_argument("--device", type=int, required=True)
    args = parser.parse_args(argv)
    # The daemon decides when a mover stops; a Ctrl-C meant for it must not kill a copy.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    process = _MoverProcess(engine_backend(args.backend, args.device), args.device)
    channels = [threading.Thread(target=_serve, args=(socket.socket(fileno=fd), process), daemon=True)
                for fd in args.socket_fd]
    for channel in channels:
        channel.start()
    # The daemon closing any channel (or dying) ends the mover.
    while all(channel.is_alive() for channel in channels):
        channels[0].join(timeout=0.5)
    os._exit(0)


if __name__ == "__main__":
    main()
