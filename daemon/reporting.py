"""What every finished sleep and wake leaves behind: one log line (with the same
facts as fields for --log-format json), its metrics, and its event."""

import logging

from sleepd.common.sizes import format_size

from .events import EventBus
from .model import Model
from .views import OperationResult

log = logging.getLogger(__name__)


class Reporter:
    def __init__(self, events: EventBus, metrics=None):
        self.events = events
        self.metrics = metrics

    def slept(self, model: Model, level: int, result: OperationResult, reason: str = "") -> None:
        name = model.name
        if self.metrics:
            self.metrics.slept(model, level, result.seconds)
        freed = result.bytes_offloaded + result.bytes_discarded
        fields = {"operation": "sleep", "model": name, "reason": reason or None, "regions": result.region_count,
                  "seconds": round(result.seconds, 6), "sleep_level": level, "bytes_freed": freed,
                  "bytes_offloaded": result.bytes_offloaded, "bytes_discarded": result.bytes_discarded}
        log.info("slept %s at level %s%s: %d regions, %s freed (%s offloaded, %s discarded), %.3f s", name,
                 level, f" ({reason})" if reason else "", result.region_count, format_size(freed),
                 format_size(result.bytes_offloaded), format_size(result.bytes_discarded), result.seconds,
                 extra=fields)
        self.events.publish("slept", model, f"level {level}" + (f", {reason}" if reason else ""), freed)

    def woke(self, model: Model, tags: list[str], result: OperationResult, reason: str = "") -> None:
        name, detail = model.name, ",".join(sorted(tags)) or "all"
        if self.metrics:
            self.metrics.woke(model, result.seconds)
        fields = {"operation": "wake", "model": name, "reason": reason or None, "regions": result.region_count,
                  "seconds": round(result.seconds, 6), "tags": sorted(tags), "bytes_restored": result.bytes_restored,
                  "bytes_zeroed": result.bytes_zeroed, "evicted": list(result.evicted)}
        log.info("woke %s (%s): %d regions, %s restored, %s zero-filled, %.3f s", name,
                 detail if tags else "all tags", result.region_count, format_size(result.bytes_restored),
                 format_size(result.bytes_zeroed), result.seconds, extra=fields)
        self.events.publish("woke", model, detail, result.bytes_restored + result.bytes_zeroed)
