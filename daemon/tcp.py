"""The optional TCP listener: the same gRPC service for tools on other hosts,
only over TLS and only with a bearer token. Off unless an address is set.

Engines cannot use it (file descriptors travel only on Unix sockets); it is for
control: status, sleep, wake, swap, policy, events. A caller with the token
acts as an admin.
"""

import hmac
from concurrent import futures
from dataclasses import dataclass

import grpc

from sleepd.proto import sleepd_pb2_grpc as pb_grpc

from .call_caps import refusing
from .auth import Peer
from .private_paths import read_secret
from .service import SleepdService

# Who a TCP caller is, once its token checked out: an admin with no local uid.
TCP_PEER = Peer(pid=0, uid=0, gid=0, groups=frozenset())


class _RequireToken(grpc.ServerInterceptor):
    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()
        # Refused before any request is read, so a caller without the token holds no worker.
        self._refusal = refusing("a valid bearer token is required on sleepd's TCP port",
                                 grpc.StatusCode.UNAUTHENTICATED)

    def intercept_service(self, continuation, handler_call_details):
        offered = dict(handler_call_details.invocation_metadata).get("authorization", "")
        if hmac.compare_digest(offered.encode(), self._expected):
            return continuation(handler_call_details)
        return self._refusal


@dataclass(frozen=True)
class TcpCredentials:
    """What the listener serves with: its certificate chain, its private key and the token callers present."""
    certificate: bytes
    key: bytes
    token: str

    @classmethod
    def read(cls, cert_path: str, key_path: str, token_path: str) -> "TcpCredentials":
        """Raises UnsafePath for a key or token file that other users may read (the
        certificate is public), ValueError for an empty token, OSError for a file it cannot read."""
        with open(cert_path, "rb") as cert:
            certificate = cert.read()
        key = read_secret(key_path, "tcp.key")
        token = read_secret(token_path, "tcp.token_file").decode().strip()
        if not token:
            raise ValueError(f"tcp.token_file {token_path} holds no token; write one into it")
        return cls(certificate, key, token)


def serve_tcp(core, address: str, credentials: TcpCredentials, wake_wait_limit: float,
              swap_batch: int) -> tuple[grpc.Server, int]:
    """Starts a TLS-only server on `address`; returns it and the port it bound.
    It has a service of its own, so that being the TCP admin is decided by this
    listener alone: its callers got past _RequireToken."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=64, thread_name_prefix="grpc-tcp"),
                         interceptors=[_RequireToken(credentials.token)])
    servicer = SleepdService(core, wake_wait_limit, swap_batch, identify=lambda context: TCP_PEER)
    pb_grpc.add_SleepdServicer_to_server(servicer, server)
    port = server.add_secure_port(address, grpc.ssl_server_credentials([(credentials.key, credentials.certificate)]))
    server.start()
    return server, port
