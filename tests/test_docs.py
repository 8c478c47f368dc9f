"""The docs are true: every command block marked runnable runs against a real daemon and prints what
the docs say, the example engine runs end to end, and the references cover what they claim to.

Convention: a fenced block tagged `console` is runnable. Each line starting with `$ ` is a command
(a line ending in a backslash continues on the next), run by bash from the repository root with
$SLEEPD_SOCKET set to a daemon on the host backend that has `qwen` (weights 8 MiB, kv_cache 4 MiB, on
host:0) and `llama` (weights 8 MiB, on host:1) attached. Blocks of one document run in order against
one daemon. The lines after a command are what it must print: each must match an output line, in order,
where `...` stands for any text and runs of spaces for any spacing. Every command must exit 0.
Blocks tagged anything else (sh, python, toml, text) are not run."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sleepd.client import Controller, Region, SleepClient, Waker
from sleepd.daemon import config
from support import MiB

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted((ROOT / "docs").glob("*.md"))
FENCE = re.compile(r"^```([\w-]*)\s*$")


@pytest.fixture
def backend():
    return "host"


def blocks(path: Path, language: str) -> list[tuple[int, list[str]]]:
    """(first line number, lines) of every fenced block tagged `language`."""
    found, current, start = [], None, 0
    for number, line in enumerate(path.read_text().splitlines(), 1):
        match = FENCE.match(line.strip())
        if current is None and match and match.group(1):
            current, start, tag = [], number + 1, match.group(1)
        elif current is not None and line.strip() == "```":
            if tag == language:
                found.append((start, current))
            current = None
        elif current is not None:
            current.append(line)
    return found


def commands(lines: list[str]) -> list[tuple[str, list[str]]]:
    """(command, expected output lines) of a console block."""
    result: list[tuple[str, list[str]]] = []
    continuing = False
    for line in lines:
        if continuing:
            result[-1] = (result[-1][0] + "\n" + line, [])
            continuing = line.endswith("\\")
        elif line.startswith("$ "):
            result.append((line[2:], []))
            continuing = line.endswith("\\")
        elif result and line.strip():
            result[-1][1].append(line)
    return result


def pattern(expected: str) -> re.Pattern:
    parts = [r"\s+".join(re.escape(word) for word in part.split()) for part in expected.split("...")]
    return re.compile(r".*?".join(parts))


def check_output(command: str, output: str, expected: list[str], where: str) -> None:
    lines = output.splitlines()
    position = 0
    for want in expected:
        if want.strip() == "...":
            continue
        regex = pattern(want)
        while position < len(lines) and not regex.search(lines[position]):
            position += 1
        assert position < len(lines), f"{where}: `{command}` did not print {want!r}; it printed:\n{output}"
        position += 1


def runnable_docs() -> list[Path]:
    return [path for path in DOCS if blocks(path, "console")]


@pytest.mark.parametrize("path", runnable_docs(), ids=lambda path: path.name)
def test_every_runnable_command_in_the_docs_runs_and_prints_what_they_say(path, start_daemon, start_engine):
    daemon = start_daemon(devices=2, capacity="256MiB")
    text = path.read_text()
    if "qwen" in text or "llama" in text:
        start_engine(daemon, "qwen", regions=[("weights", 8 * MiB), ("kv_cache", 4 * MiB)])
        start_engine(daemon, "llama", device=1, regions=[("weights", 8 * MiB)])
    env = {key: value for key, value in os.environ.items() if not key.startswith("SLEEPD_")
           or key == "SLEEPD_LIBCUDA"}
    env.update(SLEEPD_SOCKET=daemon.socket, PATH=os.path.dirname(sys.executable) + os.pathsep + env["PATH"])
    for start, lines in blocks(path, "console"):
        for command, expected in commands(lines):
            where = f"{path.relative_to(ROOT)}:{start}"
            result = subprocess.run(["bash", "-c", command], cwd=ROOT, env=env, capture_output=True, text=True,
                                    timeout=120)
            assert result.returncode == 0, f"{where}: `{command}` exited {result.returncode}:\n" \
                                           f"{result.stdout}{result.stderr}"
            check_output(command, result.stdout, expected, where)


def test_the_integration_guide_runs_the_example_engine_and_quotes_its_code():
    guide = ROOT / "docs" / "integrate.md"
    ran = [command for _, lines in blocks(guide, "console") for command, _ in commands(lines)]
    assert any(command.startswith("python examples/engine.py") for command in ran)
    source = {line.strip() for line in (ROOT / "examples" / "engine.py").read_text().splitlines()}
    for start, lines in blocks(guide, "python"):
        for line in lines:
            assert not line.strip() or line.strip() in source, \
                f"docs/integrate.md:{start}: {line.strip()!r} is not in examples/engine.py"


def test_the_client_reference_covers_every_public_method_and_property():
    reference = (ROOT / "docs" / "client-api.md").read_text()
    for cls in (SleepClient, Controller, Waker, Region):
        for name in dir(cls):
            if not name.startswith("_"):
                assert f"### `{name}" in reference or f"### `{cls.__name__}.{name}" in reference, \
                    f"docs/client-api.md has no section for {cls.__name__}.{name}"


def test_the_configuration_reference_lists_every_setting_with_its_flag_and_variable():
    reference = (ROOT / "docs" / "configuration.md").read_text()
    for setting in config.SETTINGS:
        row = next((line for line in reference.splitlines() if line.startswith(f"| `{setting.key}` |")), None)
        assert row is not None, f"docs/configuration.md has no row for {setting.key}"
        assert f"`{setting.flag}`" in row and f"`{setting.env}`" in row, row


def test_links_between_docs_and_to_files_resolve():
    for path in [*DOCS, ROOT / "deploy" / "kubernetes" / "README.md"]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text()):
            if re.match(r"[a-z]+://", target):
                continue
            assert (path.parent / target).exists(), f"{path.relative_to(ROOT)} links to missing {target}"


def test_the_docs_check_itself_catches_a_wrong_output():
    with pytest.raises(AssertionError):
        check_output("echo", "slept qwen: 2 regions\n", ["woke qwen: ..."], "here")
    check_output("echo", "a\nslept  qwen: 2 regions in 0.1 s\n", ["...", "slept qwen: ... in ... s"], "here")
    assert commands(["$ a \\", "  b", "out", "$ c"]) == [("a \\\n  b", ["out"]), ("c", [])]
