"""Prometheus metrics, prefixed sleepd_. Memory gauges are read from the registry
at scrape time, so they can never drift from the daemon's state; durations,
bytes moved and errors are recorded as operations happen.

Two views: node-level series (devices, the host pool, sessions, bytes moved,
errors) for anyone who reaches the endpoint, and with them the per-model series
(model names, tags and sizes are the tenants') for the scraper with the bearer
token (metrics.token_file): `Status` shows a uid only its own models, and a
scrape cannot tell one uid from another.

A model's recorded series live as long as the daemon knows the model: when the
registry forgets it, they go (model names are the tenants' to choose, so
keeping them would let any tenant grow /metrics and the daemon without bound)."""

import threading
import weakref

from prometheus_client import CollectorRegistry, Counter, Histogram, make_wsgi_app
from prometheus_client.core import GaugeMetricFamily

from .metrics_server import MetricsServer, by_bearer_token

# Sleep and wake run from milliseconds (small models, level 2) to minutes.
_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    def __init__(self):
        self.sleep_seconds = Histogram("sleepd_sleep_duration_seconds", "Time to put a model to sleep.",
                                       ["model", "level"], buckets=_DURATION_BUCKETS, registry=None)
        self.wake_seconds = Histogram("sleepd_wake_duration_seconds", "Time to wake a model (all or some tags).",
                                      ["model"], buckets=_DURATION_BUCKETS, registry=None)
        self.wake_wait = Histogram("sleepd_wake_wait_seconds", "Time a request that found its model asleep "
                                   "waited for it to be awake (EnsureAwake), by how: woke (it woke the model) or "
                                   "waited (for another's wake).", ["model", "how"], buckets=_DURATION_BUCKETS,
                                   registry=None)
        self.bytes_moved = Counter("sleepd_moved_bytes", "Bytes copied by the movers.", ["direction"], registry=None)
        self.verified_bytes = Counter("sleepd_verified_bytes", "Bytes of backups checked against the checksums "
                                      "taken when they were written, as a wake copied them back (or, with "
                                      "host_pool.check_backups = after_resume, after the model resumed).",
                                      registry=None)
        self.damaged_backups = Counter("sleepd_damaged_backups", "Backups a wake found not as they were written "
                                       "(a checksum mismatch, a truncated slab): the wake failed, the backup kept; "
                                       "or an after-resume check did, once the model ran on them.",
                                       registry=None)
        self.verify_seconds = Counter("sleepd_verify_seconds", "Time the movers (and after-resume checks) spent "
                                      "checking backups against their checksums, the threads of a copy added up: "
                                      "what verification costs, beside sleepd_verified_bytes_total.", registry=None)
        self.errors = Counter("sleepd_errors", "Requests refused or failed, by operation and gRPC code.",
                              ["operation", "code"], registry=None)
        self.evictions = Counter("sleepd_evictions", "Models put to sleep by the daemon, by reason.",
                                 ["model", "reason"], registry=None)
        self.ranks_lost = Counter("sleepd_ranks_lost", "Engine processes whose lease broke without a goodbye.",
                                  ["model"], registry=None)
        self.weight_set_joins = Counter("sleepd_weight_set_joins", "Engines that joined a weight set rather than "
                                        "load what it holds again.", registry=None)
        self.weight_set_evictions = Counter("sleepd_weight_set_evictions", "Kept weight sets moved off their "
                                            "device (to the host pool, or dropped) for room or their budget.",
                                            registry=None)

        self.node = CollectorRegistry()       # for anyone
        self.everything = CollectorRegistry()  # for the token's bearer
        for metric in (self.bytes_moved, self.verified_bytes, self.verify_seconds, self.damaged_backups, self.errors,
                       self.weight_set_joins, self.weight_set_evictions):
            self.node.register(metric)
            self.everything.register(metric)
        for metric in (self.sleep_seconds, self.wake_seconds, self.wake_wait, self.evictions, self.ranks_lost):
            self.everything.register(metric)

        self._lock = threading.Lock()
        self._series: dict[str, set[tuple]] = {}  # model name -> (metric, its label values) recorded for it
        self._forgotten = weakref.WeakSet()        # Model objects whose series are gone

    def slept(self, model, level: int, seconds: float) -> None:
        self._per_model(model, self.sleep_seconds, str(level)).observe(seconds)

    def woke(self, model, seconds: float) -> None:
        self._per_model(model, self.wake_seconds).observe(seconds)

    def waited_for_wake(self, model, woke_it: bool, seconds: float) -> None:
        self._per_model(model, self.wake_wait, "woke" if woke_it else "waited").observe(seconds)

    def evicted(self, model, reason: str) -> None:
        self._per_model(model, self.evictions, reason).inc()

    def rank_lost(self, model) -> None:
        self._per_model(model, self.ranks_lost).inc()

    def forget(self, model) -> None:
        """The registry forgot `model`: its series go, and a late record for it (an operation
        that finished as its last rank left) brings none back."""
        with self._lock:
            self._forgotten.add(model)
            for metric, values in self._series.pop(model.name, ()):
                metric.remove(*values)

    def _per_model(self, model, metric, *others: str):
        """`metric`'s child for `model` (its first label) and the `others`, remembered so that
        forget() finds it; a throwaway child for a model already forgotten."""
        values = (model.name, *others)
        with self._lock:
            if model in self._forgotten:
                return _Discarded()
            self._series.setdefault(model.name, set()).add((metric, values))
            return metric.labels(*values)

    def watch(self, core) -> None:
        self.everything.register(_ModelCollector(core))
        node = _NodeCollector(core)
        self.node.register(node)
        self.everything.register(node)

    def serve(self, address: str, token: str) -> str:
        """Starts /metrics and returns the address it listens on (port 0 picks one). A request
        with `token` as its bearer token gets every series; one without, the node's."""
        host, _, port = address.rpartition(":")
        host = host.strip("[]") or "127.0.0.1"
        app = by_bearer_token(make_wsgi_app(self.node), make_wsgi_app(self.everything), token)
        server = MetricsServer(host, int(port), app)
        server.start()
        return f"{host}:{server.port}"


class _Discarded:
    def observe(self, _value) -> None:
        pass

    def inc(self, _amount=1) -> None:
        pass


class _ModelCollector:
    def __init__(self, core):
        self._core = core

    def collect(self):
        core = self._core
        region_bytes = GaugeMetricFamily("sleepd_region_bytes", "Bytes of regions by model, tag, state and device.",
                                         labels=["model", "tag", "state", "device"])
        sleeping = GaugeMetricFamily("sleepd_model_sleeping", "1 while a model is asleep (not every tag awake).",
                                     labels=["model"])
        totals: dict[tuple, int] = {}
        for model in core.registry.snapshot():
            sleeping.add_metric([model.name], 1 if model.sleeping else 0)
            for rank in model.ranks:
                for region in rank.regions:
                    key = (model.name, region.tag, region.state.label, core.backend.devices[region.device].name)
                    totals[key] = totals.get(key, 0) + region.mapped_size
        for labels, value in sorted(totals.items()):
            region_bytes.add_metric(list(labels), value)
        yield region_bytes
        yield sleeping


class _NodeCollector:
    def __init__(self, core):
        self._core = core

    def collect(self):
        core = self._core
        used = GaugeMetricFamily("sleepd_device_used_bytes", "Device memory held by sleepd.", labels=["device"])
        capacity = GaugeMetricFamily("sleepd_device_capacity_bytes", "Device memory in all.", labels=["device"])
        budget = GaugeMetricFamily("sleepd_device_budget_bytes", "Device memory sleepd may hand out "
                                   "(capacity less the reserve).", labels=["device"])
        committed = GaugeMetricFamily("sleepd_device_committed_bytes", "Device memory in use plus what "
                                      "sleeping models need to wake.", labels=["device"])
        driver = GaugeMetricFamily("sleepd_device_driver_bytes", "Device memory as the driver reports it "
                                   "(NVML), every process counted; absent without NVML.", labels=["device", "kind"])
        for device in core.backend.devices:
            used.add_metric([device.name], core.backend.used(device.index))
            capacity.add_metric([device.name], device.capacity)
            budget.add_metric([device.name], device.budget)
            committed.add_metric([device.name], core.room.committed(device.index))
            reported = core.backend.driver_memory(device.index)
            if reported is not None:
                driver.add_metric([device.name, "used"], reported.used)
                driver.add_metric([device.name, "free"], reported.free)
        yield from (used, capacity, budget, committed, driver)

        yield GaugeMetricFamily("sleepd_host_pool_used_bytes", "Host backup pool bytes in use.",
                                value=core.pool.used)
        yield GaugeMetricFamily("sleepd_host_pool_budget_bytes", "Host backup pool budget.",
                                value=core.pool.budget)
        yield GaugeMetricFamily("sleepd_sessions", "Engine processes attached.", value=core.registry.session_count())

        weight_sets = GaugeMetricFamily("sleepd_weight_set_bytes", "Bytes of weight sets, by state (joined: some "
                                        "engine maps it; kept: none) and where their memory is (device, host).",
                                        labels=["state", "where"])
        totals = {(state, where): 0 for state in ("joined", "kept") for where in ("device", "host")}
        for weight_set in core.registry.weight_sets():
            where = weight_set.where()
            if where in ("device", "host"):
                totals["kept" if weight_set.kept else "joined", where] += weight_set.size
        for labels, value in totals.items():
            weight_sets.add_metric(list(labels), value)
        yield weight_sets
