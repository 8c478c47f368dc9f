"""What vLLM's Worker.sleep is told about device memory on sleepd (integrations/vllm/cuda.py):
this rank's own view, which another process allocating on the same GPU during the sleep does not
move. Over the driver double, whose memory is device-wide across processes, as a GPU's is."""

import pytest

from sleepd.client import SleepClient
from sleepd.integrations.vllm.allocator import SleepdAllocator
from support import MiB

TOTAL = 256 * MiB


@pytest.fixture
def backend():
    return "cuda"


def test_a_sleep_frees_what_this_rank_held_whatever_another_process_allocates_meanwhile(start_daemon, fake,
                                                                                         start_engine):
    daemon = start_daemon(devices=1, capacity=f"{TOTAL}B")
    with SleepClient.connect("ours", socket=daemon.socket) as client:
        allocator = SleepdAllocator(client)
        for tag in ("weights", "kv_cache"):
            client.alloc(16 * MiB, tag=tag)
        free_before, total = allocator.memory_info(TOTAL)
        device_before = daemon.status()["devices"][0]
        # Another model wakes on the same GPU in the middle of our sleep: the device's free memory shrinks.
        start_engine(daemon, "theirs", regions=[("weights", 64 * MiB)])
        allocator.sleep(offload_tags=("weights",))
        free_after, _ = allocator.memory_info(TOTAL)
        device_after = daemon.status()["devices"][0]
    assert total == TOTAL
    assert free_after - free_before == 32 * MiB  # exactly what this rank gave back
    # The device-wide view vLLM would otherwise read went the other way: its assertion would have failed.
    assert int(device_after["driverFree"] or 0) < int(device_before["driverFree"] or 0) or \
        int(device_after["used"]) > int(device_before["used"]), (device_before, device_after)
