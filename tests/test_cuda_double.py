"""The CUDA backend's own promises, shown against the driver double: no context
in the daemon, a pool pinned once, and clean rollback when the driver fails."""

import json
import os
import re
import signal
import subprocess
import sys

import pytest

from sleepd.bench import gpu as gpu_bench
from support import MiB, scrape, sleeping, value, wait_for

REGIONS = [("weights", 4 * MiB), ("weights", 4 * MiB), ("weights", 4 * MiB), ("kv_cache", 2 * MiB)]


@pytest.fixture
def backend():
    return "cuda"


def states(engine) -> list[str]:
    return [region["state"] for region in engine.report()["regions"]]


def test_the_daemon_never_creates_a_cuda_context(daemon, fake, start_engine):
    start_engine(daemon, "qwen", regions=REGIONS)
    daemon.ctl("sleep", "--model", "qwen")
    daemon.ctl("wake", "--model", "qwen")
    assert fake.counters(daemon.pid)["contexts_retained"] == 0
    assert fake.counters(daemon.pid)["creates"] >= 8  # it did create and release the memory itself
    # The copies ran in a mover, on a context of its own (taken when its first copy needed one).
    assert [fake.counters(mover)["contexts_retained"] for mover in daemon.mover_pids()].count(1) == 1


# An engine's session thread, or a mover's channel thread, is not the thread that chose the device.
IMPORT_ON_A_FRESH_THREAD = """
import os, threading
from sleepd import _C

daemon_side = _C.CudaBackend()  # as in the daemon: no context
engine_side = _C.CudaBackend()
engine_side.set_device(0)  # current on this thread only
size = daemon_side.granularity(0)
fd = daemon_side.export_handle(daemon_side.create(0, size))
errors = []

def import_and_use():
    try:
        imported = engine_side.import_handle(fd, 0, size)
        address = engine_side.reserve(size)
        engine_side.map(address, size, imported, 0)
        engine_side.write(address, b"written")
        assert engine_side.read(address, 7) == b"written"
        engine_side.unmap(address, size)
        engine_side.release(imported)
    except Exception as error:
        errors.append(error)

thread = threading.Thread(target=import_and_use)
thread.start()
thread.join()
os.close(fd)
assert not errors, errors
"""


def test_memory_is_imported_and_mapped_on_a_thread_that_never_chose_a_device(fake):
    result = subprocess.run([sys.executable, "-c", IMPORT_ON_A_FRESH_THREAD], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr


def test_the_mover_pins_the_host_pool_once_not_on_every_sleep(daemon, fake, start_engine):
    start_engine(daemon, "qwen", regions=REGIONS)
    for _ in range(3):
        daemon.ctl("sleep", "--model", "qwen")
        daemon.ctl("wake", "--model", "qwen")
    [mover] = [pid for pid in daemon.mover_pids() if fake.counters(pid)["copies"]]
    counters = fake.counters(mover)
    assert counters["host_register_calls"] == 1, "the pool slab was registered more than once"
    assert counters["copies"] >= 6


def test_backups_in_pool_space_an_earlier_wake_freed_survive_a_mover_restart(daemon, fake, start_engine):
    engine = start_engine(daemon, "qwen", regions=REGIONS)
    daemon.ctl("sleep", "--model", "qwen")
    daemon.ctl("wake", "--model", "qwen")  # frees the backups' pool space, which the mover keeps pinned
    daemon.ctl("sleep", "--model", "qwen")  # backs up into that same space
    for mover in daemon.mover_pids():
        os.kill(mover, signal.SIGKILL)
    wait_for(lambda: not daemon.mover_pids(), what="the movers to die")
    daemon.ctl("wake", "--model", "qwen")  # a new mover reads the backups from the pool's files
    assert weights_digests(engine.report()) == weights_digests(engine.initial), \
        "the backups were copied to pinned pages the pool's files no longer hold"


def test_a_prefaulted_pool_is_pinned_before_the_first_sleep(start_daemon, fake):
    daemon = start_daemon("--host-pool-prefault", "--host-pool-budget", "64MiB")
    for mover in daemon.mover_pids():
        wait_for(lambda: fake.counters(mover)["host_registered_bytes"] == 64 * MiB, what="the pool to be pinned")


def test_a_kernel_still_writing_when_the_engine_sleeps_is_in_what_wakes(daemon, fake, start_engine):
    # An RL step's non-blocking weight update, then sleep() at once: the backup must hold the update.
    engine = start_engine(daemon, "qwen", regions=[("weights", 4 * MiB)])
    written = engine.request("kernel_write", index=0, seed=7)["sha256"]
    assert engine.request("sleep", level=1) == {"sleeping": True}
    assert engine.request("wake") == {"sleeping": False}
    [region] = engine.report()["regions"]
    assert region["sha256"] == written, "the backup was taken before the engine's kernel finished"


def test_out_of_memory_halfway_through_a_wake_leaves_the_model_asleep_with_its_backups(daemon, fake, start_engine):
    engine = start_engine(daemon, "qwen", regions=REGIONS)
    before = {region["id"]: region["sha256"] for region in engine.initial["regions"]}
    daemon.ctl("sleep", "--model", "qwen")
    asleep = daemon.status()

    fake.inject(oom_at_create=2)  # the second region's memory cannot be created
    result = daemon.ctl("wake", "--model", "qwen", check=False)
    assert result.returncode != 0
    assert "RESOURCE_EXHAUSTED" in result.stderr and "out of device memory midway" in result.stderr
    assert daemon.status() == asleep, "a failed wake changed the model's state"
    assert fake.counters(daemon.pid)["live_handles"] == 0, "memory created for the failed wake was kept"
    assert states(engine) == ["offloaded", "offloaded", "offloaded", "discarded"]

    fake.inject()
    daemon.ctl("wake", "--model", "qwen")
    after = {region["id"]: region for region in engine.report()["regions"]}
    for region_id, digest in before.items():
        if after[region_id]["tag"] == "weights":
            assert after[region_id]["sha256"] == digest, "a backup did not survive the failed wake"


def test_a_failing_import_in_one_rank_rolls_the_whole_model_back(daemon, fake, start_engine):
    good = start_engine(daemon, "qwen", rank=0, regions=REGIONS)
    bad = start_engine(daemon, "qwen", rank=1, device=1, regions=REGIONS, seed=1)
    daemon.ctl("sleep", "--model", "qwen")
    asleep = daemon.status()

    fake.inject(fail_import_pid=bad.pid)
    result = daemon.ctl("wake", "--model", "qwen", check=False)
    assert result.returncode != 0
    assert "rank 1" in result.stderr and "cuMemImportFromShareableHandle" in result.stderr
    assert daemon.status() == asleep
    assert states(good) == states(bad) == ["offloaded", "offloaded", "offloaded", "discarded"]
    assert good.report()["hooks"] == {"sleep": 1, "wake": 0}

    fake.inject()
    daemon.ctl("wake", "--model", "qwen")
    for engine in (good, bad):
        awake = {region["id"]: region for region in engine.report()["regions"]}
        for region in engine.initial["regions"]:
            if region["tag"] == "weights":
                assert awake[region["id"]]["sha256"] == region["sha256"]


def test_a_failing_map_in_the_mover_fails_the_sleep_and_loses_nothing(daemon, fake, start_engine):
    engine = start_engine(daemon, "qwen", regions=REGIONS)
    awake, movers = daemon.status(), sorted(daemon.mover_pids())
    fake.inject(fail_map=1)
    result = daemon.ctl("sleep", "--model", "qwen", check=False)
    fake.inject()
    assert result.returncode != 0 and "cuMemMap" in result.stderr
    assert daemon.status() == awake
    assert engine.report()["regions"] == engine.initial["regions"]
    # A failed driver call is not a dead mover: it stays, and copies for other models go on meanwhile.
    assert sorted(daemon.mover_pids()) == movers


def test_a_mover_whose_context_a_fault_broke_is_replaced_and_the_next_sleep_works(daemon, fake, start_engine):
    engine = start_engine(daemon, "qwen", regions=REGIONS)
    awake, movers = daemon.status(), set(daemon.mover_pids())
    fake.inject(sticky_fault=700)  # a GPU fault: every later call in that mover fails the same way
    result = daemon.ctl("sleep", "--model", "qwen", check=False)
    fake.inject()
    assert result.returncode != 0 and "an illegal memory access was encountered" in result.stderr
    assert "lost its device context" in result.stderr
    assert daemon.status() == awake
    daemon.ctl("sleep", "--model", "qwen")
    daemon.ctl("wake", "--model", "qwen")
    assert weights_digests(engine.report()) == weights_digests(engine.initial)
    assert len(movers - set(daemon.mover_pids())) == 1, "the broken mover is still running"


# Every code after which cuda.h says the process must be relaunched, and 214 and 999, which behave so.
STICKY_CODES = [214, 226, 700, 702, 710, 714, 715, 716, 717, 718, 719, 721, 810, 911, 999]


def test_every_code_that_leaves_a_process_unusable_has_its_mover_replaced(daemon, fake, start_engine):
    engine = start_engine(daemon, "qwen", regions=REGIONS)
    awake, devices = daemon.status(), len(daemon.mover_pids())
    for code in STICKY_CODES:  # each sleep starts the device's mover again, which the fault then breaks
        fake.inject(sticky_fault=code)
        result = daemon.ctl("sleep", "--model", "qwen", check=False)
        fake.inject()
        assert result.returncode != 0 and "lost its device context" in result.stderr, (code, result.stderr)
        assert daemon.status() == awake, code
        assert len(daemon.mover_pids()) == devices - 1, f"the mover broken by {code} is still running"
    daemon.ctl("sleep", "--model", "qwen")
    daemon.ctl("wake", "--model", "qwen")
    assert weights_digests(engine.report()) == weights_digests(engine.initial)


def daemon_states(daemon, model: str) -> list[str]:
    [entry] = daemon.status(model)["models"]
    return [region["state"] for rank in entry["ranks"] for region in rank["regions"]]


def test_one_models_offload_and_anothers_restore_run_at_the_same_time(daemon, fake, start_engine):
    leaving = start_engine(daemon, "qwen", regions=REGIONS)
    arriving = start_engine(daemon, "llama", regions=REGIONS, seed=1)
    daemon.ctl("sleep", "--model", "llama")

    fake.inject(hold_dtoh=1)  # qwen's offload cannot finish until this is lifted
    sleeping = subprocess.Popen([sys.executable, "-m", "sleepd.client.ctl", "--socket", daemon.socket,
                                 "sleep", "--model", "qwen"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: "OFFLOADING" in daemon_states(daemon, "qwen"), what="qwen's offload to start")
        # llama's restore runs while qwen's offload is still in its copy.
        daemon.ctl("--timeout", "30", "wake", "--model", "llama")
        assert "OFFLOADING" in daemon_states(daemon, "qwen")
    finally:
        fake.inject()
        _, errors = sleeping.communicate(timeout=60)
    assert sleeping.returncode == 0, errors

    weights = [r for r in arriving.initial["regions"] if r["tag"] == "weights"]
    assert [r for r in arriving.report()["regions"] if r["tag"] == "weights"] == weights
    assert states(leaving) == ["offloaded", "offloaded", "offloaded", "discarded"]
    daemon.ctl("wake", "--model", "qwen")
    assert [r["sha256"] for r in leaving.report()["regions"] if r["tag"] == "weights"] == \
        [r["sha256"] for r in leaving.initial["regions"] if r["tag"] == "weights"]


def device(daemon, index: int) -> dict:
    return daemon.status()["devices"][index]


def test_device_memory_is_the_drivers_view_from_nvml_matched_by_uuid(daemon, fake, start_engine):
    uuids = [device(daemon, index)["uuid"] for index in (0, 1)]
    # The double's NVML numbers devices in reverse: only matching by UUID gets each device's own figures.
    assert uuids == ["GPU-a0a1a2a3-a4a5-a6a7-a8a9-aaabacadae00", "GPU-a0a1a2a3-a4a5-a6a7-a8a9-aaabacadae01"]
    idle = int(device(daemon, 1)["driverUsed"])
    engine = start_engine(daemon, "qwen", device=1, regions=[("weights", 64 * MiB)])
    awake = int(device(daemon, 1)["driverUsed"])
    assert awake - idle == 64 * MiB
    assert int(device(daemon, 0)["driverUsed"]) < 64 * MiB
    assert value(scrape(daemon), "sleepd_device_driver_bytes", device="cuda:1", kind="used") == awake

    daemon.ctl("sleep", "--model", "qwen")
    assert int(device(daemon, 1)["driverUsed"]) == idle, "the driver still holds the memory of a sleeping model"
    asleep = daemon.status()

    # Another process takes most of the device: sleepd sees it and refuses the wake, naming why.
    fake.inject(foreign_used_1=200 * MiB)
    assert int(device(daemon, 1)["free"]) <= 56 * MiB
    result = daemon.ctl("wake", "--model", "qwen", check=False)
    assert result.returncode != 0
    assert "RESOURCE_EXHAUSTED" in result.stderr and "held outside sleepd" in result.stderr
    fake.inject()
    assert daemon.status() == asleep
    # NVML failing (a GPU lost from the bus) hides the driver's figures but stops nothing.
    fake.inject(nvml_lost=1)
    assert "driverUsed" not in device(daemon, 1)
    daemon.ctl("wake", "--model", "qwen")
    assert "NVML cannot read device 1" in daemon.log()
    fake.inject()
    assert int(device(daemon, 1)["driverUsed"]) == awake
    assert engine.report()["regions"] == engine.initial["regions"]


def test_without_nvml_the_daemon_uses_the_drivers_totals_and_says_so(start_daemon, fake, monkeypatch):
    monkeypatch.delenv("LD_LIBRARY_PATH")
    daemon = start_daemon(capacity="256MiB")
    assert "blind to other processes" in daemon.log()
    for entry in daemon.status()["devices"]:
        assert int(entry["capacity"]) == 256 * MiB
        assert "driverUsed" not in entry


def test_an_engine_that_numbers_its_gpus_differently_gets_memory_on_its_own_gpu(daemon, fake, start_engine):
    # The engine sees only GPU 1, as its device 0 (a container, or CUDA_VISIBLE_DEVICES=1).
    engine = start_engine(daemon, "qwen", device=0, regions=REGIONS, env={"CUDA_VISIBLE_DEVICES": "1"})
    [rank] = daemon.status("qwen")["models"][0]["ranks"]
    assert rank["device"] == 1, "the daemon put the engine's memory on another GPU"
    daemon.ctl("sleep", "--model", "qwen")
    daemon.ctl("wake", "--model", "qwen")
    assert [r["sha256"] for r in engine.report()["regions"] if r["tag"] == "weights"] == \
        [r["sha256"] for r in engine.initial["regions"] if r["tag"] == "weights"]


def test_an_engine_on_a_gpu_the_daemon_does_not_manage_is_refused_by_name(start_daemon, fake, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    daemon = start_daemon()  # manages GPU 0 only
    attach = f"from sleepd.client import SleepClient; SleepClient.connect('qwen', socket={daemon.socket!r})"
    result = subprocess.run([sys.executable, "-c", attach], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": "1"})
    assert result.returncode != 0
    assert "GPU-a0a1a2a3-a4a5-a6a7-a8a9-aaabacadae01, which this daemon does not manage" in result.stderr
    assert daemon.status()["models"] == []


def weights_digests(report) -> list[str]:
    return [r.get("sha256") for r in report["regions"] if r["tag"] == "weights"]


def test_a_swap_keeps_the_room_it_frees_for_the_model_it_brings_in(daemon, fake, start_engine):
    b = start_engine(daemon, "b", regions=[("weights", 48 * MiB)] * 3, seed=1)
    daemon.ctl("sleep", "--model", "b")
    c = start_engine(daemon, "c", regions=[("weights", 16 * MiB)], seed=2)
    daemon.ctl("sleep", "--model", "c")
    start_engine(daemon, "a", regions=[("weights", 48 * MiB)] * 3)
    fake.inject(hold_dtoh=1)  # a's offload cannot finish: the swap stays in progress
    swapping = subprocess.Popen([sys.executable, "-m", "sleepd.client.ctl", "--socket", daemon.socket,
                                 "swap", "--to", "b", "--from", "a"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    try:
        wait_for(lambda: "OFFLOADING" in daemon_states(daemon, "a"), what="the swap to start")
        # 112 MiB are free, but b is owed 144: c may not take any of it meanwhile.
        result = daemon.ctl("wake", "--model", "c", check=False)
        assert result.returncode != 0 and "RESOURCE_EXHAUSTED" in result.stderr
        assert "set aside for swapping in b" in result.stderr
    finally:
        fake.inject()
        _, errors = swapping.communicate(timeout=60)
    assert swapping.returncode == 0, errors
    daemon.ctl("wake", "--model", "c")
    assert sleeping(daemon) == {"a": True, "b": False, "c": False}
    for engine in (b, c):
        assert weights_digests(engine.report()) == weights_digests(engine.initial)


def test_a_swap_whose_rollback_finds_no_room_leaves_the_old_model_asleep_and_whole(daemon, fake, start_engine):
    a = start_engine(daemon, "a", regions=REGIONS)
    b = start_engine(daemon, "b", regions=REGIONS, seed=1)
    daemon.ctl("sleep", "--model", "b")
    fake.inject(oom_from_create=1)  # neither b's memory nor a's again can be created
    result = daemon.ctl("swap", "--to", "b", "--from", "a", check=False)
    assert result.returncode != 0
    assert "a left asleep with its backups" in result.stderr
    assert sleeping(daemon) == {"a": True, "b": True}
    assert states(a) == states(b) == ["offloaded", "offloaded", "offloaded", "discarded"]
    assert a.report()["hooks"] == {"sleep": 1, "wake": 0}

    fake.inject()
    daemon.ctl("wake", "--model", "a")
    daemon.ctl("wake", "--model", "b")
    for engine in (a, b):
        assert weights_digests(engine.report()) == weights_digests(engine.initial)
    assert a.report()["hooks"] == {"sleep": 1, "wake": 1}


# A thread where torch works on device 0 uses the engine side on device 1: its context stays device 0's.
CALLERS_CONTEXT_KEPT = """
import ctypes, os
from sleepd import _C

driver = ctypes.CDLL(os.environ["SLEEPD_LIBCUDA"])
def current():
    context = ctypes.c_void_p()
    assert driver.cuCtxGetCurrent(ctypes.byref(context)) == 0
    return context.value
torchs = ctypes.c_void_p()
assert driver.cuInit(0) == 0 and driver.cuDevicePrimaryCtxRetain(ctypes.byref(torchs), 0) == 0
assert driver.cuCtxSetCurrent(torchs) == 0

daemon_side = _C.CudaBackend()
engine_side = _C.CudaBackend()
engine_side.set_device(1)
size = daemon_side.granularity(1)
fd = daemon_side.export_handle(daemon_side.create(1, size))
seen = [current() == torchs.value]
imported = engine_side.import_handle(fd, 1, size)
address = engine_side.reserve(size)
engine_side.map(address, size, imported, 1)
engine_side.write(address, b"written")
seen.append(engine_side.read(address, 7) == b"written")
engine_side.unmap(address, size)
engine_side.free_reservation(address, size)
engine_side.release(imported)
seen.append(current() == torchs.value)
print(seen)
"""


def test_the_engine_side_leaves_the_callers_current_context_as_it_was(fake, monkeypatch):
    monkeypatch.setenv("FAKE_CUDA_DEVICES", "2")
    result = subprocess.run([sys.executable, "-c", CALLERS_CONTEXT_KEPT], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["[True,", "True,", "True]"], result.stdout


def test_the_cuda_swap_benchmark_gives_the_device_room_for_one_model(fake, monkeypatch):
    monkeypatch.setenv("FAKE_CUDA_MEMORY", str(1 << 30))  # both models fit on it, as on a real GPU
    size, region = 32 * MiB, 4 * MiB
    result = subprocess.run([sys.executable, "-m", "sleepd.bench", "swap", "--backend", "cuda", "--size", str(size),
                             "--region-size", str(region), "--rounds", "1"], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    budget = int(re.search(r"device room for one model \(a budget of .*, (\d+) bytes\)", result.stdout).group(1))
    assert budget == size + 4 * region, result.stdout  # the daemon's own figure, not the bench's arithmetic
    counted = {int(path.stem): json.loads(path.read_text()) for path in fake.counters_dir.glob("*.json")}
    # The processes that created memory, in the order they started: the daemon with room for one model, then
    # the one with room for both (the capacity probe created nothing). With room for one, B comes in only as
    # A goes out, and the device never holds more than one model and the room the bench leaves beside it.
    room_for_one, _ = [counted[pid]["peak_created_bytes"] for pid in sorted(counted) if counted[pid]["creates"]]
    assert size <= room_for_one <= budget, counted


def test_the_movers_of_eight_gpus_pin_the_pool_at_the_same_time_before_the_daemon_is_ready(start_daemon, fake):
    fake.inject(register_ms_per_gib=8000)  # 64 MiB take half a second per mover
    daemon = start_daemon("--host-pool-prefault", "--host-pool-budget", "64MiB", devices=8)
    pinning = [fake.counters(mover) for mover in daemon.mover_pids()]
    assert len(pinning) == 8 and all(c["host_registered_bytes"] == 64 * MiB for c in pinning), pinning
    # Side by side, not one after another: every mover began before any had finished.
    assert max(c["first_register_ms"] for c in pinning) < min(c["last_register_end_ms"] for c in pinning), pinning
    assert gpu_bench.pin_seconds(daemon.log()) >= 0.5  # what the GPU bench reports beside its naive baseline


@pytest.mark.parametrize("mode, name", [(3, "EXCLUSIVE_PROCESS"), (2, "PROHIBITED")])
def test_a_gpu_whose_compute_mode_leaves_no_room_for_the_movers_context_is_refused_at_start(start_daemon, fake,
                                                                                              monkeypatch, mode, name):
    monkeypatch.setenv("FAKE_CUDA_COMPUTE_MODE", str(mode))
    with pytest.raises(RuntimeError, match=f"cuda:0 is in {name} compute mode, where sleepd's mover cannot have"):
        start_daemon()
