"""What --check-config prints: the effective configuration as TOML that --config reads back the same,
each value commented with where it came from."""

import re

from sleepd.common.sizes import format_size

from .config_model import QUOTA_BYTES, SETTINGS, Config, Size


def render(config: Config) -> str:
    head = [f"# sleepd effective configuration; file: {config.path or 'none'}",
            "# precedence: flag > environment > file > default"]
    head += [f"# note: {note}" for note in config.notes()] + [""]
    body: list[tuple[str, str]] = []  # (line, comment)
    current = ""
    for setting in sorted(SETTINGS, key=lambda s: ("." in s.key, s.key.rpartition(".")[0])):
        table, _, key = setting.key.rpartition(".")
        if table != current:
            body += [("", ""), (f"[{table}]", "")]
            current = table
        value = getattr(config, setting.attr)
        written, comment = toml_scalar(value), config.sources[setting.key]
        if setting.type is Size:
            written = _size(value) or written
            comment += "" if written.startswith('"') else f" ({format_size(value)})"
        body.append((f"{key} = {written}", comment))
    for level, tags in sorted(config.rules.items()):
        body += [("", ""), (f"[rules.{level}]", "")]
        for tag, action in sorted(tags.items()):
            body.append((f'{toml_key(tag)} = "{action.value}"', config.sources.get(f"rules.{level}.{tag}", "default")))
    for name, policy in sorted(config.models.items()):
        body += [("", ""), (f"[models.{toml_key(name)}]", "")]
        for key, value in policy.items():
            body.append((f"{key} = {toml_scalar(value)}", config.sources[f"models.{name}.{key}"]))
    for kind, entries in (("default", {"": config.quotas["default"]}), ("users", config.quotas["users"]),
                          ("groups", config.quotas["groups"])):
        for owner, limits in sorted(entries.items()):
            if limits:
                body += [("", ""), (f"[quotas.{kind}{'' if owner == '' else '.' + str(owner)}]", "")]
                body += [(f"{key} = {(_size(value) or value) if key in QUOTA_BYTES else value}",
                          "default" if config.sources.get(f"quotas.{kind}.{key}") == "default" else "file")
                         for key, value in sorted(limits.items())]
    width = max(len(line) for line, comment in body if comment)
    lines = head + ["" if not line else f"{line.ljust(width)}  # {comment}" if comment else line
                    for line, comment in body]
    return "\n".join(lines) + "\n"


def toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else toml_scalar(key)


def toml_scalar(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _size(value: int) -> str | None:
    """A size as "4GiB" where a binary unit writes it exactly."""
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20)):
        if value and value % scale == 0:
            return f'"{value // scale}{unit}"'
    return None
