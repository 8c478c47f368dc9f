"""The TCP listener is off by default; when on, it takes only TLS and only the token."""

import socket
import subprocess
import threading
import time

import grpc
import pytest

from sleepd.proto import sleepd_pb2 as pb
from sleepd.proto import sleepd_pb2_grpc as pb_grpc
from support import MiB


@pytest.fixture
def backend():
    return "host"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def tls(tmp_path):
    cert, key, token = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "token"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    token.write_text("s3cret-token\n")
    return cert, key, token


def test_no_tcp_port_is_open_by_default(daemon):
    listening = subprocess.run(["ss", "-ltnp"], capture_output=True, text=True).stdout
    own = [line for line in listening.splitlines() if f"pid={daemon.pid}," in line]
    ports = [line.split()[3] for line in own]
    assert ports == [daemon.info["metrics_address"]], f"sleepd listens on {ports}"


def test_tcp_needs_tls_and_the_token(start_daemon, start_engine, tls):
    cert, key, token = tls
    port = free_port()
    daemon = start_daemon("--tcp-address", f"127.0.0.1:{port}", "--tcp-cert", str(cert), "--tcp-key", str(key),
                          "--tcp-token-file", str(token))
    engine = start_engine(daemon, "qwen", regions=[("weights", 4 * MiB)])
    credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())

    def call(metadata, secure=True):
        channel = (grpc.secure_channel(f"localhost:{port}", credentials) if secure
                   else grpc.insecure_channel(f"127.0.0.1:{port}"))
        with channel:
            return pb_grpc.SleepdStub(channel).Sleep(pb.SleepRequest(model="qwen"), metadata=metadata, timeout=10)

    with pytest.raises(grpc.RpcError) as error:
        call([], secure=False)  # plain connection: no TLS, no service
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    for wrong in ([], [("authorization", "Bearer nope")]):
        with pytest.raises(grpc.RpcError) as error:
            call(wrong)
        assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert engine.report()["regions"][0]["state"] == "mapped"

    # A caller without the token that never sends its request is refused at once: it holds no worker.
    with grpc.secure_channel(f"localhost:{port}", credentials) as channel:
        silent = channel.stream_stream("/sleepd.v1.Sleepd/Sleep", request_serializer=None, response_deserializer=None)
        done = threading.Event()

        def nothing():
            done.wait(10)
            yield from ()

        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as error:
            list(silent(nothing(), timeout=10))
        refused_after = time.monotonic() - started
        done.set()
        assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED and refused_after < 5

    reply = call([("authorization", "Bearer s3cret-token")])  # the token acts as an admin
    assert reply.sleeping and engine.report()["regions"][0]["state"] == "offloaded"
