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
from support import MiB, wait_for
from kernel import open_fds

# What a refusal may look like: a status the caller can branch on, never an internal error.
REFUSALS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED,
            grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.PERMISSION_DENIED,
            grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.ALREADY_EXISTS}
# A sleep or wake of the fuzzed model fails, rolled back, when the fuzz allocated regions in its
# engine's name that the engine never heard of: the engine refuses to unmap them. That is the engine's
# answer, relayed; the daemon's own refusals stay in REFUSALS.
ROLLED_BACK = "failed and was rolled back"
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
    """A model whose state and data must survive everything below untouched. Its weights go to the
    host pool and back once first, so that the pool's slab file is open before descriptors are counted."""
    engine = start_engine(daemon, "victim", regions=[("weights", 4 * MiB), ("kv_cache", 2 * MiB)])
    daemon.ctl("sleep", "--model", "victim", "--tags", "weights")
    daemon.ctl("wake", "--model", "victim")
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


# The fuzzer's own model: a real engine on the device the victim is not on, so that a request
# that gets past the lookup (an eviction included) may change it, and only it.
FUZZED = "fuzzed"
garbage_names = st.one_of(st.text(max_size=200),
                          st.sampled_from(["", "victim2", "a" * 129, "bad name", "../x", "victim/"]))
names = st.one_of(st.just(FUZZED), st.just(FUZZED), garbage_names)
real_tags = st.lists(st.sampled_from(["weights", "kv_cache"]), max_size=2)
tags = st.one_of(real_tags, st.lists(st.one_of(st.text(max_size=70), st.sampled_from(["weights", "lora", ""])),
                                     max_size=4))
actions = st.lists(st.builds(pb.TagAction, tag=st.one_of(st.text(max_size=20), st.sampled_from(["weights", "lora"])),
                             action=st.integers(0, 5)), max_size=3)
small_or_any = lambda bits, small: st.one_of(st.integers(0, small), st.integers(0, 2**bits - 1))  # noqa: E731


def requests(session_id: str, region_ids: list[int]):
    """Every unary call, its fields drawn from garbage and from what the fuzzed engine really has."""
    sessions = st.one_of(st.just(session_id), st.just(session_id), st.text(max_size=40))
    return st.one_of(
        st.builds(lambda m, l, t, a: ("Sleep", pb.SleepRequest(model=m, level=l, tags=t, actions=a)),
                  names, small_or_any(32, 3), tags, actions),
        st.builds(lambda m, t, e: ("Wake", pb.WakeRequest(model=m, tags=t, evict=e)), names, tags, st.booleans()),
        st.builds(lambda to, fr: ("Swap", pb.SwapRequest(to_model=to, from_models=fr)), names,
                  st.lists(names, max_size=3)),
        st.builds(lambda m, p, l, i: ("SetPolicy", pb.PolicyRequest(model=m, priority=p, eviction_level=l,
                                                                    idle_seconds=i)),
                  names, st.integers(-2**31, 2**31 - 1), small_or_any(32, 3),
                  st.floats(allow_nan=True, allow_infinity=True)),
        st.builds(lambda s, n, t, e: ("Allocate", pb.AllocateRequest(session_id=s, size=n, tag=t, evict=e)),
                  sessions, st.one_of(st.integers(-2**63, 2**63 - 1), st.integers(0, 8 * MiB)),
                  st.one_of(st.text(max_size=80), st.sampled_from(["weights", "kv_cache"])), st.booleans()),
        st.builds(lambda s, r: ("Free", pb.FreeRequest(session_id=s, region_id=r)), sessions,
                  st.one_of(st.sampled_from(region_ids), small_or_any(64, 40))),
        st.builds(lambda s: ("Touch", pb.TouchRequest(session_id=s)), sessions),
        st.builds(lambda m: ("Status", pb.StatusRequest(model=m)), names),
    )


def test_random_and_malformed_grpc_requests_are_refused_cleanly(daemon, victim, unchanged, start_engine):
    fuzzed = start_engine(daemon, FUZZED, device=1, regions=[("weights", 4 * MiB), ("kv_cache", 2 * MiB)])
    session_id = fuzzed.request("session")["session_id"]
    region_ids = [region["id"] for region in fuzzed.report()["regions"]]
    channel, fd_socket = control_channel(daemon.socket)
    stub = pb_grpc.SleepdStub(channel)
    raw = {name: channel.unary_unary(f"/sleepd.v1.Sleepd/{name}", request_serializer=None,
                                     response_deserializer=None) for name in ("Sleep", "Wake", "Allocate")}
    reached = set()

    @settings(FUZZ, max_examples=500)
    @given(requests(session_id, region_ids))
    def well_formed(item):
        method, request = item
        try:
            getattr(stub, method)(request, timeout=30)
            reached.add(method)
        except grpc.RpcError as error:
            relayed = error.code() == grpc.StatusCode.ABORTED and ROLLED_BACK in error.details()
            assert error.code() in REFUSALS or relayed, f"{method}: {error.code()} {error.details()}"
            assert "\n" not in (error.details() or "")
            if error.code() != grpc.StatusCode.NOT_FOUND:
                reached.add(method)  # past the lookup of the model or session

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
        fd_socket.close()
        # Its engine gone, the fuzzed model and whatever the fuzz allocated in its name go too.
        fuzzed.close()
        wait_for(lambda: [m["name"] for m in daemon.status()["models"]] == ["victim"], what="the fuzzed model to go")
    # Past the lookup (answered, or refused for something other than a missing model or session).
    assert reached == {"Sleep", "Wake", "Swap", "SetPolicy", "Allocate", "Free", "Touch", "Status"}, reached


def test_garbage_truncated_and_oversized_frames_with_stray_fds_on_the_fd_socket(daemon, victim, unchanged):
    path = paths.fd_socket(daemon.socket)

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
    path = paths.fd_socket(daemon.socket)
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
        greedy.connect(paths.fd_socket(daemon.socket))
        greedy.settimeout(30)
        with pytest.raises((BrokenPipeError, ConnectionResetError)):
            for _ in range(100_000):
                wire.send(greedy, {"op": "hello"})
    assert "does not read its replies" in daemon.log()
