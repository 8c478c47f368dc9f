"""Idle sleep: a model with no activity for its policy's idle_seconds goes to
its eviction level by itself. Off unless a model's policy sets it."""

import logging
import threading

from . import planner
from .errors import SleepdError
from .logs import Throttled

log = logging.getLogger(__name__)

# A model whose idle sleep keeps failing is retried after each idle period, which may be a fraction of a
# second: its failures are logged once a minute, each line counting those it stood for.
FAILURES_LOGGED_EVERY = 60.0


class IdleWatcher(threading.Thread):
    def __init__(self, operations, interval: float = 0.25):
        super().__init__(name="idle-watcher", daemon=True)
        self._ops = operations
        self._interval = interval
        self._stop = threading.Event()
        self._failures = Throttled(log, FAILURES_LOGGED_EVERY)

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        while not self._stop.wait(self._interval):
            # Only models with an idle policy are copied: this runs four times a second, and a copy reads
            # every region of its model.
            watched = [model for model in self._ops.registry.models() if model.policy.idle_seconds]
            for due in planner.idle_due([self._ops.registry.view(model) for model in watched]):
                model, idle = self._ops.registry.find(due.name), due.idle_seconds
                if model is None:  # gone since the snapshot
                    continue
                try:
                    # Through its controller where its engine runs its own sleep; refused where it has none.
                    if self._ops.put_to_sleep(model, f"idle for {idle:.0f} s") is None:
                        continue  # an operation is running on it: it is not idle
                    if self._ops.reporter.metrics:
                        self._ops.reporter.metrics.evicted(model, "idle")
                except SleepdError as error:
                    self._failures.warn(model.name, f"idle sleep of {model.name} failed: {error.message}")
                    model.touch()  # try again after another idle period, not at once
