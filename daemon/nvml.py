"""Device memory as the driver reports it, through NVML (nvidia-ml-py): what
every process on the GPU holds, sleepd's engines and everyone else alike.

NVML and CUDA number GPUs differently (PCI order against CUDA's ordering and
CUDA_VISIBLE_DEVICES), so devices are matched by UUID, never by index; a MIG
instance's "MIG-" UUID finds the instance, whose memory NVML reports apart from
its GPU's. NVML needs no CUDA context, which keeps the daemon free of one.
"""

from dataclasses import dataclass


class NvmlUnavailable(Exception):
    """NVML cannot be used here; the message says why."""


@dataclass(frozen=True)
class DriverMemory:
    total: int
    used: int
    free: int


class Nvml:
    """NVML handles for the CUDA devices, in CUDA ordinal order."""

    def __init__(self, pynvml, handles: list):
        self._pynvml = pynvml
        self._handles = handles

    @classmethod
    def open(cls, uuids: list[str]) -> "Nvml":
        """Initialises NVML and finds each CUDA device (by its UUID) in it."""
        try:
            import pynvml
        except ImportError:
            raise NvmlUnavailable("nvidia-ml-py is not installed") from None
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as error:
            raise NvmlUnavailable(f"NVML did not start: {error}") from None
        handles = []
        for ordinal, uuid in enumerate(uuids):
            try:
                handles.append(pynvml.nvmlDeviceGetHandleByUUID(uuid))
            except pynvml.NVMLError as error:
                pynvml.nvmlShutdown()
                raise NvmlUnavailable(f"NVML does not know CUDA device {ordinal} ({uuid}): {error}") from None
        return cls(pynvml, handles)

    def memory(self, device: int) -> DriverMemory:
        try:
            info = self._pynvml.nvmlDeviceGetMemoryInfo(self._handles[device])  # NVML is thread-safe
        except self._pynvml.NVMLError as error:  # a GPU fallen off the bus, a driver being reloaded
            raise NvmlUnavailable(f"NVML cannot read device {device}: {error}") from None
        return DriverMemory(int(info.total), int(info.used), int(info.free))
