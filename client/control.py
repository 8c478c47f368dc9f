"""A gRPC channel to sleepd that says who is calling.

The daemon knows a caller's uid only from the fd socket, where the kernel
reports it; the token it hands out there travels with every request on this
channel, so control requests are authorised as that uid (see daemon/auth.py).
The fd socket connection must stay open while the channel is used.
"""

import grpc

from sleepd.common import paths
from sleepd.common.wire import TOKEN_METADATA

from .fd_socket import FdConnection



class _Credentials(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                   grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    def __init__(self, token: str):
        self._token = token

    def _with_token(self, details):
        return _Details(details, list(details.metadata or []) + [(TOKEN_METADATA, self._token)])

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with_token(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._with_token(details), request)

    def intercept_stream_unary(self, continuation, details, requests):
        return continuation(self._with_token(details), requests)

    def intercept_stream_stream(self, continuation, details, requests):
        return continuation(self._with_token(details), requests)


class _Details(grpc.ClientCallDetails):
    def __init__(self, details, metadata):
        self.method = details.method
        self.timeout = details.timeout
        self.metadata = metadata
        self.credentials = details.credentials
        self.wait_for_ready = getattr(details, "wait_for_ready", None)
        self.compression = getattr(details, "compression", None)


def control_channel(socket: str | None = None) -> tuple[grpc.Channel, FdConnection]:
    """A channel whose requests carry this process's credentials, and the fd
    socket connection that vouches for them (close both when done)."""
    path = paths.client_socket(socket)
    fd_socket = FdConnection(paths.fd_socket(path))
    channel = grpc.intercept_channel(grpc.insecure_channel(f"unix:{path}"), _Credentials(fd_socket.token))
    return channel, fd_socket
