"""Whether sleepd works on this GPU node, and how fast: the acceptance run.

    tests/gpu/accept.sh WHEELHOUSE OUTDIR

WHEELHOUSE is what deploy/wheelhouse built. Nothing is fetched: the node needs
no network. OUTDIR receives accept.log (written as the run goes, so a run cut
short still leaves it), accept.json (every figure, with units, and the GPU,
driver, CUDA and torch versions) and accept.md (the same, with the targets
beside the figures). The stages, in order, each with its own time limit and
all of them within 8 minutes:

  preflight   what this Python has against what sleepd needs, before anything else
  install     a venv that sees this Python's packages (its torch above all), and
              in it, offline, what the wheelhouse brings and sleepd, built here
  presence    a GPU, its driver and a CUDA build of torch; without a GPU the run
              stops here, with one line that starts "no GPU:"
  smoke 1-4   tests/gpu/smoke.py: the driver, a round trip, the mover, torch;
              the first failure stops the run
  pytest      tests/gpu but its vLLM tests, each test with its own time limit
  benchmarks  python -m sleepd.bench gpu, swap --backend cuda, and host (the control)
  vllm        optional, with a budget of its own outside the 8 minutes: tests/gpu's vLLM
              tests, where this Python has a CUDA build of vLLM; skipped with the reason
              where it has none

Exit status: 0 when every stage passed (the targets are reported, not
enforced), 1 when something is missing or a stage failed, 2 without a GPU.
"""

import argparse
import datetime
import glob
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import figures as parse
import node_env
import preflight
import report

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
GiB = 1 << 30
BUDGET_SECONDS = 8 * 60
GPU_BENCH_SIZE = "16GiB"
# The GPU benchmark's host pool (its size and 1 GiB) with room to spare, in /dev/shm.
SHM_NEEDED = 18 * GiB
SMOKE = [("driver", "smoke 1: the driver in a process with no context", 60, []),
         ("roundtrip", "smoke 2: a two-process round trip, then a re-export to a third", 60, []),
         ("mover", "smoke 3: the mover pins a slab, offloads, restores and zeroes 512 MiB", 90, []),
         ("torch", "smoke 4: torch allocations in daemon regions; a kernel in flight at sleep()", 120,
          ["--size", str(GiB)])]
BENCHES = [("gpu", ["gpu", "--size", GPU_BENCH_SIZE], 180, parse.gpu),
           ("swap", ["swap", "--backend", "cuda", "--size", "4GiB", "--region-size", "256MiB"], 90, parse.swap),
           ("host", ["host"], 60, parse.host)]
PYTEST_SECONDS_PER_TEST = 90
VLLM_TESTS = HERE / "test_vllm_gpu.py"
VLLM_SECONDS = 20 * 60  # its own budget: vLLM starts slowly, and the 8 minutes stay the default run's


class Stop(Exception):
    """Ends the run: `result` in a word, `line` the one line that says why, `code` the exit status."""

    def __init__(self, result: str, line: str, code: int = 1):
        super().__init__(line)
        self.result, self.line, self.code = result, line, code


class Stage:
    def __init__(self, key: str, title: str, limit: int):
        self.key, self.title, self.limit = key, title, limit
        self.status, self.seconds, self.reason = "not run", None, None
        self.begun = time.monotonic()
        self.deadline = self.begun + limit

    def left(self) -> float:
        return max(1.0, self.deadline - time.monotonic())

    def record(self) -> dict:
        return {"stage": self.key, "title": self.title, "status": self.status, "seconds": self.seconds,
                "limit_seconds": self.limit, "reason": self.reason}


class Run:
    def __init__(self, wheelhouse: Path, outdir: Path, work: Path):
        self.wheelhouse, self.outdir, self.work = wheelhouse, outdir, work
        self.started = time.monotonic()
        self.started_at = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        self.log = open(outdir / "accept.log", "w")
        self._saying = threading.Lock()  # a command's output and the run's own lines, whole lines each
        self.stages: list[Stage] = []
        self.figures: dict = {}
        self.environment: dict = {}
        self.python: Path | None = None

    def say(self, line: str = "") -> None:
        with self._saying:
            print(line, flush=True)
            self.log.write(line + "\n")
            self.log.flush()

    def stage(self, key: str, title: str, limit: int, budgeted: bool = True) -> Stage | None:
        """A stage, given its limit or what is left of the run's budget (unless it has one of its own,
        not `budgeted`); None when the budget is spent."""
        left = int(self.started + BUDGET_SECONDS - time.monotonic()) if budgeted else limit
        stage = Stage(key, title, min(limit, left))
        self.stages.append(stage)
        if left < 10:
            stage.reason = "the run's 8 minutes were spent"
            self.say(f"== {title}: not run, {stage.reason}")
            return None
        self.say(f"== {title} (limit {stage.limit} s)")
        return stage

    def end(self, stage: Stage, status: str, reason: str | None = None) -> None:
        stage.status, stage.reason, stage.seconds = status, reason, round(time.monotonic() - stage.begun, 1)
        self.say(f"-- {status} in {stage.seconds} s" + (f": {reason}" if reason else ""))

    def command(self, argv: list, stage: Stage, env: dict | None = None, cwd: Path | None = None):
        """Runs `argv` in a session of its own, its output streamed into the log; ends the whole
        session (daemons and movers too) by the stage's deadline. Returns (exit status or None, lines)."""
        self.say("$ " + shlex.join(str(part) for part in argv))
        process = subprocess.Popen([str(part) for part in argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, errors="replace", env=env, cwd=cwd or self.work,
                                   start_new_session=True)
        lines = []

        def pump():
            for line in process.stdout:
                lines.append(line.rstrip("\n"))
                self.say("  " + lines[-1])

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            code = process.wait(timeout=stage.left())
        except subprocess.TimeoutExpired:
            code = None
        self._end_session(process)
        reader.join(timeout=10)
        return code, lines

    def _end_session(self, process: subprocess.Popen) -> None:
        """Whatever the command left running goes, and so do host pools a killed daemon left in /dev/shm."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                break
            try:
                process.wait(timeout=10)
                time.sleep(0.5)
            except subprocess.TimeoutExpired:
                pass
        for leftover in glob.glob(f"/dev/shm/sleepd-local-{process.pid}-*") + glob.glob(
                f"/dev/shm/sleepd-smoke-{process.pid}"):
            shutil.rmtree(leftover, ignore_errors=True)
            self.say(f"removed {leftover}, a host pool the stage left")

    def environment_for_stages(self) -> dict:
        environment = dict(os.environ, PYTHONUNBUFFERED="1")
        # One GPU is all the stages use: the daemon's movers then pin the host pool for it alone.
        environment.setdefault("CUDA_VISIBLE_DEVICES", "0")
        environment["PATH"] = f"{self.python.parent}{os.pathsep}{environment.get('PATH', '')}"
        return environment

    # ---- the stages ----

    def preflight(self) -> None:
        stage = self.stage("preflight", "preflight: what this Python has against what sleepd needs", 30)
        self.say(f"python {sys.executable} ({sys.version.split()[0]}); wheelhouse {self.wheelhouse}")
        found, missing = preflight.check(self.wheelhouse)
        for line in found:
            self.say(f"found: {line}")
        for line in missing:
            self.say(f"missing: {line}")
        if missing:
            self.end(stage, "failed", f"{len(missing)} missing")
            raise Stop("not ready", f"not ready: {len(missing)} thing(s) missing, listed above; nothing was installed")
        self.end(stage, "passed")

    def install(self) -> None:
        stage = self.stage("install", "install: sleepd and what the node lacks, from the wheelhouse, offline", 240)
        self.python = node_env.create(self.work / "venv")
        self.say(f"venv {self.work / 'venv'}: its own packages first, then this Python's")
        for command in node_env.pip_commands(self.python, self.wheelhouse):
            code, _ = self.command(command, stage, env=node_env.pip_environment())
            if code != 0:
                self.end(stage, "failed", "pip " + ("ran out of time" if code is None else f"exited {code}"))
                raise Stop("failed", "failed: the install from the wheelhouse (pip's output is above)")
        code, lines = self.command([self.python, HERE / "installed.py"], stage, env=self.environment_for_stages())
        if code != 0:
            self.end(stage, "failed", "sleepd does not import")
            raise Stop("failed", f"failed: sleepd installed but does not import: {lines[-1] if lines else code}")
        self.end(stage, "passed")

    def smoke(self, key: str, title: str, limit: int, args: list) -> dict:
        """Runs one smoke stage; returns its figures, or stops the run with its one line."""
        stage = self.stage(key, title, limit)
        if stage is None:
            raise Stop("failed", f"failed: {title}: the run's 8 minutes were spent")
        code, lines = self.command([self.python, HERE / "smoke.py", key, *args], stage,
                                   env=self.environment_for_stages())
        last = [line for line in lines if line.startswith(("figures: ", "failed: ", "absent: "))]
        verdict, _, rest = (last[-1] if last else ": ").partition(": ")
        if code == 0 and verdict == "figures":
            self.end(stage, "passed")
            return json.loads(rest)
        if code == 2 and verdict == "absent":
            self.end(stage, "no GPU", rest)
            raise Stop("no GPU", f"no GPU: {rest}; sleepd was installed from the wheelhouse and imports; "
                                 "nothing else was run", code=2)
        why = rest if verdict == "failed" else ("ran out of time" if code is None else f"exited {code}")
        self.end(stage, "failed", why)
        raise Stop("failed", f"failed: {title}: {why}")

    def presence(self) -> None:
        self.environment = self.smoke("presence", "presence: a GPU, its driver and a CUDA build of torch", 60, [])
        free = shutil.disk_usage("/dev/shm").free if os.path.isdir("/dev/shm") else 0
        if free < SHM_NEEDED:
            raise Stop("not ready", f"not ready: /dev/shm has {free / GiB:.1f} GiB free; the GPU benchmark's host pool "
                                    f"needs {SHM_NEEDED / GiB:.0f} GiB there")

    def pytest(self) -> None:
        stage = self.stage("pytest", "pytest tests/gpu", 150)
        if stage is None:
            return
        self.run_pytest(stage, "pytest", ["--timeout", str(PYTEST_SECONDS_PER_TEST), "--ignore", VLLM_TESTS, HERE])

    def vllm(self) -> None:
        stage = self.stage("vllm", "pytest tests/gpu/test_vllm_gpu.py (optional: vLLM on this GPU)", VLLM_SECONDS,
                           budgeted=False)
        missing = self.vllm_missing()
        if missing:
            self.end(stage, "skipped", missing)
            return
        self.run_pytest(stage, "vllm", ["--timeout", str(VLLM_SECONDS), VLLM_TESTS])

    def vllm_missing(self) -> str | None:
        """Why this Python cannot run vLLM's GPU tests, or None when it can."""
        probe = subprocess.run([self.python, "-c", "import vllm, torch; print(torch.version.cuda or '')"],
                               capture_output=True, text=True, timeout=120, env=self.environment_for_stages())
        if probe.returncode != 0:
            why = (probe.stderr.strip().splitlines() or ["no output"])[-1]
            return f"vLLM is not installed in {self.python} ({why})"
        if not probe.stdout.strip():
            return "vLLM is installed, but beside a torch without CUDA"
        return None

    def run_pytest(self, stage: Stage, key: str, arguments: list) -> None:
        code, lines = self.command([self.python, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *arguments],
                                   stage, env=self.environment_for_stages(), cwd=ROOT)
        counts = parse.pytest("\n".join(lines))
        self.figures.update({f"{key}.{name}": value for name, value in counts.items()})
        failed = sum(counts.get(name, {}).get("value", 0) for name in ("failed", "errors"))
        if code == 0 and not failed:
            self.end(stage, "passed")
        else:
            self.end(stage, "failed", f"{failed} failed" if failed else
                     ("ran out of time" if code is None else f"pytest exited {code}"))

    def bench(self, key: str, argv: list[str], limit: int, parser) -> None:
        stage = self.stage(key, f"benchmark: python -m sleepd.bench {shlex.join(argv)}", limit)
        if stage is None:
            return
        code, lines = self.command([self.python, "-m", "sleepd.bench", *argv], stage, env=self.environment_for_stages())
        found = parser("\n".join(lines))
        self.figures.update({f"{key}.{name}": value for name, value in found.items()})
        if code == 0:
            self.end(stage, "passed")
        else:
            self.end(stage, "failed", "ran out of time" if code is None else f"exited {code}")

    def all(self) -> None:
        self.preflight()
        self.install()
        self.presence()
        for key, title, limit, args in SMOKE:
            self.figures.update({f"{key}.{name}": value for name, value in self.smoke(key, title, limit, args).items()})
        self.pytest()
        for key, argv, limit, parser in BENCHES:
            self.bench(key, argv, limit, parser)
        self.vllm()
        failed = [stage.title for stage in self.stages if stage.status not in ("passed", "skipped")]
        if failed:
            raise Stop("failed", f"failed: {len(failed)} stage(s) did not pass: {'; '.join(failed)}")

    def finish(self, result: str, line: str, code: int) -> None:
        outcome = {"result": result, "summary": line, "exit_code": code, "started": self.started_at,
                   "seconds": round(time.monotonic() - self.started, 1), "budget_seconds": BUDGET_SECONDS}
        report.write(self.outdir, outcome, self.environment, [stage.record() for stage in self.stages], self.figures)
        self.say(f"wrote {self.outdir / 'accept.json'} and {self.outdir / 'accept.md'}")
        self.say(line)
        self.log.close()


def main() -> int:
    parser = argparse.ArgumentParser(prog="tests/gpu/accept.sh", description=__doc__.split("\n\n")[0])
    parser.add_argument("wheelhouse", type=Path, help="what deploy/wheelhouse built")
    parser.add_argument("outdir", type=Path, help="receives accept.log, accept.json and accept.md")
    args = parser.parse_args()
    args.outdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="sleepd-accept-") as work:
        run = Run(args.wheelhouse.resolve(), args.outdir.resolve(), Path(work))
        try:
            run.all()
        except Stop as stop:
            run.finish(stop.result, stop.line, stop.code)
            return stop.code
        except Exception as error:  # a bug here, or a machine unlike what a stage expects: still a record
            for line in traceback.format_exc().splitlines():
                run.say(line)
            if run.stages and run.stages[-1].status == "not run":
                run.end(run.stages[-1], "failed", f"{type(error).__name__}: {error}")
            run.finish("failed", f"failed: the acceptance run itself broke: {type(error).__name__}: {error}", 1)
            return 1
        targets = report.targets(run.figures)
        met = sum(row["met"] is True for row in targets)
        run.finish("accepted", f"accepted: every stage passed in {time.monotonic() - run.started:.0f} s; {met} of "
                               f"{len(targets)} targets met (accept.md)", 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
