"""What an engine's session sends on the handle socket and its session stream is checked against
the session's condition at the edge: wrong for it, it is refused with a status a caller branches
on, in one line, and changes nothing; never does it stop the daemon or cost another model anything."""

import json
import os
import queue
import signal
import socket
import threading

import grpc
import pytest

from sleepd.common import paths, wire
from sleepd.common.wire import TOKEN_METADATA
from sleepd.daemon.auth import Authorizer, Peer
from sleepd.daemon.backends import host_backend
from sleepd.daemon.errors import SleepdError
from sleepd.daemon.registry import Registry
from sleepd.daemon.sessions import Condition
from sleepd.proto import sleepd_pb2 as pb
from sleepd.proto import sleepd_pb2_grpc as pb_grpc
from support import MiB, Daemon

FLAGS = ("--host-devices", "2", "--host-device-capacity", "256MiB", "--hook-timeout", "1",
         "--controller-timeout", "1")
# Every answer comes within this, or the daemon is stuck.
ANSWER_SECONDS = 15.0


@pytest.fixture
def backend():
    return "host"


class Rank:
    """One in-process engine session: a raw handle-socket connection and, once attached, a
    Session stream whose commands it answers as `answers` says (late, never, or with a refusal)."""

    def __init__(self, daemon_socket: str, stub: pb_grpc.SleepdStub, answers: str = "ack"):
        self.stub, self.answers = stub, answers
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.connect(paths.handle_socket(daemon_socket))
        self.sock.settimeout(ANSWER_SECONDS)
        self.token = ""
        self.model = self.rank = self.device = None
        self.session_id = ""
        self.regions: set[int] = set()  # the regions the daemon said are this session's
        self.handing_back = False  # attached with resuming, and not yet said handed_back
        self.outgoing: "queue.Queue[pb.EngineMessage | None] | None" = None
        self.stream = None
        self.stream_open = False

    # ---- the handle socket ----

    def exchange(self, data: bytes, fds=()) -> tuple[dict | None, list[int]]:
        """Sends one packet and reads the answer; (None, []) once the daemon hung up."""
        if self.sock is None:
            return None, []
        try:
            socket.send_fds(self.sock, [data], list(fds))
            frame, received = wire.recv(self.sock)
        except (ConnectionResetError, BrokenPipeError):
            frame, received = None, []
        except socket.timeout:
            raise AssertionError(f"the handle socket did not answer {data[:80]!r} within {ANSWER_SECONDS:g} s")
        if frame is None:
            self.close_handle()
        return frame, received

    def request(self, message: dict, fds=()) -> tuple[dict | None, list[int]]:
        return self.exchange(json.dumps(message).encode(), fds)

    def hello(self) -> None:
        frame, _ = self.request({"op": "hello"})
        assert frame and frame["ok"], frame
        self.token = frame["token"]

    def close_handle(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    # ---- the session stream ----

    def attach(self, token: str, model: str, rank: int, device: int) -> pb.Attached | grpc.RpcError:
        self.outgoing = queue.Queue()
        self.outgoing.put(pb.EngineMessage(attach=pb.Attach(token=token, model=model, rank=rank, device=device)))
        self.stream = self.stub.Session(iter(self.outgoing.get, None), metadata=[(TOKEN_METADATA, token)])
        self.stream_open = True
        first_message: "queue.Queue" = queue.Queue()  # this stream's own: an earlier one may still end
        threading.Thread(target=self._serve, args=(self.stream, first_message), daemon=True).start()
        try:
            first = first_message.get(timeout=ANSWER_SECONDS)
        except queue.Empty:
            raise AssertionError(f"attach {model} rank {rank} was not answered within {ANSWER_SECONDS:g} s")
        if isinstance(first, pb.Attached):
            self.model, self.rank, self.device, self.session_id = model, rank, device, first.session_id
            self.handing_back = first.resuming
        return first

    def _serve(self, stream, first_message: "queue.Queue") -> None:
        try:
            for command in stream:
                if command.WhichOneof("kind") == "attached":
                    first_message.put(command.attached)
                else:
                    self._answer(command.op_id)
        except grpc.RpcError as error:
            first_message.put(error)  # read only while the attach waits
        finally:
            if stream is self.stream:
                self.stream_open = False

    def _answer(self, op_id: int) -> None:
        outgoing = self.outgoing
        if self.answers == "ack":
            outgoing.put(pb.EngineMessage(ack=pb.Ack(op_id=op_id, ok=True)))
        elif self.answers == "slow":
            threading.Timer(0.3, outgoing.put, [pb.EngineMessage(ack=pb.Ack(op_id=op_id, ok=True))]).start()
        elif self.answers == "refuse":
            outgoing.put(pb.EngineMessage(ack=pb.Ack(op_id=op_id, ok=False, error="the fuzzer refuses")))

    def send_on_stream(self, message: pb.EngineMessage | None) -> None:
        if self.outgoing is not None:
            self.outgoing.put(message)

    def close(self) -> None:
        self.close_handle()
        if self.stream is not None:
            self.stream.cancel()
        self.stream_open = False


def handing_back_after_a_restart(tmp_path, daemon: Daemon) -> tuple[Daemon, Rank, int, int]:
    """A rank that allocated a region over the handle socket, kept its memory, and attached again
    to a daemon restarted on the same state: (the new daemon, the rank handing back, the region,
    the descriptor of its memory)."""
    stub = pb_grpc.SleepdStub(grpc.insecure_channel(f"unix:{daemon.socket}"))
    before = Rank(daemon.socket, stub)
    before.hello()
    assert isinstance(before.attach(before.token, "qwen", 0, 0), pb.Attached)
    allocated, fds = before.request({"op": "allocate", "size": MiB, "tag": "weights"})
    assert allocated["ok"], allocated
    os.kill(daemon.pid, signal.SIGKILL)
    daemon.process.wait(timeout=30)
    before.close()
    again = Daemon(tmp_path, "host", *FLAGS)
    try:
        rank = Rank(again.socket, pb_grpc.SleepdStub(grpc.insecure_channel(f"unix:{again.socket}")))
        rank.hello()
        attached = rank.attach(rank.token, "qwen", 0, 0)
        assert attached.resuming and [r.id for r in attached.regions] == [allocated["region"]], attached
    except BaseException:
        again.stop()
        raise
    return again, rank, allocated["region"], fds[0]


def test_memory_handed_back_that_is_not_the_regions_is_refused_and_the_rank_hands_back_its_own(tmp_path,
                                                                                               start_daemon):
    again, rank, region, memory = handing_back_after_a_restart(tmp_path, start_daemon(*FLAGS[4:]))
    try:
        small = os.memfd_create("too-small")
        os.ftruncate(small, 4096)
        for what, fd in (("/dev/null", os.open("/dev/null", os.O_RDONLY)), ("a 4 KiB memfd", small)):
            refused, _ = rank.request({"op": "hand_back", "region": region}, [fd])
            os.close(fd)
            assert refused is not None, f"the daemon hung up on a hand_back of {what}:\n{again.log()}"
            assert refused["code"] == "INVALID_ARGUMENT" and "not its memory" in refused["error"], refused
        assert rank.request({"op": "hand_back", "region": region}, [memory])[0] == {"ok": True}
        assert rank.request({"op": "handed_back"})[0] == {"ok": True}
        status = again.status("qwen")
        assert status["models"][0]["ranks"][0]["regions"][0]["state"] == "MAPPED", status
        assert status["devices"][0]["used"] == str(MiB), status  # the daemon holds the region's memory again
        assert again.process.poll() is None and "Traceback" not in again.log(), again.log()
    finally:
        os.close(memory)
        rank.close()
        again.stop()


def test_an_attach_that_finds_its_session_ended_is_refused_not_taken_for_a_bug():
    """A session whose handle connection closed has ended but is still known by its token (a stopping
    daemon keeps it so for its state file): an attach with that token is refused, and the daemon serves on."""
    registry = Registry(host_backend(1, 64 * MiB), Authorizer("sleepd-admin"), {})
    session = registry.open_session(Peer(os.getpid(), 0, 0, frozenset()))
    session.end("handle socket closed")
    with pytest.raises(SleepdError) as refused:
        registry.attach(session.token, "qwen", 0, 0)
    assert refused.value.code is grpc.StatusCode.FAILED_PRECONDITION, refused.value.message
    assert "ended" in refused.value.message and "\n" not in refused.value.message
    assert registry.models() == [] and session.condition is Condition.LOST
