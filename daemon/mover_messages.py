"""The messages between the daemon and a device's mover (both ends in
daemon/mover.py): one dataclass each, and the one function that decodes and
checks it. A frame that fails its check raises wire.ProtocolError: the mover
reports it as a failed request, the daemon treats the mover as broken.
"""

from dataclasses import dataclass
from typing import ClassVar

from sleepd.common import wire

from .pool import Piece, checksums_text, parse_checksums

OFFLOAD, RESTORE, ZERO = "offload", "restore", "zero"


def _integer(frame: dict, key: str, what: str) -> int:
    value = frame.get(key)
    if type(value) is not int or value < 0:
        raise wire.ProtocolError(f"{what} needs a non-negative integer {key}")
    return value


def _checksums(text, what: str) -> tuple[int, ...]:
    try:
        return parse_checksums(text)
    except ValueError as error:
        raise wire.ProtocolError(f"{what}: {error}") from None


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
class Identify:
    """On a token backend: the id the runtime knows the mover by, for the daemon to authorise (Identified)."""
    OP: ClassVar[str] = "identify"

    def encode(self) -> tuple[dict, list[int]]:
        return {"op": self.OP}, []

    @classmethod
    def decode(cls, frame: dict, fds: list[int]) -> "Identify":
        _descriptors(cls.OP, fds, 0)
        return cls()


@dataclass(frozen=True)
class RegionCopy:
    """One region's part of a Copy: its descriptor travels in the Copy's message, or
    its token (a token backend) in the region's own entry."""
    direction: str  # OFFLOAD, RESTORE or ZERO
    size: int
    pieces: tuple[Piece, ...]  # of the host pool, in order, covering `size` bytes; none for ZERO
    fd: int = -1  # the region's device memory
    token: int = 0  # or its token
    # RESTORE: the checksums the offload took (pool.Backup), for the copy to check; none for a
    # backup recorded before checksums, copied unchecked.
    checksums: tuple[int, ...] = ()

    def encode(self) -> dict:
        entry = {"direction": self.direction, "size": self.size,
                 "pieces": [[p.slab, p.offset, p.length] for p in self.pieces]}
        if self.token:
            entry["token"] = self.token
        if self.checksums:
            entry["checksums"] = checksums_text(self.checksums)
        return entry

    @classmethod
    def decode(cls, value, fds: list[int]) -> "RegionCopy":
        """Takes the region's descriptor from the front of `fds`, unless it comes with a token."""
        if not isinstance(value, dict) or value.get("direction") not in (OFFLOAD, RESTORE, ZERO):
            raise wire.ProtocolError(f"a region's copy needs a direction: {OFFLOAD}, {RESTORE} or {ZERO}")
        pieces = value.get("pieces")
        if not isinstance(pieces, list):
            raise wire.ProtocolError("a region's copy needs a list of pieces")
        size = _integer(value, "size", "a region's copy")
        pieces = tuple(_piece(piece) for piece in pieces)
        checksums = _checksums(value.get("checksums", ""), "a region's copy")
        if "token" in value:
            return cls(value["direction"], size, pieces, token=_integer(value, "token", "a region's copy"),
                       checksums=checksums)
        return cls(value["direction"], size, pieces, fd=fds.pop(0), checksums=checksums)


@dataclass(frozen=True)
class Copy:
    OP: ClassVar[str] = "copy"
    regions: tuple[RegionCopy, ...]

    def encode(self) -> tuple[dict, list[int]]:
        return ({"op": self.OP, "regions": [region.encode() for region in self.regions]},
                [region.fd for region in self.regions if not region.token])

    @classmethod
    def decode(cls, frame: dict, fds: list[int]) -> "Copy":
        regions = frame.get("regions")
        if not isinstance(regions, list):
            raise wire.ProtocolError("copy needs a list of regions")
        _descriptors(cls.OP, fds, sum(not (isinstance(r, dict) and "token" in r) for r in regions))
        unread = list(fds)
        return cls(tuple(RegionCopy.decode(region, unread) for region in regions))


Request = AddSlab | Identify | Copy
_REQUESTS = {kind.OP: kind for kind in (AddSlab, Identify, Copy)}


def decode_request(frame: dict, fds: list[int]) -> Request:
    return wire.decode_by_op(frame, fds, _REQUESTS)


# ---- replies, mover to daemon ----

@dataclass(frozen=True)
class Done:
    seconds: float  # how long the mover took
    # A Copy's: per region, in order, the checksums of what an offload wrote into the pool (else none).
    checksums: tuple[tuple[int, ...], ...] = ()
    checking_seconds: float = 0.0  # a restore's: time its threads spent checking checksums, added up

    def encode(self) -> tuple[dict, list[int]]:
        return {"ok": True, "seconds": self.seconds, "checksums": [checksums_text(c) for c in self.checksums],
                "checking_seconds": self.checking_seconds}, []

    @classmethod
    def decode(cls, frame: dict) -> "Done":
        seconds, checksums = frame.get("seconds"), frame.get("checksums")
        checking = frame.get("checking_seconds", 0.0)
        if type(seconds) not in (int, float) or type(checking) not in (int, float) or checking < 0:
            raise wire.ProtocolError("a mover's done needs its seconds, and checking seconds of 0 or more")
        if not isinstance(checksums, list):
            raise wire.ProtocolError("a mover's done needs a list of checksums")
        return cls(seconds, tuple(_checksums(text, "a mover's done") for text in checksums), float(checking))


@dataclass(frozen=True)
class Identified:
    device_pid: int

    def encode(self) -> tuple[dict, list[int]]:
        return {"ok": True, "device_pid": self.device_pid}, []


@dataclass(frozen=True)
class Mismatch:
    """Where a restore found a backup's bytes not matching their checksum: the region (its place
    in the Copy), and the bytes [offset, offset + length) of that region."""
    region: int
    offset: int
    length: int


@dataclass(frozen=True)
class Failed:
    error: str  # what the driver or the mover said
    context_lost: bool = False  # the device's context broke for good: the mover exits after this reply
    mismatch: Mismatch | None = None  # the copy stopped at a backup that is not as it was written

    def encode(self) -> tuple[dict, list[int]]:
        frame = {"ok": False, "error": self.error, "context_lost": self.context_lost}
        if self.mismatch:
            frame["mismatch"] = [self.mismatch.region, self.mismatch.offset, self.mismatch.length]
        return frame, []

    @classmethod
    def decode(cls, frame: dict) -> "Failed":
        if not isinstance(frame.get("error"), str):
            raise wire.ProtocolError("a mover's failure needs its error")
        if not isinstance(frame.get("context_lost"), bool):
            raise wire.ProtocolError("a mover's failure needs a boolean context_lost")
        mismatch = frame.get("mismatch")
        if mismatch is not None and not (isinstance(mismatch, list) and len(mismatch) == 3
                                         and all(type(n) is int and n >= 0 for n in mismatch)):
            raise wire.ProtocolError("a mover's mismatch is [region, offset, length]")
        return cls(frame["error"], frame["context_lost"], Mismatch(*mismatch) if mismatch else None)


def decode_reply(frame: dict, fds: list[int]) -> Done | Identified | Failed:
    if fds:
        raise wire.ProtocolError(f"a mover's reply carries no descriptors, got {len(fds)}")
    if frame.get("ok") is True and "device_pid" in frame:
        return Identified(_integer(frame, "device_pid", "identified"))
    if frame.get("ok") is True:
        return Done.decode(frame)
    if frame.get("ok") is False:
        return Failed.decode(frame)
    raise wire.ProtocolError("a mover's reply needs ok: true or false")
