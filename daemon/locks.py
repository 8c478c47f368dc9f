"""The daemon's locks, each with its place in the one lock order that
operations.py writes down, and a check of that order for tests and debugging.

With SLEEPD_CHECK_LOCKS=1 every thread records the locks it holds, and taking a
lock out of order (a lower level after a higher one, or a lower key at the
same level) while waiting for it without a time limit is a bug: it is how two
operations deadlock. A timed acquire may go out of order, since it gives up
instead of waiting forever (eviction and swap take other models' locks so).
"""

import os
import threading

from .regions import bug

MODEL, WEIGHT_SET, DEVICE, REGISTRY = 1, 2, 3, 4
_NAMES = {MODEL: "model", WEIGHT_SET: "weight set", DEVICE: "device", REGISTRY: "registry"}
_held = threading.local()


def checking() -> bool:
    return os.environ.get("SLEEPD_CHECK_LOCKS") == "1"


class OrderedLock:
    def __init__(self, level: int, key=0):
        self._lock = threading.Lock()
        self.level, self.key = level, key
        self._check = checking()

    def describe(self) -> str:
        return f"{_NAMES[self.level]} lock {self.key!r}"

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        if self._check and blocking and timeout < 0:
            for held in getattr(_held, "locks", []):
                if (held.level, _order(held.key)) >= (self.level, _order(self.key)):
                    bug(f"{self.describe()} taken while holding {held.describe()}: out of the lock order")
        acquired = self._lock.acquire(blocking, timeout)
        if acquired and self._check:
            _held.__dict__.setdefault("locks", []).append(self)
        return acquired

    def release(self) -> None:
        if self._check:
            _held.locks.remove(self)
        self._lock.release()

    def locked(self) -> bool:
        return self._lock.locked()

    __enter__ = acquire

    def __exit__(self, *exc) -> None:
        self.release()


def _order(key):
    """Keys of one level compare as (type name, value), so model names and device indexes never mix."""
    return (type(key).__name__, key)
