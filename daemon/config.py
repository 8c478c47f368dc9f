"""Where sleepd's configuration comes from: a flag, else its SLEEPD_* environment variable, else the TOML
file, else the default, each value checked and every problem located.

    sleepd --config /etc/sleepd/sleepd.toml      (the default path; a missing default file is fine)
    sleepd --check-config                        validates, prints the effective configuration, exits

The settings themselves (keys, kinds of value, defaults) are declared in config_model.py;
docs/configuration.md lists every one, and a test keeps the two in step. Errors name the key and
where its value came from (file and line, environment variable, or flag), all of them at once, so
that one run of --check-config shows everything to fix.
"""

import argparse
import difflib
import json
import os
import re
import tomllib
from dataclasses import dataclass, field
from typing import Any

from sleepd.common.limits import MAX_LEVEL, MODEL_NAME, MODEL_NAME_RULE, TAG_NAME, TAG_NAME_RULE

from .config_model import BY_KEY, DEFAULT_CAPS, MODEL_KEYS, QUOTA_KEYS, SETTINGS, TABLES, Config, group_id, user_id
from .config_render import toml_key
from .rules import DEFAULT_RULES, Action

DEFAULT_PATH = "/etc/sleepd/sleepd.toml"
CONFIG_ENV = "SLEEPD_CONFIG"
# sysexits.h EX_CONFIG: the unit's RestartPreventExitStatus= keeps a bad file from a restart loop.
EXIT_CONFIG = 78


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


def parser(description: str = "") -> argparse.ArgumentParser:
    result = argparse.ArgumentParser(prog="sleepd", description=description)
    result.add_argument("--config", metavar="PATH",
                        help=f"TOML configuration file (default ${CONFIG_ENV}, else {DEFAULT_PATH} if it exists)")
    result.add_argument("--check-config", action="store_true",
                        help="validate the configuration, print the effective settings and exit "
                             f"(status 0, or {EXIT_CONFIG} with one line per error)")
    for setting in SETTINGS:
        how = ({"action": argparse.BooleanOptionalAction} if setting.type is bool else {"metavar": setting.metavar})
        result.add_argument(setting.flag, dest=setting.attr, default=None,
                            help=f"{setting.help} [{setting.key}, ${setting.env}]", **how)
    return result


def load(argv: list[str] | None = None, environ: dict[str, str] | None = None, description: str = "") -> Config:
    """Flags, then the environment, then the file, then defaults. Raises ConfigError
    naming every problem; argparse exits on a flag it does not know."""
    environ = os.environ if environ is None else environ
    args = parser(description).parse_args(argv)
    problems: list[Problem] = []
    file = _read_file(args.config or environ.get(CONFIG_ENV) or None, problems)
    file_values, rules, models, quotas, sources = _read_document(file, problems)

    values: dict[str, Any] = {}
    for setting in SETTINGS:
        if getattr(args, setting.attr) is not None:
            given, where = getattr(args, setting.attr), f"flag {setting.flag}"
        elif environ.get(setting.env):
            given, where = environ[setting.env], f"environment {setting.env}"
        elif setting.key in file_values:
            given, where = file_values[setting.key]
        else:
            values[setting.key], sources[setting.key] = setting.default_value(values), "default"
            continue
        try:
            values[setting.key], sources[setting.key] = setting.parse(given), where
        except ValueError as error:
            problems.append(Problem(_place(where), setting.key, str(error)))
            values[setting.key], sources[setting.key] = setting.default_value(values), "default"

    _check_tcp(values, sources, problems)
    _check_below(values, sources, problems)
    _check_metrics_token(values["metrics.token_file"], sources["metrics.token_file"], problems)
    if problems:
        raise ConfigError(sorted(problems, key=_file_order))
    return Config(**{setting.attr: values[setting.key] for setting in SETTINGS}, rules=rules, models=models,
                  quotas=quotas, sources=sources, path=file.path, check_config=args.check_config)


def _place(source: str) -> str:
    """Where a problem is, from where a value came from: "file sleepd.toml:12" is at "sleepd.toml:12"."""
    return source.removeprefix("file ")


def _file_order(problem: Problem) -> tuple[int, int]:
    """File problems first, by line; then the environment's and the flags', as found."""
    match = re.search(r":(\d+)(?::\d+)?$", problem.where)
    return (0, int(match.group(1))) if match else (1, 0)


# ---- the file ----

@dataclass
class _File:
    path: str | None = None                   # None: no file was read
    document: dict = field(default_factory=dict)
    lines: dict[tuple[str, ...], int] = field(default_factory=dict)

    def where(self, key: tuple[str, ...]) -> str:
        """FILE:LINE of the key itself; else of the first key written under it (`a.b = 1` holds `a`);
        else of its table."""
        deeper = [line for found, line in self.lines.items() if found[:len(key)] == key]
        if deeper:
            return f"{self.path}:{min(deeper)}"
        for length in range(len(key), 0, -1):
            if key[:length] in self.lines:
                return f"{self.path}:{self.lines[key[:length]]}"
        return str(self.path)


def _read_file(path: str | None, problems: list[Problem]) -> _File:
    """The file asked for (a missing one is a problem), else the default file if there is one."""
    explicit, path = path is not None, path or DEFAULT_PATH
    try:
        with open(path, "rb") as file:
            raw = file.read()
    except FileNotFoundError:
        if explicit:
            problems.append(Problem(path, "", "configuration file not found"))
        return _File()
    except OSError as error:
        problems.append(Problem(path, "", f"cannot read the configuration file: {error.strerror}"))
        return _File()
    try:
        text = raw.decode()
        return _File(path, tomllib.loads(text), key_lines(text))
    except UnicodeDecodeError as error:
        problems.append(Problem(path, "", f"not UTF-8 text ({error.reason} at byte {error.start})"))
    except tomllib.TOMLDecodeError as error:
        problems.append(_syntax_problem(path, str(error)))
    return _File()


def _syntax_problem(path: str, message: str) -> Problem:
    match = re.search(r"\s*\(at line (\d+), column (\d+)\)$", message)
    if match:
        return Problem(f"{path}:{match.group(1)}:{match.group(2)}", "", f"invalid TOML: {message[:match.start()]}")
    match = re.search(r"\s*\(at end of document\)$", message)
    if match:
        return Problem(path, "", f"invalid TOML: {message[:match.start()]} at the end of the file")
    return Problem(path, "", f"invalid TOML: {message}")


def _unknown(key: str, known: list[str], otherwise: str = "see docs/configuration.md for every key") -> str:
    close = difflib.get_close_matches(key, known, n=1)
    return f"unknown key; did you mean {close[0]}?" if close else f"unknown key; {otherwise}"


def _table(file: _File, key: tuple[str, ...], value: Any, what: str, problems: list[Problem]) -> dict:
    """`value` if it is a table, else {} and a problem saying what it must be."""
    if isinstance(value, dict):
        return value
    problems.append(Problem(file.where(key), ".".join(key), f"must be {what}"))
    return {}


def _read_document(file: _File, problems: list[Problem]):
    """The file's settings as {key: (value, "file FILE:LINE")}, its rules merged over the defaults, its
    model policies (checked), and where each rule and policy value came from."""
    settings: dict[str, tuple[Any, str]] = {}
    sources: dict[str, str] = {}
    known = list(BY_KEY) + [f"models.NAME.{key}" for key in MODEL_KEYS] + ["quotas.default", "quotas.users",
                                                                           "quotas.groups"]
    for name, value in file.document.items():
        if name in ("rules", "models", "quotas"):
            continue
        if name in TABLES:
            entries = [((name, key), inner) for key, inner in _table(file, (name,), value, f"a table ([{name}])",
                                                                      problems).items()]
        else:
            entries = [((name,), value)]
        for key, inner in entries:
            dotted, where = ".".join(key), file.where(key)
            if dotted not in BY_KEY:
                problems.append(Problem(where, dotted, _unknown(dotted, known)))
            elif isinstance(inner, dict):
                problems.append(Problem(where, dotted, "is a setting, not a table"))
            else:
                settings[dotted] = (inner, f"file {where}")

    rules = {level: dict(tags) for level, tags in DEFAULT_RULES.items()}
    levels = _table(file, ("rules",), file.document.get("rules", {}), "a table of levels: [rules.1], [rules.2]",
                    problems)
    for level, tags in levels.items():
        key = ("rules", level)
        if not (level.isdigit() and 1 <= int(level) <= MAX_LEVEL):
            problems.append(Problem(file.where(key), f"rules.{level}", f"there is no level {level!r} with rules; "
                                    f"levels 1 to {MAX_LEVEL} have them (level 0 moves nothing)"))
            continue
        for tag, action in _table(file, key, tags, 'a table of TAG = "offload" or "discard"', problems).items():
            dotted, where = f"rules.{level}.{tag}", file.where(key + (tag,))
            if not TAG_NAME.match(tag):
                problems.append(Problem(where, dotted, f"is not a tag name ({TAG_NAME_RULE})"))
            elif not isinstance(action, str) or action.lower() not in ("offload", "discard"):
                problems.append(Problem(where, dotted, f"{action!r} is not offload or discard"))
            else:
                rules.setdefault(int(level), {})[tag] = Action(action.lower())
                sources[dotted] = f"file {where}"

    models: dict[str, dict[str, Any]] = {}
    given = _table(file, ("models",), file.document.get("models", {}), "a table of models: [models.NAME]", problems)
    for name, policy in given.items():
        key = ("models", name)
        if not MODEL_NAME.match(name):
            problems.append(Problem(file.where(key), f"models.{toml_key(name)}",
                                    f"is not a model name ({MODEL_NAME_RULE})"))
            continue
        models[name] = _keyed_table(file, key, policy, MODEL_KEYS, "a model", problems, sources)
    return settings, rules, models, _read_quotas(file, problems, sources), sources


def _keyed_table(file: _File, key: tuple[str, ...], value: Any, kinds: dict, what: str, problems: list[Problem],
                 sources: dict[str, str]) -> dict[str, Any]:
    """A table whose keys are `kinds` ({key: parser}), parsed; each problem named with its line."""
    parsed = {}
    for field_name, inner in _table(file, key, value, f"a table of {', '.join(kinds)}", problems).items():
        dotted, where = ".".join(key + (field_name,)), file.where(key + (field_name,))
        if field_name not in kinds:
            problems.append(Problem(where, dotted, _unknown(field_name, list(kinds),
                                                            f"{what} takes {', '.join(kinds)}")))
            continue
        try:
            parsed[field_name] = kinds[field_name](inner)
            sources[dotted] = f"file {where}"
        except ValueError as error:
            problems.append(Problem(where, dotted, str(error)))
    return parsed


def _read_quotas(file: _File, problems: list[Problem], sources: dict[str, str]) -> dict[str, Any]:
    """[quotas.default], [quotas.users.USER] and [quotas.groups.GROUP], users and groups as ids."""
    quotas: dict[str, Any] = {"default": {}, "users": {}, "groups": {}}
    given = _table(file, ("quotas",), file.document.get("quotas", {}), "a table: [quotas.default], "
                   "[quotas.users.USER], [quotas.groups.GROUP]", problems)
    for kind, value in given.items():
        if kind == "default":
            quotas["default"] = _keyed_table(file, ("quotas", kind), value, QUOTA_KEYS, "a quota", problems, sources)
        elif kind in ("users", "groups"):
            to_id = user_id if kind == "users" else group_id
            for name, limits in _table(file, ("quotas", kind), value, f"a table of {kind}", problems).items():
                try:
                    owner = to_id(int(name) if name.isdigit() else name)
                except ValueError as error:
                    problems.append(Problem(file.where(("quotas", kind, name)), f"quotas.{kind}.{name}", str(error)))
                    continue
                quotas[kind][owner] = _keyed_table(file, ("quotas", kind, name), limits, QUOTA_KEYS, "a quota",
                                                   problems, sources)
        else:
            problems.append(Problem(file.where(("quotas", kind)), f"quotas.{kind}",
                                    _unknown(kind, ["default", "users", "groups"], "use default, users or groups")))
    for key, cap in DEFAULT_CAPS.items():
        if key not in quotas["default"]:
            quotas["default"][key], sources[f"quotas.default.{key}"] = cap, "default"
    return quotas


def _check_tcp(values: dict[str, Any], sources: dict[str, str], problems: list[Problem]) -> None:
    """TCP is served only with TLS and a token: an address needs all three files, and they must be readable."""
    files = ("tcp.cert", "tcp.key", "tcp.token_file")
    for key in files:
        if not values["tcp.address"] and values[key]:
            problems.append(Problem(_place(sources[key]), key, "is set but tcp.address is not; set both, or neither"))
        elif values["tcp.address"] and not values[key]:
            problems.append(Problem(_place(sources["tcp.address"]), key,
                                    "is required with tcp.address: TCP is served only with TLS and a token"))
        elif values[key] and not os.access(values[key], os.R_OK):
            reason = "does not exist" if not os.path.exists(values[key]) else "is not readable"
            problems.append(Problem(_place(sources[key]), key, f"{values[key]} {reason}"))


# Settings that only mean something below another: (key, the key it must stay below, or at most equal, why).
_BELOW = [
    ("fd_socket.allocates_per_uid", "fd_socket.workers", False,
     "one uid's waiting allocates must leave the other uids a worker"),
    ("grpc.admin_reserve", "grpc.workers", False, "the callers other than root and admin_group need a worker"),
    ("grpc.event_streams_per_uid", "grpc.calls_per_uid", True, "each Events stream is one of its uid's calls"),
    ("grpc.anonymous_event_streams", "grpc.anonymous_calls", True,
     "each Events stream without a token is one of those callers' calls"),
]


def _check_below(values: dict[str, Any], sources: dict[str, str], problems: list[Problem]) -> None:
    """Each pair of _BELOW in order, the problem named where the value that was set came from
    (the first key's, where both were)."""
    for low, high, equal_too, why in _BELOW:
        if values[low] < values[high] or (equal_too and values[low] == values[high]):
            continue
        bound = "at most" if equal_too else "less than"
        if sources[low] == "default" and sources[high] != "default":
            problems.append(Problem(_place(sources[high]), high, f"{values[high]} is too few for {low} "
                                    f"({values[low]} by default), which must be {bound} it: {why}"))
        else:
            problems.append(Problem(_place(sources[low]), low, f"{values[low]} must be {bound} {high} "
                                    f"({values[high]}): {why}"))


def _check_metrics_token(path: str, source: str, problems: list[Problem]) -> None:
    """The token file, where one is set, is readable, holds a token, and is no one else's to read
    (the mode of the file a symlink leads to, as Kubernetes mounts secrets)."""
    if not path:
        return
    try:
        mode = os.stat(path).st_mode & 0o777
        with open(path) as file:
            token = file.read().strip()
    except (OSError, UnicodeDecodeError) as error:
        problems.append(Problem(_place(source), "metrics.token_file", f"{path}: cannot read it: "
                                f"{getattr(error, 'strerror', None) or error}"))
        return
    if mode & 0o077:
        problems.append(Problem(_place(source), "metrics.token_file", f"{path} has mode {mode:04o}, so other users "
                                f"may read the token; chmod 600 {path}"))
    elif not token:
        problems.append(Problem(_place(source), "metrics.token_file", f"{path} holds no token"))


# ---- where keys are written (tomllib gives no positions for problems it does not find itself) ----

_BARE = r"[A-Za-z0-9_-]+"
_KEY_PART = re.compile(rf"\s*({_BARE}|\"(?:[^\"\\]|\\.)*\"|'[^']*')\s*")


def _read_key(text: str, start: int = 0) -> tuple[tuple[str, ...], int] | None:
    """A dotted key at `start`: its parts and where it ends, or None."""
    parts, position = [], start
    while match := _KEY_PART.match(text, position):
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
        if not text.startswith(".", position):
            return tuple(parts), position
        position += 1
    return None


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
            found = _read_key(stripped, 2 if stripped.startswith("[[") else 1)
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
