"""What an Ascend user relies on, on a real NPU: the runtime's own rules, which the
double in tests/fakeacl only stands in for (docs/ascend.md)."""

import json
import subprocess
import sys

from support import MiB, by_tag, wait_for
from test_daemon_restart import attached

REGIONS = [("weights", 64 * MiB), ("kv_cache", 32 * MiB)]


def free_bytes(device: int = 0) -> int:
    """What aclrtGetMemInfo says is free on the NPU, asked by a process of its own."""
    code = f"import json; from sleepd import _C; print(json.dumps(_C.AclBackend().memory_info({device})))"
    return json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                     timeout=120).stdout)[0]


def test_weights_come_back_bit_identical_and_sleep_frees_the_npu(start_daemon, start_engine):
    daemon = start_daemon(devices=1, capacity="1GiB")
    engine = start_engine(daemon, "qwen", regions=REGIONS)
    awake = free_bytes()
    daemon.ctl("sleep", "--model", "qwen", "--level", "1")
    # The runtime frees in its own granularity; all 96 MiB must come back, give or take other processes.
    assert free_bytes() - awake >= 96 * MiB * 0.95
    daemon.ctl("wake", "--model", "qwen")
    before, after = by_tag(engine.initial), by_tag(engine.report())
    assert after["weights"]["sha256"] == before["weights"]["sha256"]


def test_the_daemon_exports_once_for_every_importer(start_daemon, start_engine):
    # A second export of a handle fails on the runtime: two sleeps and a persistent takeover reuse the token.
    daemon = start_daemon(devices=1, capacity="1GiB")
    first = start_engine(daemon, "qwen", regions=[("weights", 64 * MiB)], persist=True)
    for _ in range(2):
        daemon.ctl("sleep", "--model", "qwen")
        daemon.ctl("wake", "--model", "qwen")
    first.kill()
    second = start_engine(daemon, "qwen", regions=[], persist=True)
    assert by_tag(second.report())["weights"]["sha256"] == by_tag(first.initial)["weights"]["sha256"]


def test_a_restarted_daemon_takes_an_engines_memory_back_by_copy(start_daemon, start_engine, tmp_path):
    daemon = start_daemon(devices=1, capacity="1GiB")
    engine = start_engine(daemon, "qwen", regions=REGIONS)
    daemon.stop()
    again = start_daemon(devices=1, capacity="1GiB")
    wait_for(lambda: attached(again) == {"qwen": [(0, False)]}, timeout=60, what="the engine to attach again")
    again.ctl("sleep", "--model", "qwen")
    again.ctl("wake", "--model", "qwen")
    assert by_tag(engine.report())["weights"]["sha256"] == by_tag(engine.initial)["weights"]["sha256"]
