"""The core story: models of several ranks sleep and wake through sleepctl, and
every byte, address and hook behaves as an engine relies on."""

import pytest

from support import MiB, by_tag
from kernel import memfd_bytes, memfd_mappings, shmem_bytes

REGIONS = [("weights", 3 * MiB + 123), ("kv_cache", 2 * MiB), ("buffers", 100_000)]


@pytest.fixture
def two_models(daemon, start_engine):
    """qwen and llama, each with a rank on device 0 and one on device 1."""
    engines = {}
    for seed, (model, rank) in enumerate([("qwen", 0), ("qwen", 1), ("llama", 0), ("llama", 1)]):
        engines[model, rank] = start_engine(daemon, model, rank=rank, device=rank, regions=REGIONS, seed=seed)
    return engines


def test_level_1_keeps_weights_and_buffers_bit_identical_and_zeroes_kv_cache(daemon, two_models):
    before = {key: by_tag(engine.initial) for key, engine in two_models.items()}
    llama_before = {key: engine.report() for key, engine in two_models.items() if key[0] == "llama"}

    out = daemon.ctl("sleep", "--model", "qwen", "--level", "1").stdout
    assert "slept qwen" in out and "offloaded" in out and "discarded" in out

    for rank in (0, 1):
        asleep = by_tag(two_models["qwen", rank].report())
        assert asleep["weights"]["state"] == "offloaded"
        assert asleep["buffers"]["state"] == "offloaded"
        assert asleep["kv_cache"]["state"] == "discarded"
    for key, report in llama_before.items():
        assert two_models[key].report() == report, "the other model changed while qwen slept"

    assert "woke qwen" in daemon.ctl("wake", "--model", "qwen").stdout

    for rank in (0, 1):
        awake = by_tag(two_models["qwen", rank].report())
        original = before["qwen", rank]
        for tag in ("weights", "buffers"):
            assert awake[tag]["sha256"] == original[tag]["sha256"], f"{tag} of rank {rank} changed"
        assert awake["kv_cache"]["zero"], "kv_cache must come back zero-filled"
        for tag in ("weights", "kv_cache", "buffers"):
            assert awake[tag]["address"] == original[tag]["address"], f"{tag} moved"
            assert awake[tag]["state"] == "mapped"
    for key, report in llama_before.items():
        assert two_models[key].report() == report, "the other model changed while qwen woke"


def test_sleeping_frees_memory_as_the_kernel_sees_it(daemon, start_engine):
    engine = start_engine(daemon, "qwen", regions=[("weights", 16 * MiB), ("kv_cache", 48 * MiB)])
    holders = [daemon.pid, engine.pid, *daemon.mover_pids()]
    assert memfd_bytes(holders, daemon.memfd_prefix("qwen")) >= 64 * MiB
    assert len(memfd_mappings(engine.pid, daemon.memfd_prefix("qwen"))) == 2
    shmem_awake = shmem_bytes()

    daemon.ctl("sleep", "--model", "qwen", "--level", "1")

    holders = [daemon.pid, engine.pid, *daemon.mover_pids()]
    assert memfd_bytes(holders, daemon.memfd_prefix("qwen")) == 0, "a process still holds the model's memory open"
    assert memfd_mappings(engine.pid, daemon.memfd_prefix("qwen")) == [], "the engine still maps the model's memory"
    # Weights moved to the host pool (still shared memory); the kv_cache is gone.
    assert shmem_awake - shmem_bytes() >= 40 * MiB

    daemon.ctl("wake", "--model", "qwen")
    assert memfd_bytes([daemon.pid], daemon.memfd_prefix("qwen")) >= 64 * MiB
    assert len(memfd_mappings(engine.pid, daemon.memfd_prefix("qwen"))) == 2


def test_level_2_discards_weights_and_kv_cache_and_offloads_untagged_buffers(daemon, start_engine):
    engine = start_engine(daemon, "qwen", regions=REGIONS)
    before = by_tag(engine.initial)

    out = daemon.ctl("sleep", "--model", "qwen", "--level", "2").stdout
    asleep = by_tag(engine.report())
    assert (asleep["weights"]["state"], asleep["kv_cache"]["state"], asleep["buffers"]["state"]) == (
        "discarded", "discarded", "offloaded")
    assert "offloaded" in out

    daemon.ctl("wake", "--model", "qwen")
    awake = by_tag(engine.report())
    assert awake["weights"]["zero"] and awake["kv_cache"]["zero"]
    assert awake["buffers"]["sha256"] == before["buffers"]["sha256"]


def test_partial_wake_keeps_the_model_asleep_until_every_tag_is_back(daemon, start_engine):
    engine = start_engine(daemon, "qwen", regions=REGIONS[:2])
    daemon.ctl("sleep", "--model", "qwen", "--level", "1")
    assert engine.report()["hooks"] == {"sleep": 1, "wake": 0}

    daemon.ctl("wake", "--model", "qwen", "--tags", "weights")
    assert daemon.status("qwen")["models"][0]["sleeping"] is True
    report = engine.report()
    assert report["hooks"]["wake"] == 0, "the resume hook ran before kv_cache was back"
    assert by_tag(report)["weights"]["state"] == "mapped"
    assert by_tag(report)["kv_cache"]["state"] == "discarded"

    daemon.ctl("wake", "--model", "qwen", "--tags", "kv_cache")
    assert daemon.status("qwen")["models"][0]["sleeping"] is False
    assert engine.report()["hooks"] == {"sleep": 1, "wake": 1}


def test_an_engine_can_sleep_and_wake_its_own_model(daemon, start_engine):
    engine = start_engine(daemon, "qwen", regions=REGIONS)
    before = by_tag(engine.initial)
    assert engine.request("sleep", level=1) == {"sleeping": True}
    assert engine.request("wake") == {"sleeping": False}
    after = by_tag(engine.report())
    assert after["weights"]["sha256"] == before["weights"]["sha256"]
    assert engine.report()["hooks"] == {"sleep": 1, "wake": 1}


def test_level_0_runs_the_hooks_and_moves_nothing(daemon, start_engine):
    engine = start_engine(daemon, "qwen", regions=REGIONS)
    out = daemon.ctl("sleep", "--model", "qwen", "--level", "0").stdout
    assert "0 regions" in out
    report = engine.report()
    assert report["hooks"] == {"sleep": 1, "wake": 0}
    assert all(region["state"] == "mapped" for region in report["regions"])
    assert daemon.status("qwen")["models"][0]["sleeping"] is True
    daemon.ctl("wake", "--model", "qwen")
    assert engine.report()["hooks"] == {"sleep": 1, "wake": 1}


def test_explicit_tag_actions_override_the_level(daemon, start_engine):
    engine = start_engine(daemon, "qwen", regions=REGIONS)
    before = by_tag(engine.initial)
    daemon.ctl("sleep", "--model", "qwen", "--tags", "kv_cache", "--action", "kv_cache=offload")
    asleep = by_tag(engine.report())
    assert asleep["kv_cache"]["state"] == "offloaded"
    assert asleep["weights"]["state"] == "mapped"
    daemon.ctl("wake", "--model", "qwen")
    assert by_tag(engine.report())["kv_cache"]["sha256"] == before["kv_cache"]["sha256"]


def test_allocations_racing_with_sleep_and_wake_lose_nothing(daemon):
    import threading

    from sleepd.client import SleepClient

    with SleepClient.connect("racer", socket=daemon.socket) as client:
        stop, errors, regions = threading.Event(), [], []

        def allocate():
            index = 0
            while not stop.is_set() and index < 60:  # 60 regions fit a device on either backend
                try:
                    region = client.alloc(64 << 10, "buffers")
                    region.write(index.to_bytes(8, "little"))
                    regions.append((region, index))
                    index += 1
                except Exception as error:  # any failure here is the bug under test
                    errors.append(error)
                    return

        thread = threading.Thread(target=allocate)
        thread.start()
        try:
            for _ in range(10):
                daemon.ctl("sleep", "--model", "racer", "--level", "1")
                daemon.ctl("wake", "--model", "racer")
        finally:
            stop.set()
            thread.join()
        assert not errors
        assert len(regions) > 10
        for region, index in regions:
            assert region.read(0, 8) == index.to_bytes(8, "little")
