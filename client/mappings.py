"""The regions an engine process maps: the record of them, and the only code that maps,
unmaps and releases their memory here, whether SleepClient asks (alloc, free, close) or
the daemon commands it (unmap, remap, and after a restart, taking the memory back)."""

import contextlib
import logging
import os
import threading

from sleepd.common.fd_messages import FETCH_BATCH
from sleepd.proto import sleepd_pb2 as pb

from .errors import SleepdError
from .native_pool import NativePool
from .region import Region, State

log = logging.getLogger(__name__)

_STATES = {pb.OFFLOADED: State.OFFLOADED, pb.DISCARDED: State.DISCARDED}


class Mappings:
    def __init__(self, backend, device: int):
        self.backend, self.device = backend, device
        self._regions: dict[int, Region] = {}
        # Guards everything below. Allocations in flight are counted, so that a command
        # naming a region the daemon has just created waits for it to be registered.
        self._changed = threading.Condition()
        self._allocating = 0
        # By tag, alive as long as the client: every allocation in them needs them.
        self._pools: dict[str, NativePool] = {}
        # Regions the daemon allocated for a refill that this process could not map, and their tags:
        # commands that name them are answered for the rest.
        self._unmapped: dict[int, str] = {}
        self._said_read_write = False  # the device refused a read-only mapping, and we said so

    # ---- what SleepClient asks ----

    @contextlib.contextmanager
    def allocating(self):
        """Around an allocation: commands that name a region wait until it is recorded (or failed)."""
        with self._changed:
            self._allocating += 1
        try:
            yield
        finally:
            with self._changed:
                self._allocating -= 1
                self._changed.notify_all()

    def map_new(self, fd_socket, info: pb.Region) -> Region:
        """Maps a region the daemon has just allocated (or a view of a weight set just joined, read-only),
        at a new address, and records it."""
        ((shared, mapped_size),) = self.fetch(fd_socket, [info.id])
        address = self.backend.reserve(mapped_size)
        try:
            handle = self._map(shared, address, mapped_size, bool(info.weight_set))
        except BaseException:
            self.backend.free_reservation(address, mapped_size)
            raise
        region = Region(self.backend, info.id, info.tag, info.size, mapped_size, self.device, address, info.persist,
                        info.weight_set)
        region.handle = handle
        with self._changed:
            self._regions[region.id] = region
        return region

    def map_anew(self, fd_socket, regions: list[Region], weight_set: str) -> None:
        """After a commit (`weight_set`: the set's id) or the write step (""): the regions' memory, or
        only its protection, changed in the daemon; each is mapped again at its address, read-only
        while it is a weight set's."""
        for region in regions:
            ((shared, _),) = self.fetch(fd_socket, [region.id])
            self._unmap_region(region)
            region.state = State.OFFLOADED  # a bare reservation, until mapped below
            region.handle = self._map(shared, region.address, region.mapped_size, bool(weight_set))
            region.weight_set = weight_set
            region.state = State.MAPPED

    def free(self, region: Region) -> None:
        """Forgets the region, and unmaps and releases its address."""
        with self._changed:
            if self._regions.pop(region.id, None) is None:
                raise ValueError(f"region {region.id} is not one of this client's regions")
        self._release_address(region)

    def free_all(self) -> None:
        with self._changed:
            self._collect_refills()
            regions, self._regions = list(self._regions.values()), {}
        for region in regions:
            self._release_address(region)

    def regions(self) -> list[Region]:
        with self._changed:
            self._collect_refills()
            return sorted(self._regions.values(), key=lambda region: region.id)

    def native_pool(self, fd_socket, tag: str, chunk_bytes: int, busy_seconds: float) -> NativePool:
        """The tag's pool, made at its first use."""
        with self._changed:
            if tag not in self._pools:
                self._pools[tag] = NativePool(fd_socket, self.backend, self.device, tag, chunk_bytes, busy_seconds)
            return self._pools[tag]

    def unmapped(self, pool: NativePool) -> list[int]:
        """The regions the daemon allocated for the pool's refills that this process could not map
        (the allocation returned NULL, and torch said out of memory); the others are recorded."""
        with self._changed:
            self._collect_refills()
            return [region_id for region_id, tag in self._unmapped.items() if tag == pool.tag]

    def forget_unmapped(self, region_id: int) -> None:
        with self._changed:
            del self._unmapped[region_id]

    def pooled_bytes(self) -> int:
        """What the torch pools hold, every tag together."""
        with self._changed:
            return sum(pool.bytes_in_use for pool in self._pools.values())

    def use_fd_socket(self, fd_socket) -> None:
        """After attaching again: refills go to the new daemon, once it has our memory back."""
        with self._changed:
            for pool in self._pools.values():
                pool.refill.use_channel(fd_socket.channel)

    # ---- what the daemon commands ----

    def unmap(self, command: pb.Unmap) -> None:
        # Idempotent: a rollback may name regions this client never got to map.
        new_states = {change.region_id: _STATES[change.state] for change in command.regions}
        named = self._named(list(new_states))
        mapped = [region for region in named if region.state is State.MAPPED]
        done, error = self.backend.unmap_all([(r.address, r.mapped_size, r.handle) for r in mapped])
        for region in mapped[:done]:
            region.handle = None
        for region in named:
            if region.handle is None:
                region.state = new_states[region.id]
                if region.state is State.DISCARDED:  # a view discarded left its weight set: it wakes as our own
                    region.weight_set = ""
        if error:
            raise RuntimeError(f"unmapping region {mapped[done].id}: {error}")

    def remap(self, fd_socket, command: pb.Remap) -> None:
        # Idempotent: a rollback may name regions that never went away.
        regions = [r for r in self._named(command.region_ids) if r.state is not State.MAPPED]
        for read_only in (False, True):  # a weight set's views, read-only, in batches of their own
            self._remap_batches(fd_socket, [r for r in regions if r.read_only is read_only], read_only)

    def _remap_batches(self, fd_socket, regions: list[Region], read_only: bool) -> None:
        # A batch at a time, so that the descriptors open at once stay few.
        for start in range(0, len(regions), FETCH_BATCH):
            batch = regions[start:start + FETCH_BATCH]
            shared = [each for each, _ in self.fetch(fd_socket, [region.id for region in batch])]
            # All or none; every fd is closed either way.
            imported = self.backend.map_all([(each, r.address, r.mapped_size) for each, r in zip(shared, batch)],
                                            self.device, read_only)
            for region, handle in zip(batch, imported):
                region.handle = handle
                region.state = State.MAPPED

    def take_back(self, fd_socket, attached: pb.Attached) -> None:
        """Takes the regions the daemon hands this rank when it attaches: persistent ones an earlier
        process left, or, after a daemon restart, our own, whose memory we hand back."""
        with self._changed:
            while self._collect_refills():  # a refill mapping now: its region is ours to hand back too
                self._changed.wait(0.005)
        for info in attached.regions:
            region = self._regions.get(info.id)
            if region is None:
                try:
                    self._take_over(fd_socket, info)
                except SleepdError as error:  # its memory died with an engine while the daemon was down
                    log.warning("region %d (%s) cannot be taken back: %s", info.id, info.tag, error.message)
            elif region.state is State.MAPPED and self.backend.shares_tokens:
                self._move_to_new_memory(fd_socket, region)
            elif region.state is State.MAPPED:
                fd = self.backend.export_handle(region.handle)
                try:
                    fd_socket.hand_back(region.id, fd)
                finally:
                    os.close(fd)
        if attached.resuming:
            fd_socket.handed_back()
            known = {info.id for info in attached.regions}
            for region in self.regions():
                if region.id not in known:
                    log.warning("region %d (%s) is unknown to the restarted daemon: it stays mapped here "
                                "but will not sleep", region.id, region.tag)

    # ---- how ----

    def fetch(self, fd_socket, region_ids: list[int]) -> list[tuple[int, int]]:
        """For each region: what shares its memory (a descriptor, or on ACL a token this
        process has been authorised to import) and its mapped size."""
        if self.backend.shares_tokens:
            return fd_socket.fetch_tokens(region_ids, self.backend.device_pid())
        return fd_socket.fetch(region_ids)

    def _map(self, shared: int, address: int, size: int, read_only: bool = False) -> int:
        """Imports the memory (from a token, or a descriptor it closes) and maps it, read-only where
        asked (a weight set's). The imported handle is kept while mapped (released on unmap): after a
        daemon restart it is what this process hands back."""
        if self.backend.shares_tokens:
            handle = self.backend.import_token(shared, self.device, size)
        else:
            try:
                handle = self.backend.import_handle(shared, self.device, size)
            finally:
                os.close(shared)
        try:
            if not read_only:
                self.backend.map(address, size, handle, self.device)
            elif not self.backend.map_read_only(address, size, handle, self.device) and not self._said_read_write:
                self._said_read_write = True
                log.warning("%s refused a read-only mapping: this engine maps its weight sets read-write, so a stray "
                            "write would change the weights of every engine that joined them", self.backend.name)
        except BaseException:
            self.backend.release(handle)
            raise
        return handle

    def _take_over(self, fd_socket, info: pb.Region) -> None:
        """Adopts a persistent region an earlier process of this rank left: a new
        address here, mapped now if the region is awake."""
        address = self.backend.reserve(info.mapped_size)
        region = Region(self.backend, info.id, info.tag, info.size, info.mapped_size, self.device, address,
                        info.persist, info.weight_set)
        if info.state == pb.MAPPED:
            ((shared, _),) = self.fetch(fd_socket, [info.id])
            region.handle = self._map(shared, address, info.mapped_size, bool(info.weight_set))
        else:
            region.state = _STATES[info.state]
        self._regions[region.id] = region

    def _move_to_new_memory(self, fd_socket, region: Region) -> None:
        """After a daemon restart on ACL, where an imported handle cannot be exported again:
        copies the region into new memory the daemon made, and maps that at the same address."""
        token, size = fd_socket.replace(region.id, self.backend.device_pid())
        handle = self.backend.import_token(token, self.device, size)
        staging = self.backend.reserve(size)
        try:
            self.backend.map(staging, size, handle, self.device)
            try:
                self.backend.copy(staging, region.address, size)
            finally:
                self.backend.unmap(staging, size)  # waits for the copy
        except BaseException:
            self.backend.release(handle)
            raise
        finally:
            self.backend.free_reservation(staging, size)
        self._unmap_region(region)
        self.backend.map(region.address, size, handle, self.device)
        region.handle = handle

    def _release_address(self, region: Region) -> None:
        """Drops the mapping (a GPU refuses to free a reservation that is still mapped) and the reservation."""
        if region.state is State.MAPPED:
            self._unmap_region(region)
        self.backend.free_reservation(region.address, region.mapped_size)
        region.state = State.FREED

    def _unmap_region(self, region: Region) -> None:
        """Back to a bare reservation, and this process's last reference to the memory gone."""
        self.backend.unmap(region.address, region.mapped_size)
        self.backend.release(region.handle)
        region.handle = None

    def _collect_refills(self) -> bool:
        """Records the regions torch pools' refills mapped since the last call (the caller
        holds _changed); True while a refill is on its way, which may bring more."""
        refilling = False
        for pool in self._pools.values():
            refilling |= pool.refill.busy  # read first: a refill that lands after this is counted busy
            for region_id, size, mapped_size, address, handle in pool.refill.take_landed():
                region = Region(self.backend, region_id, pool.tag, size, mapped_size, self.device, address)
                region.handle = handle
                self._regions[region_id] = region
            for region_id in pool.refill.take_unmapped():
                self._unmapped[region_id] = pool.tag
        return refilling

    def _named(self, region_ids) -> list[Region]:
        """The regions of these ids, waiting for an allocation in flight to record its region;
        those a refill could not map here are left out (there is nothing here to change)."""
        with self._changed:
            while True:
                refilling = self._collect_refills()
                region_ids = [i for i in region_ids if i not in self._unmapped]
                if all(i in self._regions for i in region_ids) or not (self._allocating or refilling):
                    break
                # alloc() notifies when it has recorded its region; a refill in C++ cannot, so it is polled.
                self._changed.wait(0.005 if refilling else None)
            missing = [i for i in region_ids if i not in self._regions]
            if missing:
                raise KeyError(f"regions {missing} are not this client's")
            return [self._regions[i] for i in region_ids]
