"""What engine processes import: SleepClient, its regions, its errors, and the Controller
of engines that run their own sleep."""

from .client import SleepClient
from .controller import Controller
from .errors import SleepdError
from .region import Region, State

__all__ = ["SleepClient", "Controller", "SleepdError", "Region", "State"]
