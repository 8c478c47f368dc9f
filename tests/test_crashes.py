"""An engine killed at every interesting moment: the daemon reclaims what it held,
the other ranks and models carry on, and status tells the truth. Persistent
regions outlive their engine and come back to the next process of the rank."""

import pytest

from kernel import memfd_bytes
from support import MiB, by_tag, wait_for

REGIONS = [("weights", 4 * MiB), ("kv_cache", 2 * MiB)]


def ranks(daemon, model: str) -> list[tuple[int, bool]]:
    return [(rank["rank"], rank.get("orphaned", False))
            for entry in daemon.status()["models"] if entry["name"] == model for rank in entry["ranks"]]


@pytest.fixture
def qwen_and_llama(daemon, start_engine):
    victim = start_engine(daemon, "qwen", rank=0, regions=REGIONS)
    survivor = start_engine(daemon, "qwen", rank=1, device=1, regions=REGIONS, seed=1)
    bystander = start_engine(daemon, "llama", regions=REGIONS, seed=2)
    return victim, survivor, bystander, bystander.report()


def test_an_engine_killed_during_its_own_allocation_leaves_nothing_behind(daemon, qwen_and_llama):
    victim, survivor, bystander, bystander_report = qwen_and_llama
    victim.request("die_on", moment="fetch")  # dies after the daemon created the region, before mapping it
    victim.send("alloc", size=8 * MiB, tag="buffers")
    assert victim.process.wait(timeout=20) != 0
    wait_for(lambda: ranks(daemon, "qwen") == [(1, False)], what="rank 0 to be reclaimed")
    if daemon.backend == "host":
        assert memfd_bytes([daemon.pid, *daemon.mover_pids()], daemon.memfd_prefix("qwen")) == 6 * MiB
    assert int(daemon.status()["devices"][0]["used"]) == 6 * MiB  # llama only
    assert survivor.report()["regions"] == survivor.initial["regions"]
    assert bystander.report() == bystander_report


def test_an_engine_killed_after_the_copy_but_before_its_ack_rolls_the_sleep_back(daemon, qwen_and_llama):
    victim, survivor, bystander, bystander_report = qwen_and_llama
    victim.request("die_on", moment="unmap")
    result = daemon.ctl("sleep", "--model", "qwen", check=False)
    assert result.returncode != 0 and "UNAVAILABLE" in result.stderr and "rolled back" in result.stderr
    assert victim.process.wait(timeout=20) != 0
    wait_for(lambda: ranks(daemon, "qwen") == [(1, False)], what="rank 0 to be reclaimed")
    status = daemon.status()
    assert status["pool"]["used"] == "0", "the dead rank's backups were kept"
    assert not [m for m in status["models"] if m["name"] == "qwen"][0]["sleeping"]
    assert survivor.report()["regions"] == survivor.initial["regions"]
    assert survivor.report()["hooks"] == {"sleep": 1, "wake": 1}
    assert bystander.report() == bystander_report
    daemon.ctl("sleep", "--model", "qwen")  # the rank that is left sleeps normally
    assert [r["state"] for r in survivor.report()["regions"]] == ["offloaded", "discarded"]


def test_an_engine_killed_in_the_middle_of_a_wake_leaves_the_model_asleep_and_whole(daemon, qwen_and_llama):
    victim, survivor, bystander, bystander_report = qwen_and_llama
    daemon.ctl("sleep", "--model", "qwen")
    victim.request("die_on", moment="remap")
    result = daemon.ctl("wake", "--model", "qwen", check=False)
    assert result.returncode != 0 and "UNAVAILABLE" in result.stderr
    wait_for(lambda: ranks(daemon, "qwen") == [(1, False)], what="rank 0 to be reclaimed")
    assert [r["state"] for r in survivor.report()["regions"]] == ["offloaded", "discarded"]
    daemon.ctl("wake", "--model", "qwen")
    assert by_tag(survivor.report())["weights"]["sha256"] == by_tag(survivor.initial)["weights"]["sha256"]
    assert bystander.report() == bystander_report


def test_persistent_regions_outlive_their_engine_awake_or_asleep(daemon, start_engine, fake):
    first = start_engine(daemon, "qwen", regions=REGIONS, persist=True)
    original = by_tag(first.initial)
    first.kill()
    wait_for(lambda: ranks(daemon, "qwen") == [(0, True)], what="rank 0 to show as orphaned")
    assert int(daemon.status()["devices"][0]["used"]) == 6 * MiB, "persistent memory was released"

    # Awake: the next process of the rank maps the same memory, at an address of its own.
    second = start_engine(daemon, "qwen", regions=())
    assert ranks(daemon, "qwen") == [(0, False)]
    taken = by_tag(second.report())
    assert [r["id"] for r in second.report()["regions"]] == [r["id"] for r in first.initial["regions"]]
    assert taken["weights"]["sha256"] == original["weights"]["sha256"]
    assert taken["kv_cache"]["sha256"] == original["kv_cache"]["sha256"]
    if daemon.backend == "acl":  # the new process took the first one's place on the runtime's allow-lists
        allowed = fake.allowed_pids()
        assert second.process.pid in allowed and first.process.pid not in allowed, allowed

    # Asleep: the model sleeps while no process holds the rank, and wakes with the next one.
    second.kill()
    wait_for(lambda: ranks(daemon, "qwen") == [(0, True)], what="rank 0 to show as orphaned")
    daemon.ctl("sleep", "--model", "qwen")
    assert int(daemon.status()["devices"][0]["used"]) == 0
    third = start_engine(daemon, "qwen", regions=())
    assert [r["state"] for r in third.report()["regions"]] == ["offloaded", "discarded"]
    daemon.ctl("wake", "--model", "qwen")
    assert by_tag(third.report())["weights"]["sha256"] == original["weights"]["sha256"]


def test_a_persistent_rank_can_only_come_back_on_its_device(daemon, start_engine):
    first = start_engine(daemon, "qwen", device=1, regions=REGIONS, persist=True)
    first.kill()
    wait_for(lambda: ranks(daemon, "qwen") == [(0, True)], what="rank 0 to show as orphaned")
    with pytest.raises(AssertionError, match="exited at start"):
        start_engine(daemon, "qwen", device=0, regions=())
    assert ranks(daemon, "qwen") == [(0, True)]
