"""Pool refills allocate and map daemon regions in C++, without the GIL.

torch calls its pluggable allocator's hooks holding its allocator lock, and a thread
that frees a tensor holds the GIL while it waits for that lock. Here a small C
helper plays torch: it holds a pthread mutex across sleepd_malloc calls, while the
main thread waits for the same mutex holding the GIL (ctypes.PyDLL keeps the GIL
during the call, as torch's free does). A refill that took the GIL would never
return. Real daemon, real engine process, real memory, on every backend.
"""

import json
import os
import subprocess
import sys

import grpc
import pytest

from sleepd.client import SleepClient, SleepdError
from sleepd.common.fd_messages import Allocate, Allocated

from support import MiB, scrape, value, wait_for

HELPER = r"""
#include <pthread.h>
#include <sys/types.h>

typedef void* (*malloc_hook)(ssize_t size, int device, void* stream);

// As torch's allocator: the hook runs with the allocator's lock held.
int allocate_holding(pthread_mutex_t* lock, malloc_hook hook, ssize_t size, int count, void** out,
                     volatile int* entered) {
  pthread_mutex_lock(lock);
  *entered = 1;
  int done = 0;
  while (done < count && (out[done] = hook(size, 0, 0)) != 0) ++done;
  pthread_mutex_unlock(lock);
  return done;
}
"""

ENGINE = r"""
import ctypes, json, sys, threading, time
from sleepd import _C
from sleepd.client import SleepClient

helper_path, socket_path, block, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
helper = ctypes.CDLL(helper_path)  # CDLL releases the GIL for the whole call
hook = ctypes.cast(ctypes.CDLL(_C.__file__).sleepd_malloc, ctypes.c_void_p)
libc = ctypes.PyDLL(None)          # PyDLL keeps it, as a free inside torch does
mutex = ctypes.create_string_buffer(64)  # a zeroed pthread_mutex_t is an unlocked default mutex
entered = ctypes.c_int(0)
blocks = (ctypes.c_void_p * count)()

client = SleepClient.connect("qwen", socket=socket_path)
pool = client.native_pool("weights", chunk_bytes=block)  # every allocation is a refill
done = []

def allocate():
    pool.activate()
    done.append(helper.allocate_holding(mutex, hook, ctypes.c_ssize_t(block), count, blocks, ctypes.byref(entered)))
    pool.deactivate()

thread = threading.Thread(target=allocate)
thread.start()
while not entered.value:
    time.sleep(0.001)
libc.pthread_mutex_lock(mutex)      # waits, holding the GIL, until every refill is done
libc.pthread_mutex_unlock(mutex)
thread.join()
client.settle_native_pool(pool)

regions = client.regions()
inside = all(any(r.address <= b < r.address + r.mapped_size for r in regions) for b in blocks[:done[0]])
for r in regions:
    r.write(bytes([r.id % 251]) * r.size)
client.sleep(level=1)
asleep = [r.state.value for r in client.regions()]
client.wake()
identical = all(r.read() == bytes([r.id % 251]) * r.size for r in client.regions())
print(json.dumps({"allocated": done[0], "regions": len(regions), "tags": sorted({r.tag for r in regions}),
                  "inside": inside, "asleep": asleep, "identical": identical}), flush=True)
client.close()
"""


@pytest.fixture(scope="module")
def helper(tmp_path_factory) -> str:
    library = tmp_path_factory.mktemp("helper") / "libholding.so"
    source = library.with_suffix(".c")
    source.write_text(HELPER)
    subprocess.run(["cc", "-shared", "-fPIC", "-O2", "-o", str(library), str(source), "-lpthread"], check=True)
    return str(library)


def test_refills_inside_a_held_allocator_lock_do_not_wait_for_the_gil(daemon, helper):
    result = subprocess.run([sys.executable, "-c", ENGINE, helper, daemon.socket, str(4 * MiB), "8"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["allocated"] == 8 and report["regions"] == 8 and report["tags"] == ["weights"]
    assert report["inside"], "a block sleepd_malloc returned lies outside every region the client knows"
    assert report["asleep"] == ["offloaded"] * 8
    assert report["identical"]
    assert daemon.status()["models"] == []  # the engine closed: its regions went with it


def test_a_refused_refill_returns_null_with_the_daemons_reason_and_changes_nothing(daemon):
    import ctypes

    from sleepd import _C

    hook = ctypes.CDLL(_C.__file__).sleepd_malloc
    hook.restype, hook.argtypes = ctypes.c_void_p, [ctypes.c_ssize_t, ctypes.c_int, ctypes.c_void_p]
    with SleepClient.connect("qwen", socket=daemon.socket) as client:
        pool = client.native_pool("weights", chunk_bytes=4 * MiB)
        before = daemon.status()
        pool.activate()
        try:
            assert hook(1 << 40, 0, None) is None  # larger than the device: the daemon refuses
            assert hook(MiB, 0, None) is not None  # and the pool still serves
        finally:
            pool.deactivate()
        client.settle_native_pool(pool)
        assert [r.size for r in client.regions()] == [4 * MiB]
        assert len(daemon.status()["models"][0]["ranks"][0]["regions"]) == len(before["models"][0]["ranks"][0]["regions"]) + 1


def _device_pid(backend) -> int | None:
    """What an engine names on a token backend (ACL), as the native refill does."""
    from sleepd.common.native import engine_backend

    return engine_backend("acl", 0).device_pid() if backend == "acl" else None


@pytest.mark.parametrize("size, tag, code", [(-1, "weights", "INVALID_ARGUMENT"), (MiB, "no spaces", "INVALID_ARGUMENT"),
                                             (1 << 40, "weights", "RESOURCE_EXHAUSTED")])
def test_a_bad_allocate_on_the_fd_socket_is_refused_in_one_line(daemon, size, tag, code):
    with SleepClient.connect("qwen", socket=daemon.socket) as client:
        before = daemon.status()
        with pytest.raises(SleepdError) as error:
            client._lease.fd_socket._request(Allocate(size, tag, _device_pid(daemon.backend)), Allocated)
        assert error.value.code.name == code and "\n" not in error.value.message
        assert daemon.status() == before


def test_allocate_before_attaching_is_refused(daemon):
    from sleepd.client.fd_socket import FdConnection
    from sleepd.common import paths

    fd_socket = FdConnection(paths.fd_socket(daemon.socket))
    try:
        with pytest.raises(SleepdError) as error:
            fd_socket._request(Allocate(MiB, "weights", _device_pid(daemon.backend)), Allocated)
        assert error.value.code == grpc.StatusCode.NOT_FOUND and "attach" in error.value.message
    finally:
        fd_socket.close()


def test_refills_wait_out_a_busy_model_without_holding_the_daemons_fd_socket_workers(start_daemon, start_engine):
    """The daemon refuses an allocate whose model is in a sleep (ABORTED, after a moment) and the refill asks
    again. Here the sleep hangs in one rank's hook until the hook timeout while as many ranks as the fd
    socket has workers refill at once; meanwhile another engine attaches, which needs a worker."""
    import contextlib
    import ctypes
    import threading
    import time

    from sleepd import _C
    from sleepd.daemon.config import BY_KEY

    daemon = start_daemon("--hook-timeout", "6")
    workers = BY_KEY["fd_socket.workers"].default
    hung = start_engine(daemon, "qwen", rank=workers, device=1, regions=[("weights", MiB)], sleep_hook="hang")
    hook = ctypes.CDLL(_C.__file__).sleepd_malloc
    hook.restype, hook.argtypes = ctypes.c_void_p, [ctypes.c_ssize_t, ctypes.c_int, ctypes.c_void_p]
    with contextlib.ExitStack() as stack:
        clients = [stack.enter_context(SleepClient.connect("qwen", rank=rank, socket=daemon.socket))
                   for rank in range(workers)]
        quiesced = threading.Event()
        clients[0].on_sleep(quiesced.set)
        pools = [client.native_pool("weights", chunk_bytes=4 * MiB) for client in clients]
        sleeper = subprocess.Popen([sys.executable, "-m", "sleepd.client.ctl", "--socket", daemon.socket, "sleep",
                                    "--model", "qwen"], stderr=subprocess.PIPE, text=True)
        assert quiesced.wait(30), "the sleep did not begin"
        addresses, returned, attached = [], [], []

        def refill(pool):
            pool.activate()
            addresses.append(hook(MiB, 0, None))  # waits for the sleep to fail at its hook timeout
            pool.deactivate()
            returned.append(time.monotonic())

        def refusals() -> float:
            return value(scrape(daemon), "sleepd_errors_total", operation="fd_socket_allocate", code="ABORTED") or 0

        def attach_another():
            # Every refill under way (one refill alone, asking again every 10 ms, soon has as many refusals).
            wait_for(lambda: all(pool.refill.busy for pool in pools) and refusals() >= workers,
                     what="every refill under way and as many refusals as refills")
            with SleepClient.connect("llama", socket=daemon.socket):
                attached.append(time.monotonic())

        threads = [threading.Thread(target=refill, args=(pool,)) for pool in pools]
        threads.append(threading.Thread(target=attach_another))
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        _, stderr = sleeper.communicate(timeout=30)
        assert sleeper.returncode != 0 and "DEADLINE_EXCEEDED" in stderr
        assert len(addresses) == workers and None not in addresses
        assert attached and attached[0] < min(returned), "another engine could not attach while the refills waited"
        for client, pool in zip(clients, pools):
            client.settle_native_pool(pool)
            assert [r.tag for r in client.regions()] == ["weights"]
    hung.kill()  # its hook never returns
