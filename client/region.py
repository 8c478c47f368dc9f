"""A region of daemon-owned memory as an engine sees it: a stable address,
mapped while the model is awake and a bare reservation while it sleeps."""

from enum import Enum

from sleepd import _C


class State(str, Enum):
    MAPPED = "mapped"
    OFFLOADED = "offloaded"
    DISCARDED = "discarded"
    FREED = "freed"


class _DeviceBytes:
    """Exposes device memory to torch through the CUDA array interface."""

    def __init__(self, address: int, nbytes: int):
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (address, False),
                                         "version": 3, "strides": None}


class Region:
    """Memory at `address` for the region's whole life; touching it while the
    model sleeps faults, exactly as device memory would."""

    def __init__(self, backend, region_id: int, tag: str, size: int, mapped_size: int, device: int, address: int,
                 persist: bool = False, weight_set: str = ""):
        self._backend = backend
        self.id = region_id
        self.tag = tag
        self.size = size
        self.mapped_size = mapped_size
        self.device = device
        self.address = address
        self.persist = persist  # outlives this process (SleepClient.alloc(persist=True))
        # A view of this weight set's memory, mapped read-only; "" once the region is memory of its own.
        self.weight_set = weight_set
        self.state = State.MAPPED
        self.handle: int | None = None  # the imported handle behind the mapping, while mapped

    def __repr__(self) -> str:
        return (f"Region(id={self.id}, tag={self.tag!r}, size={self.size}, address={self.address:#x}, "
                f"state={self.state.value})")

    @property
    def on_host(self) -> bool:
        return self._backend.name == "host"

    @property
    def memoryview(self) -> memoryview:
        """The region's bytes, without a copy (host backend only; use read/write on a GPU)."""
        self._check_mapped()
        if not self.on_host:
            raise TypeError(f"region {self.id} is device memory; use read() and write(), or tensor()")
        return _C.memoryview(self.address, self.size, readonly=self.read_only)

    def read(self, offset: int = 0, size: int | None = None) -> bytes:
        """A copy of the region's bytes, on any backend."""
        size = self.size - offset if size is None else size
        self._check_range(offset, size)
        return self._backend.read(self.address + offset, size)

    @property
    def read_only(self) -> bool:
        """A weight set's memory, shared with other engines: writing it faults. Leave the set first
        (SleepClient.leave_weights) to write."""
        return bool(self.weight_set)

    def write(self, data, offset: int = 0) -> None:
        """Copies a bytes-like object into the region, on any backend."""
        if self.read_only:
            raise PermissionError(f"region {self.id} ({self.tag}) is weight set {self.weight_set}'s memory, "
                                  "read-only; leave the set first (SleepClient.leave_weights)")
        self._check_range(offset, memoryview(data).nbytes)
        self._backend.write(self.address + offset, data)

    def tensor(self, dtype, shape, offset: int = 0):
        """A torch tensor over the region's memory at `offset`: a view, no copy.
        On the host backend it is a CPU tensor, on a GPU a CUDA tensor."""
        import torch

        if self._backend.name == "acl":  # torch_npu takes no array-interface views; nothing here could test one
            raise TypeError(f"region {self.id} is NPU memory: tensor() is not supported there yet; use read() and "
                            "write(), or pool() with torch_npu")
        shape = tuple(shape) if isinstance(shape, (tuple, list, torch.Size)) else (shape,)
        count = 1
        for dim in shape:
            count *= dim
        nbytes = count * torch.empty((), dtype=dtype).element_size()
        self._check_range(offset, nbytes)
        if count == 0:
            return torch.empty(shape, dtype=dtype, device="cpu" if self.on_host else f"cuda:{self.device}")
        if self.on_host:
            raw = torch.frombuffer(_C.memoryview(self.address + offset, nbytes), dtype=torch.uint8)
        else:
            raw = torch.as_tensor(_DeviceBytes(self.address + offset, nbytes), device=f"cuda:{self.device}")
        return raw.view(dtype).view(shape)

    def _check_range(self, offset: int, nbytes: int) -> None:
        self._check_mapped()
        if offset < 0 or nbytes < 0 or offset + nbytes > self.size:
            raise ValueError(f"{nbytes} bytes at offset {offset} do not fit region {self.id} of {self.size} bytes")

    def _check_mapped(self) -> None:
        if self.state is not State.MAPPED:
            raise RuntimeError(f"region {self.id} ({self.tag}) is {self.state.value}; wake the model first")
