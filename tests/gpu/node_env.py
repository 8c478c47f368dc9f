"""Where the acceptance run installs sleepd: a virtual environment that sees
this Python's own packages (the node's torch above all) after its own, and
gets the rest offline, from the wheelhouse, with pip's user and site settings
ignored."""

import json
import os
import subprocess
import sys
from pathlib import Path


def _sys_path(python) -> list[str]:
    out = subprocess.run([python, "-c", "import json, sys; print(json.dumps(sys.path))"], check=True,
                         capture_output=True, text=True).stdout
    return [path for path in json.loads(out) if path]


def create(directory: Path) -> Path:
    """A venv made by this Python, whose .pth file adds this Python's package
    directories after the venv's own. Returns its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", directory], check=True)
    python = directory / "bin" / "python"
    theirs = _sys_path(python)
    ours = [path for path in _sys_path(sys.executable) if path not in theirs and os.path.isdir(path)]
    site_packages = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                   check=True, capture_output=True, text=True).stdout.strip()
    # addsitedir, unlike a bare path, also runs the .pth files there.
    lines = [f"import site; site.addsitedir({path!r})" for path in ours]
    Path(site_packages, "_sleepd_node_packages.pth").write_text("\n".join(lines) + "\n")
    return python


def pip_environment() -> dict:
    """The environment for pip: no PIP_* settings and no configuration files, so only the command line counts."""
    environment = {key: value for key, value in os.environ.items() if not key.startswith("PIP_")}
    environment["PIP_CONFIG_FILE"] = os.devnull
    return environment


def pip_commands(python: Path, wheelhouse: Path) -> list[list[str]]:
    """What the node lacks, from the wheelhouse, then sleepd's sdist, built here against the node's
    pybind11 and the grpcio-tools just installed (pip installs no build requirements without isolation)."""
    pip = [str(python), "-m", "pip", "install", "--no-index", "--find-links", str(wheelhouse),
           "--no-build-isolation", "--no-cache-dir", "--progress-bar", "off"]
    requirements = []
    for line in (wheelhouse / "needs.txt").read_text().splitlines():
        text = line.partition("#")[0].strip()
        if text and not text.startswith("sleepd=="):
            requirements.append(text)
    (sdist,) = wheelhouse.glob("sleepd-*.tar.gz")
    return [pip + requirements, pip + [str(sdist)]]

