"""A region of daemon-owned memory as an engine sees it: a stable address,
mapped while the model is awake and a bare reservation while it sleeps."""

from enum import Enum

from sleepd import _C


class State(str, Enum):
    MAPPED = "mapped"
    OFFLOADED = "offloaded"
    DISCARDED = "discarded"
    FREED = "freed"


class Region:
    """Memory at `address` for the region's whole life; touching it while the
    model sleeps faults, exactly as device memory would."""

    def __init__(self, region_id: int, tag: str, size: int, mapped_size: int, device: int, address: int):
        self.id = region_id
        self.tag = tag
        self.size = size
        self.mapped_size = mapped_size
        self.device = device
        self.address = address
        self.state = State.MAPPED

    def __repr__(self) -> str:
        return f"Region(id={self.id}, tag={self.tag!r}, size={self.size}, address={self.address:#x}, state={self.state.value})"

    @property
    def memoryview(self) -> memoryview:
        """The region's bytes, without a copy. Valid only while the region is mapped."""
        self._check_mapped()
        return _C.memoryview(self.address, self.size)

    def tensor(self, dtype, shape, offset: int = 0):
        """A torch tensor over the region's memory at `offset`: a view, no copy."""
        import torch

        self._check_mapped()
        shape = tuple(shape) if isinstance(shape, (tuple, list, torch.Size)) else (shape,)
        count = 1
        for dim in shape:
            count *= dim
        nbytes = count * torch.empty((), dtype=dtype).element_size()
        if offset < 0 or offset + nbytes > self.size:
            raise ValueError(f"a {dtype} tensor of shape {shape} at offset {offset} needs {offset + nbytes} bytes; "
                             f"region {self.id} has {self.size}")
        if count == 0:
            return torch.empty(shape, dtype=dtype)
        buffer = _C.memoryview(self.address + offset, nbytes)
        return torch.frombuffer(buffer, dtype=dtype, count=count).view(shape)

    def _check_mapped(self) -> None:
        if self.state is not State.MAPPED:
            raise RuntimeError(f"region {self.id} ({self.tag}) is {self.state.value}; wake the model first")
