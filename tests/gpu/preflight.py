"""Before anything is installed: what this Python has against what sleepd needs
(WHEELHOUSE/needs.txt, written by deploy/wheelhouse), and what building its
extension takes, so that what is missing is said plainly and first."""

import importlib.metadata
import importlib.util
import os
import shutil
import sys
import sysconfig
from pathlib import Path


def _installed(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _needs(wheelhouse: Path, Requirement) -> list[tuple]:
    """(requirement, the wheelhouse file that provides it or None) for every need but sleepd itself."""
    needs = []
    for line in (wheelhouse / "needs.txt").read_text().splitlines():
        text, _, source = line.partition("#")
        if text.strip() and not text.strip().startswith("sleepd=="):
            path = wheelhouse / source.strip()
            needs.append((Requirement(text), path if source.strip().endswith(".whl") and path.is_file() else None))
    return needs


def _packages(wheelhouse: Path) -> tuple[list[str], list[str]]:
    # A node may not have packaging: the wheelhouse's own wheel of it, pure Python, imports as it is.
    sys.path.extend(str(wheel) for wheel in wheelhouse.glob("packaging-*-py3-none-any.whl"))
    try:
        from packaging.requirements import Requirement
        from packaging.tags import sys_tags
        from packaging.utils import parse_wheel_filename
    except ImportError:
        return [], ["packaging, to compare versions (pytest needs it too; the wheelhouse brings it)"]
    if not (wheelhouse / "needs.txt").is_file() or not list(wheelhouse.glob("sleepd-*.tar.gz")):
        return [], [f"a wheelhouse at {wheelhouse}: it has no needs.txt and sleepd sdist (build one with "
                    "deploy/wheelhouse)"]
    here = set(sys_tags())
    found, missing = [], []
    for requirement, wheel in _needs(wheelhouse, Requirement):
        name, specifier = requirement.name, requirement.specifier
        installed = _installed(name)
        if installed and specifier.contains(installed, prereleases=True):
            found.append(f"{name} {installed}")
            continue
        have = f"found {installed}" if installed else "not installed"
        if wheel is None:
            missing.append(f"{name}{specifier} ({have}; deploy/wheelhouse --include {name} would bring it)")
            continue
        _, version, _, tags = parse_wheel_filename(wheel.name)
        if not tags & here:
            missing.append(f"{name}{specifier} ({have}; the wheelhouse's {wheel.name} does not fit this Python: "
                           "build the wheelhouse for it with --python-version and --platform)")
        else:
            over = f" (over the {installed} here)" if installed else ""
            found.append(f"{name} {version} from the wheelhouse{over}")
    return found, missing


def _build_tools() -> tuple[list[str], list[str]]:
    found, missing = [], []
    headers = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if headers.is_file():
        found.append(f"Python headers in {headers.parent}")
    else:
        missing.append(f"the Python headers ({headers} is absent; e.g. the python3-dev package)")
    for variable in ("CC", "CXX", "LDSHARED"):
        command = (os.environ.get(variable) or sysconfig.get_config_var(variable) or "").split()
        path = shutil.which(command[0]) if command else None
        if path:
            found.append(f"{variable}: {path}")
        else:
            missing.append(f"a compiler: {variable} is {' '.join(command)!r}, which is not on PATH "
                           "(the extension is built here)")
    return found, missing


def check(wheelhouse: Path) -> tuple[list[str], list[str]]:
    """What was found and what is missing, one line each."""
    found, missing = _packages(wheelhouse)
    tools_found, tools_missing = _build_tools()
    found += tools_found
    missing += tools_missing
    if importlib.util.find_spec("pip") is None:
        missing.append("pip, to install from the wheelhouse")
    torch = _installed("torch")
    if torch:
        found.append(f"torch {torch} (whether it is a CUDA build is checked after the install)")
    else:
        missing.append("torch, a CUDA build (the node's own is used; the wheelhouse never holds it)")
    return found, missing
