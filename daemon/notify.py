"""systemd's notification protocol (sd_notify(3)), spoken directly: no libsystemd.

A service of Type=notify finds a datagram socket in $NOTIFY_SOCKET (a path, or
an abstract name written with a leading '@') and sends it newline-separated
KEY=VALUE lines:

    READY=1       the sockets accept: systemd considers the service started
    STATUS=...    one line for `systemctl status`
    WATCHDOG=1    a keep-alive, due every $WATCHDOG_USEC microseconds (we ping at half)
    STOPPING=1    shutdown has begun

Without $NOTIFY_SOCKET every call is a no-op, so the daemon runs the same
under systemd, in a container or in a terminal.
"""

import logging
import os
import socket
import threading
from typing import Callable

from sleepd.common.sizes import format_size

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self, address: str | None, watchdog_usec: int | None = None):
        self._address = None
        self._socket = None
        self.watchdog_usec = watchdog_usec
        if address:
            if address.startswith("@"):
                self._address = "\0" + address[1:]
            elif address.startswith("/"):
                self._address = address
            else:
                log.warning("NOTIFY_SOCKET=%s is neither a path nor an abstract socket; not notifying systemd",
                            address)
        if self._address:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @classmethod
    def from_environment(cls, environ=None) -> "Notifier":
        """Reads the protocol's variables and removes them, so that the processes the
        daemon starts (movers) neither inherit nor misuse them."""
        environ = os.environ if environ is None else environ
        address = environ.pop("NOTIFY_SOCKET", None)
        usec = environ.pop("WATCHDOG_USEC", None)
        pid = environ.pop("WATCHDOG_PID", None)
        watchdog = None
        if usec and (not pid or pid == str(os.getpid())):
            try:
                watchdog = int(usec) if int(usec) > 0 else None
            except ValueError:
                log.warning("WATCHDOG_USEC=%r is not a number; no watchdog pings", usec)
        return cls(address, watchdog)

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between pings: half the watchdog timeout, as sd_watchdog_enabled(3) advises."""
        return self.watchdog_usec / 2e6 if self.watchdog_usec else None

    def notify(self, **fields) -> bool:
        """Sends one datagram; returns whether it went. Never raises: systemd being
        away must not take the daemon down."""
        if not self._socket:
            return False
        message = "\n".join(f"{key}={_one_line(value)}" for key, value in fields.items()) + "\n"
        try:
            self._socket.sendto(message.encode(), self._address)
            return True
        except OSError as error:
            log.debug("notify %s: %s", self._address.lstrip("\0"), error)
            return False

    def ready(self, status: str) -> bool:
        return self.notify(READY=1, STATUS=status)

    def status(self, status: str) -> bool:
        return self.notify(STATUS=status)

    def watchdog(self) -> bool:
        return self.notify(WATCHDOG=1)

    def stopping(self, status: str = "stopping") -> bool:
        return self.notify(STOPPING=1, STATUS=status)

    def close(self) -> None:
        if self._socket:
            self._socket.close()
            self._socket = None


def _one_line(value) -> str:
    return str(value).replace("\n", " ")


class StatusReporter(threading.Thread):
    """Keeps STATUS= current and pings the watchdog.

    Each round takes a summary of the daemon's state before it pings, and the
    summary takes the registry lock: a daemon wedged on that lock stops
    pinging, and systemd restarts it, rather than a thread that pings regardless.
    """

    def __init__(self, notifier: Notifier, summary: Callable[[], str], interval: float = 2.0):
        super().__init__(name="systemd-notify", daemon=True)
        self._notifier = notifier
        self._summary = summary
        watchdog = notifier.watchdog_interval
        self._interval = min(interval, watchdog) if watchdog else interval
        self._stop = threading.Event()
        self._last = None

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                status = self._summary()
            except Exception:  # a bug in the summary must not end the watchdog silently
                log.exception("summary for systemd failed")
                continue
            if self._stop.is_set():
                return
            fields = {}
            if status != self._last:
                fields["STATUS"] = status
                self._last = status
            if self._notifier.watchdog_usec:
                fields["WATCHDOG"] = 1
            if fields:
                self._notifier.notify(**fields)


def summary(core) -> str:
    """One line for `systemctl status`: models awake and asleep, device and host pool bytes, sessions."""
    models = core.registry.snapshot()
    asleep = sum(1 for model in models if model.sleeping)
    used = sum(core.backend.used(device.index) for device in core.backend.devices)
    budget = sum(device.budget for device in core.backend.devices)
    sessions = core.registry.session_count()
    return (f"models: {len(models) - asleep} awake, {asleep} asleep; devices: {format_size(used)} used of "
            f"{format_size(budget)}; host pool: {format_size(core.pool.used)} used of "
            f"{format_size(core.pool.budget)}; {sessions} session{'s' if sessions != 1 else ''}")
