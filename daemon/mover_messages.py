"""The messages between the daemon and a device's mover (both ends in
daemon/mover.py): one dataclass each, and the one function that decodes and
checks it. A frame that fails its check raises wire.ProtocolError: the mover
reports it as a failed request, the daemon treats the mover as broken.
"""

from dataclasses import dataclass
from typing import ClassVar

from sleepd.common import wire

from .pool import Piece

OFFLOAD, RESTORE, ZERO = "offload", "restore", "zero"


def _integer(frame: dict, key: str, what: str) -> int:
    value = frame.get(key)
    if type(value) is not int or value < 0:
        raise wire.ProtocolError(f"{what} needs a non-negative integer {key}")
    return value


def _descriptors(what: str, fds: list[int], count: int) -> list[int]:
    if len(fds) != count:
        raise wire.ProtocolError(f"{what} needs {count} descriptors, got {len(fds)}")
    return fds


# ---- requests, daemon to mover ----

@dataclass(frozen=True)
class AddSlab:
    """A host pool slab, for the mover to map (and pin) once and keep."""
    OP: ClassVar[str] = "add_slab"
    slab: int
    size: int
    populate: bool  # build its page tables now, so that the first copy runs at full speed
    fd: int

    def encode(self) -> tuple[dict, list[int]]:
        return {"op": self.OP, "slab": self.slab, "size": self.size, "populate": self.populate}, [self.fd]

    @classmethod
    def decode(cls, frame: dict, fds: list[int]) -> "AddSlab":
        populate = frame.get("populate")
        if not isinstance(populate, bool):
            raise wire.ProtocolError("add_slab needs a boolean populate")
        return cls(_integer(frame, "slab", cls.OP), _integer(frame, "size", cls.OP), populate,
                   _descriptors(cls.OP, fds, 1)[0])


def _piece(value) -> Piece:
    if not (isinstance(value, list) and len(value) == 3 and all(type(n) is int and n >= 0 for n in value)):
        raise wire.ProtocolError(f"a backup piece is [slab, offset, length], not {value!r}"[:200])
    return Piece(*value)


@dataclass(frozen=True)
class RegionCopy:
    """One region's part of a Copy: its descriptor travels in the Copy's message."""
    direction: str  # OFFLOAD, RESTORE or ZERO
    size: int
    pieces: tuple[Piece, ...]  # of the host pool, in order, covering `size` bytes; none for ZERO
    fd: int  # the region's device memory

    @classmethod
    def decode(cls, value, fd: int) -> "RegionCopy":
        if not isinstance(value, dict) or value.get("direction") not in (OFFLOAD, RESTORE, ZERO):
            raise wire.ProtocolError(f"a region's copy needs a direction: {OFFLOAD}, {RESTORE} or {ZERO}")
        pieces = value.get("pieces")
        if not isinstance(pieces, list):
            raise wire.ProtocolError("a region's copy needs a list of pieces")
        return cls(value["direction"], _integer(value, "size", "a region's copy"),
                   tuple(_piece(piece) for piece in pieces), fd)


@dataclass(frozen=True)
class Copy:
    OP: ClassVar[str] = "copy"
    regions: tuple[RegionCopy, ...]

    def encode(self) -> tuple[dict, list[int]]:
        regions = [{"direction": r.direction, "size": r.size,
                    "pieces": [[p.slab, p.offset, p.length] for p in r.pieces]} for r in self.regions]
        return {"op": self.OP, "regions": regions}, [r.fd for r in self.regions]

    @classmethod
    def decode(cls, frame: dict, fds: list[int]) -> "Copy":
        regions = frame.get("regions")
        if not isinstance(regions, list):
            raise wire.ProtocolError("copy needs a list of regions")
        _descriptors(cls.OP, fds, len(regions))
        return cls(tuple(RegionCopy.decode(region, fd) for region, fd in zip(regions, fds)))


Request = AddSlab | Copy
_REQUESTS = {kind.OP: kind for kind in (AddSlab, Copy)}


def decode_request(frame: dict, fds: list[int]) -> Request:
    return wire.decode_by_op(frame, fds, _REQUESTS)


# ---- replies, mover to daemon ----

@dataclass(frozen=True)
class Done:
    seconds: float  # how long the mover took

    def encode(self) -> tuple[dict, list[int]]:
        return {"ok": True, "seconds": self.seconds}, []

    @classmethod
    def decode(cls, frame: dict) -> "Done":
        seconds = frame.get("seconds")
        if type(seconds) not in (int, float):
            raise wire.ProtocolError("a mover's done needs its seconds")
        return cls(seconds)


@dataclass(frozen=True)
class Failed:
    error: str  # what the driver or the mover said
    context_lost: bool = False  # the device's context broke for good: the mover exits after this reply

    def encode(self) -> tuple[dict, list[int]]:
        return {"ok": False, "error": self.error, "context_lost": self.context_lost}, []

    @classmethod
    def decode(cls, frame: dict) -> "Failed":
        if not isinstance(frame.get("error"), str):
            raise wire.ProtocolError("a mover's failure needs its error")
        if not isinstance(frame.get("context_lost"), bool):
            raise wire.ProtocolError("a mover's failure needs a boolean context_lost")
        return cls(frame["error"], frame["context_lost"])


def decode_reply(frame: dict, fds: list[int]) -> Done | Failed:
    if fds:
        raise wire.ProtocolError(f"a mover's reply carries no descriptors, got {len(fds)}")
    if frame.get("ok") is True:
        return Done.decode(frame)
    if frame.get("ok") is False:
        return Failed.decode(frame)
    raise wire.ProtocolError("a mover's reply needs ok: true or false")
