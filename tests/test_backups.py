"""Backups prove themselves: every piece of a backup carries the checksums the mover took as it
wrote it into the host pool, a wake checks them before any engine runs on the bytes, and a backup
that went bad fails the wake (DATA_LOSS) and stays, with the model asleep, for inspection."""

import json
import os
import signal

import pytest

from sleepd import _C

from support import MiB, Daemon, by_tag, scrape, value, wait_for

BLOCK = _C.CHECKSUM_BLOCK
REGIONS = [("weights", 40 * MiB), ("kv_cache", 2 * MiB)]
# A byte of the weights' second checksum block.
FLIPPED = BLOCK + 4 * MiB + 5


def recorded_backup(daemon, region_id: int) -> dict:
    """The region's entry in the daemon's state file: its backup's pieces and checksums."""
    with open(os.path.join(daemon.state_dir, "state.json")) as file:
        state = json.load(file)
    return next(region for model in state["models"] for rank in model["ranks"] for region in rank["regions"]
                if region["id"] == region_id)


def slab_path(daemon, slab: int) -> str:
    return os.path.join(daemon.pool_dir, f"slab-{slab:04d}")


def in_pool(recorded: dict, offset: int) -> tuple[int, int, int]:
    """Where byte `offset` of the region lies in the pool (slab, offset there), and where the
    checksum block that holds it starts in the region."""
    start = 0
    for slab, at, length in recorded["backup"]:
        if offset < start + length:
            return slab, at + offset - start, start + (offset - start) // BLOCK * BLOCK
        start += length
    raise AssertionError(f"byte {offset} is not in the backup")


def flip(daemon, slab: int, offset: int) -> int:
    """What an operator's bad day does to a backup: one bit of it changes in the pool. Returns the byte now."""
    with open(slab_path(daemon, slab), "r+b") as file:
        file.seek(offset)
        byte = file.read(1)[0] ^ 0x10
        file.seek(offset)
        file.write(bytes([byte]))
    return byte


def refused_wake(daemon, model: str) -> str:
    result = daemon.ctl("wake", "--model", model, check=False)
    assert result.returncode != 0, "the wake succeeded on a damaged backup"
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    return result.stderr.strip()


def assert_asleep_with_its_backup(daemon, engine, weights_id: int, recorded: dict) -> None:
    states = {region["tag"]: region["state"] for region in engine.report()["regions"]}
    assert states == {"weights": "offloaded", "kv_cache": "discarded"}
    assert daemon.status()["models"][0]["sleeping"]
    assert recorded_backup(daemon, weights_id)["backup"] == recorded["backup"], "the backup was not kept"
    assert int(daemon.status()["pool"]["used"]) == 40 * MiB


def assert_back_bit_identical(engine) -> None:
    now, before = by_tag(engine.report()), by_tag(engine.initial)
    assert now["weights"]["state"] == "mapped"
    assert now["weights"]["sha256"] == before["weights"]["sha256"]
    assert now["kv_cache"]["zero"], "discarded memory must come back zero-filled"


def test_the_checksums_recorded_with_a_backup_are_those_of_its_bytes_in_the_pool(daemon, start_engine):
    engine = start_engine(daemon, "qwen", regions=REGIONS)
    weights = by_tag(engine.initial)["weights"]
    daemon.ctl("sleep", "--model", "qwen", "--level", "1")

    recorded = recorded_backup(daemon, weights["id"])
    expected = []
    for slab, at, length in recorded["backup"]:
        with open(slab_path(daemon, slab), "rb") as file:
            file.seek(at)
            data = file.read(length)
        expected += [_C.crc32c(data[block:block + BLOCK]) for block in range(0, length, BLOCK)]
    assert recorded["checksums"] == "".join(f"{checksum:08x}" for checksum in expected)

    daemon.ctl("wake", "--model", "qwen")
    assert_back_bit_identical(engine)
    samples = scrape(daemon)
    assert value(samples, "sleepd_verified_bytes_total") == 40 * MiB
    assert value(samples, "sleepd_verify_seconds_total") > 0
    assert value(samples, "sleepd_damaged_backups_total") == 0


def test_a_byte_flipped_in_the_pool_fails_the_wake_and_the_model_stays_asleep_with_its_backup(daemon, start_engine):
    engine = start_engine(daemon, "qwen", regions=REGIONS)
    weights = by_tag(engine.initial)["weights"]
    daemon.ctl("sleep", "--model", "qwen", "--level", "1")
    recorded = recorded_backup(daemon, weights["id"])
    slab, at, block = in_pool(recorded, FLIPPED)
    flipped = flip(daemon, slab, at)

    error = refused_wake(daemon, "qwen")
    assert error.endswith("[DATA_LOSS]"), error
    block_in_slab = at - (FLIPPED - block)
    for what in ("wake qwen", f"region {weights['id']} (weights) of qwen rank 0",
                 f"bytes [{block}, {min(block + BLOCK, 40 * MiB)}) of the region",
                 f"{slab_path(daemon, slab)} at offset {block_in_slab}", "kept for inspection"):
        assert what in error, error
    assert_asleep_with_its_backup(daemon, engine, weights["id"], recorded)
    with open(slab_path(daemon, slab), "rb") as file:
        file.seek(at)
        assert file.read(1)[0] == flipped, "the damaged backup must stay as it was found, to be inspected"
    assert value(scrape(daemon), "sleepd_damaged_backups_total") == 1

    flip(daemon, slab, at)  # put right: the same backup now wakes the model, every byte as it was
    daemon.ctl("wake", "--model", "qwen")
    assert_back_bit_identical(engine)
    assert int(daemon.status()["pool"]["used"]) == 0


def test_a_truncated_slab_fails_the_wake_loudly_never_silently(daemon, start_engine):
    engine = start_engine(daemon, "qwen", regions=REGIONS)
    weights = by_tag(engine.initial)["weights"]
    daemon.ctl("sleep", "--model", "qwen", "--level", "1")
    recorded = recorded_backup(daemon, weights["id"])
    slab, at, _ = in_pool(recorded, 0)
    path = slab_path(daemon, slab)
    size = os.path.getsize(path)
    with open(path, "rb") as file:
        kept = file.read()

    os.truncate(path, at + MiB)
    error = refused_wake(daemon, "qwen")
    assert error.endswith("[DATA_LOSS]") and "cut short" in error and f"{path} holds {at + MiB} bytes" in error, \
        error
    assert_asleep_with_its_backup(daemon, engine, weights["id"], recorded)

    os.truncate(path, size)  # as long as before, but what was cut off reads as zeros now
    error = refused_wake(daemon, "qwen")
    assert error.endswith("[DATA_LOSS]") and "does not match" in error and "bytes [0, " in error, error
    assert_asleep_with_its_backup(daemon, engine, weights["id"], recorded)

    with open(path, "r+b") as file:
        file.write(kept)
    daemon.ctl("wake", "--model", "qwen")
    assert_back_bit_identical(engine)


def test_a_restarted_daemon_still_checks_the_backups_it_recovered(tmp_path, backend, fake, start_daemon,
                                                                   start_engine):
    daemon = start_daemon()
    engine = start_engine(daemon, "qwen", regions=REGIONS)
    weights = by_tag(engine.initial)["weights"]
    daemon.ctl("sleep", "--model", "qwen", "--level", "1")
    recorded = recorded_backup(daemon, weights["id"])
    os.kill(daemon.pid, signal.SIGKILL)
    daemon.process.wait(timeout=30)
    slab, at, block = in_pool(recorded, FLIPPED)
    flip(daemon, slab, at)

    again = Daemon(tmp_path, backend, "--host-devices", "2", "--host-device-capacity", "256MiB") \
        if backend == "host" else Daemon(tmp_path, backend)
    try:
        wait_for(lambda: again.status()["models"] and not again.status()["models"][0]["ranks"][0].get("orphaned"),
                 timeout=30, what="the engine to attach to the new daemon")
        error = refused_wake(again, "qwen")
        assert error.endswith("[DATA_LOSS]") and f"bytes [{block}, " in error, error
        assert_asleep_with_its_backup(again, engine, weights["id"], recorded)

        flip(again, slab, at)
        again.ctl("wake", "--model", "qwen")
        assert_back_bit_identical(engine)
    finally:
        again.stop()


@pytest.mark.parametrize("backend", ["host"])  # the state file is the same on every backend
def test_a_state_file_from_before_checksums_still_loads_and_its_backups_wake_unchecked(tmp_path, backend,
                                                                                         start_daemon, start_engine):
    daemon = start_daemon()
    engine = start_engine(daemon, "qwen", regions=REGIONS)
    daemon.ctl("sleep", "--model", "qwen", "--level", "1")
    os.kill(daemon.pid, signal.SIGKILL)
    daemon.process.wait(timeout=30)
    path = os.path.join(daemon.state_dir, "state.json")
    with open(path) as file:
        state = json.load(file)
    for region in (region for model in state["models"] for rank in model["ranks"] for region in rank["regions"]):
        del region["checksums"]  # as the daemon before checksums wrote it
    with open(path, "w") as file:
        json.dump(state, file)

    again = Daemon(tmp_path, backend, "--host-devices", "2", "--host-device-capacity", "256MiB")
    try:
        wait_for(lambda: again.status()["models"] and not again.status()["models"][0]["ranks"][0].get("orphaned"),
                 timeout=30, what="the engine to attach to the new daemon")
        again.ctl("wake", "--model", "qwen")
        assert_back_bit_identical(engine)
        assert "restored unchecked" in again.log()
        assert value(scrape(again), "sleepd_verified_bytes_total") == 0
    finally:
        again.stop()


# ---- host_pool.check_backups = "after_resume": the wake copies unchecked, the daemon checks once the model runs ----

AFTER_RESUME = ("--host-pool-check-backups", "after_resume")


def test_checked_after_resume_a_flipped_byte_lets_the_wake_succeed_then_is_counted_and_logged(start_daemon,
                                                                                                start_engine):
    daemon = start_daemon(*AFTER_RESUME)
    engine = start_engine(daemon, "qwen", regions=REGIONS)
    weights = by_tag(engine.initial)["weights"]
    daemon.ctl("sleep", "--model", "qwen", "--level", "1")
    recorded = recorded_backup(daemon, weights["id"])
    slab, at, block = in_pool(recorded, FLIPPED)
    flip(daemon, slab, at)

    daemon.ctl("wake", "--model", "qwen")  # not slowed, not refused: the model runs on the flipped byte
    now = by_tag(engine.report())
    assert now["weights"]["state"] == "mapped"
    assert now["weights"]["sha256"] != by_tag(engine.initial)["weights"]["sha256"]

    wait_for(lambda: value(scrape(daemon), "sleepd_damaged_backups_total") == 1, timeout=10,
             what="the after-resume check to count the damage")
    lines = [line for line in daemon.log().splitlines() if "after-resume check" in line]
    assert len(lines) == 1, lines
    block_in_slab = at - (FLIPPED - block)
    for what in ("ERROR", "qwen", f"region {weights['id']} (weights) of qwen rank 0",
                 f"bytes [{block}, {min(block + BLOCK, 40 * MiB)}) of the region",
                 f"{slab_path(daemon, slab)} at offset {block_in_slab}", "has run on these bytes since its wake"):
        assert what in lines[0], lines[0]
    samples = scrape(daemon)
    assert value(samples, "sleepd_verified_bytes_total") == 0
    assert value(samples, "sleepd_verify_seconds_total") > 0
    wait_for(lambda: int(daemon.status()["pool"]["used"]) == 0, timeout=10, what="the checked backup to be freed")
    wait_for(lambda: not recorded_backup(daemon, weights["id"]).get("backup"), timeout=10,
             what="the state file to forget the freed backup")


def test_checked_after_resume_an_intact_backup_counts_its_bytes_verified_and_no_damage(start_daemon, start_engine):
    daemon = start_daemon(*AFTER_RESUME)
    engine = start_engine(daemon, "qwen", regions=REGIONS)
    daemon.ctl("sleep", "--model", "qwen", "--level", "1")
    daemon.ctl("wake", "--model", "qwen")
    assert_back_bit_identical(engine)

    wait_for(lambda: value(scrape(daemon), "sleepd_verified_bytes_total") == 40 * MiB, timeout=10,
             what="the after-resume check to count the verified bytes")
    samples = scrape(daemon)
    assert value(samples, "sleepd_verify_seconds_total") > 0
    assert value(samples, "sleepd_damaged_backups_total") == 0
    wait_for(lambda: int(daemon.status()["pool"]["used"]) == 0, timeout=10, what="the checked backup to be freed")
    assert "after-resume check" not in daemon.log()


@pytest.mark.parametrize("backend", ["host"])  # the setting is the daemon's; the copy is tested on each backend above
def test_checked_after_resume_a_truncated_slab_still_fails_the_wake(start_daemon, start_engine):
    daemon = start_daemon(*AFTER_RESUME)
    engine = start_engine(daemon, "qwen", regions=REGIONS)
    weights = by_tag(engine.initial)["weights"]
    daemon.ctl("sleep", "--model", "qwen", "--level", "1")
    recorded = recorded_backup(daemon, weights["id"])
    slab, at, _ = in_pool(recorded, 0)
    os.truncate(slab_path(daemon, slab), at + MiB)
    error = refused_wake(daemon, "qwen")
    assert error.endswith("[DATA_LOSS]") and "cut short" in error, error
    assert_asleep_with_its_backup(daemon, engine, weights["id"], recorded)
