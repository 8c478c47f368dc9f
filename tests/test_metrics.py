"""Prometheus sees the same memory, sessions and latencies that sleepctl shows."""

from support import MiB, scrape, value


def test_metrics_follow_a_sleep_and_a_wake(daemon, start_engine):
    start_engine(daemon, "qwen", regions=[("weights", 4 * MiB), ("kv_cache", 2 * MiB)])
    dev0, dev1 = f"{daemon.backend}:0", f"{daemon.backend}:1"
    samples = scrape(daemon)
    assert value(samples, "sleepd_region_bytes", model="qwen", tag="weights", state="mapped", device=dev0) == 4 * MiB
    assert value(samples, "sleepd_device_used_bytes", device=dev0) == 6 * MiB
    assert value(samples, "sleepd_device_capacity_bytes", device=dev1) == 256 * MiB
    assert value(samples, "sleepd_sessions") == 1
    assert value(samples, "sleepd_model_sleeping", model="qwen") == 0

    daemon.ctl("sleep", "--model", "qwen", "--level", "1")
    samples = scrape(daemon)
    assert value(samples, "sleepd_region_bytes", model="qwen", tag="weights", state="offloaded", device=dev0) == 4 * MiB
    assert value(samples, "sleepd_region_bytes", model="qwen", tag="kv_cache", state="discarded", device=dev0) == 2 * MiB
    assert value(samples, "sleepd_device_used_bytes", device=dev0) == 0
    assert value(samples, "sleepd_host_pool_used_bytes") == 4 * MiB
    assert value(samples, "sleepd_model_sleeping", model="qwen") == 1
    assert value(samples, "sleepd_sleep_duration_seconds_count", model="qwen", level="1") == 1
    assert value(samples, "sleepd_moved_bytes_total", direction="offload") == 4 * MiB

    daemon.ctl("wake", "--model", "qwen")
    daemon.ctl("wake", "--model", "nobody", check=False)
    samples = scrape(daemon)
    assert value(samples, "sleepd_wake_duration_seconds_count", model="qwen") >= 1
    assert value(samples, "sleepd_host_pool_used_bytes") == 0
    assert value(samples, "sleepd_errors_total", operation="Wake", code="NOT_FOUND") == 1
