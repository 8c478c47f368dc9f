"""The CUDA backend's own promises, shown against the driver double: no context
in the daemon, a pool pinned once, and clean rollback when the driver fails."""

import pytest

from support import MiB, wait_for

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
    for mover in daemon.mover_pids():
        assert fake.counters(mover)["contexts_retained"] >= 1


def test_the_mover_pins_the_host_pool_once_not_on_every_sleep(daemon, fake, start_engine):
    start_engine(daemon, "qwen", regions=REGIONS)
    for _ in range(3):
        daemon.ctl("sleep", "--model", "qwen")
        daemon.ctl("wake", "--model", "qwen")
    [mover] = [pid for pid in daemon.mover_pids() if fake.counters(pid)["copies"]]
    counters = fake.counters(mover)
    assert counters["host_register_calls"] == 1, "the pool slab was registered more than once"
    assert counters["copies"] >= 6


def test_a_prefaulted_pool_is_pinned_before_the_first_sleep(start_daemon, fake):
    daemon = start_daemon("--host-pool-prefault", "--host-pool-budget", "64MiB")
    for mover in daemon.mover_pids():
        wait_for(lambda: fake.counters(mover)["host_registered_bytes"] == 64 * MiB, what="the pool to be pinned")


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
    awake = daemon.status()
    fake.inject(fail_map=1)
    result = daemon.ctl("sleep", "--model", "qwen", check=False)
    fake.inject()
    assert result.returncode != 0 and "cuMemMap" in result.stderr
    assert daemon.status() == awake
    assert engine.report()["regions"] == engine.initial["regions"]
