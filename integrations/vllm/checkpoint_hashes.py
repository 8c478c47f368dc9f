"""Content hashes of checkpoint files, cached against what `stat` says, and the last key used
for a checkpoint's path and options. No vLLM here: the weight-set key is built from these.

A file's SHA-256 is read from the cache while its device, inode, size, mtime and ctime are
those recorded with it, and computed again otherwise. ctime is set by the kernel on every
change and cannot be set back by a user, so a checkpoint rewritten in place with its mtime
restored is hashed again; a file replaced by a rename has another inode. A file that changes
while it is hashed is not cached. The cache is one JSON file under a lock, written whole
through a rename, so ranks of one server (or two servers) hash a file once and a reader never
sees half a file; a cache that cannot be read is rebuilt, which costs a hash, never a wrong one.
"""

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile

HASHES = "checkpoint-hashes.json"
LAST_KEYS = "last-keys.json"
LOCK = ".lock"
CHUNK = 8 << 20


def default_directory() -> str:
    """$SLEEPD_CACHE_DIR, else ${XDG_CACHE_HOME:-~/.cache}/sleepd."""
    explicit = os.environ.get("SLEEPD_CACHE_DIR")
    if explicit:
        return explicit
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "sleepd")


def _identity(info: os.stat_result) -> list[int]:
    return [info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns]


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class CheckpointHashes:
    def __init__(self, directory: str | None = None):
        self.directory = directory or default_directory()
        self.hashed: list[str] = []  # files this object read to hash (the rest came from the cache)

    @contextlib.contextmanager
    def _locked(self):
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        with open(os.path.join(self.directory, LOCK), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _read(self, name: str) -> dict:
        try:
            with open(os.path.join(self.directory, name)) as file:
                table = json.load(file)
            return table if isinstance(table, dict) else {}
        except (OSError, ValueError):
            return {}

    def _write(self, name: str, table: dict) -> None:
        descriptor, temporary = tempfile.mkstemp(dir=self.directory, prefix=f".{name}.")
        try:
            with os.fdopen(descriptor, "w") as file:
                json.dump(table, file, sort_keys=True)
            os.replace(temporary, os.path.join(self.directory, name))
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise

    def digest(self, path: str) -> str:
        """The SHA-256 of the file at `path` (hex), from the cache while its stat is unchanged."""
        return self.digests([path])[os.path.realpath(path)]

    def digests(self, paths: list[str]) -> dict[str, str]:
        """{real path: SHA-256} of each file; reads only those whose stat changed since they were hashed."""
        real = [os.path.realpath(path) for path in paths]
        with self._locked():
            table = self._read(HASHES)
            result, changed = {}, False
            for path in real:
                before = _identity(os.stat(path))
                entry = table.get(path)
                if isinstance(entry, dict) and entry.get("stat") == before and isinstance(entry.get("sha256"), str):
                    result[path] = entry["sha256"]
                    continue
                digest = _sha256(path)
                self.hashed.append(path)
                result[path] = digest
                if _identity(os.stat(path)) == before:  # a file that changed meanwhile is not cached
                    table[path] = {"stat": before, "sha256": digest}
                    changed = True
                else:
                    table.pop(path, None)
            if changed:
                self._write(HASHES, table)
        return result

    def remember_key(self, options: str, key: str) -> None:
        """Records `key` as the last one used for a checkpoint's path and options (`options`, a digest)."""
        with self._locked():
            table = self._read(LAST_KEYS)
            if table.get(options) != key:
                table[options] = key
                self._write(LAST_KEYS, table)

    def last_key(self, options: str) -> str | None:
        """The key last used for those path and options, or None."""
        with self._locked():
            key = self._read(LAST_KEYS).get(options)
        return key if isinstance(key, str) else None
