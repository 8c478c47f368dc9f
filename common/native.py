"""The native backend a process uses to import and map memory the daemon created
(engines and movers alike)."""

from sleepd import _C


def gpu_uuid(device: int) -> str:
    """The UUID of this process's CUDA `device`, or "" where this process has no such GPU."""
    if _C.cuda_unavailable_reason() is not None:
        return ""
    backend = _C.CudaBackend()
    return backend.uuid(device) if device < backend.device_count else ""


def engine_backend(name: str, device: int):
    """A backend for `device`, with that device's context current where it has one."""
    if name == "host":
        return _C.HostBackend(0, 0)
    if name in ("cuda", "acl"):
        backend = _C.CudaBackend() if name == "cuda" else _C.AclBackend()
        backend.set_device(device)
        return backend
    raise ValueError(f"backend {name!r} is not available in this build")
