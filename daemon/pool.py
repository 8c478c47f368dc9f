"""The host backup pool: where offloaded regions wait, in daemon-owned shared
memory files under a tmpfs directory, within a byte budget.

The pool is a few large slab files rather than a file per backup, so that a
mover maps (and on a GPU, pins) each slab once and reuses it for every sleep.
A backup is a list of pieces of slabs, with the checksums the mover took of
what it wrote there (CRC32C, one per CHECKSUM_BLOCK bytes of each piece), which
the restore checks before any engine uses the bytes.

Freed pieces keep their pages for `keep_freed_seconds` after the last free, then
give them back to the kernel: a sleep that follows a wake (a training loop's
step) then copies into pages that exist, which on a 4 KiB-page host costs a
fraction of faulting fresh ones in. They keep them for good if the pool is
pre-faulted, or if a mover has pinned their slab: a pin holds the pages it found
until the mover exits, so a range punched out of the file would leave later
copies landing on pages the file no longer has (a new mover or daemon would read
zeros), and would return no memory anyway.
"""

import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field

from sleepd import _C
from sleepd.common.sizes import format_size

from .errors import exhausted
from .private_paths import PrivateDirectory

log = logging.getLogger(__name__)

PAGE = os.sysconf("SC_PAGESIZE")
SLAB_PREFIX = "slab-"
_CHECKSUMS = re.compile("(?:[0-9a-f]{8})*")


def _round_up(size: int, unit: int) -> int:
    return (size + unit - 1) // unit * unit


@dataclass(frozen=True)
class Piece:
    slab: int
    offset: int
    length: int


@dataclass
class Backup:
    size: int
    pieces: list[Piece]
    # CRC32C of each CHECKSUM_BLOCK of each piece's bytes in use, in order, as the mover wrote them
    # (the mover's end records them); empty until then, or for a backup recorded before checksums.
    checksums: tuple[int, ...] = ()

    def locate(self, offset: int) -> tuple[Piece, int]:
        """The piece holding byte `offset` of the region, and that byte's offset in the piece's slab."""
        start = 0
        for piece in self.pieces:
            if offset < start + piece.length:
                return piece, piece.offset + offset - start
            start += piece.length
        raise ValueError(f"byte {offset} is beyond the backup's {start} bytes")


def checksums_text(checksums: tuple[int, ...]) -> str:
    """Checksums as they are written in messages and the state file: 8 hex digits each."""
    return "".join(f"{checksum:08x}" for checksum in checksums)


def parse_checksums(text: str) -> tuple[int, ...]:
    """The checksums of checksums_text(); raises ValueError for anything else."""
    if not isinstance(text, str) or not _CHECKSUMS.fullmatch(text):
        raise ValueError("checksums are 8 lower-case hex digits each")
    return tuple(int(text[at:at + 8], 16) for at in range(0, len(text), 8))


@dataclass
class Slab:
    index: int
    name: str
    fd: int
    size: int
    free: list[tuple[int, int]] = field(default_factory=list)  # (offset, length), sorted by offset
    pinned: bool = False  # a mover has pinned it: its pages stay in the file

    def take(self, wanted: int) -> list[Piece]:
        """Up to `wanted` bytes from this slab's free extents, first fit."""
        pieces, remaining = [], wanted
        while remaining and self.free:
            offset, length = self.free[0]
            used = min(length, remaining)
            pieces.append(Piece(self.index, offset, used))
            if used == length:
                self.free.pop(0)
            else:
                self.free[0] = (offset + used, length - used)
            remaining -= used
        return pieces

    def release_extent(self, offset: int, length: int) -> None:
        """Returns an extent, merging it with its neighbours."""
        self.free.append((offset, length))
        self.free.sort()
        merged = [self.free[0]]
        for start, size in self.free[1:]:
            last_start, last_size = merged[-1]
            if last_start + last_size == start:
                merged[-1] = (last_start, last_size + size)
            else:
                merged.append((start, size))
        self.free = merged


class HostPool:
    def __init__(self, directory: str, budget: int, slab_size: int = 1 << 30, prefault: bool = False,
                 keep: list[list[Piece]] | None = None, keep_freed_seconds: float = 0.0):
        """`keep`: the pieces of backups a restarted daemon recovers; the slab files
        holding them are reopened. Without it, slabs left by an earlier daemon are removed.
        Raises UnsafePath when the directory or a slab there may not be the daemon's own."""
        self._directory = PrivateDirectory(directory, "host pool directory")
        self.directory = self._directory.path
        self.budget = budget
        self.prefault = prefault
        self._slab_size = _round_up(min(slab_size, max(budget, PAGE)), PAGE)
        self.keep_freed_seconds = keep_freed_seconds
        self._lock = threading.Lock()
        self._slabs: list[Slab] = []
        self._used = 0
        # Freed pages not yet given back: since when the last piece was freed, and who gives them back.
        self._freed = threading.Condition(self._lock)
        self._last_freed: float | None = None
        self._closing = False
        self._returner: threading.Thread | None = None
        try:
            if keep is None:
                self._remove_stale_slabs()
            else:
                self._reopen_slabs(keep)
            if prefault:
                while self._slab_bytes() < budget:
                    self._add_slab()
        except BaseException:
            self.close(keep_files=True)
            raise

    @property
    def used(self) -> int:
        return self._used

    @property
    def available(self) -> int:
        return self.budget - self._used

    def slabs(self) -> list[Slab]:
        with self._lock:
            return list(self._slabs)

    def slab_path(self, index: int) -> str:
        with self._lock:
            return os.path.join(self.directory, self._slabs[index].name)

    def cut_short(self, backup: Backup) -> tuple[int, str] | None:
        """Where in the region the first piece of `backup` that its slab file no longer holds whole
        begins (someone truncated the file), and what the file holds instead; None when all are there."""
        start = 0
        for piece in backup.pieces:
            with self._lock:
                size = os.fstat(self._slabs[piece.slab].fd).st_size
            if piece.offset + piece.length > size:
                return start, (f"{self.slab_path(piece.slab)} holds {size} bytes, not the {piece.length} "
                               f"at its offset {piece.offset}")
            start += piece.length
        return None

    def check_piece(self, piece: Piece, length: int, expected: tuple[int, ...]) -> tuple[int, str] | None:
        """Checks the first `length` bytes of `piece` in its slab file against `expected` (its checksums,
        one per CHECKSUM_BLOCK) in C++, the GIL released. Returns where in the piece the first block that
        differs starts and what differs there, or None when all match."""
        with self._lock:
            fd = self._slabs[piece.slab].fd
        try:
            found = _C.checksum_file(fd, piece.offset, length)
        except _C.BackendError as error:  # cut short: read with pread, so it raises, never faults
            return 0, f"could not be read whole ({error})"
        for block, (want, got) in enumerate(zip(expected, found)):
            if want != got:
                start = block * _C.CHECKSUM_BLOCK
                return start, (f"does not match the checksums taken when it was written: block {block} of the "
                               f"piece has CRC32C {got:08x}, not {want:08x}")
        return None

    def pin(self, index: int) -> None:
        """Says that a mover has pinned slab `index`: its freed pieces are never punched out from now on."""
        with self._lock:
            self._slabs[index].pinned = True

    def allocate(self, size: int) -> Backup:
        wanted = _round_up(size, PAGE)
        with self._lock:
            if wanted > self.budget - self._used:
                raise exhausted(
                    f"host backup pool needs {format_size(wanted)}, has {format_size(self.budget - self._used)} "
                    f"free of its {format_size(self.budget)} budget; raise --host-pool-budget or discard instead"
                )
            pieces: list[Piece] = []
            remaining = wanted
            for slab in self._slabs:
                taken = slab.take(remaining)
                pieces += taken
                remaining -= sum(piece.length for piece in taken)
                if not remaining:
                    break
            while remaining:
                taken = self._add_slab().take(remaining)
                pieces += taken
                remaining -= sum(piece.length for piece in taken)
            self._used += wanted
            return Backup(size=size, pieces=pieces)

    def free(self, backup: Backup) -> None:
        with self._lock:
            for piece in backup.pieces:
                slab = self._slabs[piece.slab]
                if not (self.prefault or slab.pinned):
                    if self.keep_freed_seconds:
                        self._last_freed = time.monotonic()
                    else:
                        _C.punch_hole(slab.fd, piece.offset, piece.length)
                slab.release_extent(piece.offset, piece.length)
                self._used -= piece.length
            if self._last_freed is not None:
                self._start_returner()
                self._freed.notify()
        backup.pieces = []

    def _start_returner(self) -> None:
        if self._returner is None:
            self._returner = threading.Thread(target=self._return_freed_pages, name="pool-returner", daemon=True)
            self._returner.start()

    def _return_freed_pages(self) -> None:
        """Gives the pages of every free extent back to the kernel once keep_freed_seconds have passed
        since the last free. Under the lock, so no piece is allocated from an extent while it is punched."""
        with self._freed:
            while not self._closing:
                if self._last_freed is None:
                    self._freed.wait()
                    continue
                due = self._last_freed + self.keep_freed_seconds - time.monotonic()
                if due > 0:
                    self._freed.wait(due)
                    continue
                for slab in self._slabs:
                    if not slab.pinned:
                        for offset, length in slab.free:
                            _C.punch_hole(slab.fd, offset, length)
                self._last_freed = None

    def close(self, keep_files: bool = False) -> None:
        """Closes the slabs; `keep_files` leaves them for the next daemon to recover."""
        with self._lock:
            self._closing = True
            self._freed.notify()
        if self._returner is not None:
            self._returner.join()
        with self._lock:
            for slab in self._slabs:
                os.close(slab.fd)
                if not keep_files:
                    self._directory.remove(slab.name)
            self._slabs = []
        self._directory.close()

    def _slab_bytes(self) -> int:
        return sum(slab.size for slab in self._slabs)

    def _add_slab(self) -> Slab:
        size = min(self._slab_size, _round_up(self.budget - self._slab_bytes(), PAGE))
        index = len(self._slabs)
        name = f"{SLAB_PREFIX}{index:04d}"
        fd = self._directory.create(name)
        os.ftruncate(fd, size)
        if self.prefault:
            os.posix_fallocate(fd, 0, size)
        slab = Slab(index, name, fd, size, free=[(0, size)])
        self._slabs.append(slab)
        return slab

    def recovered(self, pieces: list[Piece], checksums: tuple[int, ...]) -> Backup:
        """The Backup object for pieces recovered at start (their bytes are already in use)."""
        return Backup(size=sum(piece.length for piece in pieces), pieces=list(pieces), checksums=checksums)

    def _reopen_slabs(self, keep: list[list[Piece]]) -> None:
        names = sorted(name for name in self._directory.names() if name.startswith(SLAB_PREFIX))
        for index, name in enumerate(names):
            if name != f"{SLAB_PREFIX}{index:04d}":
                raise RuntimeError(f"host pool {self.directory}: slab files are not contiguous at {name}")
            fd = self._directory.open(name)
            size = os.fstat(fd).st_size
            self._slabs.append(Slab(index, name, fd, size, free=[(0, size)]))
        for pieces in keep:
            for piece in (Piece(*piece) for piece in pieces):
                slab = self._slabs[piece.slab]
                # Carve the piece out of the slab's free extents.
                for position, (offset, length) in enumerate(slab.free):
                    if offset <= piece.offset and piece.offset + piece.length <= offset + length:
                        rest = [(offset, piece.offset - offset),
                                (piece.offset + piece.length, offset + length - piece.offset - piece.length)]
                        slab.free[position:position + 1] = [(o, n) for o, n in rest if n]
                        break
                else:
                    raise RuntimeError(f"host pool: recovered backup piece {piece} overlaps another")
                self._used += piece.length
        log.info("host pool %s: reopened %d slabs holding %s of recovered backups", self.directory,
                 len(self._slabs), format_size(self._used))

    def _remove_stale_slabs(self) -> None:
        for name in self._directory.names():
            if name.startswith(SLAB_PREFIX):
                log.warning("removing stale host pool file %s from an earlier daemon", name)
                self._directory.remove(name)
