"""Requests sent down a stream whose answers come back on it (a rank's commands, a
controller's requests): each waits on a future until its answer arrives, or until
the stream ends, which fails every request waiting and every later one."""

import itertools
import threading
from concurrent.futures import Future


class Replies:
    def __init__(self):
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._waiting: dict[int, Future] = {}
        self._error: tuple[type[Exception], str] | None = None  # once the stream ended

    def expect(self) -> tuple[int, Future]:
        """A new request's id and the future its answer resolves; id 0 and a failed future once ended."""
        future: Future = Future()
        with self._lock:
            if self._error is not None:
                future.set_exception(self._new_error())
                return 0, future
            request_id = next(self._ids)
            self._waiting[request_id] = future
        return request_id, future

    def deliver(self, request_id: int, answer) -> None:
        with self._lock:
            future = self._waiting.pop(request_id, None)
        if future is not None and not future.done():
            future.set_result(answer)

    def forget(self, request_id: int) -> None:
        """The request's sender stopped waiting (its deadline passed)."""
        with self._lock:
            self._waiting.pop(request_id, None)

    def fail_all(self, kind: type[Exception], message: str) -> None:
        """The stream ended: every request waiting, and every later one, fails with a `kind(message)` of its
        own (one instance raised in several threads would collect all their tracebacks)."""
        with self._lock:
            self._error = kind, message
            waiting, self._waiting = self._waiting, {}
        for future in waiting.values():
            if not future.done():
                future.set_exception(kind(message))

    def _new_error(self) -> Exception:
        kind, message = self._error
        return kind(message)
