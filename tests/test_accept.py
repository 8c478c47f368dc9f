"""The GPU acceptance command, proven as far as a machine without a GPU allows:
deploy/wheelhouse builds a wheelhouse; tests/gpu/accept.sh installs sleepd from
it, with no index, on a stand-in node (this environment less what the
wheelhouse brings), and stops with its one "no GPU:" line; the smoke checks
that need no torch pass over the driver double; the report judges figures
against the targets."""

import importlib.metadata
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

from sleepd.bench import gpu as bench_gpu

ROOT = Path(__file__).resolve().parent.parent
GPU = ROOT / "tests" / "gpu"
sys.path.insert(0, str(GPU))

import accept  # noqa: E402
import figures  # noqa: E402
import report  # noqa: E402


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory) -> Path:
    """For this Python: CI cannot build the extension for another."""
    directory = tmp_path_factory.mktemp("wheelhouse")
    subprocess.run([sys.executable, ROOT / "deploy" / "wheelhouse", "--python-version",
                    f"{sys.version_info.major}.{sys.version_info.minor}", directory], check=True, timeout=600)
    return directory


def needs(wheelhouse: Path) -> list[tuple[Requirement, str]]:
    lines = (wheelhouse / "needs.txt").read_text().splitlines()
    return [(Requirement(text), source.strip()) for text, _, source in (line.partition("#") for line in lines)
            if text.strip()]


def wheel_names(wheelhouse: Path) -> set[str]:
    return {parse_wheel_filename(path.name)[0] for path in wheelhouse.glob("*.whl")}


def test_the_wheelhouse_holds_sleepd_and_everything_but_torch(wheelhouse):
    assert [path.name for path in wheelhouse.glob("*.tar.gz")] == ["sleepd-0.1.0.tar.gz"]
    assert {"grpcio", "grpcio-tools", "protobuf", "pybind11", "setuptools", "psutil", "prometheus-client",
            "nvidia-ml-py", "rich", "pytest", "pytest-timeout", "argcomplete", "grpcio-health-checking",
            "grpcio-reflection"} <= wheel_names(wheelhouse)
    # Nothing is assumed: torch, which the node brings, is no requirement of sleepd's.
    assert [str(r) for r, source in needs(wheelhouse) if source.startswith("assumed")] == []
    assert sum(path.stat().st_size for path in wheelhouse.iterdir()) < 60 << 20  # what a lent node can be sent


def stand_in_node(directory: Path, wheelhouse: Path) -> Path:
    """A Python that has this environment's packages (CPU torch and what is not sleepd's) less everything the
    wheelhouse brings and sleepd: a node with torch and nothing sleepd needs. Returns it."""
    tools = directory / "tools"
    missing = [str(r) for r, source in needs(wheelhouse) if source.startswith("assumed") and not satisfied(r)]
    if missing:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--target", tools, *missing], check=True)
    leave_out = wheel_names(wheelhouse) | {"sleepd"} | {canonicalize_name(Requirement(r).name) for r in missing}
    packages = directory / "packages"
    packages.mkdir()
    site = Path(sysconfig.get_paths()["purelib"])
    keep, drop = set(), set()
    for distribution in importlib.metadata.distributions(path=[str(site)]):
        tops = {Path(file).parts[0] for file in distribution.files or [] if not str(file).startswith("..")}
        (drop if canonicalize_name(distribution.metadata["Name"]) in leave_out else keep).update(tops)
    for top in keep - drop - {"__pycache__"}:
        (packages / top).symlink_to(site / top)
    node = directory / "node"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", node], check=True)
    purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    node_site = subprocess.run([node / "bin" / "python", "-c", purelib],
                               check=True, capture_output=True, text=True).stdout.strip()
    Path(node_site, "node.pth").write_text(f"import site; site.addsitedir({str(tools)!r}); "
                                           f"site.addsitedir({str(packages)!r})\n")
    return node / "bin" / "python"


def satisfied(requirement: Requirement) -> bool:
    try:
        return requirement.specifier.contains(importlib.metadata.version(requirement.name), prereleases=True)
    except importlib.metadata.PackageNotFoundError:
        return False


def test_accept_installs_from_the_wheelhouse_offline_then_stops_at_no_gpu(wheelhouse, tmp_path):
    python = stand_in_node(tmp_path, wheelhouse)
    environment = {key: value for key, value in os.environ.items() if not key.startswith(("SLEEPD_", "FAKE_CUDA"))}
    outdir = tmp_path / "out"
    result = subprocess.run([GPU / "accept.sh", wheelhouse, outdir], env={**environment, "PYTHON": str(python)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    lines = result.stdout.splitlines()
    assert result.returncode == 2, result.stdout[-3000:]
    assert [line for line in lines if line.startswith("no GPU:")] == [lines[-1]]
    assert "sleepd was installed from the wheelhouse and imports; nothing else was run" in lines[-1]

    # Installed offline: every pip install had no index, and what the node lacked came into the venv.
    pip = [line for line in lines if line.startswith("$ ") and " -m pip install " in line]
    assert len(pip) == 2 and all("--no-index --find-links" in line for line in pip)
    (installed,) = [line for line in lines if line.startswith("  installed into the venv: ")]
    names = {canonicalize_name(item.rsplit(" ", 1)[0]) for item in installed.split(": ", 1)[1].split(", ")}
    assert names == wheel_names(wheelhouse) | {"sleepd"}
    (imports,) = [line for line in lines if line.startswith("  sleepd 0.1.0 imports from ")]
    assert "/venv/" in imports and str(ROOT) not in imports

    assert (outdir / "accept.log").read_text().splitlines() == lines
    record = json.loads((outdir / "accept.json").read_text())
    assert record["result"] == "no GPU" and record["exit_code"] == 2
    assert [(stage["stage"], stage["status"]) for stage in record["stages"]] == [
        ("preflight", "passed"), ("install", "passed"), ("presence", "no GPU")]
    assert "no GPU:" in (outdir / "accept.md").read_text()


@pytest.mark.parametrize("stage", ["roundtrip", "mover"])
def test_the_smoke_checks_that_need_no_torch_pass_over_the_driver_double(stage, fake_cuda, fake_nvml, tmp_path):
    environment = dict(os.environ, SLEEPD_LIBCUDA=fake_cuda, LD_LIBRARY_PATH=fake_nvml,
                       FAKE_CUDA_TAG=f"accept-{tmp_path.name}", FAKE_CUDA_MEMORY=str(1 << 30))
    result = subprocess.run([sys.executable, GPU / "smoke.py", stage, "--size", str(64 << 20)], env=environment,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines()[-1].startswith("figures: {")


# What `python -m sleepd.bench gpu` prints, from its own formatter, for a run whose first sleep is slow.
GPU_BENCH_OUTPUT = "\n".join(bench_gpu.lines(bench_gpu.Measured(
    size=16 << 30, prefault=True, dtoh=52.3 * (1 << 30), htod=53.1 * (1 << 30), sleeps=[0.345, 0.320, 0.318, 0.322],
    wakes=[0.330, 0.318, 0.317, 0.319], naive_down=5.2, naive_up=0.4, level2_sleep=0.0125, level2_wake=0.0301,
    engine_left=512 << 20, daemon_left=0, pin_seconds=3.2)))


def test_the_report_judges_the_gpu_benchmark_against_the_targets():
    found = {f"gpu.{key}": value for key, value in figures.gpu(GPU_BENCH_OUTPUT).items()}
    assert found["gpu.engine_asleep"]["value"] == 512 << 20
    verdicts = {row["figure"]: row["met"] for row in report.targets(found)}
    assert verdicts["gpu.first_sleep_x_pinned"] is False
    assert verdicts["gpu.later_sleep_x_pinned"] is True
    assert verdicts["gpu.first_sleep_vs_naive"] is True
    assert verdicts["gpu.daemon_asleep"] is True
    assert verdicts["swap.swap_vs_sequential"] is None  # not measured


def test_the_vllm_stage_has_a_budget_of_its_own_and_skips_with_the_reason_where_vllm_is_missing(tmp_path):
    run = accept.Run(tmp_path, tmp_path, tmp_path)
    run.python = Path(sys.executable)  # the README's environment: no vLLM
    run.started -= accept.BUDGET_SECONDS  # the default run's 8 minutes are spent; this stage's are its own
    run.vllm()
    run.log.close()
    [stage] = run.stages
    assert stage.status == "skipped" and stage.limit == accept.VLLM_SECONDS, stage.record()
    assert stage.reason.startswith(f"vLLM is not installed in {sys.executable} (") and "vllm" in stage.reason
    assert "-- skipped in" in (tmp_path / "accept.log").read_text()
