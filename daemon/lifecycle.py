"""A region's life, in one place. Every state change goes through `advance`.

    MAPPED ──begin_offload──▶ OFFLOADING ──released──▶ OFFLOADED
      │  ▲                        │                        │
      │  └─────────abort──────────┘                        │
      └──────released (discard)──▶ DISCARDED               │
                                      │                    │
                   begin_restore ◀────┴────────────────────┘
                         ▼
                     RESTORING ──restored──▶ MAPPED
                         └──abort──▶ back to OFFLOADED (backup kept) or DISCARDED

"released" means the daemon dropped its own handle after every engine acked
its unmap; only then is the device memory gone.
"""

from enum import IntEnum


class RegionState(IntEnum):
    # Values match sleepd.v1.RegionState.
    MAPPED = 1
    OFFLOADING = 2
    OFFLOADED = 3
    RESTORING = 4
    DISCARDED = 5

    @property
    def label(self) -> str:
        return self.name.lower()


_TRANSITIONS = {
    (RegionState.MAPPED, "begin_offload"): RegionState.OFFLOADING,
    (RegionState.OFFLOADING, "abort"): RegionState.MAPPED,
    (RegionState.OFFLOADING, "released"): RegionState.OFFLOADED,
    (RegionState.MAPPED, "released"): RegionState.DISCARDED,
    (RegionState.OFFLOADED, "begin_restore"): RegionState.RESTORING,
    (RegionState.DISCARDED, "begin_restore"): RegionState.RESTORING,
    (RegionState.RESTORING, "restored"): RegionState.MAPPED,
}


class IllegalTransition(RuntimeError):
    pass


def advance(region, event: str) -> RegionState:
    """Moves `region.state` along the table above; anything else is a bug."""
    if region.state is RegionState.RESTORING and event == "abort":
        new = RegionState.OFFLOADED if region.backup is not None else RegionState.DISCARDED
    else:
        new = _TRANSITIONS.get((region.state, event))
    if new is None:
        raise IllegalTransition(f"region {region.id}: no transition from {region.state.label} on {event}")
    region.state = new
    return new
