"""Choosing and building the daemon's memory backend.

The daemon itself never creates a device context: the CUDA backend's create,
export and release need none, and device totals come from the driver (or NVML).
"""

import logging
from dataclasses import dataclass

from sleepd import _C

log = logging.getLogger(__name__)

# Backends whose freshly created memory reads as zeros, so a discarded region
# needs no explicit zero-fill on wake.
ZEROED_ON_CREATE = {"host"}


@dataclass(frozen=True)
class Device:
    index: int
    name: str
    capacity: int
    reserve: int = 0  # kept outside sleepd: contexts, NCCL, activations

    @property
    def budget(self) -> int:
        return max(0, self.capacity - self.reserve)


class DaemonBackend:
    """The daemon's view: the backend plus the devices it manages."""

    def __init__(self, native, devices: list[Device]):
        self.native = native
        self.name = native.name
        self.devices = devices

    def used(self, device: int) -> int:
        return self.native.used(device)

    def free(self, device: int) -> int:
        """What sleepd may still hand out on the device: its budget less what it holds."""
        return max(0, self.devices[device].budget - self.used(device))


def host_backend(devices: int, capacity: int, reserve: int = 0) -> DaemonBackend:
    native = _C.HostBackend(devices, capacity)
    return DaemonBackend(native, [Device(i, f"host:{i}", capacity, reserve) for i in range(devices)])


def cuda_backend(reserve: int = 0) -> DaemonBackend:
    native = _C.CudaBackend()
    return DaemonBackend(native, [Device(i, f"cuda:{i}", native.total_memory(i), reserve)
                                  for i in range(native.device_count)])


def choose(requested: str, host_devices: int, host_capacity: int, reserve: int = 0) -> DaemonBackend:
    """`auto` takes CUDA when the driver loads and sees a device, and the host backend otherwise."""
    if requested == "cuda":
        reason = _C.cuda_unavailable_reason()
        if reason:
            raise SystemExit(f"sleepd: --backend cuda: {reason}")
        return cuda_backend(reserve)
    if requested == "auto":
        reason = _C.cuda_unavailable_reason()
        if reason is None:
            return cuda_backend(reserve)
        log.info("using the host backend: %s", reason)
    return host_backend(host_devices, host_capacity, reserve)
