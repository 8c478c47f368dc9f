"""The daemon's log: human lines by default, or one JSON object per line for
log shippers (`--log-format json`).

A JSON line has `time` (UTC, ISO 8601 with milliseconds), `level`, `logger`,
`message`, any fields the call passed with `extra=` (a field named like one of
those four is left out), and `exception` when there is a traceback. Uncaught exceptions, in the main thread or any other, and
Python warnings go through the same handler, so that nothing on the daemon's
stderr breaks the one-object-per-line rule.
"""

import json
import logging
import sys
import threading
import time
from collections import Counter
from datetime import datetime, timezone

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_") and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def setup(level: str, fmt: str, stream=None) -> None:
    """Configures the root logger once, for the daemon's whole life."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)
    log = logging.getLogger("sleepd")

    def uncaught(kind, value, traceback):
        if issubclass(kind, KeyboardInterrupt):
            sys.__excepthook__(kind, value, traceback)
            return
        log.critical("uncaught exception", exc_info=(kind, value, traceback))

    def uncaught_in_thread(args):
        if args.exc_type is SystemExit:
            return
        log.error("uncaught exception in thread %s", args.thread.name if args.thread else "?",
                  exc_info=(args.exc_type, args.exc_value, args.exc_traceback))

    sys.excepthook = uncaught
    threading.excepthook = uncaught_in_thread


class Throttled:
    """Warnings of one kind (a caller's refusals during a flood, one model's failures over and
    over), logged at most once per `every` seconds per key, each line counting those it stood for."""

    def __init__(self, logger: logging.Logger, every: float = 60.0):
        self._logger, self._every = logger, every
        self._lock = threading.Lock()
        self._quiet_until: dict = {}
        self._unlogged: Counter = Counter()

    def warn(self, key, message: str) -> None:
        now = time.monotonic()
        with self._lock:
            if now < self._quiet_until.get(key, 0):
                self._unlogged[key] += 1
                return
            earlier = self._unlogged.pop(key, 0)
            self._quiet_until[key] = now + self._every
        self._logger.warning("%s%s", message, f" (and {earlier} like it since the last such line)" if earlier else "")
