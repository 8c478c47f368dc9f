"""The pytest plug-in of a run of vLLM's own tests (`-p sleepd_vllm_layer`), for
tests/vllm_upstream/test_vllm_own_tests.py. It changes no test; it

- gives each test a model of its own on the daemon (SLEEPD_MODEL=<base>-<n>) when SLEEPD_MODEL is set,
  so an engine that is still going away cannot meet the next test's;
- writes each test's outcome, duration and output, one JSON line each, to $SLEEPD_VLLM_TESTS_REPORT."""

import json
import os

import pytest

_counter = 0


@pytest.fixture(autouse=True)
def _sleepd_model_per_test():
    global _counter
    base = os.environ.get("SLEEPD_VLLM_TESTS_MODEL")
    if not base:
        yield
        return
    _counter += 1
    os.environ["SLEEPD_MODEL"] = f"{base}-{_counter}"
    yield


def pytest_runtest_logreport(report):
    path = os.environ.get("SLEEPD_VLLM_TESTS_REPORT")
    if not path or (report.when != "call" and report.passed):
        return
    output = "\n".join(f"--- {name}\n{text}" for name, text in report.sections)
    with open(path, "a") as file:
        file.write(json.dumps({"nodeid": report.nodeid, "when": report.when, "outcome": report.outcome,
                               "duration": report.duration, "longrepr": report.longreprtext,
                               "output": output[-200_000:]}) + "\n")
