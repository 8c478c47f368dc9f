"""Where sleepd's sockets, host backup pool and state live by default.

The daemon and its clients resolve the socket the same way, so an engine finds
the daemon with no configuration: $SLEEPD_SOCKET, else the system socket under
/run/sleepd, else the per-user one under $XDG_RUNTIME_DIR. There is no fallback
under /tmp: any user could create that path first and answer as sleepd.
"""

import hashlib
import os

SYSTEM_SOCKET = "/run/sleepd/sleepd.sock"


def user_socket() -> str | None:
    """The per-user socket under $XDG_RUNTIME_DIR (a directory only its user may write), or None."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return os.path.join(runtime, "sleepd", "sleepd.sock") if runtime else None


def _writable_dir(path: str) -> bool:
    try:
        os.makedirs(path, mode=0o755, exist_ok=True)  # whatever the umask, never writable by others
    except OSError:
        return False
    return os.access(path, os.W_OK | os.X_OK)


def daemon_socket(requested: str | None) -> tuple[str, str | None]:
    """The path the daemon listens on, and a note to log when it had to fall back."""
    if requested:
        return requested, None
    if os.environ.get("SLEEPD_SOCKET"):
        return os.environ["SLEEPD_SOCKET"], None
    if _writable_dir(os.path.dirname(SYSTEM_SOCKET)):
        return SYSTEM_SOCKET, None
    fallback = user_socket()
    if fallback is None:
        return SYSTEM_SOCKET, (f"{os.path.dirname(SYSTEM_SOCKET)} is not writable and XDG_RUNTIME_DIR is not set; "
                               "give the daemon --socket (or $SLEEPD_SOCKET) in a directory only you may write")
    return fallback, f"{os.path.dirname(SYSTEM_SOCKET)} is not writable; listening on {fallback} instead"


def client_socket(requested: str | None) -> str:
    """The socket a client connects to: the explicit one, else the first daemon that is there."""
    if requested:
        return requested
    if os.environ.get("SLEEPD_SOCKET"):
        return os.environ["SLEEPD_SOCKET"]
    if os.path.exists(SYSTEM_SOCKET):
        return SYSTEM_SOCKET
    return user_socket() or SYSTEM_SOCKET


def fd_socket(grpc_socket: str) -> str:
    """The file-descriptor socket that lives beside a gRPC socket."""
    return grpc_socket + ".fds"


def default_pool_dir(grpc_socket: str) -> str:
    """A tmpfs directory unique to one daemon socket, so two daemons never share a pool."""
    digest = hashlib.sha256(os.path.abspath(grpc_socket).encode()).hexdigest()[:12]
    return os.path.join("/dev/shm", f"sleepd-{os.getuid()}-{digest}")


def default_state_dir() -> str:
    if os.environ.get("STATE_DIRECTORY"):  # set by systemd's StateDirectory=
        return os.environ["STATE_DIRECTORY"].split(":")[0]
    if os.geteuid() == 0:
        return "/var/lib/sleepd"
    state_home = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return os.path.join(state_home, "sleepd")
