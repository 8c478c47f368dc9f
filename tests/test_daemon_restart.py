"""sleepd killed with SIGKILL and started again: engines keep computing, attach
again by themselves, hand their memory back, and every byte checks out."""

import os
import signal
import subprocess
import sys
import time

import grpc
import pytest

from sleepd.client import SleepClient, SleepdError
from sleepd.client import fd_socket

from kernel import memfd_mappings
from support import MiB, Daemon, by_tag, wait_for

REGIONS = [("weights", 4 * MiB), ("kv_cache", 2 * MiB), ("buffers", 2 * MiB)]


def attached(daemon) -> dict:
    return {m["name"]: [(r["rank"], r.get("orphaned", False)) for r in m["ranks"]] for m in daemon.status()["models"]}


@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGTERM], ids=["killed", "stopped"])
def test_a_restarted_daemon_comes_back_with_every_model_and_every_byte(stop, tmp_path, backend, fake, start_daemon,
                                                                       start_engine):
    daemon = start_daemon()
    awake = [start_engine(daemon, "awake", rank=rank, device=rank, regions=REGIONS, seed=rank) for rank in (0, 1)]
    asleep = start_engine(daemon, "asleep", regions=REGIONS, seed=7)
    daemon.ctl("sleep", "--model", "asleep", "--level", "1")
    asleep_before = asleep.report()

    os.kill(daemon.pid, stop)
    daemon.process.wait(timeout=30)
    # The engines keep computing on memory that stays mapped.
    for engine in awake:
        assert engine.report()["regions"] == engine.initial["regions"]

    again = Daemon(tmp_path, backend, "--host-devices", "2", "--host-device-capacity", "256MiB") \
        if backend == "host" else Daemon(tmp_path, backend)
    try:
        wait_for(lambda: attached(again) == {"asleep": [(0, False)], "awake": [(0, False), (1, False)]},
                 timeout=30, what="the engines to attach to the new daemon")
        for engine in awake:
            assert engine.report()["regions"] == engine.initial["regions"]
        assert asleep.report()["regions"] == asleep_before["regions"]
        assert int(again.status()["devices"][0]["used"]) == 8 * MiB  # awake rank 0's memory is the daemon's again

        # The new daemon really holds the memory: it can put the model to sleep and wake it.
        again.ctl("sleep", "--model", "awake", "--level", "1")
        assert memfd_mappings(awake[0].pid, again.memfd_prefix("awake")) == []
        again.ctl("wake", "--model", "awake")
        again.ctl("wake", "--model", "asleep")
        for engine in awake + [asleep]:
            now, original = by_tag(engine.report()), by_tag(engine.initial)
            for tag in ("weights", "buffers"):
                assert now[tag]["sha256"] == original[tag]["sha256"], f"{engine.model} {tag} changed"
            assert now["kv_cache"]["zero"]
        assert again.status()["pool"]["used"] == "0"
    finally:
        again.stop()


@pytest.mark.parametrize("backend", ["host"])  # recovery's bookkeeping is the same on every backend
def test_a_restarted_daemon_releases_what_an_engine_that_never_came_back_held_after_reattach_seconds(
        tmp_path, backend, start_daemon, start_engine):
    daemon = start_daemon()
    gone = start_engine(daemon, "gone", regions=REGIONS)
    os.kill(daemon.pid, signal.SIGKILL)
    daemon.process.wait(timeout=30)
    gone.kill()  # it never attaches again

    again = restart(tmp_path, backend, "--reattach-seconds", "1")  # 60 by default
    try:
        assert [model["name"] for model in again.status()["models"]] == ["gone"]
        wait_for(lambda: "did not come back after the daemon restarted" in again.log(), timeout=20,
                 what="the absent engine's rank to be released")
        wait_for(lambda: again.status()["models"] == [], what="the model without ranks to go")
        assert [device["used"] for device in again.status()["devices"]] == ["0", "0"]
    finally:
        again.stop()


def process_state(pid: int, thread: str | None = None) -> str:
    with open(f"/proc/{pid}/stat" if thread is None else f"/proc/{pid}/task/{thread}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0]


def kill_daemon_in_the_middle(daemon, engine, operation: str, moment: str) -> None:
    """Runs `sleepctl OPERATION --model qwen` and SIGKILLs the daemon while the
    engine sits frozen at `moment` (see engine_process.py); the engine then carries on."""
    engine.request("die_on", moment=moment)
    caller = subprocess.Popen([sys.executable, "-m", "sleepd.client.ctl", "--socket", daemon.socket,
                               operation, "--model", "qwen"], stderr=subprocess.PIPE, text=True)
    wait_for(lambda: process_state(engine.pid) == "T", what=f"the engine to stop at {moment}")
    os.kill(daemon.pid, signal.SIGKILL)
    daemon.process.wait()
    os.kill(engine.pid, signal.SIGCONT)  # it goes on as told; what it needs of the daemon finds none
    caller.communicate(timeout=30)


def restart(tmp_path, backend, *flags) -> Daemon:
    return Daemon(tmp_path, backend, "--host-devices", "2", "--host-device-capacity", "256MiB", *flags) \
        if backend == "host" else Daemon(tmp_path, backend, *flags)


ASLEEP = {"weights": "offloaded", "kv_cache": "discarded", "buffers": "offloaded"}


def assert_wakes_whole(daemon, engine, states=ASLEEP) -> None:
    """After the restart the model sleeps, its regions in `states`; a wake brings
    back every offloaded byte and zeroes the rest."""
    wait_for(lambda: attached(daemon) == {"qwen": [(0, False)]}, timeout=30, what="the engine to come back")
    wait_for(lambda: not any(r.get("orphaned") for r in daemon.status()["models"][0]["ranks"])
             and daemon.status()["models"][0]["sleeping"], what="the resume to finish")
    assert {r["tag"]: r["state"] for r in engine.report()["regions"]} == states
    # Backups are kept for what is asleep with contents, and only for that.
    kept = sum(size for tag, size in REGIONS if states[tag] == "offloaded")
    wait_for(lambda: daemon.status()["pool"]["used"] == str(kept), what="the backups of what woke to be freed")
    daemon.ctl("wake", "--model", "qwen")
    now, original = by_tag(engine.report()), by_tag(engine.initial)
    for tag in ("weights", "buffers"):
        assert now[tag]["sha256"] == original[tag]["sha256"], f"{tag} lost in the crash"
    assert now["kv_cache"]["zero"]
    assert engine.report()["hooks"] == {"sleep": 1, "wake": 1}


# A fetched ACL token is no reference, as a descriptor is: the memory behind the tokens the engine had not
# imported yet dies with the daemon, so that remap fails (all or none) and the regions stay asleep, the
# offloaded ones recoverable from the backups the state file recorded.
ACL_STATES = {"stop_on_second_map": ASLEEP}


@pytest.mark.parametrize("operation, moment, states", [
    # The copy is done and recorded when the engine gets the unmap.
    ("sleep", "stop_before_unmap", ASLEEP),
    # The memory is created and filled when the engine gets the remap; the backups are not yet freed.
    ("wake", "stop_before_remap", ASLEEP),
    # The engine has mapped the weights, not yet the rest, but it holds every region's descriptor
    # (a remap fetches them together): it maps the rest when it carries on, and hands all back
    # (on ACL, see ACL_STATES).
    ("wake", "stop_on_second_map", {"weights": "mapped", "kv_cache": "mapped", "buffers": "mapped"}),
], ids=["mid-sleep", "mid-wake", "between-the-regions-of-a-wake"])
def test_a_daemon_killed_in_the_middle_of_an_operation_loses_no_byte(operation, moment, states, tmp_path, backend,
                                                                     fake, start_daemon, start_engine):
    if backend == "acl":
        states = ACL_STATES.get(moment, states)
    daemon = start_daemon()
    engine = start_engine(daemon, "qwen", regions=REGIONS)
    if operation == "wake":
        daemon.ctl("sleep", "--model", "qwen")
    kill_daemon_in_the_middle(daemon, engine, operation, moment)
    again = restart(tmp_path, backend)
    try:
        assert_wakes_whole(again, engine, states)
    finally:
        again.stop()


def test_a_client_of_a_stuck_daemon_gives_up_within_its_bound(tmp_path, monkeypatch):
    """A daemon that takes the connection but never answers (stopped here, as a wedged one
    would be) costs an engine attaching, or attaching again, ANSWER_SECONDS, not forever."""
    monkeypatch.setattr(fd_socket, "ANSWER_SECONDS", 1.0)
    daemon = restart(tmp_path, "host")
    os.kill(daemon.pid, signal.SIGSTOP)
    # kill() returns before every thread has stopped: a busy machine lets the daemon answer a hello meanwhile.
    wait_for(lambda: all(process_state(daemon.pid, thread) == "T" for thread in os.listdir(f"/proc/{daemon.pid}/task")),
             what="every thread of the daemon to stop")
    try:
        started = time.monotonic()
        with pytest.raises(SleepdError) as refused:
            SleepClient.connect("qwen", socket=daemon.socket)
        assert time.monotonic() - started < 10
        assert refused.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
        assert "did not answer hello" in refused.value.message
    finally:
        os.kill(daemon.pid, signal.SIGKILL)
        daemon.process.wait()
        daemon.stop()


def test_a_client_tries_to_attach_again_for_its_reconnect_seconds_then_carries_on(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("SLEEPD_RECONNECT_SECONDS", "1.5")
    with pytest.raises(ValueError, match="argument reconnect_seconds must be a positive number of seconds, got -1"):
        SleepClient.connect("qwen", socket="/nowhere", reconnect_seconds=-1)
    daemon = restart(tmp_path, "host")
    client = SleepClient.connect("qwen", socket=daemon.socket)
    assert (client.reconnect_seconds, client.busy_seconds) == (1.5, 600.0)
    region = client.alloc(MiB, tag="weights")
    region.write(b"kept" * (MiB // 4))
    os.kill(daemon.pid, signal.SIGKILL)
    daemon.process.wait()
    daemon.stop()
    wait_for(lambda: "could not attach again within 1.5 s" in caplog.text, what="the client to give up", timeout=30)
    assert region.read() == b"kept" * (MiB // 4)  # carrying on without sleepd: its memory stays as it is
    client.close()
