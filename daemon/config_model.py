"""The typed configuration: what each setting is called, what kind of value it takes, its default and its
help, declared once on the Config that holds the effective values. Where values come from is config.py's
job; printing them is config_render.py's."""

import grp
import math
import os
import pwd
import re
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, NewType

import psutil

from sleepd.common import paths
from sleepd.common.limits import MAX_LEVEL, PRIORITY_MAX, PRIORITY_MIN
from sleepd.common.sizes import parse_size

from .rules import Action

Size = NewType("Size", int)  # bytes, written "512MiB" or "4GiB" (or as an integer) and printed back so
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
# The longest the daemon's own waits may be set to: a day already means "never" to an operator, and a far
# longer one overflows the timers that keep it.
DAY = 86400.0
# The most gRPC workers, and calls of one caller, that may be set: more threads than one process should run.
GRPC_MOST = 1 << 14


# ---- kinds of value: each turns a TOML value or a flag's or variable's string into a value, or raises ValueError ----

def text(value) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{value!r} is not a non-empty string")
    return value


def fs_path(value) -> str:
    return os.path.expanduser(text(value))


def optional_fs_path(value) -> str:
    """A path, or "" for none."""
    return "" if value == "" else fs_path(value)


def size(minimum: int) -> Callable[[Any], int]:
    def parse(value) -> int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ValueError(f"{value!r} is not a size; write for example \"512MiB\" or \"4GiB\" (or bytes)")
        result = value if isinstance(value, int) else parse_size(value)
        if result < minimum:
            raise ValueError(f"{value!r} is too small; it must be at least {minimum} bytes")
        return result
    return parse


def integer(minimum: int, maximum: int) -> Callable[[Any], int]:
    def parse(value) -> int:
        if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{value!r} is not a whole number")
        if not minimum <= value <= maximum:
            raise ValueError(f"{value} is out of range; it must be from {minimum} to {maximum}")
        return value
    return parse


def seconds(positive: bool, maximum: float = math.inf) -> Callable[[Any], float]:
    def parse(value) -> float:
        try:
            number = float(value) if isinstance(value, str) else value
        except ValueError:
            number = None
        if isinstance(number, bool) or not isinstance(number, (int, float)) or number != number:
            raise ValueError(f"{value!r} is not a number of seconds")
        if number < 0 or (positive and number == 0):
            raise ValueError(f"{value} must be {'positive' if positive else 'zero or positive'}")
        if number > maximum:
            raise ValueError(f"{value} is too long; it must be at most {maximum:g} seconds")
        return float(number)
    return parse


def boolean(value) -> bool:
    words = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in words:
        return words[value.strip().lower()]
    raise ValueError(f"{value!r} is not true or false")


def choice(*options: str, fold: Callable[[str], str] = str.lower) -> Callable[[Any], str]:
    def parse(value) -> str:
        if isinstance(value, str) and fold(value.strip()) in options:
            return fold(value.strip())
        raise ValueError(f"{value!r} is not one of {', '.join(options)}")
    return parse


def address(*words: str) -> Callable[[Any], str]:
    """HOST:PORT (an IPv6 host in brackets), or one of `words` ("off", "")."""
    def parse(value) -> str:
        given = value.strip() if isinstance(value, str) else None
        if given in words:
            return given
        if given is not None:
            host, _, port = given.rpartition(":")
            if host and port.isdigit() and int(port) <= 65535 and (not host.startswith("[") or host.endswith("]")):
                return given
        alternatives = " or ".join(repr(word) for word in words)
        raise ValueError(f"{value!r} is not HOST:PORT (port 0 picks a free one) or {alternatives}")
    return parse


def group(value) -> str:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*\$?", text(value)):
        raise ValueError(f"{value!r} is not a group name")
    return value


# ---- the settings ----

@dataclass(frozen=True)
class Setting:
    key: str                          # the dotted TOML key
    parse: Callable[[Any], Any]
    default: Any                      # a value, or a function of the values of the settings declared before it
    help: str
    metavar: str = "VALUE"
    type: Any = None                  # Config's annotation: bool takes --no-FLAG, Size prints as "4GiB"

    @property
    def attr(self) -> str:
        """Config's attribute: `host_pool.budget` is host_pool_budget."""
        return self.key.replace(".", "_")

    @property
    def flag(self) -> str:
        return "--" + self.attr.replace("_", "-")

    @property
    def env(self) -> str:
        return "SLEEPD_" + self.attr.upper()

    def default_value(self, values: dict[str, Any]) -> Any:
        return self.default(values) if callable(self.default) else self.default


def _setting(key: str, parse: Callable[[Any], Any], default: Any, help: str, metavar: str = "VALUE"):
    return field(metadata={"setting": Setting(key, parse, default, help, metavar)})


@dataclass(frozen=True, kw_only=True)
class Config:
    """The effective configuration: one attribute per setting, the tag rules and model policies, where
    each value came from, and the file read (if any)."""
    backend: str = _setting(
        "backend", choice("auto", "host", "cuda", "acl"), "auto",
        "memory backend: auto (cuda when the driver loads and sees a device, else host), host or cuda",
        "{auto,host,cuda}")
    socket: str = _setting(
        "socket", fs_path, lambda _: paths.daemon_socket(None)[0],
        "gRPC Unix socket; the fd socket is PATH.fds beside it "
        "(default /run/sleepd/sleepd.sock, else $XDG_RUNTIME_DIR/sleepd/sleepd.sock)", "PATH")
    metrics_address: str = _setting(
        "metrics.address", address("off"), "127.0.0.1:9464",
        "HOST:PORT for Prometheus /metrics; port 0 picks a free one; off disables", "HOST:PORT")
    metrics_token_file: str = _setting(
        "metrics.token_file", optional_fs_path, "",
        "file (mode 0600 or stricter) holding the bearer token a scraper presents to get the per-model series "
        "(model names, tags, sizes) besides the node's; empty: the node's series only", "PATH")
    state_dir: str = _setting(
        "state_dir", fs_path, lambda _: paths.default_state_dir(),
        "where the daemon keeps daemon.json (default $STATE_DIRECTORY, /var/lib/sleepd as root, "
        "else $XDG_STATE_HOME/sleepd)", "DIR")
    hook_timeout: float = _setting(
        "hook_timeout", seconds(positive=True), 30.0,
        "seconds each engine has to answer a quiesce or resume, whose hooks it runs", "SECONDS")
    device_step_timeout: float = _setting(
        "device_step_timeout", seconds(positive=True), 10.0,
        "seconds each engine has to unmap or map its memory while the daemon holds the device for that "
        "round; past it that engine's operation is rolled back, so other models on the device go first",
        "SECONDS")
    controller_timeout: float = _setting(
        "controller_timeout", seconds(positive=True), 300.0,
        "seconds a model's controller has to run its engine's own sleep or wake asked from outside it",
        "SECONDS")
    eviction_answer_seconds: float = _setting(
        "eviction_answer_seconds", seconds(positive=True), 5.0,
        "seconds an eviction waits for a model's ranks, or its controller, to answer before it skips "
        "that model and tries the next", "SECONDS")
    reattach_seconds: float = _setting(
        "reattach_seconds", seconds(positive=True, maximum=DAY), 60.0,
        "seconds a restarted daemon waits for the engines of the models it recovered to attach again and hand "
        "back their memory; then what only an absent engine held is released", "SECONDS")
    wake_wait_limit: float = _setting(
        "wake_wait_limit", seconds(positive=True, maximum=DAY), 600.0,
        "seconds an ensure-awake that waits for another's wake (wait_only) waits at most; a request's own "
        "timeout is capped by it", "SECONDS")
    admin_group: str = _setting(
        "admin_group", group, "sleepd-admin",
        "members of this group (and root) may act on every model; others only on their uid's", "GROUP")
    device_reserve: Size = _setting(
        "device.reserve", size(0), 0,
        "bytes per device kept outside sleepd (CUDA context, NCCL, activations); "
        "a device's budget is its capacity less this", "SIZE")
    host_devices: int = _setting("host.devices", integer(1, 1024), 1, "devices the host backend simulates", "N")
    host_device_capacity: Size = _setting(
        "host.device_capacity", size(1), parse_size("4GiB"),
        "bytes per simulated host device, e.g. 512MiB or 4GiB", "SIZE")
    host_pool_dir: str = _setting(
        "host_pool.dir", fs_path, lambda values: paths.default_pool_dir(values["socket"]),
        "tmpfs directory of the host backup pool (default: one per socket under /dev/shm)", "DIR")
    host_pool_budget: Size = _setting(
        "host_pool.budget", size(1), lambda _: psutil.virtual_memory().total // 2 // 4096 * 4096,
        "bytes the host backup pool may hold (default: half the RAM)", "SIZE")
    host_pool_prefault: bool = _setting(
        "host_pool.prefault", boolean, False,
        "commit the whole pool at start and keep its pages, so even the first sleep runs at full speed")
    host_pool_keep_freed_seconds: float = _setting(
        "host_pool.keep_freed_seconds", seconds(positive=False, maximum=DAY), 0.0,
        "seconds the pool keeps the pages of freed backups for the next sleep before giving them back "
        "to the kernel (0: at once)", "SECONDS")
    host_pool_check_backups: str = _setting(
        "host_pool.check_backups", choice("before_resume", "after_resume"), "before_resume",
        "when a wake checks a backup against its checksums: before_resume (as it copies it back; a damaged "
        "backup fails the wake) or after_resume (the daemon checks the pool's copy once the model runs, then "
        "frees it; a model runs on bad bytes until that check flags them)", "{before_resume,after_resume}")
    log_level: str = _setting(
        "log.level", choice(*LOG_LEVELS, fold=str.upper), "INFO", "DEBUG, INFO, WARNING or ERROR",
        "{DEBUG,INFO,WARNING,ERROR}")
    log_format: str = _setting(
        "log.format", choice("text", "json"), "text",
        "text, or json: one JSON object per line (time, level, logger, message, fields) for log shippers",
        "{text,json}")
    tcp_address: str = _setting(
        "tcp.address", address(""), "",
        "HOST:PORT for control over TCP, TLS and a bearer token only (empty: no TCP listener)", "HOST:PORT")
    tcp_cert: str = _setting(
        "tcp.cert", optional_fs_path, "", "TLS certificate chain (PEM) for the TCP listener", "PATH")
    tcp_key: str = _setting("tcp.key", optional_fs_path, "", "TLS private key (PEM) for the TCP listener", "PATH")
    tcp_token_file: str = _setting(
        "tcp.token_file", optional_fs_path, "", "file holding the bearer token TCP clients must present", "PATH")
    fd_socket_connections_per_uid: int = _setting(
        "fd_socket.connections_per_uid", integer(1, 1 << 16), 256,
        "connections to the fd socket one uid may hold at once, root's included", "N")
    fd_socket_connections: int = _setting(
        "fd_socket.connections", integer(1, 1 << 20), 4096,
        "connections to the fd socket all uids but root may hold together", "N")
    fd_socket_workers: int = _setting(
        "fd_socket.workers", integer(2, 256), 8,
        "threads that answer the fd socket's requests (an allocate may wait for its model)", "N")
    fd_socket_allocates_per_uid: int = _setting(
        "fd_socket.allocates_per_uid", integer(1, 255), 2,
        "allocates (pool refills) of one uid the fd socket's workers may hold at once; fewer than fd_socket.workers",
        "N")
    fd_socket_allocate_wait_seconds: float = _setting(
        "fd_socket.allocate_wait_seconds", seconds(positive=True, maximum=60.0), 1.0,
        "seconds an allocate waits for its model's sleep or wake to end before it is refused ABORTED and the "
        "engine asks again", "SECONDS")
    grpc_workers: int = _setting(
        "grpc.workers", integer(2, GRPC_MOST), 1024, "threads that serve gRPC calls on the Unix socket", "N")
    grpc_admin_reserve: int = _setting(
        "grpc.admin_reserve", integer(1, GRPC_MOST - 1), 64,
        "of grpc.workers, how many callers other than root and admin_group never take together", "N")
    grpc_calls_per_uid: int = _setting(
        "grpc.calls_per_uid", integer(1, GRPC_MOST), 128,
        "gRPC calls (streams included) one uid other than root and admin_group may have in progress", "N")
    grpc_event_streams_per_uid: int = _setting(
        "grpc.event_streams_per_uid", integer(1, GRPC_MOST), 16,
        "of grpc.calls_per_uid, how many may be Events streams", "N")
    grpc_sessions_per_uid: int = _setting(
        "grpc.sessions_per_uid", integer(1, GRPC_MOST), 128,
        "engine sessions (one per engine process) one uid other than root and admin_group may hold, "
        "apart from its calls", "N")
    grpc_anonymous_calls: int = _setting(
        "grpc.anonymous_calls", integer(0, GRPC_MOST), 16,
        "gRPC calls in progress that callers without a token may have together", "N")
    grpc_anonymous_event_streams: int = _setting(
        "grpc.anonymous_event_streams", integer(0, GRPC_MOST), 4,
        "of grpc.anonymous_calls, how many may be Events streams", "N")
    weight_sets_kept_budget: Size = _setting(
        "weight_sets.kept_budget", size(0), 0,
        "device bytes per device that weight sets no engine has joined may keep (least recently used leave "
        "first, to the host pool, else dropped); 0: no limit of their own, they give way to any allocation "
        "or wake that needs the room", "SIZE")
    weight_sets_shared_with: str = _setting(
        "weight_sets.shared_with", lambda value: sharing_text(value), "",
        "who may join whose weight sets besides the owner: OWNER:USER pairs, users by name or uid, separated "
        "by spaces or commas (\"alice:bob alice:carol\"); joining engines trust the owner's keys",
        "OWNER:USER ...")
    weight_sets_stop_offload_seconds: float = _setting(
        "weight_sets.stop_offload_seconds", seconds(positive=False, maximum=DAY), 30.0,
        "seconds a clean stop spends moving kept weight sets that are only on the device to the host pool, so "
        "that the restarted daemon has them; keep it well under the service's stop timeout (TimeoutStopSec)",
        "SECONDS")
    swap_batch: Size = _setting(
        "swap.batch", size(1 << 20), parse_size("64MiB"),
        "bytes a swap puts to sleep at a time: the incoming model's restore starts once the first batch is "
        "out, and each batch is one unmap round with the engines", "SIZE")

    rules: dict[int, dict[str, Action]]       # [rules.LEVEL], merged over rules.DEFAULT_RULES
    models: dict[str, dict[str, Any]]         # [models.NAME]: the MODEL_KEYS the file gives
    quotas: dict[str, Any]                    # {"default": {...}, "users": {uid: {...}}, "groups": {gid: {...}}}
    sources: dict[str, str]                   # key: "flag --x", "environment SLEEPD_X", "file FILE:LINE" or "default"
    path: str | None                          # the file read
    check_config: bool = False

    @property
    def tcp_enabled(self) -> bool:
        return bool(self.tcp_address)

    def table(self, name: str) -> dict[str, Any]:
        """The values of a table's settings by key within it: table("fd_socket")["workers"]."""
        return {setting.key.partition(".")[2]: getattr(self, setting.attr) for setting in SETTINGS
                if setting.key.startswith(name + ".")}

    def notes(self, startup: bool = False) -> list[str]:
        """What is valid but worth a warning (at startup, less what the daemon's parts say themselves)."""
        notes = []
        if self.sources["socket"] == "default" and self.socket != paths.SYSTEM_SOCKET:
            notes.append(f"{os.path.dirname(paths.SYSTEM_SOCKET)} is not writable; listening on {self.socket} instead")
        try:
            grp.getgrnam(self.admin_group)
        except KeyError:
            if not startup:
                notes.append(f"admin_group {self.admin_group!r} does not exist on this machine; "
                             "only root may act on every model")
        return notes


SETTINGS = [replace(f.metadata["setting"], type=f.type) for f in fields(Config) if "setting" in f.metadata]
BY_KEY = {setting.key: setting for setting in SETTINGS}
TABLES = {key.split(".")[0] for key in BY_KEY if "." in key} | {"rules", "models", "quotas"}
POLICY_KEYS: dict[str, Callable[[Any], Any]] = {
    "priority": integer(PRIORITY_MIN, PRIORITY_MAX),
    "pinned": boolean,
    "eviction_level": integer(0, MAX_LEVEL),
    "idle_seconds": seconds(positive=False),
}


def _account(kind: str, lookup: Callable[[str], int]) -> Callable[[Any], int]:
    """A parser of a numeric id, or of a name of this machine's `kind` (user, group) as its id."""
    def parse(value) -> int:
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
        if isinstance(value, str) and value.strip():
            try:
                return lookup(value)
            except KeyError:
                raise ValueError(f"{value!r} is no {kind} on this machine") from None
        raise ValueError(f"{value!r} is not an id or a {kind} name")
    return parse


user_id = _account("user", lambda name: pwd.getpwnam(name).pw_uid)
group_id = _account("group", lambda name: grp.getgrnam(name).gr_gid)


def sharing_text(value) -> str:
    """weight_sets.shared_with: "OWNER:USER ..." (users by name or uid), written back with uids."""
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a string of OWNER:USER pairs")
    return " ".join(f"{owner}:{user}" for owner, user in sharing_pairs(value))


def sharing_pairs(text: str) -> list[tuple[int, int]]:
    """(owner uid, user uid) for each OWNER:USER of weight_sets.shared_with."""
    pairs = []
    for word in filter(None, re.split(r"[\s,]+", text.strip())):
        owner, colon, user = word.partition(":")
        if not colon:
            raise ValueError(f"{word!r} is not OWNER:USER")
        pairs.append((user_id(int(owner) if owner.isdigit() else owner), user_id(int(user) if user.isdigit() else user)))
    return pairs


# [models.NAME]: a policy, and the owner it is for (see registry.py: a policy is no prize for a name's first claimant).
MODEL_KEYS: dict[str, Callable[[Any], Any]] = {**POLICY_KEYS, "owner": user_id}
# [quotas.default], [quotas.users.USER], [quotas.groups.GROUP]: bytes of each, for one uid's models together,
QUOTA_BYTES: dict[str, Callable[[Any], Any]] = {"device": size(0), "host_pool": size(0)}
# and how many models one uid may own and how many regions its models may hold: every name and region is
# daemon memory, descriptors and metric series.
QUOTA_COUNTS: dict[str, Callable[[Any], Any]] = {"models": integer(0, 1 << 31), "regions": integer(0, 1 << 31)}
QUOTA_KEYS = {**QUOTA_BYTES, **QUOTA_COUNTS}
# The counts every non-admin uid gets unless [quotas.default] (or an entry of its own) says otherwise.
DEFAULT_CAPS = {"models": 64, "regions": 16384}
