"""The one exception the daemon raises for a refused request, carrying the gRPC
status a caller would branch on and a one-line message."""

import grpc


class SleepdError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(message: str) -> SleepdError:
    return SleepdError(grpc.StatusCode.INVALID_ARGUMENT, message)


def not_found(message: str) -> SleepdError:
    return SleepdError(grpc.StatusCode.NOT_FOUND, message)


def exhausted(message: str) -> SleepdError:
    return SleepdError(grpc.StatusCode.RESOURCE_EXHAUSTED, message)


def precondition(message: str) -> SleepdError:
    return SleepdError(grpc.StatusCode.FAILED_PRECONDITION, message)


def denied(message: str) -> SleepdError:
    return SleepdError(grpc.StatusCode.PERMISSION_DENIED, message)


def unavailable(message: str) -> SleepdError:
    return SleepdError(grpc.StatusCode.UNAVAILABLE, message)


def aborted(message: str) -> SleepdError:
    """A conflict with an operation in progress: the caller may try again."""
    return SleepdError(grpc.StatusCode.ABORTED, message)
