"""A pytest plugin (tests/conftest.py loads it): suites a run counts on must run in full.

    python -m pytest --require-suites tests/test_tenants.py,tests/test_hostile.py
    SLEEPD_REQUIRE_SUITES=tests/test_tenants.py,tests/test_hostile.py python -m pytest -q

A suite is a test file or folder, relative to where pytest starts. At the end of the run, a suite
of which a test was skipped or deselected, or of which no test ran (none collected, a path that
does not exist), turns the run red, with one line for each such suite. CI (.ci/run) names the
suites that skip where they lack something (a second uid, CUDA's headers, vLLM), so that a
machine without it fails instead of passing quietly. An expected failure (xfail) counts as run.
"""

import os
from pathlib import Path

import pytest

ENVIRONMENT = "SLEEPD_REQUIRE_SUITES"


def pytest_addoption(parser):
    parser.addoption("--require-suites", default=os.environ.get(ENVIRONMENT, ""), metavar="PATHS",
                     help="comma-separated test files or folders that must run in full: the run fails if any of "
                          f"their tests is skipped or deselected, or none runs (default: ${ENVIRONMENT})")


def pytest_configure(config):
    paths = [path.strip() for path in config.getoption("require_suites").split(",") if path.strip()]
    if paths:
        config.pluginmanager.register(RequiredSuites(config, paths), "sleepd-required-suites")


class RequiredSuites:
    def __init__(self, config, paths: list[str]):
        self._suites = {path: _from_root(config, path) for path in paths}
        self._ran: dict[str, set[str]] = {path: set() for path in paths}
        self._skipped: dict[str, dict[str, str]] = {path: {} for path in paths}  # test -> reason
        self._deselected: dict[str, set[str]] = {path: set() for path in paths}
        self._problems: list[str] = []

    def _suite_of(self, nodeid: str) -> str | None:
        file = nodeid.split("::")[0]
        for path, relative in self._suites.items():
            if file == relative or file.startswith(relative + "/") or relative == ".":
                return path
        return None

    def pytest_deselected(self, items):
        for item in items:
            if (suite := self._suite_of(item.nodeid)) is not None:
                self._deselected[suite].add(item.nodeid)

    def pytest_collectreport(self, report):
        """A whole module skipped as it is collected (pytest.skip(allow_module_level=True), importorskip)."""
        if report.skipped and (suite := self._suite_of(report.nodeid)) is not None:
            self._skipped[suite][report.nodeid] = _reason(report)

    def pytest_runtest_logreport(self, report):
        if (suite := self._suite_of(report.nodeid)) is None:
            return
        if report.skipped and not hasattr(report, "wasxfail"):
            self._skipped[suite][report.nodeid] = _reason(report)
        elif report.when == "call" or report.failed:
            self._ran[suite].add(report.nodeid)

    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionfinish(self, session):
        for path in self._suites:
            skipped, deselected = self._skipped[path], self._deselected[path]
            ran = self._ran[path] - skipped.keys()
            if skipped:
                test, reason = next(iter(skipped.items()))
                self._problems.append(f"required suite {path} did not run in full: {len(skipped)} skipped "
                                      f"(first: {test}: {reason})")
            elif deselected:
                self._problems.append(f"required suite {path} did not run in full: {len(deselected)} deselected "
                                      f"(first: {sorted(deselected)[0]})")
            elif not ran:
                self._problems.append(f"required suite {path} did not run: no test of it ran (none collected, "
                                      "or no such file or folder)")
        if self._problems and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter):
        for problem in self._problems:
            terminalreporter.write_line(problem, red=True, bold=True)


def _from_root(config, path: str) -> str:
    """`path` as the start of the node ids of its tests: relative to the root directory, with '/'."""
    absolute = Path(os.path.normpath(config.invocation_params.dir / path))
    try:
        return absolute.relative_to(config.rootpath).as_posix()
    except ValueError:
        return path


def _reason(report) -> str:
    if isinstance(report.longrepr, tuple):  # (file, line, "Skipped: why")
        return report.longrepr[2].removeprefix("Skipped: ")
    return str(report.longrepr)
