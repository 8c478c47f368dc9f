"""State changes, fanned out to every subscriber (sleepctl events, the Events RPC).

A subscriber that stops reading loses its oldest events rather than holding the
daemon back: each has a bounded queue. A subscriber sees only the events of the
models its filter allows (a non-admin: its own uid's).
"""

import queue
import threading
import time
from dataclasses import dataclass

MAX_QUEUED = 1000


@dataclass(frozen=True)
class Event:
    time: float
    kind: str      # slept, woke, evicted, refused, rank_lost, attached, backup_damaged
    model: str
    owner_uid: int
    detail: str = ""
    bytes: int = 0


class Subscription:
    def __init__(self, bus: "EventBus", model: str, may_see):
        self._bus = bus
        self.model = model
        self.may_see = may_see  # owner uid -> whether this subscriber sees that model's events
        self.queue: "queue.Queue[Event | None]" = queue.Queue(MAX_QUEUED)

    def get(self, timeout: float | None = None) -> Event | None:
        """The next event, or None once the subscription is closed (or after `timeout`)."""
        try:
            return self.queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def close(self) -> None:
        self._bus.unsubscribe(self)
        try:
            self.queue.put_nowait(None)
        except queue.Full:
            pass


class EventBus:
    def __init__(self):
        self._lock = threading.Lock()
        self._subscribers: list[Subscription] = []

    def subscribe(self, model: str = "", may_see=lambda owner_uid: True) -> Subscription:
        subscription = Subscription(self, model, may_see)
        with self._lock:
            self._subscribers.append(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        with self._lock:
            if subscription in self._subscribers:
                self._subscribers.remove(subscription)

    def publish(self, kind: str, model, detail: str = "", nbytes: int = 0) -> None:
        """`model` is the Model the event is about (its name and owner travel with the event)."""
        event = Event(time.time(), kind, model.name, model.owner_uid, detail, nbytes)
        with self._lock:
            subscribers = list(self._subscribers)
        for subscription in subscribers:
            if (subscription.model and subscription.model != model.name) or not subscription.may_see(model.owner_uid):
                continue
            while True:
                try:
                    subscription.queue.put_nowait(event)
                    break
                except queue.Full:  # a slow reader loses its oldest event, never blocks the daemon
                    try:
                        subscription.queue.get_nowait()
                    except queue.Empty:
                        pass
