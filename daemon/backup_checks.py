"""Checking backups after a resume (host_pool.check_backups = "after_resume").

In that mode a wake's restore copies a backup back without checking it, the
model resumes, and the backup is handed here instead of being freed: one daemon
thread re-computes the checksums of its pieces from the pool's slab files (in
C++, the GIL released), compares them with those the offload recorded, and then
frees it. Until then the backup counts as pool usage.

A mismatch comes too late to stop anything: the model has run on those bytes
since its wake. It is counted (sleepd_damaged_backups_total), logged as one
error line naming the model, the region, the slab and the offset, and published
as a `backup_damaged` event. The backup is then freed all the same: no region
holds it any longer, the state file no longer names it, and what it held is
what the model now runs on, so keeping it would only hold pool space that no
restart could account for.

A daemon stop abandons the checks not yet done, between two pieces: their
backups are freed unchecked (a warning names them) before the pool closes, so
the next daemon finds their pieces free and the state file never names them.
"""

import collections
import logging
import threading
import time
from dataclasses import dataclass, field

from sleepd import _C
from sleepd.common.sizes import format_size

from .mover import RESTORE, CopyJob
from .pool import Backup, HostPool

log = logging.getLogger(__name__)

BEFORE_RESUME = "before_resume"
AFTER_RESUME = "after_resume"


@dataclass
class _Pending:
    owner: object    # the Model or WeightSet the region belongs to (its name and owner go with the event)
    region: str      # the region as the log names it, at its wake
    size: int        # the region's bytes the backup holds (what its checksums cover)
    backup: Backup
    woke: float = field(default_factory=time.time)


class BackupChecks:
    """What becomes of a restored backup: before_resume, the restore's copy checked it and it is freed at
    once; after_resume, one thread checks it against its checksums, then frees it."""

    def __init__(self, pool: HostPool, metrics, events, when: str = BEFORE_RESUME):
        self.in_the_copy = when == BEFORE_RESUME  # whether a restore's copy checks its backup
        self._pool = pool
        self._metrics = metrics
        self._events = events
        self._lock = threading.Condition()
        self._queue: collections.deque[_Pending] = collections.deque()
        self._current: _Pending | None = None
        self._stopping = False
        self._thread: threading.Thread | None = None

    @property
    def waiting_bytes(self) -> int:
        """Pool bytes of backups not yet checked and freed."""
        with self._lock:
            pending = list(self._queue) + ([self._current] if self._current else [])
        return sum(piece.length for entry in pending for piece in entry.backup.pieces)

    def restore_jobs(self, what: str, regions) -> list[CopyJob]:
        """The copies that bring the backups of `regions` back: checked as they copy before_resume, else
        unchecked (the backup comes here, to restored(), once the model runs on it)."""
        for region in regions:
            if region.backup and not region.backup.checksums:
                log.warning("%s: %s has a backup recorded before backups had checksums; it is restored "
                            "unchecked", what, region.describe())
        return [CopyJob(RESTORE, r.device, r.handle, r.mapped_size, r.backup, self.in_the_copy)
                for r in regions if r.backup]

    def restored(self, owner, region: str, size: int, backup: Backup) -> None:
        """Takes a restored backup: freed at once if its copy checked it (or it has no checksums, recorded
        before them), else checked, then freed."""
        if self.in_the_copy or not backup.checksums:
            self._pool.free(backup)
            return
        with self._lock:
            if self._stopping:  # a wake that finished while the daemon stops: nothing checks it any longer
                abandoned = True
            else:
                abandoned = False
                self._queue.append(_Pending(owner, region, size, backup))
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="backup-checker", daemon=True)
                    self._thread.start()
                self._lock.notify()
        if abandoned:
            log.warning("after-resume check of %s's %s abandoned: the daemon is stopping; its backup is freed "
                        "unchecked", owner.name, region)
            self._pool.free(backup)

    def stop(self) -> None:
        """Abandons the checks not yet done (the one under way after its current piece) and frees their
        backups unchecked. Call before the pool closes; a backup restored later is freed at once."""
        with self._lock:
            self._stopping = True
            self._lock.notify()
            thread = self._thread
        if thread is not None:
            thread.join()
        with self._lock:
            abandoned = list(self._queue)
            self._queue.clear()
        if abandoned:
            log.warning("stopping: %d backup(s) of resumed models were not checked after their resume (%s); "
                        "freed unchecked", len(abandoned),
                        "; ".join(f"{entry.owner.name}'s {entry.region}" for entry in abandoned))
        for entry in abandoned:
            self._pool.free(entry.backup)

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._stopping:
                    self._lock.wait()
                if self._stopping:
                    return
                self._current = entry = self._queue.popleft()
            try:
                checked = self._check(entry)
            except Exception:  # a bug here must not leak the backup; the check is simply not done
                log.exception("after-resume check of %s's %s failed; its backup is freed unchecked",
                              entry.owner.name, entry.region)
                checked = True
            with self._lock:
                self._current = None
                if not checked:  # stopped midway: stop() frees it with the rest
                    self._queue.appendleft(entry)
                    return
            self._pool.free(entry.backup)

    def _check(self, entry: _Pending) -> bool:
        """Checks every piece; returns False when the daemon stopped before it was done."""
        started = time.perf_counter()
        start, blocks, damaged = 0, 0, None
        for piece in entry.backup.pieces:
            with self._lock:
                if self._stopping:
                    return False
            length = min(piece.length, entry.size - start)
            count = -(-length // _C.CHECKSUM_BLOCK)
            found = self._pool.check_piece(piece, length, entry.backup.checksums[blocks:blocks + count])
            if found is not None:
                at, what = found
                damaged = (start + at, piece, piece.offset + at, what)
                break
            start += length
            blocks += count
        elapsed = time.perf_counter() - started
        if self._metrics:
            self._metrics.verify_seconds.inc(elapsed)
            if damaged is None:
                self._metrics.verified_bytes.inc(entry.size)
        if damaged is not None:
            self._damaged(entry, *damaged)
        return True

    def _damaged(self, entry: _Pending, offset: int, piece, at: int, what: str) -> None:
        if self._metrics:
            self._metrics.damaged_backups.inc()
        end = min(offset + _C.CHECKSUM_BLOCK, entry.size)
        woke = time.strftime("%H:%M:%S", time.localtime(entry.woke))
        message = (f"after-resume check: {entry.owner.name}: {entry.region}: its backup {what}, in bytes "
                   f"[{offset}, {end}) of the region ({self._pool.slab_path(piece.slab)} at offset {at}); the "
                   f"model has run on these bytes since its wake at {woke}; the backup is freed "
                   f"({format_size(entry.size)})")
        log.error("%s", message)
        self._events.publish("backup_damaged", entry.owner, message, entry.size)
