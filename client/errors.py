"""The client's one error type: what the daemon refused, and why."""

import contextlib

import grpc


class SleepdError(Exception):
    """A request the daemon refused. `code` is the grpc.StatusCode it answered with."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(f"{message} [{code.name}]")
        self.code = code
        self.message = message

    @classmethod
    def from_rpc(cls, error: grpc.RpcError) -> "SleepdError":
        return cls(error.code(), error.details() or str(error))


@contextlib.contextmanager
def as_sleepd_error():
    """Inside it, a gRPC call the daemon refuses raises SleepdError, the client's one error type."""
    try:
        yield
    except grpc.RpcError as error:
        raise SleepdError.from_rpc(error) from None
