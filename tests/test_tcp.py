"""The TCP listener is off by default; when on, it takes only TLS and only the token."""

import os
import socket
import subprocess
import sys
import threading
import time

import grpc
import pytest

from sleepd.proto import sleepd_pb2 as pb
from sleepd.proto import sleepd_pb2_grpc as pb_grpc
from support import MiB, assert_refused


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
    key.chmod(0o600)
    token.chmod(0o600)
    return cert, key, token


def tcp_flags(port: int, cert, key, token) -> tuple[str, ...]:
    return ("--tcp-address", f"127.0.0.1:{port}", "--tcp-cert", str(cert), "--tcp-key", str(key),
            "--tcp-token-file", str(token))


def mounted_like_kubernetes(directory, *files, mode: int) -> list:
    """The files as a Kubernetes secret volume shows them: each name a symlink to ..data/name,
    ..data a symlink to the directory holding the files, whose mode is defaultMode."""
    directory.mkdir()
    (directory / "..2024_01_01").mkdir()
    (directory / "..data").symlink_to("..2024_01_01")
    links = []
    for file in files:
        target = directory / "..2024_01_01" / file.name
        target.write_bytes(file.read_bytes())
        target.chmod(mode)
        (directory / file.name).symlink_to(f"..data/{file.name}")
        links.append(directory / file.name)
    return links


def start_refused(tmp_path, *flags) -> subprocess.CompletedProcess:
    """sleepd on `flags`, expected to refuse to start (one that starts runs into the timeout)."""
    pool_dir = f"/dev/shm/sleepd-tcp-{os.getpid()}-{tmp_path.name}"
    try:
        return subprocess.run([sys.executable, "-m", "sleepd.daemon.main", "--backend", "host", "--socket",
                               str(tmp_path / "sleepd.sock"), "--state-dir", str(tmp_path / "state"),
                               "--host-pool-dir", pool_dir, "--metrics-address", "off", *flags],
                              capture_output=True, text=True, timeout=30)
    finally:
        subprocess.run(["rm", "-rf", pool_dir])


def test_no_tcp_port_is_open_by_default(daemon):
    listening = subprocess.run(["ss", "-ltnp"], capture_output=True, text=True).stdout
    own = [line for line in listening.splitlines() if f"pid={daemon.pid}," in line]
    ports = [line.split()[3] for line in own]
    assert ports == [daemon.info["metrics_address"]], f"sleepd listens on {ports}"


def test_tcp_needs_tls_and_the_token(start_daemon, start_engine, tls):
    cert, key, token = tls
    port = free_port()
    daemon = start_daemon(*tcp_flags(port, cert, key, token))
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


@pytest.mark.parametrize("secret, mode", [("token", 0o644), ("key", 0o640), ("token", 0o604)],
                         ids=["a world-readable token", "a group-readable key", "a token others may read"])
def test_a_secret_other_users_may_read_stops_the_daemon_before_it_makes_anything(tmp_path, tls, secret, mode):
    cert, key, token = tls
    opened = {"key": key, "token": token}[secret]
    opened.chmod(mode)
    refused = start_refused(tmp_path, *tcp_flags(free_port(), cert, key, token))
    assert_refused(refused, str(opened), f"has mode {mode:04o}", f"chmod 600 {opened}")
    assert not (tmp_path / "state").exists() and not (tmp_path / "sleepd.sock").exists()


def test_a_secret_mounted_through_symlinks_is_judged_by_the_mode_of_the_file_they_lead_to(tmp_path, tls):
    cert, key, token = tls
    key_link, token_link = mounted_like_kubernetes(tmp_path / "secret", key, token, mode=0o644)
    target = tmp_path / "secret" / "..2024_01_01" / "key.pem"
    refused = start_refused(tmp_path, *tcp_flags(free_port(), cert, key_link, token_link))
    assert_refused(refused, f"{key_link} (a link to {target})", "has mode 0644", f"chmod 600 {target}")


def test_a_private_secret_mounted_through_symlinks_serves(start_daemon, start_engine, tls, tmp_path):
    cert, key, token = tls
    key_link, token_link = mounted_like_kubernetes(tmp_path / "secret", key, token, mode=0o400)
    port = free_port()
    daemon = start_daemon(*tcp_flags(port, cert, key_link, token_link))
    engine = start_engine(daemon, "qwen", regions=[("weights", 4 * MiB)])
    credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
    with grpc.secure_channel(f"localhost:{port}", credentials) as channel:
        reply = pb_grpc.SleepdStub(channel).Sleep(pb.SleepRequest(model="qwen"),
                                                  metadata=[("authorization", "Bearer s3cret-token")], timeout=10)
    assert reply.sleeping and engine.report()["regions"][0]["state"] == "offloaded"
