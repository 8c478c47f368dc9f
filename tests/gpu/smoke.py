"""The acceptance run's smoke checks on a real GPU, one stage per call, in the
order tests/gpu/accept.sh runs them:

    python tests/gpu/smoke.py presence    a GPU, its driver and a CUDA build of torch are there
    python tests/gpu/smoke.py driver      the driver in a process with no context
    python tests/gpu/smoke.py roundtrip   export, import on a fresh thread in another process, re-export;
                                          then memory that outlives the process that created it
    python tests/gpu/smoke.py mover       the mover pins a slab, then offloads, restores and zeroes
    python tests/gpu/smoke.py torch       torch allocations inside pool() land in daemon regions and sleep

(`import`, `reimport`, `create` and `hold` are the round trip's other processes;
`create` exits before `hold` re-exports what it maps, as a daemon does before a restart.) Each prints
what it does. Its last line is `figures: {json}` when it passed,
`failed: <why>` (exit 1) when it did not, or, from presence only, `absent: <why>`
(exit 2) where there is no GPU.
"""

import argparse
import ctypes
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from importlib.metadata import version

from figures import figure
from sleepd import _C
from sleepd.common.native import engine_backend

MiB = 1 << 20
GiB = 1 << 30
GRANULARITY = 2 * MiB
CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED = 102
CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED = 103
# torch.cuda._sleep's spin, in GPU clock cycles: a second or more at any clock an H100 or H200 runs.
LONG_KERNEL_CYCLES = 2_000_000_000


class Failed(Exception):
    """The check failed; the message is the one line that says how."""


class Absent(Exception):
    """There is no GPU to check."""


def check(condition: bool, why: str) -> None:
    if not condition:
        raise Failed(why)


def say(line: str) -> None:
    print(line, flush=True)


def rate(size: int, seconds: float) -> float:
    return round(size / seconds / GiB, 2)


class Driver:
    """The driver calls sleepd._C does not bind, through the library sleepd loads."""

    def __init__(self):
        self._lib = ctypes.CDLL(os.environ.get("SLEEPD_LIBCUDA") or "libcuda.so.1")
        self._call("cuInit", 0)

    def _call(self, name: str, *args) -> None:
        result = getattr(self._lib, name)(*args)
        check(result == 0, f"{name} failed with CUDA error {result}")

    def _device(self, ordinal: int) -> ctypes.c_int:
        device = ctypes.c_int()
        self._call("cuDeviceGet", ctypes.byref(device), ordinal)
        return device

    def attribute(self, ordinal: int, attribute: int) -> int:
        value = ctypes.c_int()
        self._call("cuDeviceGetAttribute", ctypes.byref(value), attribute, self._device(ordinal))
        return value.value

    def primary_context_active(self, ordinal: int) -> bool:
        flags, active = ctypes.c_uint(), ctypes.c_int()
        self._call("cuDevicePrimaryCtxGetState", self._device(ordinal), ctypes.byref(flags), ctypes.byref(active))
        return bool(active.value)

    def version(self) -> str:
        version = ctypes.c_int()
        self._call("cuDriverGetVersion", ctypes.byref(version))
        return f"{version.value // 1000}.{version.value % 1000 // 10}"


class Nvml:
    """CUDA device 0 as NVML sees it, found by the UUID sleepd reads from the driver."""

    def __init__(self, uuid: str):
        import pynvml

        self._nvml = pynvml
        pynvml.nvmlInit()
        try:
            self.handle = pynvml.nvmlDeviceGetHandleByUUID(uuid)
        except pynvml.NVMLError as error:
            raise Failed(f"NVML does not know CUDA device 0's UUID {uuid}: {error}") from None

    def text(self, call, *args) -> str:
        value = call(*args)
        return value.decode() if isinstance(value, bytes) else value

    def uuid(self) -> str:
        return self.text(self._nvml.nvmlDeviceGetUUID, self.handle)

    def name(self) -> str:
        return self.text(self._nvml.nvmlDeviceGetName, self.handle)

    def driver_version(self) -> str:
        return self.text(self._nvml.nvmlSystemGetDriverVersion)

    def used(self) -> int:
        return int(self._nvml.nvmlDeviceGetMemoryInfo(self.handle).used)

    def processes(self) -> dict[int, int]:
        """Bytes each process with a context on the device holds."""
        return {p.pid: int(p.usedGpuMemory or 0) for p in self._nvml.nvmlDeviceGetComputeRunningProcesses(self.handle)}


def pattern(offset: int, length: int) -> bytes:
    """`length` bytes from `offset` on of a pattern repeating every 1 MiB + 4099 bytes: no copy chunk
    is a multiple of that, so a chunk copied to the wrong place shows."""
    block = random.Random(1).randbytes(MiB + 4099)
    start = offset % len(block)
    return (block * ((start + length) // len(block) + 1))[start:start + length]


# ---- presence ----

def presence(args) -> dict:
    try:
        import torch
    except ImportError as error:
        raise Failed(f"torch cannot be imported: {error}") from None
    build = f"torch {torch.__version__} " + (f"(built for CUDA {torch.version.cuda})" if torch.version.cuda
                                              else "(a CPU build)")
    reason = _C.cuda_unavailable_reason()
    if reason:
        raise Absent(f"{reason}; {build}")
    backend = _C.CudaBackend()
    try:
        torch.cuda.init()
    except Exception as error:
        raise Failed(f"the driver sees {backend.device_count} GPU(s) but {build} cannot use them: {error}") from None
    nvml = Nvml(backend.uuid(0))
    return {"gpu": figure("GPU", nvml.name()), "gpus": figure("GPUs visible", backend.device_count),
            "gpu_memory": figure("GPU memory", round(backend.total_memory(0) / GiB, 1), "GiB"),
            "driver": figure("NVIDIA driver", nvml.driver_version()),
            "cuda": figure("CUDA (driver API)", Driver().version()),
            "torch": figure("torch", torch.__version__),
            "torch_cuda": figure("torch built for CUDA", torch.version.cuda),
            "python": figure("Python", sys.version.split()[0]), "sleepd": figure("sleepd", version("sleepd"))}


# ---- 1: the driver in a process with no context ----

def driver(args) -> dict:
    backend = _C.CudaBackend()
    cuda = Driver()
    uuid = backend.uuid(0)
    nvml = Nvml(uuid)
    check(nvml.uuid() == uuid, f"sleepd reads CUDA device 0 as {uuid}, NVML's device by that UUID says {nvml.uuid()}")
    say(f"device 0: {uuid} ({nvml.name()}), as NVML names it")
    granularity = backend.granularity(0)
    check(granularity == GRANULARITY, f"the allocation granularity is {granularity} bytes, not 2 MiB")
    vmm = cuda.attribute(0, CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED)
    posix_fd = cuda.attribute(0, CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED)
    check(vmm == 1, f"the device reports VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED = {vmm}")
    check(posix_fd == 1, f"the device reports HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED = {posix_fd}")
    say("granularity 2 MiB; virtual memory management and POSIX file descriptor handles supported")

    baseline = nvml.used()
    handle = backend.create(0, GiB)
    fd = backend.export_handle(handle)
    created = nvml.used() - baseline
    os.close(fd)
    backend.release(handle)
    deadline = time.monotonic() + 5
    while abs(nvml.used() - baseline) > GRANULARITY and time.monotonic() < deadline:
        time.sleep(0.05)
    left = nvml.used() - baseline
    say(f"create 1 GiB: NVML used +{created / MiB:.0f} MiB; after export and release: {left / MiB:+.0f} MiB")
    check(abs(left) <= GRANULARITY, f"NVML shows {left / MiB:+.0f} MiB against its baseline after create, "
                                    "export and release")
    check(not cuda.primary_context_active(0), "create, export and release made this process a CUDA context")
    check(os.getpid() not in nvml.processes(), "NVML lists this process on the GPU, with no context made")
    say("no context made in this process")
    return {"granularity": figure("allocation granularity", granularity // MiB, "MiB"),
            "created_seen": figure("NVML used after creating 1 GiB with no context", created // MiB, "MiB"),
            "left_after_release": figure("NVML used after release, against baseline", left // MiB, "MiB")}


# ---- 2: a two-process round trip, then a re-export to a third ----

ROUNDTRIP_BYTES = 64 * MiB


def roundtrip(args) -> dict:
    backend = _C.CudaBackend()  # this process, like the daemon, makes no context
    handle = backend.create(0, ROUNDTRIP_BYTES)
    fd = backend.export_handle(handle)
    say(f"process {os.getpid()} (no context): created and exported {ROUNDTRIP_BYTES // MiB} MiB")
    try:
        child("import", fd, ROUNDTRIP_BYTES)
        read_only = any(line.startswith(READ_ONLY_HONOURED) for line in child("readonly", fd, ROUNDTRIP_BYTES))
    finally:
        os.close(fd)
        backend.release(handle)
    outlived = outliving_its_creator()
    return {"roundtrip_bytes": figure("round trip through two processes", ROUNDTRIP_BYTES // MiB, "MiB"),
            "outlived_bytes": figure("memory that outlived its creator, read back whole", outlived // MiB, "MiB"),
            "read_only_mapping": figure("a weight set's read-only mapping refuses a write (1) or the driver "
                                        "maps read-write (0)", int(read_only))}


def outliving_its_creator() -> int:
    """What a daemon restart relies on: a creator exports memory, an engine maps it, the creator
    exits; the engine re-exports what it maps, and a third process reads every byte. Returns the size."""
    report = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"sleepd-smoke-outlive-{os.getpid()}")
    try:
        subprocess.run([sys.executable, __file__, "create", "--size", str(ROUNDTRIP_BYTES), "--report", report],
                       check=True, timeout=60)
        deadline = time.monotonic() + 60
        while not (os.path.exists(report) and open(report).read().endswith("\n.\n")):
            check(time.monotonic() < deadline, "the engine that outlived the creator did not finish in 60 s")
            time.sleep(0.1)
        lines = open(report).read().splitlines()[:-1]
    finally:
        if os.path.exists(report):
            os.unlink(report)
    for line in lines:
        say(f"  {line}")
    failed = [line for line in lines if line.startswith("failed: ")]
    check(not failed, failed[-1][len("failed: "):] if failed else "")
    return ROUNDTRIP_BYTES


def creator(args) -> None:
    """Creates and exports memory, starts the engine that maps it, and exits once it has."""
    backend = _C.CudaBackend()
    handle = backend.create(0, args.size)
    fd = backend.export_handle(handle)
    with open(args.report, "w") as report:
        engine = subprocess.Popen([sys.executable, __file__, "hold", "--fd", str(fd), "--size", str(args.size)],
                                  pass_fds=[fd], stdin=subprocess.PIPE, stdout=report, stderr=subprocess.STDOUT,
                                  text=True, start_new_session=True)
    check(wait_for_line(args.report, "mapped"), "the engine did not map the memory")
    os.close(fd)
    backend.release(handle)
    engine.stdin.write(f"{os.getpid()}\n")  # this process's pid, to watch it go
    engine.stdin.close()


def wait_for_line(path: str, line: str, seconds: float = 60) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if line in open(path).read().splitlines():
            return True
        time.sleep(0.05)
    return False


def holder(args) -> None:
    """The engine: maps and fills the memory, waits for its creator to exit, checks every byte, and
    re-exports what it maps to a third process, which reads it all again. Ends its report with '.'."""
    try:
        backend = engine_backend("cuda", 0)
        imported = backend.import_handle(args.fd, 0, args.size)
        os.close(args.fd)
        address = backend.reserve(args.size)
        backend.map(address, args.size, imported, 0)
        backend.write(address, pattern(0, args.size))
        print("mapped", flush=True)
        creator_pid = int(sys.stdin.readline())
        while _alive(creator_pid):
            time.sleep(0.05)
        say(f"process {os.getpid()}: its creator {creator_pid} has exited; the memory it maps is still there")
        check(backend.read(address, args.size) == pattern(0, args.size),
              "the bytes changed once the process that created the memory exited")
        again = backend.export_handle(imported)
        try:
            child("reimport", again, args.size)
        finally:
            os.close(again)
        backend.unmap(address, args.size)
        backend.free_reservation(address, args.size)
        backend.release(imported)
    except Exception as error:
        say("failed: " + " ".join((str(error) if isinstance(error, Failed) else f"{type(error).__name__}: {error}")
                                  .split()))
    print(".", flush=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not open(f"/proc/{pid}/stat").read().split(") ")[-1].startswith("Z")


def child(role: str, fd: int, size: int) -> list[str]:
    """Runs this file as `role` with `fd`; its failure becomes ours. Returns the lines it said."""
    process = subprocess.run([sys.executable, __file__, role, "--fd", str(fd), "--size", str(size)], pass_fds=[fd],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60)
    lines = process.stdout.splitlines()
    for line in lines:
        say(f"  {line}")
    if process.returncode != 0:
        failed = [line for line in lines if line.startswith("failed: ")]
        raise Failed(failed[-1][len("failed: "):] if failed else f"the {role} process exited {process.returncode}")
    return lines


def importer(args) -> None:
    backend = engine_backend("cuda", 0)  # the engine's context, current on this thread only
    outcome = {}

    def work():
        try:
            imported = backend.import_handle(args.fd, 0, args.size)
            address = backend.reserve(args.size)
            backend.map(address, args.size, imported, 0)
            data = pattern(0, args.size)
            backend.write(address, data)
            check(backend.read(address, args.size) == data, "the bytes read back differ from those written")
            backend.unmap(address, args.size)
            backend.free_reservation(address, args.size)
            say(f"process {os.getpid()}, a fresh thread: imported, mapped, wrote, read back, unmapped")
            again = backend.export_handle(imported)
            try:
                child("reimport", again, args.size)
            finally:
                os.close(again)
            backend.release(imported)
        except Exception as error:
            outcome["error"] = error

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]


def reimporter(args) -> None:
    backend = engine_backend("cuda", 0)
    imported = backend.import_handle(args.fd, 0, args.size)
    address = backend.reserve(args.size)
    backend.map(address, args.size, imported, 0)
    check(backend.read(address, args.size) == pattern(0, args.size),
          "the re-exported handle does not hold the bytes the importer wrote")
    backend.unmap(address, args.size)
    backend.free_reservation(address, args.size)
    backend.release(imported)
    say(f"process {os.getpid()}: imported the re-exported handle and read the same bytes")


READ_ONLY_HONOURED = "read-only mapping honoured"


def read_only_mapper(args) -> None:
    """How a weight set's engine maps it (issue 22): cuMemSetAccess with read access only. cuda.h documents
    the flag without saying device mappings honour it; this says which, reads back the bytes, and tries a
    write, which must fail. Last in its process: a refused write may leave the context unusable."""
    backend = engine_backend("cuda", 0)
    imported = backend.import_handle(args.fd, 0, args.size)
    address = backend.reserve(args.size)
    if not backend.map_read_only(address, args.size, imported, 0):
        say("the driver refused a read-only mapping: weight sets are mapped read-write on this node")
        return
    check(backend.read(address, 4096) == pattern(0, 4096), "a read-only mapping reads other bytes")
    try:
        backend.write(address, b"\xa5" * 4096)
        backend.synchronize()
    except Exception as error:
        say(f"{READ_ONLY_HONOURED}: a write was refused ({type(error).__name__}: {error})")
        return
    raise Failed("a write into a read-only mapping succeeded: weight sets are not protected on this node")


# ---- 3: the mover ----

def mover(args) -> dict:
    from sleepd.daemon.mover import CopyJob, Mover
    from sleepd.daemon.mover_messages import OFFLOAD, RESTORE, ZERO
    from sleepd.daemon.pool import HostPool

    size = args.size
    backend = _C.CudaBackend()  # the daemon's side: no context
    directory = f"/dev/shm/sleepd-smoke-{os.getpid()}"
    pool = HostPool(directory, 2 * size, prefault=True)
    views = {slab.index: (_C.map_file(slab.fd, slab.size), slab.size) for slab in pool.slabs()}
    the_mover = Mover(backend, "cuda", 0, pool)
    handle = None
    try:
        the_mover.start()
        started = time.perf_counter()
        the_mover.register_pool()
        pinned = time.perf_counter() - started
        say(f"mover {the_mover.pid}: mapped and pinned {2 * size / GiB:.1f} GiB of pool in {pinned:.2f} s")
        source, target = pool.allocate(size), pool.allocate(size)

        def chunks(backup):
            """(offset in the backup, memoryview) over the backup's bytes, 64 MiB at a time."""
            offset = 0
            for piece in backup.pieces:
                address = views[piece.slab][0] + piece.offset
                for at in range(0, piece.length, 64 * MiB):
                    length = min(64 * MiB, piece.length - at)
                    yield offset + at, _C.memoryview(address + at, length)
                offset += piece.length

        for offset, view in chunks(source):
            view[:] = pattern(offset, len(view))
        handle = backend.create(0, size)
        seconds = {}
        for direction, backup in ((RESTORE, source), (OFFLOAD, target), (ZERO, None), ("offload zeros", target)):
            started = time.perf_counter()
            the_mover.run([CopyJob(OFFLOAD if direction == "offload zeros" else direction, 0, handle, size, backup)])
            seconds[direction] = time.perf_counter() - started
            if direction == OFFLOAD:
                bad = sum(1 for offset, view in chunks(target) if bytes(view) != pattern(offset, len(view)))
                check(bad == 0, f"{bad} of the 64 MiB chunks offloaded differ from those restored")
            if direction == "offload zeros":
                zeros = bytes(64 * MiB)
                bad = sum(1 for _, view in chunks(target) if bytes(view) != zeros[:len(view)])
                check(bad == 0, f"{bad} of the 64 MiB chunks are not zero after the mover zeroed the memory")
        say(f"{size // MiB} MiB: restore {rate(size, seconds[RESTORE])} GiB/s, offload {rate(size, seconds[OFFLOAD])} "
            f"GiB/s (bytes equal), zero {rate(size, seconds[ZERO])} GiB/s (zeros read back)")
    finally:
        if handle is not None:
            backend.release(handle)
        the_mover.close()
        for address, length in views.values():
            _C.unmap_file(address, length)
        pool.close()
        shutil.rmtree(directory, ignore_errors=True)
    return {"pin_rate": figure("mover pins the pool", rate(2 * size, pinned), "GiB/s"),
            "restore_rate": figure(f"mover restore of {size // MiB} MiB", rate(size, seconds[RESTORE]), "GiB/s"),
            "offload_rate": figure(f"mover offload of {size // MiB} MiB", rate(size, seconds[OFFLOAD]), "GiB/s"),
            "zero_rate": figure(f"mover zero of {size // MiB} MiB", rate(size, seconds[ZERO]), "GiB/s")}


# ---- 4: torch routing ----

def in_regions(tensor, regions) -> bool:
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    return any(r.address <= start and end <= r.address + r.mapped_size for r in regions)


def torch_routing(args) -> dict:
    import torch

    from sleepd.bench.local import LocalDaemon
    from sleepd.client import SleepClient

    size = args.size
    nvml = Nvml(_C.CudaBackend().uuid(0))
    flags = ["--backend", "cuda", "--host-pool-budget", str(2 * size), "--host-pool-prefault"]
    with LocalDaemon(None, *flags) as daemon, SleepClient.connect("smoke", socket=daemon.socket) as client:
        daemon_idle = nvml.processes().get(daemon.pid, 0)
        with client.pool("weights"):
            weights = torch.empty(size, dtype=torch.uint8, device="cuda").fill_(1)
            small = [torch.ones(n, device="cuda") for n in (1, 1000, MiB)]
        outside = sum(not in_regions(t, client.regions()) for t in (weights, *small))
        check(outside == 0, f"{outside} of 4 tensors made inside pool() are not in daemon regions")
        say(f"4 tensors made inside pool() lie in the client's {len(client.regions())} daemon regions")
        other_device = other_device_routing(torch, daemon, SleepClient)
        model_bytes = sum(r.mapped_size for r in client.regions())

        torch.cuda.synchronize()
        engine_seen = os.getpid() in nvml.processes()
        awake = nvml.used()
        client.sleep(level=1)
        asleep = nvml.used()
        daemon_asleep = nvml.processes().get(daemon.pid, 0)
        client.wake()
        freed = awake - asleep
        say(f"asleep, NVML shows {freed / MiB:.0f} MiB freed of the model's {model_bytes / MiB:.0f} MiB; the daemon "
            f"holds {daemon_idle} bytes idle and {daemon_asleep} bytes with the model asleep")

        torch.cuda._sleep(LONG_KERNEL_CYCLES)
        weights.fill_(7)  # queued behind the spin: still to run when sleep() starts
        written = torch.cuda.Event()
        written.record()
        pending = not written.query()
        client.sleep(level=1)
        client.wake()
        stale = int((weights != 7).sum().item())
        check(pending, "the long kernel had finished before sleep() was called, so it proves nothing")
        check(stale == 0, f"{stale} of {size} bytes that a kernel in flight at sleep() wrote came back stale after "
                          "wake: the sleep did not wait for the engine's work")
        say("a kernel still writing a pooled tensor at sleep(): its bytes came back after wake")
        del weights, small
    return {"other_device": figure("pool() with torch's current device not the client's", other_device),
            "model_bytes": figure("the model's daemon memory", round(model_bytes / MiB), "MiB"),
            "nvml_freed": figure("NVML used, freed while asleep", round(freed / MiB), "MiB"),
            "nvml_freed_share": figure("NVML used, freed while asleep, against the model's daemon memory",
                                       round(freed / model_bytes, 3), "x"),
            "daemon_idle": figure("daemon's device memory while idle (NVML)", daemon_idle, "bytes"),
            "daemon_asleep": figure("daemon's device memory with the model asleep (NVML)", daemon_asleep, "bytes"),
            "nvml_sees_processes": figure("NVML lists this engine's process (so its per-process figures count)",
                                          engine_seen)}


def other_device_routing(torch, daemon, client_class) -> str:
    """With torch's current device 0, a client on device 1 still gets its pool() allocations."""
    if torch.cuda.device_count() < 2:
        return "not run: one GPU"
    torch.cuda.set_device(0)
    with client_class.connect("smoke-device-1", device=1, socket=daemon.socket) as other:
        with other.pool("weights"):
            tensor = torch.empty(64 * MiB, dtype=torch.uint8, device="cuda:1")
        inside = in_regions(tensor, other.regions())
        del tensor
    check(inside, "with torch's current device 0, a cuda:1 tensor made inside a device-1 client's pool() is not "
                  "in its daemon regions")
    say("with torch's current device 0, a device-1 client's pool() allocations lie in its regions")
    return "passed"


STAGES = {"presence": presence, "driver": driver, "roundtrip": roundtrip, "mover": mover, "torch": torch_routing}
ROLES = {"import": importer, "reimport": reimporter, "create": creator, "hold": holder, "readonly": read_only_mapper}


def main() -> int:
    parser = argparse.ArgumentParser(prog="smoke.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", choices=[*STAGES, *ROLES])
    parser.add_argument("--size", type=int, default=512 * MiB, help="bytes the mover and torch stages move")
    parser.add_argument("--fd", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--report", help=argparse.SUPPRESS)
    args = parser.parse_args()
    try:
        figures = {**STAGES, **ROLES}[args.stage](args)
    except Absent as why:
        say(f"absent: {why}")
        return 2
    except Exception as error:
        reason = str(error) if isinstance(error, Failed) else f"{type(error).__name__}: {error}"
        say("failed: " + " ".join(reason.split()))
        return 1
    if args.stage in STAGES:
        say("figures: " + json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
