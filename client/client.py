"""SleepClient: what an engine process imports to put its memory in sleepd's hands.

    c = SleepClient.connect(model="qwen", rank=0, device=0)
    r = c.alloc(64 << 20, tag="kv_cache")
    c.on_sleep(pause); c.on_wake(resume)
    c.sleep(level=1); c.wake(); c.is_sleeping()

One session stream per process is its lease with the daemon: a background thread
answers the daemon's commands on it (run hooks, unmap, remap) while the caller's
thread goes on. Closing the client, or the process dying, ends the lease and the
daemon reclaims the memory.
"""

import contextlib
import logging
import threading
from typing import Callable

import grpc

from sleepd.common import paths
from sleepd.common.native import engine_backend, gpu_uuid
from sleepd.proto import sleepd_pb2 as pb

from . import timing
from .awake import ensure_awake_request
from .errors import SleepdError, as_sleepd_error
from .lease import Lease, attach_again
from .mappings import Mappings
from .native_pool import NativePool
from . import weight_sets
from .region import Region, State
from .weight_sets import WeightSet

log = logging.getLogger(__name__)

# Chunks this large keep a model's handle count small (weights of 8 GiB: 16 handles).
DEFAULT_CHUNK_BYTES = 512 << 20


class SleepClient:
    def __init__(self, model: str, rank: int, device: int, socket_path: str, needs_controller: bool = False,
                 reconnect_seconds: float | None = None, busy_seconds: float | None = None):
        self.model, self.rank, self.device = model, rank, device
        self.needs_controller = needs_controller
        self.reconnect_seconds = timing.seconds(reconnect_seconds, timing.RECONNECT)
        self.busy_seconds = timing.seconds(busy_seconds, timing.BUSY)
        # By tag, alive as long as the client: every tensor in them needs them.
        self._torch_pools: dict = {}
        self._sleep_hooks: list[Callable[[], None]] = []
        self._wake_hooks: list[Callable[[], None]] = []
        self._tag_wake_hooks: dict[str, list[Callable[[], None]]] = {}
        self._closed = False

        self._socket_path = socket_path
        self._device_uuid = gpu_uuid(device)
        self._lease = self._attach()
        attached = self._lease.answer.attached
        self._session_id = attached.session_id
        self._mappings = Mappings(engine_backend(attached.backend, device), device)
        self._mappings.take_back(self._lease.fd_socket, attached)
        self._thread = threading.Thread(target=self._serve_commands, name="sleepd-session", daemon=True)
        self._thread.start()

    def _attach(self) -> Lease:
        """A lease whose stream is an attached session."""
        return Lease(self._socket_path, "Session", lambda fd_socket: pb.EngineMessage(attach=pb.Attach(
            token=fd_socket.token, model=self.model, rank=self.rank, device=self.device, device_uuid=self._device_uuid,
            needs_controller=self.needs_controller)))

    @classmethod
    def connect(cls, model: str, rank: int = 0, device: int = 0, socket: str | None = None,
                needs_controller: bool = False, reconnect_seconds: float | None = None,
                busy_seconds: float | None = None) -> "SleepClient":
        """Attaches this process as `rank` of `model` on `device`. The socket is
        `socket`, else $SLEEPD_SOCKET, else the system or per-user default. With
        `needs_controller`, the engine runs its own sleep: sleeps asked from outside
        it go through the model's controller (sleepd.client.Controller), and are
        refused while none is attached. `reconnect_seconds` ($SLEEPD_RECONNECT_SECONDS,
        120): how long to try attaching again after the daemon went away;
        `busy_seconds` ($SLEEPD_BUSY_SECONDS, 600): how long a pool refill keeps asking
        while the model is busy with a sleep or wake."""
        return cls(model, rank, device, paths.client_socket(socket), needs_controller, reconnect_seconds,
                   busy_seconds)

    def __enter__(self) -> "SleepClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- memory ----

    def alloc(self, nbytes: int, tag: str, evict: bool = False, persist: bool = False) -> Region:
        """A new region of at least `nbytes`, mapped at an address it keeps for life.
        With `evict`, the daemon may put other models to sleep to make room. With
        `persist`, the region outlives this process: if it dies, the next process
        to attach as the same model and rank gets it back (see regions())."""
        with self._mappings.allocating():
            with as_sleepd_error():
                info = self._lease.stub.Allocate(pb.AllocateRequest(session_id=self._session_id, size=nbytes,
                                                                    tag=tag, evict=evict, persist=persist))
            try:
                return self._mappings.map_new(self._lease.fd_socket, info)
            except BaseException:
                self._free(info.id)
                raise

    def free(self, region: Region) -> None:
        """Gives the region back. Tensors and views over it must not be used afterwards."""
        self._mappings.free(region)
        self._free(region.id)

    def _free(self, region_id: int) -> None:
        with as_sleepd_error():
            self._lease.stub.Free(pb.FreeRequest(session_id=self._session_id, region_id=region_id))

    def adopt(self, module, tag: str = "weights") -> list[Region]:
        """Moves a torch module's parameters and buffers into a few large regions."""
        from .adopt import adopt

        return adopt(self, module, tag)

    @contextlib.contextmanager
    def pool(self, tag: str = "weights", chunk_bytes: int = DEFAULT_CHUNK_BYTES):
        """Inside this block, torch CUDA allocations on this thread land in
        daemon-owned regions tagged `tag`, carved from chunks of `chunk_bytes`.

        Only this thread's: allocations other threads make meanwhile (a loader's
        thread pool) go to plain device memory and never sleep. Open pool() in
        each of those threads; a block that sees the device's memory grow outside
        sleepd warns (torch_pool.RoutingWarning).

        torch's pitfalls, handled here: expandable segments are switched off while
        any pool() block is open (they bypass a pluggable allocator), and back on
        after the last, if they were on; the MemPool and the allocator live as long
        as this client, because every tensor in them needs them;
        torch.cuda.empty_cache() does not give pool memory back, sleep does.
        """
        from .torch_pool import TorchPool

        torch_pool = self._torch_pools.get(tag)
        if torch_pool is None:
            backend = self._mappings.backend.name
            if backend not in ("cuda", "acl"):
                raise RuntimeError("pool() routes torch CUDA or NPU allocations; this daemon runs the "
                                   f"{backend} backend, so use alloc() or adopt() instead")
            torch_pool = self._torch_pools[tag] = TorchPool(self.native_pool(tag, chunk_bytes), self.device, backend)
        try:
            with torch_pool.active(self.device, self._mappings.pooled_bytes):
                yield torch_pool
        finally:
            self.settle_native_pool(torch_pool.native)

    def native_pool(self, tag: str = "weights", chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> NativePool:
        """The pool behind pool(tag), for native allocators: on a thread where it is active,
        calls to the C functions sleepd_malloc(size, device, stream) and sleepd_free(ptr,
        size, device, stream) exported by sleepd._C are carved from regions tagged `tag`,
        which are allocated and mapped in C++ without the GIL. Call settle_native_pool()
        when done allocating."""
        return self._mappings.native_pool(self._lease.fd_socket, tag, chunk_bytes, self.busy_seconds)

    def settle_native_pool(self, pool: NativePool) -> None:
        """Records the regions the pool's refills mapped (as regions() would), and frees those the
        daemon allocated that this process could not map (a refill that failed: the allocation
        returned NULL, and torch said out of memory)."""
        for region_id in self._mappings.unmapped(pool):
            try:
                self._free(region_id)
            except SleepdError as error:
                log.warning("region %d, which a refill of the %r pool could not map, is not freed: %s",
                            region_id, pool.tag, error.message)
            self._mappings.forget_unmapped(region_id)

    def regions(self) -> list[Region]:
        return self._mappings.regions()

    # ---- weight sets (docs/client-api.md) ----

    def commit_weights(self, regions: list[Region], key, tensors: dict | None = None) -> WeightSet:
        """Makes `regions`, which hold loaded weights, a weight set keyed `key` (str or bytes: everything that
        decides their bytes), with the place of each of `tensors` ({name: tensor in those regions}) as its
        manifest. The set outlives this process; from now on this engine maps it read-only, like every engine
        that joins it. ALREADY_EXISTS where this uid has a set of that key on the device: join it instead."""
        key = weight_sets.key_bytes(key)
        places = weight_sets.places_of(tensors or {}, regions)
        with as_sleepd_error():
            info = self._lease.stub.CommitWeights(pb.CommitWeightsRequest(
                session_id=self._session_id, region_ids=[r.id for r in regions], key=key,
                manifest=weight_sets.encode(places)))
        self._mappings.map_anew(self._lease.fd_socket, regions, info.id)
        return WeightSet(info.id, key, regions, places)

    def join_weights(self, key) -> WeightSet | None:
        """The newest weight set of `key` this engine may use on its device, mapped read-only at new addresses;
        None where there is none (load, then commit_weights)."""
        key = weight_sets.key_bytes(key)
        with self._mappings.allocating():
            with as_sleepd_error():
                reply = self._lease.stub.JoinWeights(pb.JoinWeightsRequest(session_id=self._session_id, key=key))
            if not reply.found:
                return None
            regions = []
            try:
                for info in reply.regions:
                    regions.append(self._mappings.map_new(self._lease.fd_socket, info))
            except BaseException:
                for region in regions:
                    self._mappings.free(region)
                for info in reply.regions:
                    self._free(info.id)
                raise
        return WeightSet(reply.weight_set.id, key, regions, weight_sets.decode(reply.manifest))

    def leave_weights(self, weight_set: WeightSet) -> None:
        """The write step, before this engine writes its weights: its regions of the set become memory of its
        own, a copy, at the same addresses (tensors over them stay valid). Other engines keep the set."""
        with as_sleepd_error():
            self._lease.stub.LeaveWeights(pb.LeaveWeightsRequest(session_id=self._session_id,
                                                                 weight_set=weight_set.id))
        self._mappings.map_anew(self._lease.fd_socket, weight_set.regions, "")

    # ---- hooks ----

    def on_sleep(self, fn: Callable[[], None]) -> None:
        """`fn` runs before any memory of this model goes (pause the scheduler here)."""
        self._sleep_hooks.append(fn)

    def on_wake(self, fn: Callable[[], None], tag: str | None = None) -> None:
        """`fn` runs once every region is back (resume here); with `tag`, as soon
        as that tag's regions are back (reload weights here)."""
        if tag is None:
            self._wake_hooks.append(fn)
        else:
            self._tag_wake_hooks.setdefault(tag, []).append(fn)

    # ---- control of this model ----

    def sleep(self, level: int = 1, tags: list[str] | None = None, actions: dict[str, str] | None = None) -> pb.OperationReply:
        request = pb.SleepRequest(model=self.model, level=level, tags=tags or [], actions=[
            pb.TagAction(tag=tag, action=pb.Action.Value(action.upper())) for tag, action in (actions or {}).items()])
        with as_sleepd_error():
            return self._lease.stub.Sleep(request)

    def wake(self, tags: list[str] | None = None, evict: bool = False) -> pb.OperationReply:
        """Restores some tags, or all; with `evict`, other models may be put to sleep to make room.
        The daemon counts a wake as activity (see touch)."""
        with as_sleepd_error():
            return self._lease.stub.Wake(pb.WakeRequest(model=self.model, tags=tags or [], evict=evict))

    def ensure_awake(self, evict: bool = True, wake: bool | None = None, timeout: float = 0.0) -> pb.EnsureAwakeReply:
        """Returns once the model is fully awake, waking it (and, with `evict`,
        making room as policy allows) if it sleeps; with `wake` False (default:
        $SLEEPD_WAKE_ON_REQUEST, on unless 0), waiting up to `timeout` seconds (0:
        the daemon's limit) for someone else to wake it. Call it before serving a
        request instead of touching memory that may be unmapped."""
        with as_sleepd_error():
            return self._lease.stub.EnsureAwake(ensure_awake_request(self.model, evict, wake, timeout))

    def touch(self) -> None:
        """Marks the model as in use: eviction and idle sleep take the least recently active first."""
        with as_sleepd_error():
            self._lease.stub.Touch(pb.TouchRequest(session_id=self._session_id))

    def set_policy(self, priority: int | None = None, pinned: bool | None = None,
                   eviction_level: int | None = None, idle_seconds: float | None = None) -> pb.ModelPolicy:
        """Changes this model's eviction policy; unset arguments keep their value."""
        fields = {"priority": priority, "pinned": pinned, "eviction_level": eviction_level,
                  "idle_seconds": idle_seconds}
        request = pb.PolicyRequest(model=self.model, **{k: v for k, v in fields.items() if v is not None})
        with as_sleepd_error():
            return self._lease.stub.SetPolicy(request)

    def is_sleeping(self) -> bool:
        return self.status().sleeping

    def status(self) -> pb.ModelStatus:
        with as_sleepd_error():
            return self._lease.stub.Status(pb.StatusRequest(model=self.model)).models[0]

    def close(self) -> None:
        """Ends the lease: the daemon reclaims every region; local reservations go too."""
        if self._closed:
            return
        self._closed = True
        # Say goodbye and half-close; the daemon reclaims and ends the stream.
        self._lease.outgoing.put(pb.EngineMessage(detach=pb.Detach()))
        self._lease.outgoing.put(None)
        self._thread.join(timeout=5)
        if self._thread.is_alive():
            self._lease.stream.cancel()
            self._thread.join(timeout=5)
        self._mappings.free_all()
        self._lease.close()

    # ---- the daemon's commands ----

    def _serve_commands(self) -> None:
        while True:
            try:
                for command in self._lease.stream:
                    kind = command.WhichOneof("kind")  # quiesce, unmap, remap or resume: handled by _<kind>
                    try:
                        getattr(self, f"_{kind}")(getattr(command, kind))
                        ack = pb.Ack(op_id=command.op_id, ok=True)
                    except Exception as error:  # reported to the daemon, which rolls the model back
                        log.exception("sleepd %s command failed", kind)
                        ack = pb.Ack(op_id=command.op_id, ok=False, error=f"{type(error).__name__}: {error}")
                    self._lease.outgoing.put(pb.EngineMessage(ack=ack))
            except grpc.RpcError as error:
                if not self._closed:
                    log.warning("sleepd session of %s rank %d broke (%s); attaching again", self.model, self.rank,
                                error.details())
            if self._closed or not self._reconnect():
                return

    def _reconnect(self) -> bool:
        """Attaches again after the daemon went away (a restart): our mappings stayed
        valid all along; the new daemon gets their memory back from us. Every step is
        bounded: False, said in one line, once reconnect_seconds have passed."""
        try:
            lease = attach_again(self._attach, self.reconnect_seconds, lambda: self._closed)
        except TimeoutError as error:
            log.error("%s rank %d could not attach again within %g s (last: %s); carrying on without sleepd",
                      self.model, self.rank, self.reconnect_seconds, error)
            return False
        if lease is None:
            return False
        old, self._lease = self._lease, lease
        attached = lease.answer.attached
        self._session_id = attached.session_id
        old.close()  # refills in flight on it fail, and torch reports out of memory
        try:
            self._mappings.take_back(lease.fd_socket, attached)
        except Exception as error:  # a step the new daemon refused or never answered
            log.error("%s rank %d attached again but could not hand its memory back (%s: %s); carrying on "
                      "without sleepd: its regions stay as they are here and will not sleep",
                      self.model, self.rank, type(error).__name__, error)
            lease.close()  # ends the session: the daemon stops waiting for this rank
            return False
        self._mappings.use_fd_socket(lease.fd_socket)  # refills go to the new daemon once it has our memory back
        log.info("%s rank %d attached again%s", self.model, self.rank,
                 " and handed its memory back" if attached.resuming else "")
        return True

    def _quiesce(self, command: pb.Quiesce) -> None:
        for hook in self._sleep_hooks:
            hook()
        # The mover copies our memory once we ack: kernels still writing it must have finished.
        self._mappings.backend.synchronize()

    def _unmap(self, command: pb.Unmap) -> None:
        self._mappings.unmap(command)

    def _remap(self, command: pb.Remap) -> None:
        self._mappings.remap(self._lease.fd_socket, command)

    def _tags_awake(self, command: pb.TagsAwake) -> None:
        for tag in command.tags:
            if all(r.state is State.MAPPED for r in self.regions() if r.tag == tag):
                for hook in self._tag_wake_hooks.get(tag, []):
                    hook()

    def _resume(self, command: pb.Resume) -> None:
        for hook in self._wake_hooks:
            hook()
