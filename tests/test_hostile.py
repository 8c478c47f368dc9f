"""Hostile and malformed input over the real sockets. Afterwards the daemon is up,
every model's state and data are unchanged, and its descriptors and memory are
back where they started."""

import os
import socket
import time

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sleepd.client.control import control_channel
from sleepd.common import paths, wire
from sleepd.proto import sleepd_pb2 as pb
from sleepd.proto import sleepd_pb2_grpc as pb_grpc
from support import MiB
from kernel import open_fds

# What a refusal may look like: a status the caller can branch on, never an internal error.
REFUSALS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED,
            grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.PERMISSION_DENIED,
            grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.ALREADY_EXISTS}
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))


@pytest.fixture
def backend():
    return "host"


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


@pytest.fixture
def victim(daemon, start_engine):
    """A model whose state and data must survive everything below untouched."""
    engine = start_engine(daemon, "victim", regions=[("weights", 4 * MiB), ("kv_cache", 2 * MiB)])
    daemon.ctl("sleep", "--model", "victim", "--tags", "kv_cache")
    return engine


@pytest.fixture
def unchanged(daemon, victim):
    """Checks, after the test, that the daemon answers, the victim is as it was,
    and the daemon's descriptors and memory are back where they started."""
    def settle():
        time.sleep(0.5)
        return open_fds(daemon.pid), rss(daemon.pid)

    status, report = daemon.status(), victim.report()
    fds_before, rss_before = settle()
    yield
    fds_after, rss_after = settle()
    assert daemon.status() == status
    assert victim.report() == report
    assert fds_after <= fds_before, f"the daemon holds {fds_after - fds_before} more descriptors"
    assert rss_after - rss_before < 32 * MiB, f"the daemon grew by {(rss_after - rss_before) >> 20} MiB"


names = st.one_of(st.text(max_size=200), st.sampled_from(["", "victim2", "a" * 129, "bad name", "../x", "victim/"]))
tags = st.lists(st.one_of(st.text(max_size=70), st.sampled_from(["weights", "kv_cache", "lora", ""])), max_size=4)
actions = st.lists(st.builds(pb.TagAction, tag=st.text(max_size=20), action=st.integers(0, 5)), max_size=3)
requests = st.one_of(
    st.builds(lambda m, l, t, a: ("Sleep", pb.SleepRequest(model=m, level=l, tags=t, actions=a)),
              names, st.integers(0, 2**32 - 1), tags, actions),
    st.builds(lambda m, t, e: ("Wake", pb.WakeRequest(model=m, tags=t, evict=e)), names, tags, st.booleans()),
    st.builds(lambda to, fr: ("Swap", pb.SwapRequest(to_model=to, from_models=fr)), names, st.lists(names, max_size=3)),
    st.builds(lambda m, p, l, i: ("SetPolicy", pb.PolicyRequest(model=m, priority=p, eviction_level=l, idle_seconds=i)),
              names, st.integers(-2**31, 2**31 - 1), st.integers(0, 2**32 - 1),
              st.floats(allow_nan=True, allow_infinity=True)),
    st.builds(lambda s, n, t, e: ("Allocate", pb.AllocateRequest(session_id=s, size=n, tag=t, evict=e)),
              st.text(max_size=40), st.integers(-2**63, 2**63 - 1), st.text(max_size=80), st.booleans()),
    st.builds(lambda s, r: ("Free", pb.FreeRequest(session_id=s, region_id=r)), st.text(max_size=40),
              st.integers(0, 2**64 - 1)),
    st.builds(lambda s: ("Touch", pb.TouchRequest(session_id=s)), st.text(max_size=40)),
    st.builds(lambda m: ("Status", pb.StatusRequest(model=m)), names),
)


def test_random_and_malformed_grpc_requests_are_refused_cleanly(daemon, victim, unchanged):
    channel, handles = control_channel(daemon.socket)
    stub = pb_grpc.SleepdStub(channel)
    raw = {name: channel.unary_unary(f"/sleepd.v1.Sleepd/{name}", request_serializer=None,
                                     response_deserializer=None) for name in ("Sleep", "Wake", "Allocate")}

    @FUZZ
    @given(requests)
    def well_formed(item):
        method, request = item
        if getattr(request, "model", None) == "victim" or getattr(request, "to_model", None) == "victim":
            return  # legitimate requests for the victim would change it by design
        try:
            getattr(stub, method)(request, timeout=30)
        except grpc.RpcError as error:
            assert error.code() in REFUSALS, f"{method}: {error.code()} {error.details()}"
            assert "\n" not in (error.details() or "")

    @FUZZ
    @given(st.sampled_from(sorted(raw)), st.binary(max_size=4096))
    def garbage(method, body):
        try:
            raw[method](body, timeout=30)
        except grpc.RpcError as error:
            # Undecodable bodies are refused by gRPC itself; decodable ones by sleepd.
            assert error.code() in REFUSALS | {grpc.StatusCode.INTERNAL}, error.code()

    try:
        well_formed()
        garbage()
    finally:
        channel.close()
        handles.close()


def test_garbage_truncated_and_oversized_frames_with_stray_fds_on_the_handle_socket(daemon, victim, unchanged):
    path = paths.handle_socket(daemon.socket)

    @FUZZ
    @given(st.one_of(st.binary(max_size=2048), st.binary(min_size=wire.MAX_MESSAGE, max_size=wire.MAX_MESSAGE + 4096),
                     st.builds(lambda d: __import__("json").dumps(d).encode(),
                               st.dictionaries(st.sampled_from(["op", "region", "token", "x"]),
                                               st.one_of(st.text(max_size=20), st.integers(), st.none()),
                                               max_size=4))),
           st.integers(0, 3))
    def frames(payload, stray_fds):
        fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(stray_fds)]
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
            sock.connect(path)
            try:
                socket.send_fds(sock, [payload], fds)
                sock.settimeout(5)
                reply, received = wire.recv(sock)
                wire.close_all(received)
                if reply is not None:
                    assert reply.get("ok") in (True, False)
            except (OSError, wire.ProtocolError):
                pass  # the daemon hung up on us, as it should on garbage
            finally:
                wire.close_all(fds)

    frames()


def test_thousands_of_connections_opened_and_dropped(daemon, victim, unchanged):
    path = paths.handle_socket(daemon.socket)
    for index in range(2000):
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
            sock.connect(path)
            if index % 2:
                wire.send(sock, {"op": "hello"})
    for _ in range(200):
        with grpc.insecure_channel(f"unix:{daemon.socket}") as channel:
            try:
                grpc.channel_ready_future(channel).result(timeout=10)
            except grpc.FutureTimeoutError:
                raise AssertionError("the daemon stopped accepting gRPC connections")


def test_a_client_that_never_acks_costs_a_timeout_and_nothing_else(start_daemon, start_engine):
    daemon = start_daemon("--hook-timeout", "1")
    victim_engine = start_engine(daemon, "victim", regions=[("weights", 4 * MiB)])
    silent = start_engine(daemon, "silent", regions=[("weights", 4 * MiB)], sleep_hook="hang")
    status, report = daemon.status(), victim_engine.report()
    fds_before = open_fds(daemon.pid)
    for _ in range(3):
        result = daemon.ctl("sleep", "--model", "silent", check=False)
        assert result.returncode != 0 and "DEADLINE_EXCEEDED" in result.stderr
    assert daemon.status() == status
    assert victim_engine.report() == report
    assert silent.pid in [r["pid"] for m in status["models"] for r in m["ranks"]]
    time.sleep(0.5)
    assert open_fds(daemon.pid) <= fds_before


def test_a_peer_that_never_reads_its_replies_is_dropped(daemon, victim, unchanged):
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as greedy:
        greedy.connect(paths.handle_socket(daemon.socket))
        greedy.settimeout(30)
        with pytest.raises((BrokenPipeError, ConnectionResetError)):
            for _ in range(100_000):
                wire.send(greedy, {"op": "hello"})
    assert "does not read its replies" in daemon.log()
