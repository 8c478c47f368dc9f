"""The control plane's parts, wired together once: who uses which part is
visible here. No part reaches into another's internals."""

from dataclasses import dataclass

from .auth import Authorizer
from .backup_checks import BEFORE_RESUME, BackupChecks
from .backends import DaemonBackend
from .events import EventBus
from .controllers import Controllers
from .fanout import Fanout
from .mover import Mover
from .operations import Operations
from .pool import HostPool
from .quotas import Quotas
from .recovery import Checkpoints, Recovery, StateStore
from .registry import Registry
from .reporting import Reporter
from .room import Room
from .rules import SleepRules


@dataclass
class Core:
    backend: DaemonBackend
    pool: HostPool
    authorizer: Authorizer
    events: EventBus
    metrics: object
    registry: Registry
    room: Room
    controllers: Controllers
    operations: Operations
    recovery: Recovery
    backup_checks: BackupChecks  # host_pool.check_backups; stopped before the pool closes


def build(backend: DaemonBackend, pool: HostPool, movers: dict[int, Mover], rules: SleepRules, fanout: Fanout,
          metrics, authorizer: Authorizer, store: StateStore | None = None,
          default_policies: dict[str, dict] | None = None, quotas: dict | None = None,
          controller_timeout: float = 300.0, eviction_answer_seconds: float = 5.0,
          weight_sets: dict | None = None, check_backups: str = BEFORE_RESUME) -> Core:
    """`weight_sets`: the [weight_sets] table (kept_budget, shared_with); `check_backups`: host_pool.check_backups."""
    events = EventBus()
    backup_checks = BackupChecks(pool, metrics, events, check_backups)
    registry = Registry(backend, authorizer, default_policies or {}, forgotten=metrics.forget)
    room = Room(registry, backend, authorizer, events)
    checkpoints = Checkpoints(registry, backend.name, store)
    controllers = Controllers(registry, authorizer, events, controller_timeout)
    operations = Operations(registry, room, fanout, backend, pool, movers, rules,
                            Reporter(events, metrics), Quotas(quotas, registry, authorizer), checkpoints,
                            controllers, authorizer, eviction_answer_seconds, weight_sets or {}, backup_checks)
    recovery = Recovery(registry, backend, pool, operations)
    return Core(backend, pool, authorizer, events, metrics, registry, room, controllers, operations, recovery,
                backup_checks)
