"""CPU figures for vLLM on sleepd, printed, never asserted:

* from `POST /sleep` (level 1) to the model's memory released as the kernel sees it
  (no process holds its memfds any more), and the time the request itself took;
* from `POST /wake_up` to the first streamed token of a request sent right after it,
  beside the first-token time of the same request while awake;
* from `sleepctl sleep` (through vLLM's controller) to the memory released, and from a
  request arriving while asleep to its first token (the request wakes the model itself).

    python tests/vllm_suite/benchmark.py [--cycles N]     # in the vLLM environment (.ci/vllm-env)
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

MODEL = "bench"


def first_token_seconds(server) -> float:
    body = json.dumps({"model": server.checkpoint, "prompt": "hello world", "max_tokens": 8, "temperature": 0,
                       "stream": True}).encode()
    request = urllib.request.Request(f"{server.url}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=300) as response:
        for line in response:
            if line.startswith(b"data: ") and b'"text"' in line:
                return time.perf_counter() - started
    raise RuntimeError("the stream ended without a token")


def released_seconds(daemon, server, holders, sleep=None) -> tuple[float, float]:
    """(request to kernel release, request round trip) of one POST /sleep, or of `sleep()`."""
    from kernel import memfd_bytes

    prefix = daemon.memfd_prefix(MODEL)
    released = []
    started = time.perf_counter()

    def watch():
        while memfd_bytes(holders, prefix):
            time.sleep(0.0005)
        released.append(time.perf_counter() - started)

    watcher = threading.Thread(target=watch)
    watcher.start()
    if sleep:
        sleep()
    else:
        server.call("POST", "/sleep?level=1")
    answered = time.perf_counter() - started
    watcher.join(timeout=60)
    return released[0], answered


def main() -> None:
    import tiny_model
    from servers import VllmServer, model_status
    from support import Daemon

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cycles", type=int, default=5)
    cycles = parser.parse_args().cycles
    with tempfile.TemporaryDirectory(prefix="sleepd-vllm-bench-") as directory:
        checkpoint = tiny_model.build(os.path.join(directory, "model"), seed=0)
        daemon = Daemon(directory, "host")
        server = None
        try:
            server = VllmServer(daemon, MODEL, checkpoint, os.path.join(directory, "vllm.log"))
            (rank,) = model_status(daemon, MODEL)["ranks"]
            holders = [daemon.pid, rank["pid"]]
            figures = {"sleep to released": [], "sleep request": [], "wake to first token": [],
                       "first token awake": [], "sleepctl sleep to released": [], "asleep to first token": []}
            for _ in range(cycles):
                figures["first token awake"].append(first_token_seconds(server))
                released, answered = released_seconds(daemon, server, holders)
                figures["sleep to released"].append(released)
                figures["sleep request"].append(answered)
                started = time.perf_counter()
                server.call("POST", "/wake_up")
                first_token_seconds(server)  # returns when the first token arrives
                figures["wake to first token"].append(time.perf_counter() - started)
                released, _ = released_seconds(daemon, server, holders,
                                               sleep=lambda: daemon.ctl("sleep", "--model", MODEL, "--level", "1"))
                figures["sleepctl sleep to released"].append(released)
                figures["asleep to first token"].append(first_token_seconds(server))  # woken by the request
            print(f"vLLM on sleepd, CPU, tiny Qwen2, KV cache 1 GiB, {cycles} cycles (median, min, max in ms):")
            for name, seconds in figures.items():
                ms = [s * 1000 for s in seconds]
                print(f"  {name:26} {statistics.median(ms):8.1f} {min(ms):8.1f} {max(ms):8.1f}")
        finally:
            if server:
                server.stop()
            daemon.stop()


if __name__ == "__main__":
    main()
