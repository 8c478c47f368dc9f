"""The short soak CI runs: many clients cycling through sleep and wake with random
kills lose no byte and leak no descriptor or memory (the long run is in the notes)."""

import json
import subprocess
import sys


def test_a_short_soak_loses_nothing_and_leaks_nothing():
    result = subprocess.run([sys.executable, "-m", "sleepd.bench", "soak", "--minutes", "0.6", "--kill-every", "3",
                             "--json"], capture_output=True, text=True, timeout=300)
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["cycles"] > 20 and summary["kills"] >= 5
    assert summary["bytes_verified"] > 0
    assert summary["corrupted_bytes"] == 0
    assert summary["leaked_fds"] == 0
    assert summary["leaked_bytes"] == 0
    assert summary["rss_end"] - summary["rss_start"] < 64 << 20
    assert result.returncode == 0, result.stderr[-2000:]
