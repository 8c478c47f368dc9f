"""Work that must wait for one model's lock, queued for that model alone.

A session's end reclaims its memory under its model's lock, which a sleep may hold
for several hook timeouts. Run on a shared worker (the fd socket's), it would
hold a thread that every other uid's hello, fetch and allocate need. Here each model
with work pending has one thread of its own, which drains the model's queue in order
and ends once it is empty: a stalled model delays only its own queue.
"""

import logging
import threading
from collections import deque
from typing import Callable

log = logging.getLogger(__name__)


class ModelWork:
    def __init__(self):
        self._lock = threading.Lock()
        self._queues: dict[object, deque] = {}  # model -> jobs not started yet

    def submit(self, model, job: Callable[[], None]) -> None:
        with self._lock:
            pending = self._queues.get(model)
            if pending is not None:
                pending.append(job)
                return
            self._queues[model] = deque([job])
        threading.Thread(target=self._drain, args=(model,), name=f"model-work-{model.name}", daemon=True).start()

    def _drain(self, model) -> None:
        while True:
            with self._lock:
                pending = self._queues[model]
                if not pending:
                    del self._queues[model]
                    return
                job = pending.popleft()
            try:
                job()
            except Exception:  # the next job of the model still runs
                log.exception("work for model %s failed", model.name)
