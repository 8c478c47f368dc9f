"""The one exception the daemon raises for a refused request, carrying the status
a caller would branch on and a one-line message. The statuses are the domain's own
(`Code`, named as gRPC names them): the edges (service.py, the fd socket) turn
them into gRPC's, so the planner and the state modules never import gRPC."""

from enum import Enum, auto


class Code(Enum):
    INVALID_ARGUMENT = auto()
    NOT_FOUND = auto()
    ALREADY_EXISTS = auto()
    PERMISSION_DENIED = auto()
    UNAUTHENTICATED = auto()
    RESOURCE_EXHAUSTED = auto()
    FAILED_PRECONDITION = auto()
    ABORTED = auto()
    UNAVAILABLE = auto()
    DEADLINE_EXCEEDED = auto()
    DATA_LOSS = auto()


class SleepdError(Exception):
    def __init__(self, code: Code, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(message: str) -> SleepdError:
    return SleepdError(Code.INVALID_ARGUMENT, message)


def not_found(message: str) -> SleepdError:
    return SleepdError(Code.NOT_FOUND, message)


def exhausted(message: str) -> SleepdError:
    return SleepdError(Code.RESOURCE_EXHAUSTED, message)


def precondition(message: str) -> SleepdError:
    return SleepdError(Code.FAILED_PRECONDITION, message)


def denied(message: str) -> SleepdError:
    return SleepdError(Code.PERMISSION_DENIED, message)


def unavailable(message: str) -> SleepdError:
    return SleepdError(Code.UNAVAILABLE, message)


def data_loss(message: str) -> SleepdError:
    """Bytes sleepd kept are not as it wrote them (a backup that fails its checksum)."""
    return SleepdError(Code.DATA_LOSS, message)


def aborted(message: str) -> SleepdError:
    """A conflict with an operation in progress: the caller may try again."""
    return SleepdError(Code.ABORTED, message)
