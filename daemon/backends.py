"""Choosing and building the daemon's memory backend.

The daemon itself never creates a device context: the CUDA backend's create,
export and release need none, and device memory figures come from NVML, which
needs none either (from the driver's total, with a warning, where NVML is missing).
On ACL, allocating, exporting, authorising and freeing need only aclInit, but the
runtime reports a device's memory only to a process that has set the device: a
short-lived probe process asks it, so the daemon never sets one.
"""

import json
import logging
import subprocess
import sys
from dataclasses import dataclass

from sleepd import _C

from .nvml import DriverMemory, Nvml, NvmlUnavailable

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
    uuid: str = ""    # as nvidia-smi -L shows it (GPU-…, or MIG-… for a MIG instance); empty on the host backend

    @property
    def budget(self) -> int:
        return max(0, self.capacity - self.reserve)


class DaemonBackend:
    """The daemon's view: the backend plus the devices it manages."""

    def __init__(self, native, devices: list[Device], driver: Nvml | None = None):
        self.native = native
        self.name = native.name
        self.devices = devices
        self._driver = driver
        self._unreadable: set[int] = set()  # devices NVML failed on, so that the log says it once

    def used(self, device: int) -> int:
        return self.native.used(device)

    def driver_memory(self, device: int) -> DriverMemory | None:
        """The device's memory as the driver reports it, every process counted
        (None without NVML, or while NVML cannot read it: said once in the log)."""
        if self._driver is None:
            return None
        try:
            memory = self._driver.memory(device)
        except NvmlUnavailable as why:
            if device not in self._unreadable:
                self._unreadable.add(device)
                log.warning("%s; counting only sleepd's own memory on it until NVML reads it again", why)
            return None
        self._unreadable.discard(device)
        return memory

    def free(self, device: int) -> int:
        """What sleepd may still hand out on the device: its budget less what it
        holds, and never more than the driver says is free (other processes use
        the device too)."""
        room = self.devices[device].budget - self.used(device)
        driver = self.driver_memory(device)
        if driver is not None:
            room = min(room, driver.free)
        return max(0, room)


def host_backend(devices: int, capacity: int, reserve: int = 0) -> DaemonBackend:
    native = _C.HostBackend(devices, capacity)
    return DaemonBackend(native, [Device(i, f"host:{i}", capacity, reserve) for i in range(devices)])


# The daemon's movers hold a context of their own on each device, beside the engines' contexts.
_COMPUTE_MODES_REFUSED = {2: "PROHIBITED", 3: "EXCLUSIVE_PROCESS"}


def cuda_backend(reserve: int = 0) -> DaemonBackend:
    native = _C.CudaBackend()
    for device in range(native.device_count):
        mode = _COMPUTE_MODES_REFUSED.get(native.compute_mode(device))
        if mode:
            raise SystemExit(f"sleepd: --backend cuda: cuda:{device} is in {mode} compute mode, where sleepd's mover "
                             "cannot have a CUDA context beside the engine's; set the GPU to DEFAULT "
                             "(nvidia-smi -i N -c DEFAULT), or run an MPS server, which sleepd does not support yet")
    uuids = [native.uuid(i) for i in range(native.device_count)]
    try:
        driver = Nvml.open(uuids)
    except NvmlUnavailable as why:
        log.warning("device memory from the CUDA driver's totals, blind to other processes on the GPUs: %s", why)
        driver = None
    devices = [Device(i, f"cuda:{i}", driver.memory(i).total if driver else native.total_memory(i), reserve, uuid)
               for i, uuid in enumerate(uuids)]
    return DaemonBackend(native, devices, driver)


# Run in a child: setting a device makes a context, which the daemon must not hold.
_NPU_TOTALS = ("import json; from sleepd import _C; b = _C.AclBackend(); "
               "print(json.dumps([b.memory_info(i)[1] for i in range(b.device_count)]))")


def acl_backend(reserve: int = 0) -> DaemonBackend:
    native = _C.AclBackend()
    probe = subprocess.run([sys.executable, "-c", _NPU_TOTALS], capture_output=True, text=True, timeout=120)
    if probe.returncode != 0:
        raise SystemExit(f"sleepd: --backend acl: cannot read the NPUs' memory: {probe.stderr.strip()[-300:]}")
    totals = json.loads(probe.stdout)
    return DaemonBackend(native, [Device(i, f"acl:{i}", total, reserve) for i, total in enumerate(totals)])


_BACKENDS = {"cuda": (_C.cuda_unavailable_reason, cuda_backend), "acl": (_C.acl_unavailable_reason, acl_backend)}


def choose(requested: str, host_devices: int, host_capacity: int, reserve: int = 0) -> DaemonBackend:
    """`auto` takes CUDA, else ACL, when its runtime loads and sees a device, and the host backend otherwise."""
    if requested in _BACKENDS:
        unavailable, build = _BACKENDS[requested]
        reason = unavailable()
        if reason:
            raise SystemExit(f"sleepd: --backend {requested}: {reason}")
        return build(reserve)
    if requested == "auto":
        reasons = []
        for name, (unavailable, build) in _BACKENDS.items():
            reason = unavailable()
            if reason is None:
                return build(reserve)
            reasons.append(f"{name}: {reason}")
        log.info("using the host backend (%s)", "; ".join(reasons))
    return host_backend(host_devices, host_capacity, reserve)
