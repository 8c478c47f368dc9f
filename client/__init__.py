"""What engine processes import: SleepClient, its regions, and its errors."""

from .client import SleepClient
from .errors import SleepdError
from .region import Region, State

__all__ = ["SleepClient", "SleepdError", "Region", "State"]
