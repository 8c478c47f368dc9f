"""What a vLLM sleep-mode user relies on, on a real GPU."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

torch = pytest.importorskip("torch")

from sleepd import _C  # noqa: E402
from sleepd.client import SleepClient  # noqa: E402
from sleepd.daemon.nvml import Nvml  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
MiB = 1 << 20


def device_used_bytes() -> int:
    """Used memory on CUDA device 0 as NVML reports it (the driver's view, not ours)."""
    return Nvml.open([_C.CudaBackend().uuid(0)]).memory(0).used


def test_pool_tensors_come_back_bit_identical_after_a_level_1_sleep(gpu_daemon):
    with SleepClient.connect("qwen", socket=gpu_daemon.socket) as client:
        with client.pool("weights"):
            weights = torch.randn(64 * MiB // 4, device="cuda")
        with client.pool("kv_cache"):
            kv = torch.ones(32 * MiB // 4, device="cuda")
        saved = weights.cpu()
        pointer = weights.data_ptr()
        client.sleep(level=1)
        client.wake()
        assert weights.data_ptr() == pointer
        assert torch.equal(weights.cpu(), saved)
        assert kv.abs().sum().item() == 0  # discarded: zero-filled


def test_a_byte_flipped_in_the_pinned_pool_fails_the_wake_and_once_put_right_wakes_bit_identical(gpu_daemon):
    from sleepd.client import SleepdError

    with SleepClient.connect("qwen", socket=gpu_daemon.socket) as client:
        with client.pool("weights"):
            weights = torch.randn(96 * MiB // 4, device="cuda")
        saved = weights.cpu()
        client.sleep(level=1)
        with open(os.path.join(gpu_daemon.state_dir, "state.json")) as file:
            state = json.load(file)
        backup = next(region["backup"] for model in state["models"] for rank in model["ranks"]
                      for region in rank["regions"] if region["backup"])
        slab, offset, length = backup[0]
        path = os.path.join(gpu_daemon.pool_dir, f"slab-{slab:04d}")
        at = offset + min(length - 1, 20 * MiB + 3)  # the mover's pinned pages are the file's pages

        def flip():
            with open(path, "r+b") as slab_file:
                slab_file.seek(at)
                byte = slab_file.read(1)[0]
                slab_file.seek(at)
                slab_file.write(bytes([byte ^ 0x01]))

        flip()
        with pytest.raises(SleepdError) as error:
            client.wake()
        assert error.value.code.name == "DATA_LOSS" and path in error.value.message, error.value.message
        assert client.is_sleeping()
        flip()
        client.wake()
        assert torch.equal(weights.cpu(), saved)


def in_regions(client, tensor) -> bool:
    return any(r.address <= tensor.data_ptr() < r.address + r.size for r in client.regions())


def test_memory_another_thread_allocates_inside_pool_is_reported_not_silently_missed(gpu_daemon):
    from sleepd.client.torch_pool import RoutingWarning

    torch.cuda.empty_cache()  # the other thread's tensor must need new device memory
    with SleepClient.connect("qwen", socket=gpu_daemon.socket) as client:
        theirs = []

        def load():
            theirs.append(torch.ones(256 * MiB, dtype=torch.uint8, device="cuda"))

        with pytest.warns(RoutingWarning, match="another thread"):
            with client.pool("weights"):
                mine = torch.ones(64 * MiB, dtype=torch.uint8, device="cuda")
                loader = threading.Thread(target=load)
                loader.start()
                loader.join()
        assert in_regions(client, mine)
        assert not in_regions(client, theirs[0]), "pool() routed another thread's allocation after all"


def set_allocator_settings(settings: str) -> None:
    """torch's allocator settings, through the call that torch 2.13 does not deprecate where it has it."""
    (getattr(torch._C, "_accelerator_setAllocatorSettings", None) or torch.cuda.memory._set_allocator_settings)(settings)


def test_pool_leaves_expandable_segments_on_for_the_rest_of_the_process(gpu_daemon):
    set_allocator_settings("expandable_segments:True")
    try:
        with SleepClient.connect("qwen", socket=gpu_daemon.socket) as client:
            with client.pool("weights"):
                inside = torch.ones(64 * MiB, dtype=torch.uint8, device="cuda")
            assert in_regions(client, inside), "an expandable segment bypassed the pool"
            outside = torch.ones(64 * MiB, dtype=torch.uint8, device="cuda")
            [segment] = [s for s in torch.cuda.memory_snapshot()
                         if s["address"] <= outside.data_ptr() < s["address"] + s["total_size"]]
            assert segment.get("is_expandable"), "pool() left expandable segments off"
    finally:
        set_allocator_settings("expandable_segments:False")


# A loader thread fills a pool, one refill (a daemon region) per tensor, while the main
# thread allocates and frees tensors of its own, which torch does holding the GIL.
LOAD_WHILE_FREEING = """
import sys, threading, torch
from sleepd.client import SleepClient

client = SleepClient.connect("qwen", socket=sys.argv[1])
kept, mine = [], [torch.empty(1 << 20, device="cuda") for _ in range(8)]

def load():
    with client.pool("weights", chunk_bytes=2 << 20):
        for _ in range(100):
            kept.append(torch.empty(4 << 20, dtype=torch.uint8, device="cuda"))

loader = threading.Thread(target=load)
loader.start()
while loader.is_alive():
    mine.append(torch.empty(1 << 20, device="cuda"))
    del mine[0]
print(len(kept), flush=True)
client.close()
"""


def test_a_pool_filling_while_another_thread_frees_tensors_does_not_deadlock(gpu_daemon):
    result = subprocess.run([sys.executable, "-c", LOAD_WHILE_FREEING, gpu_daemon.socket], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "100", result.stderr


def test_nvml_shows_the_memory_freed_while_asleep_and_back_after_wake(gpu_daemon):
    size = 2 << 30
    with SleepClient.connect("qwen", socket=gpu_daemon.socket) as client:
        with client.pool("weights"):
            weights = torch.empty(size // 4, device="cuda").fill_(1.0)
        torch.cuda.synchronize()
        awake = device_used_bytes()
        client.sleep(level=1)
        asleep = device_used_bytes()
        assert awake - asleep >= 0.95 * size, f"NVML: {awake} bytes used awake, {asleep} asleep"
        client.wake()
        assert device_used_bytes() - asleep >= 0.95 * size
        assert weights[:16].sum().item() == 16


def test_a_cuda_graph_captured_before_sleep_replays_after_wake(gpu_daemon):
    with SleepClient.connect("qwen", socket=gpu_daemon.socket) as client:
        with client.pool("weights"):
            w = torch.randn(256, 256, device="cuda")
            x = torch.randn(64, 256, device="cuda")
            y = torch.empty(64, 256, device="cuda")
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            with torch.cuda.graph(graph):
                torch.matmul(x, w, out=y)
        expected = x @ w
        client.sleep(level=1)
        client.wake()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.allclose(y, expected)


def test_a_torch_model_gives_the_same_outputs_after_sleep(gpu_daemon):
    torch.manual_seed(0)
    with SleepClient.connect("tiny", socket=gpu_daemon.socket) as client:
        with client.pool("weights"):
            layer = torch.nn.TransformerEncoderLayer(128, 4, batch_first=True, dropout=0.0).cuda().eval()
        tokens = torch.randn(4, 32, 128, device="cuda")
        with torch.no_grad():
            before = layer(tokens)
            client.sleep(level=1)
            client.wake()
            assert torch.equal(layer(tokens), before)


def start_engine(daemon, model: str, megabytes: int, seed: int):
    process = subprocess.Popen([sys.executable, os.path.join(HERE, "gpu_engine.py"), daemon.socket, model,
                                str(megabytes), str(seed)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert json.loads(process.stdout.readline())["ready"]
    return process


def ask(process, op: str) -> dict:
    process.stdin.write(json.dumps({"op": op}) + "\n")
    process.stdin.flush()
    return json.loads(process.stdout.readline())


def test_two_engine_processes_share_one_gpu_and_swap(gpu_daemon):
    ctl = [sys.executable, "-m", "sleepd.client.ctl", "--socket", gpu_daemon.socket]
    a = start_engine(gpu_daemon, "a", 512, 1)
    b = start_engine(gpu_daemon, "b", 512, 2)
    try:
        subprocess.run([*ctl, "sleep", "--model", "a"], check=True)
        assert ask(b, "check")["weights_ok"]
        subprocess.run([*ctl, "sleep", "--model", "b"], check=True)
        subprocess.run([*ctl, "wake", "--model", "a"], check=True)
        assert ask(a, "check") == {"weights_ok": True, "kv_sum": 0.0}
        subprocess.run([*ctl, "wake", "--model", "b"], check=True)
        assert ask(b, "check")["weights_ok"]
    finally:
        for process in (a, b):
            process.stdin.write('{"op": "exit"}\n')
            process.stdin.flush()
            process.wait(timeout=60)


def test_the_rl_weight_update_flow(gpu_daemon):
    with SleepClient.connect("policy", socket=gpu_daemon.socket) as client:
        with client.pool("weights"):
            weights = torch.randn(16 * MiB // 4, device="cuda")
        with client.pool("kv_cache"):
            kv = torch.ones(16 * MiB // 4, device="cuda")
        client.sleep(level=2)
        client.wake(tags=["weights"])
        assert client.is_sleeping()
        new = torch.randn_like(weights)
        weights.copy_(new)  # the trainer's update lands in the same memory
        client.wake(tags=["kv_cache"])
        assert not client.is_sleeping()
        assert torch.equal(weights, new)
        assert kv.abs().sum().item() == 0


def test_a_pool_routes_the_clients_device_whatever_device_torch_has_current(gpu_daemon):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs: torch's current device must differ from the client's")
    torch.cuda.set_device(1)
    try:
        with SleepClient.connect("qwen", device=0, socket=gpu_daemon.socket) as client:
            with client.pool("weights"):
                weights = torch.ones(16 * MiB, dtype=torch.uint8, device="cuda:0")
            assert in_regions(client, weights), "the pool bound to torch's current device, not the client's"
    finally:
        torch.cuda.set_device(0)


ASYNC_ALLOCATOR = """
import sys, torch
from sleepd.client import SleepClient

with SleepClient.connect("async", socket=sys.argv[1]) as client:
    try:
        with client.pool("weights"):
            torch.empty(1 << 20, device="cuda")
    except RuntimeError as error:
        print(error)
"""


def test_a_torch_on_cudamallocasync_is_refused_up_front_not_silently_unrouted(gpu_daemon):
    result = subprocess.run([sys.executable, "-c", ASYNC_ALLOCATOR, gpu_daemon.socket], capture_output=True,
                            text=True, timeout=120, env={**os.environ, "PYTORCH_ALLOC_CONF": "backend:cudaMallocAsync"})
    assert result.returncode == 0, result.stderr
    assert "torch allocates with cudaMallocAsync" in result.stdout, result.stdout + result.stderr


def test_a_daemon_killed_under_an_attached_engine_comes_back_with_every_byte(tmp_path):
    """Memory outlives the daemon that created it: the engine keeps computing on what it maps, hands
    it back to the next daemon, and a sleep and wake through that daemon bring back every byte."""
    from sleepd.bench.local import LocalDaemon

    flags = ("--backend", "cuda", "--host-pool-budget", "4GiB")
    first = LocalDaemon(str(tmp_path), *flags)
    engine = start_engine(first, "kept", 512, 3)
    again = None
    try:
        os.kill(first.pid, signal.SIGKILL)
        first.process.wait()
        assert ask(engine, "check") == {"weights_ok": True, "kv_sum": float(512 << 18)}
        again = LocalDaemon(str(tmp_path), *flags)  # the same state directory and host pool
        ctl = [sys.executable, "-m", "sleepd.client.ctl", "--socket", again.socket]
        deadline = time.monotonic() + 60
        while True:  # the engine's client reconnects and hands its memory back
            status = json.loads(subprocess.run([*ctl, "--json", "status"], capture_output=True, text=True).stdout)
            ranks = [rank for model in status["models"] if model["name"] == "kept" for rank in model["ranks"]]
            if ranks and not ranks[0].get("orphaned") and all(region["state"] == "MAPPED"
                                                              for region in ranks[0]["regions"]):
                break
            assert time.monotonic() < deadline, status
            time.sleep(0.5)
        assert ask(engine, "check")["weights_ok"]
        subprocess.run([*ctl, "sleep", "--model", "kept"], check=True)
        subprocess.run([*ctl, "wake", "--model", "kept"], check=True)
        assert ask(engine, "check") == {"weights_ok": True, "kv_sum": 0.0}  # the KV cache was discarded
    finally:
        engine.stdin.write('{"op": "exit"}\n')
        engine.stdin.flush()
        engine.wait(timeout=60)
        if again is not None:
            again.stop()
