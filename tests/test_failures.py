"""When an engine dies or refuses, the daemon reclaims or rolls back, and says so."""

import os
import signal
import subprocess
import sys
import time

from support import MiB, wait_for
from kernel import memfd_bytes, shmem_bytes

REGIONS = [("weights", 4 * MiB), ("kv_cache", 2 * MiB)]


def test_a_killed_engine_has_its_memory_reclaimed(daemon, start_engine):
    victim = start_engine(daemon, "qwen", rank=0, regions=[("weights", 32 * MiB), ("kv_cache", 32 * MiB)])
    survivor = start_engine(daemon, "qwen", rank=1, device=1, regions=REGIONS, seed=1)
    bystander = start_engine(daemon, "llama", regions=REGIONS, seed=2)
    bystander_report = bystander.report()
    assert memfd_bytes([daemon.pid], daemon.memfd_prefix("qwen")) >= 64 * MiB
    shmem_before = shmem_bytes()

    victim.kill()

    def rank_gone():
        ranks = [r["rank"] for m in daemon.status()["models"] if m["name"] == "qwen" for r in m["ranks"]]
        return ranks == [1]
    wait_for(rank_gone, what="the killed rank to be reclaimed")
    # Rank 1's memory is all that is left of qwen, as the kernel sees it (the
    # driver double does not name memory by model, so llama's counts there too).
    left = 6 * MiB if daemon.backend == "host" else 12 * MiB
    assert memfd_bytes([daemon.pid, *daemon.mover_pids()], daemon.memfd_prefix("qwen")) == left
    assert shmem_before - shmem_bytes() >= 60 * MiB
    assert survivor.report()["regions"] == survivor.initial["regions"]
    assert bystander.report() == bystander_report


def test_the_model_disappears_with_its_last_rank(daemon, start_engine):
    engine = start_engine(daemon, "qwen", regions=REGIONS)
    daemon.ctl("sleep", "--model", "qwen")
    assert daemon.status()["pool"]["used"] == str(4 * MiB)
    engine.kill()
    wait_for(lambda: daemon.status()["models"] == [], what="qwen to disappear")
    assert daemon.status()["pool"]["used"] == "0", "the dead model's backups were kept"


def test_a_failing_sleep_hook_rolls_the_whole_model_back(daemon, start_engine):
    good = start_engine(daemon, "qwen", rank=0, regions=REGIONS)
    bad = start_engine(daemon, "qwen", rank=1, device=1, regions=REGIONS, seed=1, sleep_hook="fail")
    before = daemon.status()

    result = daemon.ctl("sleep", "--model", "qwen", check=False)
    assert result.returncode != 0
    assert "ABORTED" in result.stderr and "rank 1" in result.stderr and "refused to pause" in result.stderr

    assert daemon.status() == before
    for engine in (good, bad):
        assert engine.report()["regions"] == engine.initial["regions"]
    # The rank that did pause was resumed.
    assert good.report()["hooks"] == {"sleep": 1, "wake": 1}


def test_a_rank_that_never_answers_fails_the_sleep_after_the_timeout(start_daemon, start_engine):
    daemon = start_daemon("--hook-timeout", "1", capacity="64MiB")
    good = start_engine(daemon, "qwen", rank=0, regions=REGIONS)
    hung = start_engine(daemon, "qwen", rank=1, device=1, regions=REGIONS, seed=1, sleep_hook="hang")
    before = daemon.status()

    result = daemon.ctl("sleep", "--model", "qwen", check=False)
    assert result.returncode != 0
    assert "DEADLINE_EXCEEDED" in result.stderr and f"pid {hung.pid}" in result.stderr
    assert daemon.status() == before
    assert good.report()["regions"] == good.initial["regions"]
    hung.kill()  # its hook never returns, so a clean exit would wait out the client's close (10 s)


def test_a_rank_killed_during_sleep_rolls_the_others_back(start_daemon, start_engine):
    daemon = start_daemon("--hook-timeout", "20", capacity="64MiB")
    good = start_engine(daemon, "qwen", rank=0, regions=REGIONS)
    hung = start_engine(daemon, "qwen", rank=1, device=1, regions=REGIONS, seed=1, sleep_hook="hang")
    sleeper = subprocess.Popen([sys.executable, "-m", "sleepd.client.ctl", "--socket", daemon.socket,
                                "sleep", "--model", "qwen"], stderr=subprocess.PIPE, text=True)
    wait_for(lambda: good.report()["hooks"]["sleep"] == 1, what="the sleep to begin")
    os.kill(hung.pid, signal.SIGKILL)
    _, stderr = sleeper.communicate(timeout=30)
    assert sleeper.returncode != 0 and "UNAVAILABLE" in stderr
    assert good.report()["regions"] == good.initial["regions"]
    assert good.report()["hooks"] == {"sleep": 1, "wake": 1}
    wait_for(lambda: [r["rank"] for r in daemon.status()["models"][0]["ranks"]] == [0], what="rank 1 reclaimed")


def test_a_mover_that_died_is_restarted_and_the_sleep_succeeds(daemon, start_engine):
    engine = start_engine(daemon, "qwen", regions=REGIONS)
    movers = daemon.mover_pids()
    for pid in movers:
        os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not set(movers) & set(daemon.mover_pids()), what="the movers to die")
    daemon.ctl("sleep", "--model", "qwen")
    daemon.ctl("wake", "--model", "qwen")
    after = {r["tag"]: r for r in engine.report()["regions"]}
    before = {r["tag"]: r for r in engine.initial["regions"]}
    assert after["weights"]["sha256"] == before["weights"]["sha256"]


def test_wake_that_does_not_fit_is_refused_and_changes_nothing(start_daemon, start_engine):
    daemon = start_daemon(devices=1, capacity="8MiB")
    sleeper = start_engine(daemon, "qwen", regions=[("weights", 6 * MiB)])
    daemon.ctl("sleep", "--model", "qwen")
    start_engine(daemon, "llama", regions=[("weights", 4 * MiB)])
    before = daemon.status()
    result = daemon.ctl("wake", "--model", "qwen", check=False)
    assert result.returncode != 0
    assert "RESOURCE_EXHAUSTED" in result.stderr and "llama 4.0 MiB" in result.stderr
    assert daemon.status() == before
    assert {r["state"] for r in sleeper.report()["regions"]} == {"offloaded"}


def test_sleep_that_overflows_the_host_pool_is_refused_before_anything_moves(start_daemon, start_engine):
    daemon = start_daemon("--host-pool-budget", "2MiB")
    engine = start_engine(daemon, "qwen", regions=[("buffers", 4 * MiB), ("kv_cache", 2 * MiB)])
    before = daemon.status()
    result = daemon.ctl("sleep", "--model", "qwen", check=False)
    assert result.returncode != 0 and "RESOURCE_EXHAUSTED" in result.stderr and "host pool" in result.stderr
    assert daemon.status() == before
    assert engine.report()["hooks"] == {"sleep": 0, "wake": 0}
    # Naming the tags that may go shows the way out.
    daemon.ctl("sleep", "--model", "qwen", "--action", "buffers=discard")


def test_a_full_host_pool_falls_back_to_discard_only_where_the_tag_allows_it(start_daemon, start_engine):
    daemon = start_daemon("--host-pool-budget", "5MiB")
    engine = start_engine(daemon, "qwen", regions=[("weights", 4 * MiB), ("weights", 2 * MiB), ("buffers", 2 * MiB)])
    out = daemon.ctl("sleep", "--model", "qwen", "--level", "1").stdout
    states = [(r["tag"], r["size"], r["state"]) for r in engine.report()["regions"]]
    # buffers (no rule) must be offloaded; the largest weights region is discarded to make it fit.
    assert states == [("weights", 4 * MiB, "discarded"), ("weights", 2 * MiB, "offloaded"),
                      ("buffers", 2 * MiB, "offloaded")]
    assert "4.0 MiB discarded" in out


def test_a_mover_killed_during_a_copy_fails_the_sleep_cleanly_and_the_next_try_succeeds(daemon, start_engine):
    engine = start_engine(daemon, "qwen", regions=[("weights", 8 * MiB), ("kv_cache", 2 * MiB)])
    awake = daemon.status()
    movers = daemon.mover_pids()
    for pid in movers:
        os.kill(pid, signal.SIGSTOP)  # the copy request will wait in its socket
    sleeper = subprocess.Popen([sys.executable, "-m", "sleepd.client.ctl", "--socket", daemon.socket,
                                "sleep", "--model", "qwen"], stderr=subprocess.PIPE, text=True)
    wait_for(lambda: engine.report()["hooks"]["sleep"] == 1, what="the sleep to reach its copy")
    time.sleep(0.5)
    for pid in movers:
        os.kill(pid, signal.SIGKILL)
    _, stderr = sleeper.communicate(timeout=30)
    assert sleeper.returncode != 0
    assert "UNAVAILABLE" in stderr and "mover" in stderr and "nothing was released" in stderr
    assert daemon.status() == awake
    assert engine.report()["regions"] == engine.initial["regions"]

    daemon.ctl("sleep", "--model", "qwen")  # a new mover takes over
    assert set(daemon.mover_pids()).isdisjoint(movers)
    daemon.ctl("wake", "--model", "qwen")
    weights = [r for r in engine.report()["regions"] if r["tag"] == "weights"]
    assert weights[0]["sha256"] == engine.initial["regions"][0]["sha256"]
