"""sleepd's configuration: one table of settings, read from flags, the
environment and a TOML file, in that order of precedence, over defaults.

    sleepd --config /etc/sleepd/sleepd.toml      (the default path; a missing default file is fine)
    sleepd --check-config                        validates, prints the effective configuration, exits

Every scalar setting has a dotted TOML key, a flag and an environment variable
named after it: `host_pool.budget` is `--host-pool-budget` and
`SLEEPD_HOST_POOL_BUDGET`. Tag rules (`[rules.LEVEL]`) and per-model policy
defaults (`[models.NAME]`) live in the file only. docs/configuration.md lists
every setting; a test keeps that list and SETTINGS below in step.

Errors name the key and where it came from (file and line, environment
variable, or flag), all of them at once, so that one run of --check-config
shows everything to fix.
"""

import argparse
import difflib
import grp
import json
import os
import re
import tomllib
from dataclasses import dataclass, field
from typing import Any, Callable

import psutil

from sleepd.common import paths
from sleepd.common.sizes import format_size, parse_size

from .rules import DEFAULT_RULES, MAX_LEVEL, Action

DEFAULT_PATH = "/etc/sleepd/sleepd.toml"
CONFIG_ENV = "SLEEPD_CONFIG"
# sysexits.h EX_CONFIG: the unit's RestartPreventExitStatus= keeps a bad file from a restart loop.
EXIT_CONFIG = 78

# The same names the daemon accepts at attach (daemon/manager.py) and for tags.
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")
TAG_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


# ---- value kinds: each turns a TOML value or a string (flag, environment) into a value, or raises ValueError ----

def _text(value) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{value!r} is not a non-empty string")
    return value


def _path(value) -> str:
    return os.path.expanduser(_text(value))


def _optional_path(value) -> str:
    """A path, or "" for none."""
    if value == "":
        return ""
    return _path(value)


def _size(minimum: int) -> Callable[[Any], int]:
    def convert(value) -> int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ValueError(f"{value!r} is not a size; write for example \"512MiB\" or \"4GiB\" (or bytes)")
        size = value if isinstance(value, int) else parse_size(value)
        if size < minimum:
            raise ValueError(f"{value!r} is too small; it must be at least {minimum} bytes")
        return size
    return convert


def _integer(minimum: int, maximum: int | None = None) -> Callable[[Any], int]:
    def convert(value) -> int:
        if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{value!r} is not a whole number")
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"from {minimum} to {maximum}" if maximum is not None else f"at least {minimum}"
            raise ValueError(f"{value} is out of range; it must be {bound}")
        return value
    return convert


def _seconds(positive: bool) -> Callable[[Any], float]:
    def convert(value) -> float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ValueError(f"{value!r} is not a number of seconds") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            raise ValueError(f"{value!r} is not a number of seconds")
        if value < 0 or (positive and value == 0):
            raise ValueError(f"{value} must be {'positive' if positive else 'zero or positive'}")
        return float(value)
    return convert


_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def _boolean(value) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f"{value!r} is not true or false")


def _choice(*options: str, fold: Callable[[str], str] = str.lower) -> Callable[[Any], str]:
    def convert(value) -> str:
        if isinstance(value, str) and fold(value.strip()) in options:
            return fold(value.strip())
        raise ValueError(f"{value!r} is not one of {', '.join(options)}")
    return convert


def _address(allow: tuple[str, ...]) -> Callable[[Any], str]:
    """HOST:PORT (IPv6 in brackets), or one of the words in `allow` ("off", "")."""
    def convert(value) -> str:
        if isinstance(value, str) and value.strip() in allow:
            return value.strip()
        if isinstance(value, str):
            host, _, port = value.strip().rpartition(":")
            if host and port.isdigit() and int(port) <= 65535 and (not host.startswith("[") or host.endswith("]")):
                return value.strip()
        words = " or ".join(repr(word) for word in allow)
        raise ValueError(f"{value!r} is not HOST:PORT (port 0 picks a free one)" + (f" or {words}" if words else ""))
    return convert


def _group(value) -> str:
    name = _text(value)
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*\$?", name):
        raise ValueError(f"{value!r} is not a group name")
    return name


# ---- the settings ----

@dataclass(frozen=True)
class Setting:
    key: str                                   # dotted TOML key
    convert: Callable[[Any], Any]
    default: Any                               # a value, or a function of the settings resolved so far
    help: str
    metavar: str = "VALUE"
    boolean: bool = False
    size: bool = False                         # printed back as "4GiB" where exact

    @property
    def attr(self) -> str:
        """The attribute of Config: `host_pool.budget` -> host_pool_budget."""
        return self.key.replace(".", "_")

    @property
    def flag(self) -> str:
        return "--" + self.attr.replace("_", "-")

    @property
    def env(self) -> str:
        return "SLEEPD_" + self.attr.upper()


def _default_socket(_) -> str:
    """Where the daemon will listen when nothing names a socket, found without creating anything:
    the system socket if its directory is (or can be made) writable, else the per-user one."""
    directory = os.path.dirname(paths.SYSTEM_SOCKET)
    if os.path.isdir(directory):
        usable = os.access(directory, os.W_OK | os.X_OK)
    else:
        usable = os.access(os.path.dirname(directory), os.W_OK | os.X_OK)
    return paths.SYSTEM_SOCKET if usable else paths.user_socket()


def _half_the_ram(_) -> int:
    return psutil.virtual_memory().total // 2 // 4096 * 4096


SETTINGS: list[Setting] = [
    Setting("backend", _choice("auto", "host", "cuda"), "auto",
            "memory backend: auto (cuda when the driver loads and sees a device, else host), host or cuda",
            "{auto,host,cuda}"),
    Setting("socket", _path, _default_socket,
            "gRPC Unix socket; the handle socket is PATH.fds beside it "
            "(default /run/sleepd/sleepd.sock, else $XDG_RUNTIME_DIR/sleepd/sleepd.sock)", "PATH"),
    Setting("metrics.address", _address(("off",)), "127.0.0.1:9464",
            "HOST:PORT for Prometheus /metrics; port 0 picks a free one; off disables", "HOST:PORT"),
    Setting("state_dir", _path, lambda _: paths.default_state_dir(),
            "where the daemon keeps daemon.json (default $STATE_DIRECTORY, /var/lib/sleepd as root, "
            "else $XDG_STATE_HOME/sleepd)", "DIR"),
    Setting("hook_timeout", _seconds(positive=True), 30.0,
            "seconds each engine has to answer a quiesce, unmap, remap or resume", "SECONDS"),
    Setting("admin_group", _group, "sleepd",
            "members of this group (and root) may act on every model; others only on their uid's", "GROUP"),
    Setting("device.reserve", _size(0), 0,
            "bytes per device kept outside sleepd (CUDA context, NCCL, activations); "
            "a device's budget is its capacity less this", "SIZE", size=True),
    Setting("host.devices", _integer(1, 1024), 1, "devices the host backend simulates", "N"),
    Setting("host.device_capacity", _size(1), parse_size("4GiB"),
            "bytes per simulated host device, e.g. 512MiB or 4GiB", "SIZE", size=True),
    Setting("host_pool.dir", _path, lambda values: paths.default_pool_dir(values["socket"]),
            "tmpfs directory of the host backup pool (default: one per socket under /dev/shm)", "DIR"),
    Setting("host_pool.budget", _size(1), _half_the_ram,
            "bytes the host backup pool may hold (default: half the RAM)", "SIZE", size=True),
    Setting("host_pool.prefault", _boolean, False,
            "commit the whole pool at start and keep its pages, so even the first sleep runs at full speed",
            boolean=True),
    Setting("log.level", _choice(*LOG_LEVELS, fold=str.upper), "INFO",
            "DEBUG, INFO, WARNING or ERROR", "{DEBUG,INFO,WARNING,ERROR}"),
    Setting("log.format", _choice("text", "json"), "text",
            "text, or json: one JSON object per line (time, level, logger, message, fields) for log shippers",
            "{text,json}"),
    Setting("tcp.address", _address(("",)), "",
            "HOST:PORT for control over TCP, TLS and a bearer token only (empty: no TCP listener)", "HOST:PORT"),
    Setting("tcp.cert", _optional_path, "", "TLS certificate chain (PEM) for the TCP listener", "PATH"),
    Setting("tcp.key", _optional_path, "", "TLS private key (PEM) for the TCP listener", "PATH"),
    Setting("tcp.token_file", _optional_path, "", "file holding the bearer token TCP clients must present", "PATH"),
]
BY_KEY = {setting.key: setting for setting in SETTINGS}
POLICY_KEYS: dict[str, Callable[[Any], Any]] = {
    "priority": _integer(-(2 ** 31), 2 ** 31 - 1),
    "pinned": _boolean,
    "eviction_level": _integer(0, MAX_LEVEL),
    "idle_seconds": _seconds(positive=False),
}
TABLES = {key.split(".")[0] for key in BY_KEY if "." in key} | {"rules", "models"}


# ---- errors ----

@dataclass
class Problem:
    where: str      # "sleepd.toml:12", "environment SLEEPD_X", "flag --x"
    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.key}: {self.message}" if self.key else f"{self.where}: {self.message}"


class ConfigError(Exception):
    def __init__(self, problems: list[Problem]):
        super().__init__("\n".join(str(problem) for problem in problems))
        self.problems = problems


# ---- where keys are in the file (tomllib gives no positions for semantic errors) ----

_BARE = r"[A-Za-z0-9_-]+"
_BASIC = r'"(?:[^"\\]|\\.)*"'
_LITERAL = r"'[^']*'"
_KEY_PART = re.compile(rf"\s*({_BARE}|{_BASIC}|{_LITERAL})\s*")


def _read_key(text: str, start: int = 0) -> tuple[tuple[str, ...], int] | None:
    """A dotted key at `start`: its parts and where it ends, or None."""
    parts, position = [], start
    while True:
        match = _KEY_PART.match(text, position)
        if not match:
            return None
        token = match.group(1)
        if token[0] == '"':
            try:
                token = json.loads(token)  # TOML's basic-string escapes are JSON's, give or take \e and \U
            except ValueError:
                token = token[1:-1]
        elif token[0] == "'":
            token = token[1:-1]
        parts.append(token)
        position = match.end()
        if position < len(text) and text[position] == ".":
            position += 1
            continue
        return tuple(parts), position


def key_lines(text: str) -> dict[tuple[str, ...], int]:
    """The line (1-based) where each table header and key of a TOML text is written."""
    lines: dict[tuple[str, ...], int] = {}
    table: tuple[str, ...] = ()
    closing = None  # the delimiter of a multi-line string we are inside
    for number, line in enumerate(text.splitlines(), 1):
        if closing:
            if closing in line:
                closing = None
            continue
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.startswith("["):
            double = stripped.startswith("[[")
            found = _read_key(stripped, 2 if double else 1)
            if found:
                table = found[0]
                lines.setdefault(table, number)
            continue
        found = _read_key(line)
        if not found or not line[found[1]:].lstrip().startswith("="):
            continue
        key = table + found[0]
        lines.setdefault(key, number)
        value = line[found[1]:].lstrip()[1:]
        for delimiter in ('"""', "'''"):
            if value.count(delimiter) % 2 == 1:
                closing = delimiter
        # Keys of an inline table on the same line: `policy = { priority = 5, pinned = true }`.
        for inner in re.finditer(r"[{,]\s*", value):
            inner_key = _read_key(value, inner.end())
            if inner_key and value[inner_key[1]:].lstrip().startswith("="):
                lines.setdefault(key + inner_key[0], number)
    return lines


# ---- the configuration ----

@dataclass
class Config:
    """The effective configuration: every setting as an attribute (host_pool.budget -> host_pool_budget),
    plus `rules`, `models`, where each value came from, and the file read (if any)."""
    values: dict[str, Any]
    rules: dict[int, dict[str, Action]]
    models: dict[str, dict[str, Any]]
    sources: dict[str, str] = field(default_factory=dict)
    path: str | None = None
    check_config: bool = False

    def __getattr__(self, name: str):
        for setting in SETTINGS:
            if setting.attr == name:
                return self.values[setting.key]
        raise AttributeError(name)

    def explicit(self, key: str) -> bool:
        return self.sources.get(key, "default") != "default"

    @property
    def tcp_enabled(self) -> bool:
        return bool(self.values["tcp.address"])

    def notes(self, startup: bool = False) -> list[str]:
        """What is valid but worth a warning (at startup, less what the daemon's parts say themselves)."""
        notes = []
        try:
            grp.getgrnam(self.values["admin_group"])
        except KeyError:
            if not startup:
                notes.append(f"admin_group {self.values['admin_group']!r} does not exist on this machine; "
                             "only root may act on every model")
        return notes

    def render(self) -> str:
        """The effective configuration as TOML that --config accepts, each value with where it came from."""
        head = [f"# sleepd effective configuration; file: {self.path or 'none'}",
                "# precedence: flag > environment > file > default"]
        head += [f"# note: {note}" for note in self.notes()] + [""]
        body: list[tuple[str, str]] = []  # (line, comment)
        current = None
        for setting in sorted(SETTINGS, key=lambda s: ("." in s.key, s.key.rpartition(".")[0])):
            table, _, key = setting.key.rpartition(".")
            if table != (current or ""):
                body += [("", ""), (f"[{table}]", "")]
                current = table
            value = self.values[setting.key]
            comment = self.sources.get(setting.key, "default")
            if setting.size and not _toml_value(setting, value).startswith('"'):
                comment += f" ({format_size(value)})"
            body.append((f"{key} = {_toml_value(setting, value)}", comment))
        for level, tags in sorted(self.rules.items()):
            body += [("", ""), (f"[rules.{level}]", "")]
            for tag, action in sorted(tags.items()):
                body.append((f'{_toml_key(tag)} = "{action.value}"',
                             self.sources.get(f"rules.{level}.{tag}", "default")))
        for name, policy in sorted(self.models.items()):
            body += [("", ""), (f"[models.{_toml_key(name)}]", "")]
            for key, value in policy.items():
                body.append((f"{key} = {_toml_scalar(value)}", self.sources.get(f"models.{name}.{key}", "")))
        width = max(len(line) for line, comment in body if comment)
        lines = head + ["" if not line else f"{line.ljust(width)}  # {comment}" if comment else line
                        for line, comment in body]
        return "\n".join(lines) + "\n"


def _toml_key(key: str) -> str:
    return key if re.fullmatch(_BARE, key) else '"' + key.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _toml_scalar(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _toml_value(setting: Setting, value) -> str:
    if setting.size:
        for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20)):
            if value and value % scale == 0:
                return f'"{value // scale}{unit}"'
    return _toml_scalar(value)


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="PATH",
                        help=f"TOML configuration file (default ${CONFIG_ENV}, else {DEFAULT_PATH} if it exists)")
    parser.add_argument("--check-config", action="store_true",
                        help="validate the configuration, print the effective settings and exit "
                             f"(status 0, or {EXIT_CONFIG} with one line per error)")
    for setting in SETTINGS:
        if setting.boolean:
            parser.add_argument(setting.flag, dest=setting.attr, action=argparse.BooleanOptionalAction,
                                default=None, help=f"{setting.help} [{setting.key}, ${setting.env}]")
        else:
            parser.add_argument(setting.flag, dest=setting.attr, metavar=setting.metavar, default=None,
                                help=f"{setting.help} [{setting.key}, ${setting.env}]")


def parser(description: str = "") -> argparse.ArgumentParser:
    result = argparse.ArgumentParser(prog="sleepd", description=description)
    _arguments(result)
    return result


def load(argv: list[str] | None = None, environ: dict[str, str] | None = None,
         description: str = "") -> Config:
    """Flags, then the environment, then the file, then defaults. Raises ConfigError
    naming every problem; argparse exits on a flag it does not know."""
    environ = os.environ if environ is None else environ
    args = parser(description).parse_args(argv)
    problems: list[Problem] = []

    path, explicit = args.config, True
    if path is None and environ.get(CONFIG_ENV):
        path = environ[CONFIG_ENV]
    if path is None:
        path, explicit = DEFAULT_PATH, False
    document, lines, shown = {}, {}, path
    try:
        with open(path, "rb") as file:
            raw = file.read()
    except FileNotFoundError:
        if explicit:
            problems.append(Problem(path, "", "configuration file not found"))
        path = None
        raw = None
    except OSError as error:
        problems.append(Problem(path, "", f"cannot read the configuration file: {error.strerror}"))
        path, raw = None, None
    if raw is not None:
        try:
            text = raw.decode()
            document = tomllib.loads(text)
            lines = key_lines(text)
        except UnicodeDecodeError as error:
            problems.append(Problem(shown, "", f"not UTF-8 text ({error.reason} at byte {error.start})"))
        except tomllib.TOMLDecodeError as error:
            problems.append(_syntax_problem(shown, str(error)))

    def where(key: tuple[str, ...]) -> str:
        # The key itself; else the first key written under it (`a.b = 1` holds `a`); else its table.
        deeper = [line for found, line in lines.items() if found[:len(key)] == key]
        if deeper:
            return f"{shown}:{min(deeper)}"
        for length in range(len(key), 0, -1):
            if key[:length] in lines:
                return f"{shown}:{lines[key[:length]]}"
        return shown

    file_values, rules, models, sources = _read_document(document, where, problems)

    values: dict[str, Any] = {}
    for setting in SETTINGS:
        flag_value = getattr(args, setting.attr)
        if flag_value is not None:
            value, source = flag_value, f"flag {setting.flag}"
        elif environ.get(setting.env) not in (None, ""):
            value, source = environ[setting.env], f"environment {setting.env}"
        elif setting.key in file_values:
            value, source = file_values[setting.key]
        else:
            values[setting.key] = setting.default(values) if callable(setting.default) else setting.default
            continue
        try:
            values[setting.key] = setting.convert(value)
            sources[setting.key] = source
        except ValueError as error:
            place = source[5:] if source.startswith("file ") else source
            problems.append(Problem(place, setting.key, str(error)))
            values[setting.key] = setting.default(values) if callable(setting.default) else setting.default

    _check_tcp(values, sources, problems)
    if problems:
        raise ConfigError(sorted(problems, key=_file_order))
    return Config(values, rules, models, sources, path, args.check_config)


def _file_order(problem: Problem) -> tuple[int, int]:
    """File problems first, by line; then the environment's and the flags', as found."""
    match = re.search(r":(\d+)(?::\d+)?$", problem.where)
    return (0, int(match.group(1))) if match else (1, 0)


def _syntax_problem(path: str, message: str) -> Problem:
    match = re.search(r"\s*\(at line (\d+), column (\d+)\)$", message)
    if match:
        return Problem(f"{path}:{match.group(1)}:{match.group(2)}", "", f"invalid TOML: {message[:match.start()]}")
    match = re.search(r"\s*\(at end of document\)$", message)
    if match:
        return Problem(path, "", f"invalid TOML: {message[:match.start()]} at the end of the file")
    return Problem(path, "", f"invalid TOML: {message}")


def _unknown(key: str) -> str:
    close = difflib.get_close_matches(key, list(BY_KEY) + [f"models.NAME.{k}" for k in POLICY_KEYS], n=1)
    hint = f"; did you mean {close[0]}?" if close else "; see docs/configuration.md for every key"
    return f"unknown key{hint}"


def _read_document(document: dict, where, problems: list[Problem]):
    """The file's settings as {key: (raw value, source)}, its rules merged over the defaults, and its model
    policies, each checked."""
    file_values: dict[str, tuple[Any, str]] = {}
    sources: dict[str, str] = {}

    def source(key: tuple[str, ...]) -> str:
        return "file " + where(key)

    for name, value in document.items():
        if name in ("rules", "models"):
            continue
        if name in BY_KEY:
            if isinstance(value, dict):
                problems.append(Problem(where((name,)), name, "is a setting, not a table"))
            else:
                file_values[name] = (value, source((name,)))
            continue
        if name in TABLES:
            if not isinstance(value, dict):
                problems.append(Problem(where((name,)), name, f"must be a table ([{name}])"))
                continue
            for key, inner in value.items():
                dotted = f"{name}.{key}"
                if dotted in BY_KEY and not isinstance(inner, dict):
                    file_values[dotted] = (inner, source((name, key)))
                elif dotted in BY_KEY:
                    problems.append(Problem(where((name, key)), dotted, "is a setting, not a table"))
                else:
                    problems.append(Problem(where((name, key)), dotted, _unknown(dotted)))
            continue
        problems.append(Problem(where((name,)), name, _unknown(name)))

    rules = {level: dict(tags) for level, tags in DEFAULT_RULES.items()}
    given = document.get("rules", {})
    if not isinstance(given, dict):
        problems.append(Problem(where(("rules",)), "rules", "must be a table of levels: [rules.1], [rules.2]"))
        given = {}
    for level_name, tags in given.items():
        key = ("rules", level_name)
        if not (level_name.isdigit() and 1 <= int(level_name) <= MAX_LEVEL):
            problems.append(Problem(where(key), f"rules.{level_name}",
                                    f"there is no level {level_name!r} with rules; levels 1 to {MAX_LEVEL} have "
                                    "them (level 0 moves nothing)"))
            continue
        if not isinstance(tags, dict):
            problems.append(Problem(where(key), f"rules.{level_name}", "must be a table of TAG = \"offload\" "
                                                                       "or \"discard\""))
            continue
        for tag, action in tags.items():
            dotted = f"rules.{level_name}.{tag}"
            if not TAG_NAME.match(tag):
                problems.append(Problem(where(key + (tag,)), dotted, "is not a tag name (letters, digits, "
                                                                     "_ . -, at most 64)"))
            elif not isinstance(action, str) or action.lower() not in ("offload", "discard"):
                problems.append(Problem(where(key + (tag,)), dotted, f"{action!r} is not offload or discard"))
            else:
                rules.setdefault(int(level_name), {})[tag] = Action(action.lower())
                sources[dotted] = source(key + (tag,))

    models: dict[str, dict[str, Any]] = {}
    given = document.get("models", {})
    if not isinstance(given, dict):
        problems.append(Problem(where(("models",)), "models", "must be a table of models: [models.NAME]"))
        given = {}
    for name, policy in given.items():
        key = ("models", name)
        if not MODEL_NAME.match(name):
            problems.append(Problem(where(key), f"models.{_toml_key(name)}", "is not a model name (a letter or digit, then "
                                                                  "letters, digits, . _ : / -, at most 128)"))
            continue
        if not isinstance(policy, dict):
            problems.append(Problem(where(key), f"models.{name}",
                                    f"must be a table of {', '.join(POLICY_KEYS)}"))
            continue
        checked = {}
        for field_name, value in policy.items():
            dotted = f"models.{name}.{field_name}"
            convert = POLICY_KEYS.get(field_name)
            if convert is None:
                close = difflib.get_close_matches(field_name, list(POLICY_KEYS), n=1)
                hint = f"did you mean {close[0]}?" if close else f"a model takes {', '.join(POLICY_KEYS)}"
                problems.append(Problem(where(key + (field_name,)), dotted, f"unknown key; {hint}"))
                continue
            try:
                checked[field_name] = convert(value)
                sources[dotted] = source(key + (field_name,))
            except ValueError as error:
                problems.append(Problem(where(key + (field_name,)), dotted, str(error)))
        models[name] = checked
    return file_values, rules, models, sources


def _check_tcp(values: dict[str, Any], sources: dict[str, str], problems: list[Problem]) -> None:
    """TCP is served only with TLS and a token: an address needs all three files, and they must be readable."""
    def place(key: str) -> str:
        source = sources.get(key, "default")
        return source[5:] if source.startswith("file ") else source

    if not values["tcp.address"]:
        for key in ("tcp.cert", "tcp.key", "tcp.token_file"):
            if values[key]:
                problems.append(Problem(place(key), key, "is set but tcp.address is not; set both, or neither"))
        return
    for key in ("tcp.cert", "tcp.key", "tcp.token_file"):
        if not values[key]:
            problems.append(Problem(place("tcp.address"), key,
                                    "is required with tcp.address: TCP is served only with TLS and a token"))
        elif not os.access(values[key], os.R_OK):
            reason = "does not exist" if not os.path.exists(values[key]) else "is not readable"
            problems.append(Problem(place(key), key, f"{values[key]} {reason}"))
