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
import os
import queue
import threading
import time
from typing import Callable

import grpc

from sleepd.common import paths
from sleepd.common.handle_messages import FETCH_BATCH
from sleepd.common.native import engine_backend, gpu_uuid
from sleepd.proto import sleepd_pb2 as pb
from sleepd.proto import sleepd_pb2_grpc as pb_grpc

from . import timing
from .awake import ensure_awake_request
from .errors import SleepdError
from .control import control_channel
from .handles import ANSWER_SECONDS
from .native_pool import NativePool
from .region import Region, State

log = logging.getLogger(__name__)

_STATES = {pb.OFFLOADED: State.OFFLOADED, pb.DISCARDED: State.DISCARDED}
# Chunks this large keep a model's handle count small (weights of 8 GiB: 16 handles).
DEFAULT_CHUNK_BYTES = 512 << 20


def _rpc(call, *args, **kwargs):
    try:
        return call(*args, **kwargs)
    except grpc.RpcError as error:
        raise SleepdError.from_rpc(error) from None



class SleepClient:
    def __init__(self, model: str, rank: int, device: int, socket_path: str, needs_controller: bool = False,
                 reconnect_seconds: float | None = None, busy_seconds: float | None = None):
        self.model, self.rank, self.device = model, rank, device
        self.needs_controller = needs_controller
        self.reconnect_seconds = timing.seconds(reconnect_seconds, timing.RECONNECT)
        self.busy_seconds = timing.seconds(busy_seconds, timing.BUSY)
        self._regions: dict[int, Region] = {}
        # Guards _regions. Allocations in flight are counted, so that a command
        # naming a region the daemon has just created waits for it to be registered.
        self._regions_changed = threading.Condition()
        self._allocating = 0
        # Both by tag, alive as long as the client: every allocation in them needs them.
        self._pools: dict[str, NativePool] = {}  # guarded by _regions_changed
        self._torch_pools: dict = {}
        # Regions the daemon allocated for a refill that this process could not map, and their tags
        # (guarded by _regions_changed): commands that name them are answered for the rest.
        self._unmapped: dict[int, str] = {}
        self._sleep_hooks: list[Callable[[], None]] = []
        self._wake_hooks: list[Callable[[], None]] = []
        self._tag_wake_hooks: dict[str, list[Callable[[], None]]] = {}
        self._closed = False

        self._socket_path = socket_path
        self._device_uuid = gpu_uuid(device)
        self._channel, self._handles, self._stub, self._outgoing, self._stream, attached = self._open_session()
        self._session_id = attached.session_id
        self._backend = engine_backend(attached.backend, device)
        self._adopt(attached)
        self._thread = threading.Thread(target=self._serve_commands, name="sleepd-session", daemon=True)
        self._thread.start()

    def _open_session(self):
        """A handle connection, a channel and an attached session stream."""
        channel, handles = control_channel(self._socket_path)
        stub = pb_grpc.SleepdStub(channel)
        outgoing: "queue.Queue[pb.EngineMessage | None]" = queue.Queue()
        outgoing.put(pb.EngineMessage(attach=pb.Attach(token=handles.token, model=self.model, rank=self.rank,
                                                       device=self.device, device_uuid=self._device_uuid,
                                                       needs_controller=self.needs_controller)))
        stream = stub.Session(iter(outgoing.get, None))
        # The stream lives as long as the session, so no deadline bounds it: only the wait for Attached is.
        silent = threading.Timer(ANSWER_SECONDS, stream.cancel)
        silent.start()
        try:
            attached = next(stream).attached
        except grpc.RpcError as error:
            handles.close()
            channel.close()
            if error.code() is grpc.StatusCode.CANCELLED and not silent.is_alive():
                raise SleepdError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                  f"sleepd did not answer the attach within {ANSWER_SECONDS:g} s") from None
            raise SleepdError.from_rpc(error) from None
        finally:
            silent.cancel()
        return channel, handles, stub, outgoing, stream, attached

    def _adopt(self, attached: pb.Attached) -> None:
        """Takes the regions the daemon hands this rank: persistent ones an earlier
        process left, or, after a daemon restart, our own, whose memory we hand back."""
        with self._regions_changed:
            while self._collect_refills():  # a refill mapping now: its region is ours to hand back too
                self._regions_changed.wait(0.005)
        for info in attached.regions:
            region = self._regions.get(info.id)
            if region is None:
                try:
                    self._take_over(info)
                except SleepdError as error:  # its memory died with an engine while the daemon was down
                    log.warning("region %d (%s) cannot be taken back: %s", info.id, info.tag, error.message)
            elif region.state is State.MAPPED and self._backend.shares_tokens:
                self._move_to_new_memory(region)
            elif region.state is State.MAPPED:
                fd = self._backend.export_handle(region.handle)
                try:
                    self._handles.hand_back(region.id, fd)
                finally:
                    os.close(fd)
        if attached.resuming:
            self._handles.handed_back()
            known = {info.id for info in attached.regions}
            for region in self.regions():
                if region.id not in known:
                    log.warning("region %d (%s) is unknown to the restarted daemon: it stays mapped here "
                                "but will not sleep", region.id, region.tag)

    def _move_to_new_memory(self, region: Region) -> None:
        """After a daemon restart on ACL, where an imported handle cannot be exported again:
        copies the region into new memory the daemon made, and maps that at the same address."""
        token, size = self._handles.replace(region.id, self._backend.device_pid())
        handle = self._backend.import_token(token, self.device, size)
        staging = self._backend.reserve(size)
        try:
            self._backend.map(staging, size, handle, self.device)
            try:
                self._backend.copy(staging, region.address, size)
            finally:
                self._backend.unmap(staging, size)  # waits for the copy
        except BaseException:
            self._backend.release(handle)
            raise
        finally:
            self._backend.free_reservation(staging, size)
        self._unmap_region(region)
        self._backend.map(region.address, size, handle, self.device)
        region.handle = handle

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
        with self._regions_changed:
            self._allocating += 1
        try:
            info = _rpc(self._stub.Allocate, pb.AllocateRequest(session_id=self._session_id, size=nbytes, tag=tag,
                                                                     evict=evict, persist=persist))
            try:
                ((shared, mapped_size),) = self._fetch([info.id])
                address = self._backend.reserve(mapped_size)
                try:
                    handle = self._map(shared, address, mapped_size)
                except BaseException:
                    self._backend.free_reservation(address, mapped_size)
                    raise
            except BaseException:
                _rpc(self._stub.Free, pb.FreeRequest(session_id=self._session_id, region_id=info.id))
                raise
            region = Region(self._backend, info.id, info.tag, info.size, mapped_size, self.device, address,
                            info.persist)
            region.handle = handle
            with self._regions_changed:
                self._regions[region.id] = region
        finally:
            with self._regions_changed:
                self._allocating -= 1
                self._regions_changed.notify_all()
        return region

    def free(self, region: Region) -> None:
        """Gives the region back. Tensors and views over it must not be used afterwards."""
        with self._regions_changed:
            if self._regions.pop(region.id, None) is None:
                raise ValueError(f"region {region.id} is not one of this client's regions")
        self._release_address(region)
        _rpc(self._stub.Free, pb.FreeRequest(session_id=self._session_id, region_id=region.id))

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
            if self._backend.name not in ("cuda", "acl"):
                raise RuntimeError("pool() routes torch CUDA or NPU allocations; this daemon runs the "
                                   f"{self._backend.name} backend, so use alloc() or adopt() instead")
            torch_pool = self._torch_pools[tag] = TorchPool(self.native_pool(tag, chunk_bytes), self.device,
                                                            self._backend.name)
        try:
            with torch_pool.active(self.device, self._pooled_bytes):
                yield torch_pool
        finally:
            self.settle_native_pool(torch_pool.native)

    def native_pool(self, tag: str = "weights", chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> NativePool:
        """The pool behind pool(tag), for native allocators: on a thread where it is active,
        calls to the C functions sleepd_malloc(size, device, stream) and sleepd_free(ptr,
        size, device, stream) exported by sleepd._C are carved from regions tagged `tag`,
        which are allocated and mapped in C++ without the GIL. Call settle_native_pool()
        when done allocating."""
        with self._regions_changed:
            if tag not in self._pools:
                self._pools[tag] = NativePool(self._handles, self._backend, self.device, tag, chunk_bytes,
                                              self.busy_seconds)
            return self._pools[tag]

    def settle_native_pool(self, pool: NativePool) -> None:
        """Records the regions the pool's refills mapped (as regions() would), and frees those the
        daemon allocated that this process could not map (a refill that failed: the allocation
        returned NULL, and torch said out of memory)."""
        with self._regions_changed:
            self._collect_refills()
            unmapped = [region_id for region_id, tag in self._unmapped.items() if tag == pool.tag]
        for region_id in unmapped:
            try:
                _rpc(self._stub.Free, pb.FreeRequest(session_id=self._session_id, region_id=region_id))
            except SleepdError as error:
                log.warning("region %d, which a refill of the %r pool could not map, is not freed: %s",
                            region_id, pool.tag, error.message)
            with self._regions_changed:
                del self._unmapped[region_id]

    def _collect_refills(self) -> bool:
        """Records the regions torch pools' refills mapped since the last call (the caller
        holds _regions_changed); True while a refill is on its way, which may bring more."""
        refilling = False
        for pool in self._pools.values():
            refilling |= pool.refill.busy  # read first: a refill that lands after this is counted busy
            for region_id, size, mapped_size, address, handle in pool.refill.take_landed():
                region = Region(self._backend, region_id, pool.tag, size, mapped_size, self.device, address)
                region.handle = handle
                self._regions[region_id] = region
            for region_id in pool.refill.take_unmapped():
                self._unmapped[region_id] = pool.tag
        return refilling

    def _pooled_bytes(self) -> int:
        """What this client's torch pools hold, every tag together."""
        with self._regions_changed:
            return sum(pool.bytes_in_use for pool in self._pools.values())

    def regions(self) -> list[Region]:
        with self._regions_changed:
            self._collect_refills()
            return sorted(self._regions.values(), key=lambda region: region.id)

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
        return _rpc(self._stub.Sleep, request)

    def wake(self, tags: list[str] | None = None, evict: bool = False) -> pb.OperationReply:
        """Restores some tags, or all; with `evict`, other models may be put to sleep to make room.
        The daemon counts a wake as activity (see touch)."""
        return _rpc(self._stub.Wake, pb.WakeRequest(model=self.model, tags=tags or [], evict=evict))

    def ensure_awake(self, evict: bool = True, wake: bool | None = None, timeout: float = 0.0) -> pb.EnsureAwakeReply:
        """Returns once the model is fully awake, waking it (and, with `evict`,
        making room as policy allows) if it sleeps; with `wake` False (default:
        $SLEEPD_WAKE_ON_REQUEST, on unless 0), waiting up to `timeout` seconds (0:
        the daemon's limit) for someone else to wake it. Call it before serving a
        request instead of touching memory that may be unmapped."""
        return _rpc(self._stub.EnsureAwake, ensure_awake_request(self.model, evict, wake, timeout))

    def touch(self) -> None:
        """Marks the model as in use: eviction and idle sleep take the least recently active first."""
        _rpc(self._stub.Touch, pb.TouchRequest(session_id=self._session_id))

    def set_policy(self, priority: int | None = None, pinned: bool | None = None,
                   eviction_level: int | None = None, idle_seconds: float | None = None) -> pb.ModelPolicy:
        """Changes this model's eviction policy; unset arguments keep their value."""
        fields = {"priority": priority, "pinned": pinned, "eviction_level": eviction_level,
                  "idle_seconds": idle_seconds}
        request = pb.PolicyRequest(model=self.model, **{k: v for k, v in fields.items() if v is not None})
        return _rpc(self._stub.SetPolicy, request)

    def is_sleeping(self) -> bool:
        return self.status().sleeping

    def status(self) -> pb.ModelStatus:
        return _rpc(self._stub.Status, pb.StatusRequest(model=self.model)).models[0]

    def close(self) -> None:
        """Ends the lease: the daemon reclaims every region; local reservations go too."""
        if self._closed:
            return
        self._closed = True
        # Say goodbye and half-close; the daemon reclaims and ends the stream.
        self._outgoing.put(pb.EngineMessage(detach=pb.Detach()))
        self._outgoing.put(None)
        self._thread.join(timeout=5)
        if self._thread.is_alive():
            self._stream.cancel()
            self._thread.join(timeout=5)
        with self._regions_changed:
            self._collect_refills()
            regions, self._regions = list(self._regions.values()), {}
        for region in regions:
            self._release_address(region)
        self._handles.close()
        self._channel.close()

    # ---- the daemon's commands ----

    def _serve_commands(self) -> None:
        while True:
            try:
                for command in self._stream:
                    kind = command.WhichOneof("kind")  # quiesce, unmap, remap or resume: handled by _<kind>
                    try:
                        getattr(self, f"_{kind}")(getattr(command, kind))
                        ack = pb.Ack(op_id=command.op_id, ok=True)
                    except Exception as error:  # reported to the daemon, which rolls the model back
                        log.exception("sleepd %s command failed", kind)
                        ack = pb.Ack(op_id=command.op_id, ok=False, error=f"{type(error).__name__}: {error}")
                    self._outgoing.put(pb.EngineMessage(ack=ack))
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
        deadline = time.monotonic() + self.reconnect_seconds
        why = ""
        while not self._closed and time.monotonic() < deadline:
            try:
                opened = self._open_session()
            except (SleepdError, grpc.RpcError, OSError) as error:
                why = str(error)
                time.sleep(0.2)
                continue
            old_channel, old_handles = self._channel, self._handles
            self._channel, self._handles, self._stub, self._outgoing, self._stream, attached = opened
            self._session_id = attached.session_id
            old_handles.close()  # refills in flight on it fail, and torch reports out of memory
            old_channel.close()
            try:
                self._adopt(attached)
            except Exception as error:  # a step the new daemon refused or never answered
                log.error("%s rank %d attached again but could not hand its memory back (%s: %s); carrying on "
                          "without sleepd: its regions stay as they are here and will not sleep",
                          self.model, self.rank, type(error).__name__, error)
                self._handles.close()  # ends the session: the daemon stops waiting for this rank
                self._channel.close()
                return False
            with self._regions_changed:  # refills go to the new daemon once it has our memory back
                for pool in self._pools.values():
                    pool.refill.use_channel(self._handles.channel)
            log.info("%s rank %d attached again%s", self.model, self.rank,
                     " and handed its memory back" if attached.resuming else "")
            return True
        if not self._closed:
            log.error("%s rank %d could not attach again within %g s (last: %s); carrying on without sleepd",
                      self.model, self.rank, self.reconnect_seconds, why)
        return False

    def _quiesce(self, command: pb.Quiesce) -> None:
        for hook in self._sleep_hooks:
            hook()
        # The mover copies our memory once we ack: kernels still writing it must have finished.
        self._backend.synchronize()

    def _unmap(self, command: pb.Unmap) -> None:
        # Idempotent: a rollback may name regions this client never got to map.
        new_states = {change.region_id: _STATES[change.state] for change in command.regions}
        named = self._regions_named(list(new_states))
        mapped = [region for region in named if region.state is State.MAPPED]
        done, error = self._backend.unmap_all([(r.address, r.mapped_size, r.handle) for r in mapped])
        for region in mapped[:done]:
            region.handle = None
        for region in named:
            if region.handle is None:
                region.state = new_states[region.id]
        if error:
            raise RuntimeError(f"unmapping region {mapped[done].id}: {error}")

    def _remap(self, command: pb.Remap) -> None:
        # Idempotent: a rollback may name regions that never went away.
        regions = [r for r in self._regions_named(command.region_ids) if r.state is not State.MAPPED]
        # A batch at a time, so that the descriptors open at once stay few.
        for start in range(0, len(regions), FETCH_BATCH):
            batch = regions[start:start + FETCH_BATCH]
            shared = [each for each, _ in self._fetch([region.id for region in batch])]
            # All or none; every fd is closed either way.
            handles = self._backend.map_all([(each, r.address, r.mapped_size) for each, r in zip(shared, batch)],
                                            self.device)
            for region, handle in zip(batch, handles):
                region.handle = handle
                region.state = State.MAPPED

    def _tags_awake(self, command: pb.TagsAwake) -> None:
        for tag in command.tags:
            if all(r.state is State.MAPPED for r in self.regions() if r.tag == tag):
                for hook in self._tag_wake_hooks.get(tag, []):
                    hook()

    def _resume(self, command: pb.Resume) -> None:
        for hook in self._wake_hooks:
            hook()

    def _fetch(self, region_ids: list[int]) -> list[tuple[int, int]]:
        """For each region: what shares its memory (a descriptor, or on ACL a token this
        process has been authorised to import) and its mapped size."""
        if self._backend.shares_tokens:
            return self._handles.fetch_tokens(region_ids, self._backend.device_pid())
        return self._handles.fetch(region_ids)

    def _map(self, shared: int, address: int, size: int) -> int:
        """Imports the memory (from a token, or a descriptor it closes) and maps it. The
        imported handle is kept while mapped (released on unmap): after a daemon restart
        it is what this process hands back."""
        if self._backend.shares_tokens:
            handle = self._backend.import_token(shared, self.device, size)
        else:
            try:
                handle = self._backend.import_handle(shared, self.device, size)
            finally:
                os.close(shared)
        try:
            self._backend.map(address, size, handle, self.device)
        except BaseException:
            self._backend.release(handle)
            raise
        return handle

    def _take_over(self, info: pb.Region) -> None:
        """Adopts a persistent region an earlier process of this rank left: a new
        address here, mapped now if the region is awake."""
        address = self._backend.reserve(info.mapped_size)
        region = Region(self._backend, info.id, info.tag, info.size, info.mapped_size, self.device, address,
                        info.persist)
        if info.state == pb.MAPPED:
            ((shared, _),) = self._fetch([info.id])
            region.handle = self._map(shared, address, info.mapped_size)
        else:
            region.state = _STATES[info.state]
        self._regions[region.id] = region

    def _release_address(self, region: Region) -> None:
        """Drops the mapping (a GPU refuses to free a reservation that is still mapped) and the reservation."""
        if region.state is State.MAPPED:
            self._unmap_region(region)
        self._backend.free_reservation(region.address, region.mapped_size)
        region.state = State.FREED

    def _unmap_region(self, region: Region) -> None:
        """Back to a bare reservation, and this process's last reference to the memory gone."""
        self._backend.unmap(region.address, region.mapped_size)
        self._backend.release(region.handle)
        region.handle = None

    def _regions_named(self, region_ids) -> list[Region]:
        """The regions of these ids, waiting for an allocation in flight to record its region;
        those a refill could not map here are left out (there is nothing here to change)."""
        with self._regions_changed:
            while True:
                refilling = self._collect_refills()
                region_ids = [i for i in region_ids if i not in self._unmapped]
                if all(i in self._regions for i in region_ids) or not (self._allocating or refilling):
                    break
                # alloc() notifies when it has recorded its region; a refill in C++ cannot, so it is polled.
                self._regions_changed.wait(0.005 if refilling else None)
            missing = [i for i in region_ids if i not in self._regions]
            if missing:
                raise KeyError(f"regions {missing} are not this client's")
            return [self._regions[i] for i in region_ids]
