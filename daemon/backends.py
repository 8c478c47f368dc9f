"""Choosing and building a memory backend, for the daemon and for the processes
that map its memory (engines, movers)."""

from dataclasses import dataclass

from sleepd import _C

# Backends whose freshly created memory reads as zeros, so a discarded region
# needs no explicit zero-fill on wake.
ZEROED_ON_CREATE = {"host"}


@dataclass(frozen=True)
class Device:
    index: int
    name: str
    capacity: int


class DaemonBackend:
    """The daemon's view: the backend plus the devices it manages."""

    def __init__(self, native, devices: list[Device]):
        self.native = native
        self.name = native.name
        self.devices = devices

    def used(self, device: int) -> int:
        return self.native.used(device)

    def free(self, device: int) -> int:
        return self.devices[device].capacity - self.used(device)


def host_backend(devices: int, capacity: int) -> DaemonBackend:
    native = _C.HostBackend(devices, capacity)
    return DaemonBackend(native, [Device(i, f"host:{i}", capacity) for i in range(devices)])

