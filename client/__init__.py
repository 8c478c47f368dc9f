"""What engine processes import: SleepClient, its regions, its errors, the Controller
of engines that run their own sleep, and the Waker of their other front ends.

Each loads at its first use, so that importing a part of the package (sleepctl's
command line, sleepd.client.ctl) loads no gRPC."""

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .client import SleepClient
    from .controller import Controller
    from .errors import SleepdError
    from .region import Region, State
    from .waker import Waker

_MODULES = {"SleepClient": ".client", "Controller": ".controller", "SleepdError": ".errors", "Region": ".region",
            "State": ".region", "Waker": ".waker"}
__all__ = list(_MODULES)


def __getattr__(name: str):
    if name not in _MODULES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = globals()[name] = getattr(importlib.import_module(_MODULES[name], __name__), name)
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
