"""The benchmarks run end to end and print their ratios (tiny sizes: this checks
that they work, not how fast anything is; the figures are in the notes)."""

import re
import subprocess
import sys


def bench(*args) -> str:
    result = subprocess.run([sys.executable, "-m", "sleepd.bench", *args], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_the_swap_benchmark_prints_its_ratios():
    out = bench("swap", "--size", "64MiB", "--region-size", "8MiB", "--rounds", "1")
    assert float(re.search(r"swap / sequential:\s+([0-9.]+)", out).group(1)) > 0
    assert float(re.search(r"together / apart:\s+([0-9.]+)", out).group(1)) > 0


def test_the_host_benchmark_prints_ratios_to_memcpy():
    out = bench("host", "--size", "64MiB", "--region-size", "16MiB", "--rounds", "2", "--small-regions", "20")
    assert re.search(r"x memcpy", out), out
