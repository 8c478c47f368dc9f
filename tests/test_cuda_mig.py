"""A MIG instance is a device of its own: sleepd names it by its own "MIG-" UUID, as
NVML and nvidia-smi do, so that engines are matched to it and NVML reports its
memory, not the whole GPU's. Over the driver double, with GPU 1 in MIG mode."""

import pytest

from support import MiB, sleeping

GPU_0 = "GPU-a0a1a2a3-a4a5-a6a7-a8a9-aaabacadae00"
INSTANCE_ON_GPU_1 = "MIG-c0c1c2c3-c4c5-c6c7-c8c9-cacbcccdce01"


@pytest.fixture
def backend():
    return "cuda"


@pytest.fixture
def mig_daemon(start_daemon, monkeypatch):
    monkeypatch.setenv("FAKE_CUDA_MIG", "1")
    return start_daemon(capacity="256MiB")


def test_a_mig_instance_is_named_and_sized_as_nvml_sees_it(mig_daemon):
    devices = mig_daemon.status()["devices"]
    assert [d["uuid"] for d in devices] == [GPU_0, INSTANCE_ON_GPU_1]
    # The instance's memory, found in NVML by its UUID; its GPU as a whole holds eight times that.
    assert int(devices[1]["capacity"]) == 256 * MiB
    assert "driverUsed" in devices[1]
    assert "blind to other processes" not in mig_daemon.log()


def test_an_engine_on_a_mig_instance_gets_its_memory_there(mig_daemon, start_engine):
    idle = int(mig_daemon.status()["devices"][1]["driverUsed"])
    # The engine sees only the instance, as its device 0.
    engine = start_engine(mig_daemon, "qwen", device=0, regions=[("weights", 64 * MiB)],
                          env={"CUDA_VISIBLE_DEVICES": "1"})
    [rank] = mig_daemon.status("qwen")["models"][0]["ranks"]
    assert rank["device"] == 1
    assert int(mig_daemon.status()["devices"][1]["driverUsed"]) - idle == 64 * MiB

    mig_daemon.ctl("sleep", "--model", "qwen")
    assert sleeping(mig_daemon) == {"qwen": True}
    assert int(mig_daemon.status()["devices"][1]["driverUsed"]) == idle
    mig_daemon.ctl("wake", "--model", "qwen")
    assert engine.report()["regions"] == engine.initial["regions"]
