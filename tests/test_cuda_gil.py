"""A driver call that waits for the GPU does not stop the rest of the process: an
engine's gRPC thread, its hooks and the mover's other direction keep running while
one thread's unmap waits for the kernels still writing the memory."""

import json
import subprocess
import sys

import pytest

SYNC_SECONDS = 1.0

# Maps a region, then has the double's cuCtxSynchronize take SYNC_SECONDS, and
# measures how long this thread is held up at most while another thread unmaps.
UNMAP_WHILE_COUNTING = """
import json, sys, threading, time
from sleepd import _C

backend = _C.CudaBackend()
backend.set_device(0)
size = backend.granularity(0)
handle = backend.create(0, size)
address = backend.reserve(size)
backend.map(address, size, handle, 0)
with open(sys.argv[1], "w") as control:
    control.write("sync_delay_ms=%d\\n" % int(float(sys.argv[2]) * 1000))

unmapping = threading.Thread(target=backend.unmap, args=(address, size))
start = last = time.monotonic()
longest = 0.0
unmapping.start()
while unmapping.is_alive():
    now = time.monotonic()
    longest, last = max(longest, now - last), now
print(json.dumps({"unmap": time.monotonic() - start, "longest_stall": longest}))
"""


@pytest.fixture
def backend():
    return "cuda"


def test_other_threads_run_while_unmap_waits_for_the_gpu(fake):
    result = subprocess.run([sys.executable, "-c", UNMAP_WHILE_COUNTING, str(fake.control_file), str(SYNC_SECONDS)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen["unmap"] >= SYNC_SECONDS, "the unmap did not wait for the (slow) synchronise"
    assert seen["longest_stall"] < SYNC_SECONDS / 2, f"the unmap held every other thread up: {seen}"
