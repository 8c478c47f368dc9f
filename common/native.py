"""The native backend a process uses to import and map memory the daemon created
(engines and movers alike)."""

from sleepd import _C


def engine_backend(name: str):
    if name == "host":
        return _C.HostBackend(0, 0)
    raise ValueError(f"backend {name!r} is not available in this build")
