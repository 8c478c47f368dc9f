"""The messages of the fd socket (daemon/fd_socket.py and client/fd_socket.py):
one dataclass each, and the one function that decodes and checks it.

Requests carry "op"; replies carry "ok". A frame that is no request at all
(an unknown op, or descriptors on a request that takes none) raises
wire.ProtocolError, and the daemon drops the connection; a known request with
bad arguments raises InvalidArguments, and the daemon refuses it and serves on.
"""

from dataclasses import dataclass
from typing import ClassVar

from sleepd.common.limits import TAG_NAME, TAG_NAME_RULE

from . import wire
from .shown import shown


class InvalidArguments(wire.ProtocolError):
    """A known request whose fields or descriptors are wrong."""


def _integer(frame: dict, key: str, what: str) -> int:
    value = frame.get(key)
    if type(value) is not int:  # JSON true is no region id
        raise InvalidArguments(f"{what} needs an integer {key}")
    return value


def _string(frame: dict, key: str, what: str) -> str:
    value = frame.get(key)
    if not isinstance(value, str):
        raise InvalidArguments(f"{what} needs a string {key}")
    return value


def _optional_device_pid(frame: dict, what: str) -> int | None:
    """The id a token backend's runtime knows the engine by, where the request names one."""
    device_pid = frame.get("device_pid")
    if device_pid is not None and (type(device_pid) is not int or device_pid <= 0):
        raise InvalidArguments(f"{what} needs a positive integer device_pid when it names one")
    return device_pid


def _with_device_pid(frame: dict, device_pid: int | None) -> tuple[dict, list[int]]:
    if device_pid is not None:
        frame["device_pid"] = device_pid
    return frame, []


def _no_descriptors(what: str, fds: list[int]) -> None:
    # Nothing sleepd sends carries a stray descriptor; one that arrives marks a broken or hostile peer.
    if fds:
        raise wire.ProtocolError(f"{what} takes no descriptors, got {len(fds)}")


def _one_descriptor(what: str, fds: list[int]) -> int:
    if len(fds) != 1:
        raise InvalidArguments(f"{what} needs exactly one descriptor, got {len(fds)}")
    return fds[0]


# ---- requests, engine to daemon ----

@dataclass(frozen=True)
class Hello:
    """The first request: the daemon answers with the session's token (Welcome)."""
    OP: ClassVar[str] = "hello"

    def encode(self) -> tuple[dict, list[int]]:
        return {"op": self.OP}, []

    @classmethod
    def decode(cls, frame: dict, fds: list[int]) -> "Hello":
        _no_descriptors(cls.OP, fds)
        return cls()


# Regions one fetch may name: a remap of a thousand regions costs a few round trips, not a thousand,
# and the descriptors of one reply stay under the kernel's limit per message (wire.MAX_FDS).
FETCH_BATCH = 250


@dataclass(frozen=True)
class Fetch:
    """Descriptors (or, on a token backend, tokens) for the memory of up to FETCH_BATCH
    regions, please (Fetched). On a token backend (ACL) the engine names the id its
    runtime knows it by (aclrtDeviceGetBareTgid), for the daemon to authorise."""
    OP: ClassVar[str] = "fetch"
    regions: tuple[int, ...]
    device_pid: int | None = None

    def encode(self) -> tuple[dict, list[int]]:
        return _with_device_pid({"op": self.OP, "regions": list(self.regions)}, self.device_pid)

    @classmethod
    def decode(cls, frame: dict, fds: list[int]) -> "Fetch":
        _no_descriptors(cls.OP, fds)
        regions = frame.get("regions")
        if not isinstance(regions, list) or not 1 <= len(regions) <= FETCH_BATCH \
                or any(type(region) is not int for region in regions):
            raise InvalidArguments(f"{cls.OP} needs a list of 1 to {FETCH_BATCH} integer regions")
        return cls(tuple(regions), _optional_device_pid(frame, cls.OP))


@dataclass(frozen=True)
class HandBack:
    """After a daemon restart: the memory of a region this engine maps (Done)."""
    OP: ClassVar[str] = "hand_back"
    region: int
    fd: int

    def encode(self) -> tuple[dict, list[int]]:
        return {"op": self.OP, "region": self.region}, [self.fd]

    @classmethod
    def decode(cls, frame: dict, fds: list[int]) -> "HandBack":
        return cls(_integer(frame, "region", cls.OP), _one_descriptor(cls.OP, fds))


@dataclass(frozen=True)
class Replace:
    """After a daemon restart, on a token backend (ACL), where an imported handle cannot be
    exported again: new memory for a region this engine maps, which the engine copies its
    bytes into and maps in place of the old (Fetched, with the new memory's token)."""
    OP: ClassVar[str] = "replace"
    region: int
    device_pid: int

    def encode(self) -> tuple[dict, list[int]]:
        return {"op": self.OP, "region": self.region, "device_pid": self.device_pid}, []

    @classmethod
    def decode(cls, frame: dict, fds: list[int]) -> "Replace":
        _no_descriptors(cls.OP, fds)
        return cls(_integer(frame, "region", cls.OP), _integer(frame, "device_pid", cls.OP))


@dataclass(frozen=True)
class HandedBack:
    """After a daemon restart: everything this engine maps has been handed back (Done)."""
    OP: ClassVar[str] = "handed_back"

    def encode(self) -> tuple[dict, list[int]]:
        return {"op": self.OP}, []

    @classmethod
    def decode(cls, frame: dict, fds: list[int]) -> "HandedBack":
        _no_descriptors(cls.OP, fds)
        return cls()


@dataclass(frozen=True)
class Allocate:
    """A new region of at least `size` bytes tagged `tag`, and its memory, in one round trip
    (Allocated). What a torch pool's refill sends from C++ (csrc/daemon_refill.cpp), inside
    torch's allocator, where the gRPC Allocate (which needs Python) could deadlock. On a
    token backend the engine names its device_pid, as for Fetch."""
    OP: ClassVar[str] = "allocate"
    size: int
    tag: str
    device_pid: int | None = None

    def encode(self) -> tuple[dict, list[int]]:
        return _with_device_pid({"op": self.OP, "tag": self.tag, "size": self.size}, self.device_pid)

    @classmethod
    def decode(cls, frame: dict, fds: list[int]) -> "Allocate":
        _no_descriptors(cls.OP, fds)
        tag = _string(frame, "tag", cls.OP)
        if not TAG_NAME.match(tag):
            raise InvalidArguments(f"{cls.OP}: tag '{shown(tag)}' is not valid; use {TAG_NAME_RULE}")
        return cls(_integer(frame, "size", cls.OP), tag, _optional_device_pid(frame, cls.OP))


Request = Hello | Fetch | HandBack | Replace | HandedBack | Allocate
_REQUESTS = {kind.OP: kind for kind in (Hello, Fetch, HandBack, Replace, HandedBack, Allocate)}
REQUEST_OPS = frozenset(_REQUESTS)


def decode_request(frame: dict, fds: list[int]) -> Request:
    return wire.decode_by_op(frame, fds, _REQUESTS)


# ---- replies, daemon to engine ----

@dataclass(frozen=True)
class Welcome:
    token: str  # what the engine's control requests carry (wire.TOKEN_METADATA)
    pid: int
    uid: int

    def encode(self) -> tuple[dict, list[int]]:
        return {"ok": True, "token": self.token, "pid": self.pid, "uid": self.uid}, []

    @classmethod
    def decode(cls, frame: dict, fds: list[int]) -> "Welcome":
        _no_descriptors("welcome", fds)
        return cls(_string(frame, "token", "welcome"), _integer(frame, "pid", "welcome"),
                   _integer(frame, "uid", "welcome"))


@dataclass(frozen=True)
class Fetched:
    """For each region fetched, in order: its mapped size (an imported handle does not tell it)
    and either a descriptor of its memory or, on a token backend, its token (sent in-band)."""
    sizes: tuple[int, ...]
    fds: tuple[int, ...] = ()
    tokens: tuple[int, ...] = ()

    def encode(self) -> tuple[dict, list[int]]:
        frame = {"ok": True, "sizes": list(self.sizes)}
        if self.tokens:
            frame["tokens"] = list(self.tokens)
        return frame, list(self.fds)

    @classmethod
    def decode(cls, frame: dict, fds: list[int]) -> "Fetched":
        sizes, tokens = frame.get("sizes"), frame.get("tokens", [])
        if not isinstance(sizes, list) or any(type(size) is not int for size in sizes) \
                or not isinstance(tokens, list) or any(type(token) is not int or token <= 0 for token in tokens):
            raise InvalidArguments("fetched needs integer sizes, and positive integer tokens if any")
        if (len(fds), len(tokens)) not in ((len(sizes), 0), (0, len(sizes))):
            raise InvalidArguments(f"fetched needs one descriptor or one token per size, got {len(sizes)} sizes, "
                                   f"{len(fds)} descriptors and {len(tokens)} tokens")
        return cls(tuple(sizes), tuple(fds), tuple(tokens))


@dataclass(frozen=True)
class Allocated:
    """The region an Allocate made: its id, size and mapped size, and its memory as one
    descriptor or, on a token backend, a token. A flat object of integers: the C++
    refill reads it without a JSON library."""
    region: int
    size: int
    mapped_size: int
    fd: int | None = None
    token: int | None = None

    def encode(self) -> tuple[dict, list[int]]:
        frame = {"ok": True, "region": self.region, "size": self.size, "mapped_size": self.mapped_size}
        if self.token is not None:
            frame["token"] = self.token
        return frame, [] if self.fd is None else [self.fd]

    @classmethod
    def decode(cls, frame: dict, fds: list[int]) -> "Allocated":
        token = frame.get("token")
        if token is not None and (type(token) is not int or token <= 0):
            raise InvalidArguments("allocated needs a positive integer token when it has one")
        if len(fds) != (token is None):
            raise InvalidArguments(f"allocated needs one descriptor or a token, got {len(fds)} descriptors")
        return cls(_integer(frame, "region", "allocated"), _integer(frame, "size", "allocated"),
                   _integer(frame, "mapped_size", "allocated"), fds[0] if fds else None, token)


@dataclass(frozen=True)
class Done:
    def encode(self) -> tuple[dict, list[int]]:
        return {"ok": True}, []

    @classmethod
    def decode(cls, frame: dict, fds: list[int]) -> "Done":
        _no_descriptors("done", fds)
        return cls()


@dataclass(frozen=True)
class Refused:
    code: str  # a grpc.StatusCode name, for the caller to branch on
    error: str  # one line

    def encode(self) -> tuple[dict, list[int]]:
        return {"ok": False, "code": self.code, "error": self.error}, []

    @classmethod
    def decode(cls, frame: dict, fds: list[int]) -> "Refused":
        _no_descriptors("refused", fds)
        return cls(_string(frame, "code", "refused"), _string(frame, "error", "refused"))


Reply = Welcome | Fetched | Allocated | Done | Refused


def decode_reply(frame: dict, fds: list[int], expected: type) -> Reply:
    """The reply `expected` or a Refused, whichever the frame holds."""
    if frame.get("ok") is False:
        return Refused.decode(frame, fds)
    if frame.get("ok") is not True:
        raise wire.ProtocolError("a reply needs ok: true or false")
    return expected.decode(frame, fds)
