"""The ACL backend's promises, shown against the runtime double: for each of the
runtime's rules, the double refuses the wrong thing and sleepd does the right one
(the scenarios every backend runs, in the other test modules, show the right thing
working end to end on ACL too)."""

import os
import subprocess
import sys

import grpc
import pytest

from sleepd.client import SleepClient, SleepdError
from support import HERE, MiB

REGIONS = [("weights", 4 * MiB), ("weights", 4 * MiB), ("kv_cache", 2 * MiB)]
# acl_base_rt.h / rt_error_codes.h
SUCCESS, PARAM_INVALID, CONTEXT_NULL, FEATURE_NOT_SUPPORT, NO_PERMISSION = 0, 107000, 107002, 207000, 207006


@pytest.fixture
def backend():
    return "acl"


def states(engine) -> list[str]:
    return [region["state"] for region in engine.report()["regions"]]


def calls(role: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, os.path.join(HERE, "acl_calls.py"), role, *args],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def steps(process: subprocess.Popen) -> dict[str, int]:
    out, _ = process.communicate(timeout=60)
    return {name: int(value) for name, value in (line.split() for line in out.splitlines())}


def test_the_double_refuses_what_the_runtime_refuses(fake):
    exporter = calls("exporter")
    exported = {}
    while "token" not in exported:
        name, value = exporter.stdout.readline().split()
        exported[name] = int(value)
    assert (exported["export"], exported["export_again"]) == (SUCCESS, FEATURE_NOT_SUPPORT)
    assert exported["import_in_exporter"] == FEATURE_NOT_SUPPORT

    stranger = calls("importer", str(exported["token"]))
    assert stranger.stdout.readline().startswith("pid")
    stranger.stdin.write("\n")
    stranger.stdin.flush()
    assert steps(stranger)["import"] == NO_PERMISSION

    importer = calls("importer", str(exported["token"]))
    pid = importer.stdout.readline().split()[1]
    exporter.stdin.write(f"{pid}\n")
    exporter.stdin.flush()
    assert exporter.stdout.readline().split() == ["authorize", "0"]
    importer.stdin.write("\n")
    importer.stdin.flush()
    assert steps(importer) == {
        "import_without_device": CONTEXT_NULL, "import": SUCCESS, "import_again": FEATURE_NOT_SUPPORT,
        "export_imported": FEATURE_NOT_SUPPORT, "map_partial": PARAM_INVALID, "map_at_offset": PARAM_INVALID,
        "map": SUCCESS, "malloc": SUCCESS, "map_local_beside_imported": PARAM_INVALID,
        "copy_over_dest_max": PARAM_INVALID, "copy": SUCCESS, "free_while_mapped": PARAM_INVALID}
    exporter.stdin.close()
    exporter.wait(timeout=30)


def test_the_daemon_never_sets_a_device_and_exports_each_handle_once(daemon, fake, start_engine):
    start_engine(daemon, "qwen", regions=REGIONS)
    for _ in range(2):
        daemon.ctl("sleep", "--model", "qwen")
        daemon.ctl("wake", "--model", "qwen")
    counters = fake.counters(daemon.pid)
    assert counters["devices_set"] == 0
    # Each handle went to the engine and, for each sleep, to the mover: one export, the token cached.
    assert counters["exports"] == counters["mallocs"] >= 6
    assert counters["pid_sets"] > counters["exports"]
    [mover] = [pid for pid in daemon.mover_pids() if fake.counters(pid)["copies"]]
    assert fake.counters(mover)["host_register_calls"] == 1, "the pool slab was registered more than once"


def test_a_second_process_on_a_region_gets_the_cached_token(daemon, fake, start_engine):
    first = start_engine(daemon, "qwen", regions=[("weights", 4 * MiB)], persist=True)
    first.kill()  # its persistent region outlives it, awake
    second = start_engine(daemon, "qwen", regions=[], persist=True)
    [region] = second.report()["regions"]
    assert region["sha256"] == first.initial["regions"][0]["sha256"]
    assert fake.counters(daemon.pid)["exports"] == 1


def test_an_engine_that_names_another_pid_is_refused_and_nothing_leaks(daemon, fake):
    free_before, total = fake.memory_info()
    code = ("import sys; from sleepd.client import SleepClient, SleepdError\n"
            f"c = SleepClient.connect('qwen', socket={daemon.socket!r})\n"
            "try:\n    c.alloc(4 << 20, 'weights')\n"
            "except SleepdError as error:\n    print(error.code.name, error.message); sys.exit(3)\n")
    # As a process whose runtime id is not its own pid, while the daemon's two ids agree.
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "FAKE_ACL_BARE_TGID": "1"})
    assert result.returncode == 3, result.stderr
    assert result.stdout.startswith("PERMISSION_DENIED") and "device pid 1" in result.stdout
    assert fake.memory_info() == (free_before, total) == (total, total)
    assert fake.counters(daemon.pid)["live_handles"] == 0
    assert int(daemon.status()["devices"][0]["used"]) == 0


def test_memory_is_freed_as_the_runtime_sees_it(daemon, fake, start_engine):
    _, total = fake.memory_info()
    engine = start_engine(daemon, "qwen", regions=REGIONS)
    assert fake.memory_info()[0] == total - 10 * MiB
    daemon.ctl("sleep", "--model", "qwen", "--level", "2")
    assert fake.memory_info()[0] == total
    daemon.ctl("wake", "--model", "qwen")
    assert fake.memory_info()[0] == total - 10 * MiB
    engine.close()
    assert fake.memory_info()[0] == total


def test_out_of_memory_halfway_through_a_wake_leaves_the_model_asleep_with_its_backups(daemon, fake, start_engine):
    engine = start_engine(daemon, "qwen", regions=REGIONS)
    daemon.ctl("sleep", "--model", "qwen")
    asleep = daemon.status()
    fake.inject(oom_at_malloc=2)
    result = daemon.ctl("wake", "--model", "qwen", check=False)
    assert result.returncode != 0 and "RESOURCE_EXHAUSTED" in result.stderr
    assert daemon.status() == asleep
    assert fake.counters(daemon.pid)["live_handles"] == 0, "memory created for the failed wake was kept"
    fake.inject()
    daemon.ctl("wake", "--model", "qwen")
    awake = {region["id"]: region["sha256"] for region in engine.report()["regions"] if region["tag"] == "weights"}
    assert awake == {r["id"]: r["sha256"] for r in engine.initial["regions"] if r["tag"] == "weights"}


def test_a_failing_import_in_one_rank_rolls_the_whole_model_back(daemon, fake, start_engine):
    good = start_engine(daemon, "qwen", rank=0, regions=REGIONS)
    bad = start_engine(daemon, "qwen", rank=1, device=1, regions=REGIONS, seed=1)
    daemon.ctl("sleep", "--model", "qwen")
    asleep = daemon.status()
    fake.inject(fail_import_pid=bad.pid)
    result = daemon.ctl("wake", "--model", "qwen", check=False)
    assert result.returncode != 0
    assert "rank 1" in result.stderr and "aclrtMemImportFromShareableHandle" in result.stderr
    assert daemon.status() == asleep
    assert states(good) == states(bad) == ["offloaded", "offloaded", "discarded"]


def test_a_failing_map_in_the_mover_fails_the_sleep_and_loses_nothing(daemon, fake, start_engine):
    engine = start_engine(daemon, "qwen", regions=REGIONS)
    daemon.ctl("sleep", "--model", "qwen")  # starts the mover, so that its pid is known
    daemon.ctl("wake", "--model", "qwen")
    awake, regions = daemon.status(), engine.report()["regions"]
    [mover] = [pid for pid in daemon.mover_pids() if fake.counters(pid)["copies"]]
    fake.inject(fail_map_pid=mover)
    result = daemon.ctl("sleep", "--model", "qwen", check=False)
    fake.inject()
    assert result.returncode != 0 and "aclrtMapMem" in result.stderr
    assert daemon.status() == awake
    assert engine.report()["regions"] == regions


def test_a_token_fetch_that_names_no_device_pid_is_invalid_and_changes_nothing(daemon, fake):
    with SleepClient.connect("qwen", socket=daemon.socket) as client:
        region = client.alloc(MiB, "weights")
        before, pid_sets = daemon.status(), fake.counters(daemon.pid)["pid_sets"]
        with pytest.raises(SleepdError) as error:
            client._lease.fd_socket.fetch([region.id])  # the descriptor-backend request, without a device pid
        assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT and "device_pid" in error.value.message
        assert daemon.status() == before
        assert fake.counters(daemon.pid)["pid_sets"] == pid_sets
