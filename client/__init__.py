"""What engine processes import: SleepClient, its regions, its errors, the Controller
of engines that run their own sleep, and the Waker of their other front ends."""

from .client import SleepClient
from .controller import Controller
from .errors import SleepdError
from .region import Region, State
from .waker import Waker

__all__ = ["SleepClient", "Controller", "SleepdError", "Region", "State", "Waker"]
