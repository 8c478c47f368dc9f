"""The client's bounds that engine authors may set: a `connect` argument, else an
environment variable, else the default."""

import math
import os

# How long a client or a controller keeps trying to attach again after the daemon went away (a restart).
RECONNECT = ("SLEEPD_RECONNECT_SECONDS", 120.0)
# How long a pool refill keeps asking while its model is busy with a sleep or wake (the daemon refuses
# an allocate that would wait for one, so that it holds no worker meanwhile): as long as a wake may take.
BUSY = ("SLEEPD_BUSY_SECONDS", 600.0)


def seconds(given: float | None, setting: tuple[str, float]) -> float:
    """`given`, else the setting's environment variable, else its default; refuses what is no
    positive number of seconds, naming where it came from."""
    variable, default = setting
    source, value = ("argument", given) if given is not None else (f"${variable}", os.environ.get(variable))
    if value is None:
        return default
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not (math.isfinite(number) and number > 0):
        raise ValueError(f"{source} {variable.removeprefix('SLEEPD_').lower()} must be a positive number of "
                         f"seconds, got {value!r}")
    return number
