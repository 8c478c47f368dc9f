"""The daemon's pure parts: sizes, rules, the region state machine, the pool allocator, backups'
checksums on the mover's socket and checked after resume, and the checks on the directories and files the
daemon keeps for itself."""

import os
import threading
import time

import pytest

from sleepd import _C
from sleepd.common import wire
from sleepd.common.sizes import format_size, parse_size
from sleepd.daemon.backup_checks import BackupChecks
from sleepd.daemon.errors import Code as ErrorCode, SleepdError
from sleepd.daemon.events import EventBus
from sleepd.daemon.mover_messages import (RESTORE, Copy, Done, Failed, Mismatch, RegionCopy, decode_reply,
                                          decode_request)
from sleepd.daemon.pool import Backup, HostPool, Piece, checksums_text, parse_checksums
from sleepd.daemon.private_paths import PrivateDirectory, UnsafePath
from sleepd.daemon.regions import IllegalTransition, Region, RegionState
from sleepd.daemon.replies import Replies
from sleepd.daemon.rules import Action, SleepRules

MiB = 1 << 20


@pytest.mark.parametrize("text, value", [("512MiB", 512 * MiB), ("4GiB", 4 << 30), ("1.5G", 3 << 29),
                                         ("4096", 4096), ("64 kb", 64 << 10)])
def test_sizes_parse_as_people_write_them(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "lots", "4XB", "-1GiB"])
def test_sizes_that_are_not_sizes_are_refused(text):
    with pytest.raises(ValueError, match="not a size"):
        parse_size(text)


def test_format_size():
    assert format_size(1536 * MiB) == "1.5 GiB"
    assert format_size(100) == "100 B"


def test_default_rules_follow_the_brief():
    rules = SleepRules()
    tags = {"weights", "kv_cache", "buffers"}
    assert rules.plan(0, tags, {}) is None
    assert rules.plan(1, tags, {}) == {"weights": Action.OFFLOAD, "kv_cache": Action.DISCARD,
                                       "buffers": Action.OFFLOAD}
    assert rules.plan(2, tags, {}) == {"weights": Action.DISCARD, "kv_cache": Action.DISCARD,
                                       "buffers": Action.OFFLOAD}
    assert rules.plan(2, {"weights"}, {"weights": Action.OFFLOAD}) == {"weights": Action.OFFLOAD}
    with pytest.raises(SleepdError) as error:
        rules.plan(7, tags, {})
    assert error.value.code is ErrorCode.INVALID_ARGUMENT


class Owner:
    model = "qwen"

    @staticmethod
    def describe():
        return "qwen rank 0 (pid 1)"


def test_region_life_follows_the_table():
    region = Region.new(1, "weights", 4096, 4096, 0, Owner(), persist=False)
    region.created(handle=11)
    assert region.restored() is None and region.state is RegionState.MAPPED and region.holds_memory
    backup = Backup(4096, [])
    region.offload(backup)
    assert region.state is RegionState.OFFLOADING
    assert region.release() == 11 and region.state is RegionState.OFFLOADED and not region.holds_memory
    region.begin_restore()
    assert region.state is RegionState.RESTORING
    region.created(handle=12)
    assert region.cancel_restore() == 12 and region.state is RegionState.OFFLOADED  # a backup exists
    region.begin_restore()
    region.created(handle=13)
    assert region.restored() is backup and region.state is RegionState.MAPPED and region.backup is None
    assert region.release() == 13 and region.state is RegionState.DISCARDED  # discard
    region.begin_restore()
    assert region.cancel_restore() is None and region.state is RegionState.DISCARDED
    with pytest.raises(IllegalTransition, match="region 1 .*no transition from discarded on offload"):
        region.offload(backup)
    with pytest.raises(IllegalTransition, match="release while discarded without device memory"):
        region.release()
    assert region.state is RegionState.DISCARDED


@pytest.fixture
def pool(tmp_path):
    pool = HostPool(str(tmp_path / "pool"), budget=8 * MiB, slab_size=4 * MiB)
    yield pool
    pool.close()


def test_pool_allocates_across_slabs_within_its_budget(pool):
    a = pool.allocate(3 * MiB)
    b = pool.allocate(3 * MiB)  # spills into a second slab
    assert {piece.slab for piece in b.pieces} == {0, 1}
    assert pool.used == 6 * MiB
    with pytest.raises(SleepdError) as error:
        pool.allocate(3 * MiB)
    assert error.value.code is ErrorCode.RESOURCE_EXHAUSTED
    assert pool.used == 6 * MiB
    pool.free(a)
    c = pool.allocate(5 * MiB)  # fits in the freed extent plus the rest
    assert sum(piece.length for piece in c.pieces) == 5 * MiB
    pool.free(b)
    pool.free(c)
    assert pool.used == 0
    assert [slab.free for slab in pool.slabs()] == [[(0, 4 * MiB)], [(0, 4 * MiB)]]


def test_pool_returns_freed_pages_to_the_kernel(pool):
    backup = pool.allocate(4 * MiB)
    slab = pool.slabs()[0]
    os.pwrite(slab.fd, b"x" * (4 * MiB), 0)
    assert os.fstat(slab.fd).st_blocks * 512 >= 4 * MiB
    pool.free(backup)
    assert os.fstat(slab.fd).st_blocks == 0


def test_freed_pages_wait_for_the_next_sleep_then_go_back_to_the_kernel(tmp_path):
    pool = HostPool(str(tmp_path / "pool"), budget=8 * MiB, slab_size=8 * MiB, keep_freed_seconds=0.5)
    first = pool.allocate(4 * MiB)
    slab = pool.slabs()[0]
    os.pwrite(slab.fd, b"x" * (4 * MiB), 0)
    pool.free(first)
    assert os.fstat(slab.fd).st_blocks * 512 >= 4 * MiB  # kept for the next sleep
    # The next sleep's backup reuses the kept pages; they are in use, and must outlive the return of the rest.
    second = pool.allocate(2 * MiB)
    assert second.pieces == [Piece(0, 0, 2 * MiB)]
    os.pwrite(slab.fd, b"y" * (2 * MiB), 0)
    pool.free(pool.allocate(MiB))
    deadline = time.monotonic() + 10
    while os.fstat(slab.fd).st_blocks * 512 > 2 * MiB and time.monotonic() < deadline:
        time.sleep(0.05)
    assert os.fstat(slab.fd).st_blocks * 512 == 2 * MiB  # only the piece in use keeps its pages
    assert os.pread(slab.fd, 2 * MiB, 0) == b"y" * (2 * MiB)
    assert os.pread(slab.fd, MiB, 2 * MiB) == bytes(MiB)
    pool.close()


def test_a_backup_says_where_each_byte_of_its_region_lies_and_which_slab_lost_it(pool):
    pool.allocate(MiB)
    backup = pool.allocate(5 * MiB)  # 3 MiB at the end of slab 0, 2 MiB at the start of slab 1
    assert backup.locate(0) == (Piece(0, MiB, 3 * MiB), MiB)
    assert backup.locate(4 * MiB + 7) == (Piece(1, 0, 2 * MiB), MiB + 7)
    with pytest.raises(ValueError):
        backup.locate(5 * MiB)
    assert pool.cut_short(backup) is None
    os.ftruncate(pool.slabs()[1].fd, MiB)
    assert pool.cut_short(backup) == (3 * MiB, f"{pool.slab_path(1)} holds {MiB} bytes, not the {2 * MiB} at its "
                                               "offset 0")


class _Count:
    def __init__(self):
        self.value = 0.0

    def inc(self, amount=1):
        self.value += amount


class _Metrics:
    def __init__(self):
        self.verified_bytes, self.verify_seconds, self.damaged_backups = _Count(), _Count(), _Count()


class _Owner:
    name, owner_uid = "qwen", os.getuid()


def _written_backup(pool, size: int) -> Backup:
    """A backup of `size` bytes of its own pattern in the pool, with the checksums an offload takes."""
    backup = pool.allocate(size)
    checksums = []
    for piece in backup.pieces:
        data = os.urandom(piece.length)
        os.pwrite(pool.slabs()[piece.slab].fd, data, piece.offset)
        checksums.append(_C.crc32c(data))  # one block each: pieces here are under CHECKSUM_BLOCK
    backup.checksums = tuple(checksums)
    return backup


def test_a_backup_checked_after_resume_is_freed_and_a_damaged_one_reported_with_its_slab_and_offset(pool):
    events, metrics = EventBus(), _Metrics()
    seen = events.subscribe()
    checker = BackupChecks(pool, metrics, events, "after_resume")
    pool.allocate(MiB)
    damaged = _written_backup(pool, 5 * MiB)  # 3 MiB at the end of slab 0, 2 MiB at the start of slab 1
    intact = _written_backup(pool, 2 * MiB)
    os.pwrite(pool.slabs()[1].fd, bytes([os.pread(pool.slabs()[1].fd, 1, 7)[0] ^ 1]), 7)
    checker.restored(_Owner(), "region 1 (weights) of qwen rank 0", 5 * MiB, damaged)
    checker.restored(_Owner(), "region 2 (kv) of qwen rank 0", 2 * MiB, intact)
    event = seen.get(timeout=10)
    assert event.kind == "backup_damaged" and event.model == "qwen" and event.bytes == 5 * MiB
    for what in ("region 1 (weights)", f"bytes [{3 * MiB}, {5 * MiB}) of the region",
                 f"{pool.slab_path(1)} at offset 0", "has run on these bytes"):
        assert what in event.detail, event.detail
    deadline = time.monotonic() + 10
    while pool.used != MiB and time.monotonic() < deadline:
        time.sleep(0.01)
    assert pool.used == MiB  # both freed, the damaged one too
    assert metrics.damaged_backups.value == 1 and metrics.verified_bytes.value == 2 * MiB
    checker.stop()


def test_backups_awaiting_their_check_hold_pool_space_and_a_stop_frees_them_unchecked(pool, monkeypatch):
    checker = BackupChecks(pool, _Metrics(), EventBus(), "after_resume")
    going_on, checking = threading.Event(), threading.Event()
    real = pool.check_piece

    def slow(*args):
        checking.set()
        going_on.wait()
        return real(*args)

    monkeypatch.setattr(pool, "check_piece", slow)
    first = _written_backup(pool, 5 * MiB)  # two pieces: the stop comes between them
    second = _written_backup(pool, 2 * MiB)
    checker.restored(_Owner(), "region 1", 5 * MiB, first)
    checker.restored(_Owner(), "region 2", 2 * MiB, second)
    assert checking.wait(10)
    assert pool.used == 7 * MiB and checker.waiting_bytes == 7 * MiB
    stopping = threading.Thread(target=checker.stop)
    stopping.start()
    going_on.set()
    stopping.join(10)
    assert not stopping.is_alive()
    assert pool.used == 0 and checker.waiting_bytes == 0
    third = _written_backup(pool, MiB)  # a wake that ends as the daemon stops: freed, not left half-owned
    checker.restored(_Owner(), "region 3", MiB, third)
    assert pool.used == 0


def test_checksums_cross_the_movers_socket_and_the_state_file_as_they_were_taken():
    checksums = (0, 0xE3069283, 0xFFFFFFFF)
    assert parse_checksums(checksums_text(checksums)) == checksums
    copy = Copy((RegionCopy(RESTORE, 3 * MiB, (Piece(0, 0, 3 * MiB),), token=7, checksums=checksums),))
    assert decode_request(*copy.encode()) == copy
    done = Done(0.5, ((1, 2), ()), checking_seconds=0.25)
    assert decode_reply(*done.encode()) == done
    failed = Failed("block 1 differs", mismatch=Mismatch(0, 16 * MiB, MiB))
    assert decode_reply(*failed.encode()) == failed
    for text in ("e306928", "E3069283", "e306928g", 7):
        with pytest.raises(ValueError):
            parse_checksums(text)
        frame, fds = copy.encode()
        frame["regions"][0]["checksums"] = text
        with pytest.raises(wire.ProtocolError, match="checksums"):
            decode_request(frame, fds)


def test_prefaulted_pool_keeps_its_pages(tmp_path):
    pool = HostPool(str(tmp_path / "pool"), budget=4 * MiB, prefault=True)
    slab = pool.slabs()[0]
    assert os.fstat(slab.fd).st_blocks * 512 >= 4 * MiB
    pool.free(pool.allocate(MiB))
    assert os.fstat(slab.fd).st_blocks * 512 >= 4 * MiB
    pool.close()


def test_a_new_pool_removes_stale_slabs(tmp_path):
    directory = tmp_path / "pool"
    directory.mkdir()
    (directory / "slab-0000").write_bytes(b"old")
    pool = HostPool(str(directory), budget=MiB)
    assert not (directory / "slab-0000").exists()
    pool.close()


def test_a_pool_slab_that_is_a_symlink_is_refused_and_its_target_left_alone(tmp_path):
    target = tmp_path / "not-a-slab"
    target.write_bytes(b"precious" * 1024)
    directory = tmp_path / "pool"
    directory.mkdir(mode=0o700)
    (directory / "slab-0000").symlink_to(target)
    with pytest.raises(UnsafePath, match=f"{directory / 'slab-0000'} is a symlink.*remove it"):
        HostPool(str(directory), budget=MiB, keep=[])  # a restarted daemon reopening its slabs
    assert target.read_bytes() == b"precious" * 1024


def test_a_pool_directory_of_ours_that_others_may_read_is_closed_but_one_they_may_write_is_refused(tmp_path):
    directory = tmp_path / "pool"
    directory.mkdir()
    directory.chmod(0o755)  # as a kubelet hostPath or systemd makes it
    HostPool(str(directory), budget=MiB).close()
    assert directory.stat().st_mode & 0o777 == 0o700
    directory.chmod(0o777)
    with pytest.raises(UnsafePath, match=f"host pool directory {directory} has mode 0777"):
        HostPool(str(directory), budget=MiB)


def test_a_file_is_replaced_by_a_fresh_one_never_written_through_a_symlink(tmp_path):
    target = tmp_path / "elsewhere"
    target.write_text("theirs")
    directory = PrivateDirectory(str(tmp_path / "state"), "state directory")
    (tmp_path / "state" / "daemon.json").symlink_to(target)
    (tmp_path / "state" / "daemon.json.tmp").symlink_to(target)  # as if left half-way
    directory.replace("daemon.json", b"{}")
    assert target.read_text() == "theirs"
    written = (tmp_path / "state" / "daemon.json").lstat()
    assert written.st_mode & 0o777 == 0o600 and not (tmp_path / "state" / "daemon.json").is_symlink()
    assert directory.read("daemon.json") == b"{}"
    directory.close()


def test_a_file_with_a_second_name_is_refused(tmp_path):
    directory = PrivateDirectory(str(tmp_path / "state"), "state directory")
    directory.replace("state.json", b"{}")
    os.link(tmp_path / "state" / "state.json", tmp_path / "second-name")
    with pytest.raises(UnsafePath, match="state.json has 2 names"):
        directory.read("state.json")
    directory.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a symlink to another uid needs root")
def test_a_symlink_on_the_way_is_followed_only_when_root_or_the_daemon_owns_it(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "ours").symlink_to(tmp_path / "real")
    directory = PrivateDirectory(str(tmp_path / "ours" / "pool"), "host pool directory")
    assert directory.path == str(tmp_path / "real" / "pool")
    directory.close()
    (tmp_path / "theirs").symlink_to(tmp_path / "real")
    os.lchown(tmp_path / "theirs", 65534, 65534)
    with pytest.raises(UnsafePath, match=f"{tmp_path / 'theirs'} on its way is a symlink owned by uid 65534"):
        PrivateDirectory(str(tmp_path / "theirs" / "pool"), "host pool directory")


def test_replies_fail_every_waiting_and_later_request_each_with_its_own_error():
    replies = Replies()
    (first, waiting), (second, answered) = replies.expect(), replies.expect()
    replies.deliver(second, "done")
    replies.fail_all(ConnectionError, "the stream ended")
    later_id, later = replies.expect()
    replies.deliver(first, "too late")  # after the end, nothing is delivered

    assert answered.result() == "done" and later_id == 0
    errors = [waiting.exception(), later.exception()]
    assert all(isinstance(error, ConnectionError) and str(error) == "the stream ended" for error in errors)
    assert errors[0] is not errors[1]
