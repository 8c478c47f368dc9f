"""Whatever an engine's sessions send, in whatever condition they are, the daemon serves on.

What a session sends on the fd socket and its session stream is checked against the session's
condition at the edge: wrong for it, it is refused with a status a caller branches on, in one line,
and changes nothing. The focused tests below pin what the state machine at the end of this file
found. That machine drives its own engine sessions through the real sockets of a real daemon: raw
fd-socket connections that send every request (hello, fetch, hand_back, replace, handed_back,
allocate) with their own, foreign and made-up region ids, descriptors and garbage, and every gRPC
call an engine or its owner makes (the Session stream and its messages, Allocate, Free, Touch, Sleep,
Wake, EnsureAwake, Swap, SetPolicy, Status, a controller's Control stream), from sessions attached or
not, while the model is awake, asleep or mid-sleep (ranks that answer late, refuse or never answer),
and, after the daemon is killed and started again on its state, while ranks hand their memory back
and others are still recovering. After every step: the daemon is up (a bug() a client reached would
have stopped it with 70), every refusal is a status a caller can branch on in one line (never
INTERNAL or UNKNOWN), a request the fd socket understood is answered (never a dropped
connection), and root's victim model is as it was, its bytes too.
"""

import functools
import itertools
import json
import os
import queue
import signal
import socket
import threading
import time
import traceback
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

import grpc
import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

from sleepd.common import paths, wire
from sleepd.common.wire import TOKEN_METADATA
from sleepd.daemon.auth import Authorizer, Peer
from sleepd.daemon.backends import host_backend
from sleepd.daemon.config import BY_KEY
from sleepd.daemon.errors import SleepdError
from sleepd.daemon.registry import Registry
from sleepd.daemon.sessions import Condition
from sleepd.proto import sleepd_pb2 as pb
from sleepd.proto import sleepd_pb2_grpc as pb_grpc
from support import MiB, Daemon, wait_for

FLAGS = ("--host-devices", "2", "--host-device-capacity", "256MiB", "--hook-timeout", "1",
         "--controller-timeout", "1")
REATTACH_SECONDS = BY_KEY["reattach_seconds"].default  # FLAGS leave it as it is
# Every answer comes within this, or the daemon is stuck: the slowest is a sleep or wake whose ranks
# never answer, a few hook timeouts.
ANSWER_SECONDS = 15.0
Code = grpc.StatusCode
# What a refusal may be: a status the caller branches on. ABORTED: busy or a rank refused;
# DEADLINE_EXCEEDED: a rank or controller did not answer in time; UNAVAILABLE: a rank went away.
REFUSALS = {Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.RESOURCE_EXHAUSTED, Code.FAILED_PRECONDITION,
            Code.PERMISSION_DENIED, Code.UNAUTHENTICATED, Code.ALREADY_EXISTS, Code.ABORTED,
            Code.DEADLINE_EXCEEDED, Code.UNAVAILABLE}
ANSWERS = ("ack", "slow", "never", "refuse")  # how a rank answers the daemon's commands
RESTARTS_PER_RUN = 8  # a restart costs a second or two: a few per run

MODEL_KEYS = ("a", "b")  # each example's own models; the victim is never named
TAGS = st.sampled_from(["weights", "kv_cache", "", "no such tag", "bad\ntag", "x" * 80])
SIZES = st.sampled_from([MiB, 4096, 1, 2 * MiB, 0, -1, 1 << 40, 1 << 62])
NOWHERE = [0, -1, 10 ** 9, 1 << 63]  # region ids nobody has


@pytest.fixture
def backend():
    return "host"


class Rank:
    """One in-process engine session: a raw fd-socket connection and, once attached, a
    Session stream whose commands it answers as `answers` says (late, never, or with a refusal)."""

    def __init__(self, daemon_socket: str, stub: pb_grpc.SleepdStub, answers: str = "ack"):
        self.stub, self.answers = stub, answers
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.connect(paths.fd_socket(daemon_socket))
        self.sock.settimeout(ANSWER_SECONDS)
        self.token = ""
        self.model = self.rank = self.device = None
        self.session_id = ""
        self.regions: set[int] = set()  # the regions the daemon said are this session's
        self.handing_back = False  # attached with resuming, and not yet said handed_back
        self.outgoing: "queue.Queue[pb.EngineMessage | None] | None" = None
        self.stream = None
        self.stream_open = False

    # ---- the fd socket ----

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
            raise AssertionError(f"the fd socket did not answer {data[:80]!r} within {ANSWER_SECONDS:g} s")
        if frame is None:
            self.close_fd_socket()
        return frame, received

    def request(self, message: dict, fds=()) -> tuple[dict | None, list[int]]:
        return self.exchange(json.dumps(message).encode(), fds)

    def hello(self) -> None:
        frame, _ = self.request({"op": "hello"})
        assert frame and frame["ok"], frame
        self.token = frame["token"]

    def close_fd_socket(self) -> None:
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
        self.close_fd_socket()
        if self.stream is not None:
            self.stream.cancel()
        self.stream_open = False


def handing_back_after_a_restart(tmp_path, daemon: Daemon) -> tuple[Daemon, Rank, int, int]:
    """A rank that allocated a region over the fd socket, kept its memory, and attached again
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
    """A session whose fd socket connection closed has ended but is still known by its token (a stopping
    daemon keeps it so for its state file): an attach with that token is refused, and the daemon serves on."""
    registry = Registry(host_backend(1, 64 * MiB), Authorizer("sleepd-admin"), {})
    session = registry.open_session(Peer(os.getpid(), 0, 0, frozenset()))
    session.end("fd socket closed")
    with pytest.raises(SleepdError) as refused:
        registry.attach(session.token, "qwen", 0, 0)
    assert refused.value.code.name == "FAILED_PRECONDITION", refused.value.message
    assert "ended" in refused.value.message and "\n" not in refused.value.message
    assert registry.models() == [] and session.condition is Condition.LOST


class ControlStream:
    """A model's controller on a Control stream, answering forwarded requests as `answers` says."""

    def __init__(self, world: "World", model: str, token: str, answers: str):
        self.outgoing: "queue.Queue[pb.ControllerMessage | None]" = queue.Queue()
        self.outgoing.put(pb.ControllerMessage(attach=pb.ControllerAttach(model=model)))
        self.answers = answers
        self.stream = world.stub.Control(iter(self.outgoing.get, None), metadata=[(TOKEN_METADATA, token)])
        self.first: Future = Future()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        try:
            for request in self.stream:
                if request.WhichOneof("kind") == "attached":
                    self.first.set_result(None)
                elif self.answers != "never":
                    self.outgoing.put(pb.ControllerMessage(done=pb.ControlDone(
                        request_id=request.request_id, ok=self.answers == "ok", error="the fuzzer refuses")))
        except grpc.RpcError as error:
            if not self.first.done():
                self.first.set_result(error)

    def close(self) -> None:
        self.stream.cancel()


class World:
    """The daemon (replaced by a restart), root's victim model and its engine, and the
    admin's view through which the victim is checked."""

    def __init__(self, tmp_path, daemon: Daemon, victim_engine):
        self.tmp_path, self.daemon, self.victim_engine = tmp_path, daemon, victim_engine
        self.restarted: list[Daemon] = []
        self.reached: set[str] = set()  # conditions the machine got to, checked at the end
        self.failure: str | None = None  # the first failure, with the steps that led to it
        self._connect()
        # The victim is pinned, so that no eviction the fuzzer's requests allow takes it.
        self.stub.SetPolicy(pb.PolicyRequest(model="victim", pinned=True), metadata=self.admin,
                            timeout=ANSWER_SECONDS)
        self.victim_status = self.victim()
        self.victim_report = victim_engine.report()
        self.victim_regions = [r.id for r in self.victim_status.ranks[0].regions]

    def _connect(self) -> None:
        self.channel = grpc.insecure_channel(f"unix:{self.daemon.socket}")
        self.stub = pb_grpc.SleepdStub(self.channel)
        self.admin_sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.admin_sock.connect(paths.fd_socket(self.daemon.socket))
        wire.send(self.admin_sock, {"op": "hello"})
        self.admin = [(TOKEN_METADATA, wire.recv(self.admin_sock)[0]["token"])]  # root's: an admin's

    def victim(self) -> pb.ModelStatus:
        reply = self.stub.Status(pb.StatusRequest(model="victim"), metadata=self.admin, timeout=ANSWER_SECONDS)
        status = reply.models[0]
        status.ClearField("idle_seconds")
        return status

    def assert_alive(self) -> None:
        code = self.daemon.process.poll()
        assert code is None, f"sleepd exited with {code} (70: a bug() a client reached):\n{self.daemon.log()[-4000:]}"

    def restart(self) -> None:
        """Kills the daemon and starts another on its state; the victim's engine comes back by itself."""
        os.kill(self.daemon.pid, signal.SIGKILL)
        self.daemon.process.wait(timeout=30)
        self.admin_sock.close()
        self.channel.close()
        self.daemon = Daemon(self.tmp_path, "host", *FLAGS)
        self.restarted_at = time.monotonic()
        self.restarted.append(self.daemon)
        self._connect()
        wait_for(lambda: self.victim() == self.victim_status, timeout=30, what="the victim to come back as it was")

    def close(self) -> None:
        self.admin_sock.close()
        self.channel.close()
        for daemon in self.restarted:
            daemon.stop()


EXAMPLES = itertools.count()


def recorded(function):
    """A rule or check whose call is logged, and whose first failure is kept as it happened: hypothesis
    replays a failing run to report it, and a replay against live processes may not fail the same way."""
    @functools.wraps(function)
    def step(self, *arguments, **named):
        shown = [repr(value) for value in arguments] + [f"{key}={value!r}" for key, value in named.items()]
        self.steps.append(f"{function.__name__}({', '.join(shown)})")
        try:
            return function(self, *arguments, **named)
        except Exception as error:
            if self.world.failure is None:
                self.world.failure = "".join(traceback.format_exception(error)) + "\nsteps:\n  " + \
                    "\n  ".join(self.steps)
            raise
    return step


class Sessions(RuleBasedStateMachine):
    world: World  # set by the test

    def __init__(self):
        super().__init__()
        number = next(EXAMPLES)
        self.models = {key: f"fuzz{number}{key}" for key in MODEL_KEYS}
        self.ranks: list[Rank] = []
        self.gone: list[tuple[str, int, int]] = []  # (model, rank, device) of ranks a restart cut off
        self.memory: dict[int, int] = {}  # region id -> a descriptor of its memory the fuzzer kept
        self.controllers: list[ControlStream] = []
        self.background: list[tuple[str, Future]] = []
        self.restarted = False
        self.steps: list[str] = []
        self.log_start = len(self.world.daemon.log())

    # ---- helpers ----

    # Rules have no preconditions: what they could depend on (a connection the daemon dropped, a restart
    # done) is not the same when hypothesis draws the same choices again, so a rule with nothing to act on
    # does nothing, and one that needs a session and finds none opens one.

    def pick(self, index: int) -> Rank:
        """A session, those with a connection left first: one that lost both has little left to try."""
        if not self.ranks:
            self.connect("ack")
        live = [rank for rank in self.ranks if rank.sock is not None or rank.stream_open] or self.ranks
        return live[index % len(live)]

    def model_name(self, key: str) -> str:
        return self.models.get(key, key)  # other keys are names of no model, valid or not

    def region_id(self, choice: int, rank: Rank) -> int:
        """A region id: the rank's own, another session's, the victim's, or nobody's."""
        own = [region for region, owner in self.owners().items() if owner is rank]
        others = [region for region, owner in self.owners().items() if owner is not rank]
        pools = [own, own, own, others, self.world.victim_regions, NOWHERE]
        pool = pools[choice % len(pools)] or NOWHERE
        return pool[(choice // len(pools)) % len(pool)]

    def owners(self) -> dict[int, Rank]:
        return {region: rank for rank in self.ranks for region in rank.regions}

    def expect_refusal_or_ok(self, what: str, frame: dict | None) -> None:
        """A request the fd socket understood is answered: done, or refused by a status and one line."""
        assert frame is not None, f"{what}: the daemon hung up on a well-formed request:\n{self.new_log()}"
        if not frame["ok"]:
            assert Code[frame["code"]] in REFUSALS, f"{what}: {frame}"
            assert "\n" not in frame["error"], f"{what}: {frame}"

    def call(self, what: str, method, request, metadata=()):
        """A unary call; returns the reply or the refusal's code."""
        started = time.monotonic()
        try:
            return method(request, metadata=list(metadata), timeout=ANSWER_SECONDS)
        except grpc.RpcError as error:
            return self.refusal(what, error, time.monotonic() - started)

    def refusal(self, what: str, error: grpc.RpcError, seconds: float) -> Code:
        assert seconds < ANSWER_SECONDS, f"{what}: not answered within {ANSWER_SECONDS:g} s"
        assert error.code() in REFUSALS, f"{what}: {error.code()} {error.details()}\n{self.new_log()}"
        assert "\n" not in (error.details() or ""), f"{what}: {error.details()!r}"
        return error.code()

    def caller(self, choice: int) -> list[tuple[str, str]]:
        """Whose credentials a call carries: a rank's, the admin's, made-up ones, or none."""
        if choice == 0:
            return self.world.admin
        if choice == 1:
            return [(TOKEN_METADATA, "0" * 32)]
        if choice == 2 or not self.ranks:
            return []
        rank = self.pick(choice)
        return [(TOKEN_METADATA, rank.token)] if rank.token else []

    def new_log(self) -> str:
        return self.world.daemon.log()[self.log_start:][-4000:]

    # ---- sessions ----

    @initialize(answers=st.sampled_from(ANSWERS), asleep=st.booleans(),
                returning=st.sampled_from([None, [], [("ack", False)], [("ack", False), ("slow", False)]]))
    @recorded
    def two_attached_ranks_with_memory(self, answers, asleep, returning):
        """Every example starts from a model with two attached ranks that hold memory, `asleep` or
        not; with `returning`, the daemon restarts at once and they come back (some, or none)."""
        for rank in (0, 1):
            self.connect(answers if rank else "ack")
            session = self.ranks[-1]
            assert isinstance(session.attach(session.token, self.models["a"], rank, rank), pb.Attached)
            self.fd_socket_allocate(len(self.ranks) - 1, MiB, "weights")
        if asleep:
            self.call("Sleep", self.world.stub.Sleep, pb.SleepRequest(model=self.models["a"]), self.world.admin)
        if returning is not None:
            self.the_daemon_restarts(returning)

    def may_restart(self) -> bool:
        return not self.restarted and len(self.world.restarted) < RESTARTS_PER_RUN and \
            any(rank.stream_open for rank in self.ranks)

    @rule(answers=st.sampled_from(ANSWERS))
    @recorded
    def connect(self, answers):
        if sum(rank.sock is not None for rank in self.ranks) >= 6:
            return
        rank = Rank(self.world.daemon.socket, self.world.stub, answers)
        rank.hello()
        self.ranks.append(rank)

    @rule(index=st.integers(0, 7), key=st.sampled_from([*MODEL_KEYS, "victim2", "bad name", ""]),
          rank_number=st.integers(0, 2), device=st.sampled_from([0, 1, 7]), token=st.sampled_from(["own", "other",
                                                                                                 "made up"]))
    @recorded
    def attach(self, index, key, rank_number, device, token):
        rank = self.pick(index)
        if rank.stream_open:
            return
        # Another session's token: one of an attached session, which attaches no second time.
        attached = [other.token for other in self.ranks if other is not rank and other.model is not None]
        tokens = {"own": rank.token, "other": attached[0] if attached else "", "made up": "f" * 32}
        answer = rank.attach(tokens[token], self.model_name(key), rank_number, device)
        if isinstance(answer, grpc.RpcError):
            self.refusal("attach", answer, 0)
        else:
            assert token == "own", f"attached with a token that is not the session's own ({token})"
            rank.regions.update(region.id for region in answer.regions)
            if answer.resuming:
                self.world.reached.add("handing back")

    @rule(which=st.integers(0, 7), answers=st.sampled_from(ANSWERS), as_an_engine=st.booleans())
    @recorded
    def come_back_after_the_restart(self, which, answers, as_an_engine):
        """A rank the restart cut off connects and attaches again, and is handing back what it
        maps; `as_an_engine`, it does so at once, as SleepClient would, which must succeed."""
        if not self.gone:
            return
        model, rank_number, device = self.gone.pop(which % len(self.gone))
        self.connect(answers)
        rank = self.ranks[-1]
        answer = rank.attach(rank.token, model, rank_number, device)
        if isinstance(answer, grpc.RpcError):
            self.refusal("attach again", answer, 0)
            return
        rank.regions.update(region.id for region in answer.regions)
        if not answer.resuming:  # only once the daemon stopped waiting for it
            assert time.monotonic() - self.world.restarted_at > REATTACH_SECONDS - 5, \
                f"{model} rank {rank_number} came back after a restart, but is not handing back"
            return
        self.world.reached.add("handing back")
        if any(gone[0] == model for gone in self.gone):
            self.world.reached.add("another rank recovering")
        if as_an_engine:
            for region in answer.regions:
                # A kept descriptor of memory the daemon let go of before the restart holds nothing now
                # (it was taken back); an engine maps the region's current memory, which this one may not have fetched.
                if region.state == pb.MAPPED and region.id in self.memory and os.fstat(self.memory[region.id]).st_size:
                    frame, _ = rank.request({"op": "hand_back", "region": region.id}, [self.memory[region.id]])
                    assert frame and frame["ok"], f"hand_back of region {region.id}: {frame}"
            frame, _ = rank.request({"op": "handed_back"})
            assert frame and frame["ok"], f"handed_back: {frame}"
            rank.handing_back = False
            self.world.reached.add("handed_back")

    @rule(index=st.integers(0, 7), message=st.sampled_from(["stray ack", "second attach", "detach", "half-close",
                                                            "cancel"]), op_id=st.integers(0, 2 ** 64 - 1))
    @recorded
    def on_the_session_stream(self, index, message, op_id):
        rank = self.pick(index)
        if message == "stray ack":
            rank.send_on_stream(pb.EngineMessage(ack=pb.Ack(op_id=op_id, ok=bool(op_id % 2))))
        elif message == "second attach":
            rank.send_on_stream(pb.EngineMessage(attach=pb.Attach(token=rank.token, model=self.models["b"])))
        elif message == "detach":
            rank.send_on_stream(pb.EngineMessage(detach=pb.Detach()))
        elif message == "half-close":
            rank.send_on_stream(None)
        elif rank.stream is not None:
            rank.stream.cancel()

    @rule(index=st.integers(0, 7))
    @recorded
    def close_the_fd_socket(self, index):
        self.pick(index).close_fd_socket()

    # ---- the fd socket ----

    @rule(index=st.integers(0, 7), choices=st.lists(st.integers(0, 40), min_size=1, max_size=3),
          shape=st.sampled_from(["ids", "none", "too many", "strings"]))
    @recorded
    def fetch(self, index, choices, shape):
        rank = self.pick(index)
        if rank.sock is None:
            return
        ids = {"ids": [self.region_id(c, rank) for c in choices], "none": [], "too many": list(range(1, 300)),
               "strings": [str(c) for c in choices]}[shape]
        frame, fds = rank.request({"op": "fetch", "regions": ids})
        self.expect_refusal_or_ok("fetch", frame)
        if frame["ok"]:
            assert len(fds) == len(ids) and not set(ids) & set(self.world.victim_regions), (ids, frame)
            for region, fd in zip(ids, fds):
                self.keep_memory(region, fd)

    def keep_memory(self, region: int, fd: int) -> None:
        old = self.memory.pop(region, None)
        if old is not None:
            os.close(old)
        self.memory[region] = fd

    @rule(index=st.integers(0, 7), size=SIZES, tag=TAGS)
    @recorded
    def fd_socket_allocate(self, index, size, tag):
        rank = self.pick(index)
        if rank.sock is None:
            return
        frame, fds = rank.request({"op": "allocate", "size": size, "tag": tag})
        self.expect_refusal_or_ok("allocate", frame)
        if frame["ok"]:
            assert rank.session_id and len(fds) == 1, frame
            rank.regions.add(frame["region"])
            self.keep_memory(frame["region"], fds[0])

    @rule(index=st.integers(0, 7), choice=st.integers(0, 40),
          memory=st.sampled_from(["its own", "another region's", "/dev/null", "a small memfd", "none", "two"]))
    @recorded
    def hand_back(self, index, choice, memory):
        rank = self.pick(index)
        if rank.sock is None:
            return
        region = self.region_id(choice, rank)
        fds = []
        try:
            if memory == "its own" and region in self.memory:
                fds = [os.dup(self.memory[region])]
            elif memory == "another region's" and self.memory:
                fds = [os.dup(next(iter(self.memory.values())))]
            elif memory == "/dev/null":
                fds = [os.open("/dev/null", os.O_RDONLY)]
            elif memory == "a small memfd":
                fds = [os.memfd_create("fuzz")]
                os.ftruncate(fds[0], 4096)
            elif memory == "two":
                fds = [os.open("/dev/null", os.O_RDONLY), os.open("/dev/null", os.O_RDONLY)]
            handing_back = rank.handing_back and rank.stream_open
            frame, _ = rank.request({"op": "hand_back", "region": region}, fds)
        finally:
            wire.close_all(fds)
        self.expect_refusal_or_ok(f"hand_back of region {region} with {memory}", frame)
        if frame["ok"]:
            assert handing_back, f"a hand_back from a session that is not handing back was taken: {frame}"
            self.world.reached.add("handed back memory")

    @rule(index=st.integers(0, 7))
    @recorded
    def handed_back(self, index):
        rank = self.pick(index)
        if rank.sock is None:
            return
        handing_back, stream_open = rank.handing_back, rank.stream_open
        frame, _ = rank.request({"op": "handed_back"})
        self.expect_refusal_or_ok("handed_back", frame)
        if not handing_back:
            assert frame["code"] == "FAILED_PRECONDITION", frame
            self.world.reached.add("handed_back refused")
        elif frame["ok"]:
            rank.handing_back = False
            self.world.reached.add("handed_back")
        else:
            assert not stream_open or not rank.stream_open, f"a rank handing back was refused: {frame}"

    @rule(index=st.integers(0, 7), choice=st.integers(0, 40), device_pid=st.sampled_from([1, os.getpid(), -5]))
    @recorded
    def replace(self, index, choice, device_pid):
        rank = self.pick(index)
        if rank.sock is None:
            return
        frame, _ = rank.request({"op": "replace", "region": self.region_id(choice, rank), "device_pid": device_pid})
        self.expect_refusal_or_ok("replace", frame)
        assert not frame["ok"], "the host backend hands memory back; it never replaces it"

    @rule(index=st.integers(0, 7), payload=st.sampled_from([
        b"", b"not json", b"[1, 2]", b'{"op": "nothing"}', b'{"op": 5}', b'{"op": "hello", "x": [1]}',
        b'{"op": "fetch", "regions": [1]}', b"\xff" * 10]), stray_fds=st.integers(0, 2))
    @recorded
    def garbage(self, index, payload, stray_fds):
        """What is no request (or carries descriptors it does not take) may cost the connection, nothing more."""
        rank = self.pick(index)
        fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(stray_fds)]
        try:
            frame, received = rank.exchange(payload, fds)
        finally:
            wire.close_all(fds)
        wire.close_all(received)
        if frame is not None:
            assert frame.get("ok") in (True, False), frame
            if frame["ok"] is False:
                assert "\n" not in frame["error"], frame

    # ---- gRPC calls on behalf of a session ----

    @rule(index=st.integers(0, 7), session=st.sampled_from(["own", "another's", "made up"]), size=SIZES, tag=TAGS,
          persist=st.booleans())
    @recorded
    def grpc_allocate(self, index, session, size, tag, persist):
        rank = self.pick(index)
        session_id = {"own": rank.session_id, "another's": self.pick(index + 1).session_id, "made up": "0" * 32}
        reply = self.call("Allocate", self.world.stub.Allocate, pb.AllocateRequest(
            session_id=session_id[session], size=size, tag=tag, persist=persist), self.caller(index))
        if isinstance(reply, pb.Region):
            owner = rank if session == "own" else self.pick(index + 1)
            assert session_id[session], "an allocation without a session"
            owner.regions.add(reply.id)

    @rule(index=st.integers(0, 7), session=st.sampled_from(["own", "another's", "made up"]),
          choice=st.integers(0, 40))
    @recorded
    def grpc_free(self, index, session, choice):
        rank = self.pick(index)
        session_id = {"own": rank.session_id, "another's": self.pick(index + 1).session_id, "made up": "0" * 32}
        region = self.region_id(choice, rank)
        reply = self.call("Free", self.world.stub.Free, pb.FreeRequest(session_id=session_id[session],
                                                                        region_id=region % (1 << 64)))
        if isinstance(reply, pb.FreeReply):
            assert region not in self.world.victim_regions, "a fuzzer's session freed the victim's region"
            for owner in self.ranks:
                owner.regions.discard(region)

    @rule(index=st.integers(0, 7), session=st.sampled_from(["own", "made up"]))
    @recorded
    def touch(self, index, session):
        rank = self.pick(index)
        self.call("Touch", self.world.stub.Touch,
                  pb.TouchRequest(session_id=rank.session_id if session == "own" else "f" * 32))

    def model_request(self, kind: str, key: str, level: int, tags: list[str], other: str, flag: bool):
        model = self.model_name(key)
        if kind == "Sleep":
            return pb.SleepRequest(model=model, level=level, tags=tags)
        if kind == "Wake":
            return pb.WakeRequest(model=model, tags=tags, evict=flag)
        if kind == "EnsureAwake":
            # Waiting for someone else's wake is bounded here, as the daemon's own limit is minutes.
            return pb.EnsureAwakeRequest(model=model, evict=flag, wait_only=flag, timeout_seconds=0.3 - level)
        if kind == "Swap":
            return pb.SwapRequest(to_model=model, from_models=[self.model_name(other)])
        if kind == "SetPolicy":
            return pb.PolicyRequest(model=model, priority=level, eviction_level=level,
                                    idle_seconds=0.5 if flag else 0.0)
        return pb.StatusRequest(model=model)

    @rule(index=st.integers(0, 7), caller=st.integers(0, 9),
          kind=st.sampled_from(["Sleep", "Wake", "EnsureAwake", "Swap", "SetPolicy", "Status"]),
          key=st.sampled_from([*MODEL_KEYS, "nobody", "bad name"]), level=st.integers(0, 3),
          tags=st.lists(TAGS, max_size=2), other=st.sampled_from([*MODEL_KEYS, "nobody"]), flag=st.booleans(),
          background=st.booleans())
    @recorded
    def model_call(self, index, caller, kind, key, level, tags, other, flag, background):
        """A call on a model as its rank, its owner, an admin or a stranger would make it; in the
        background, so that the next steps arrive while it runs (mid-sleep, mid-wake)."""
        request = self.model_request(kind, key, level, tags, other, flag)
        method = getattr(self.world.stub, kind)
        metadata = self.caller(caller)
        if background and kind != "Status" and len(self.background) < 2:
            self.background.append((kind, method.future(request, metadata=metadata, timeout=ANSWER_SECONDS)))
            self.world.reached.add("mid-operation")
        else:
            self.call(kind, method, request, metadata)

    @rule()
    @recorded
    def an_operation_in_the_background_ends(self):
        if not self.background:
            return
        self.finish(*self.background.pop(0))

    def finish(self, kind: str, future) -> None:
        started = time.monotonic()
        try:
            future.result(timeout=ANSWER_SECONDS)
        except grpc.RpcError as error:
            self.refusal(kind, error, time.monotonic() - started)
        except FutureTimeout:
            raise AssertionError(f"{kind} was not answered within {ANSWER_SECONDS:g} s")

    @rule(caller=st.integers(0, 9), key=st.sampled_from([*MODEL_KEYS, "nobody"]),
          answers=st.sampled_from(["ok", "refuse", "never"]))
    @recorded
    def controller(self, caller, key, answers):
        if len(self.controllers) >= 2:
            return
        token = dict(self.caller(caller)).get(TOKEN_METADATA, "")
        controller = ControlStream(self.world, self.model_name(key), token, answers)
        self.controllers.append(controller)
        try:
            first = controller.first.result(timeout=ANSWER_SECONDS)
        except FutureTimeout:
            raise AssertionError("a controller's attach was not answered")
        if isinstance(first, grpc.RpcError):
            self.refusal("Control", first, 0)

    @rule()
    @recorded
    def a_moment_passes(self):
        time.sleep(0.3)

    # ---- the daemon restarts ----

    @rule(returning=st.lists(st.tuples(st.sampled_from(ANSWERS), st.booleans()), max_size=2))
    @recorded
    def the_daemon_restarts(self, returning):
        """Killed and started again on its state: its attached ranks are recovering; those `returning`
        attach again at once and are handing back, while the others are still recovering."""
        if not self.may_restart():
            return
        for kind, future in self.background:
            self.finish(kind, future)
        self.background.clear()
        self.gone = [(rank.model, rank.rank, rank.device) for rank in self.ranks
                     if rank.model is not None and rank.stream_open and rank.sock is not None]
        self.world.restart()
        self.restarted = True
        self.world.reached.add("restart")
        for controller in self.controllers:
            controller.close()
        self.controllers.clear()
        for rank in self.ranks:
            rank.close()
        self.ranks.clear()
        for answers, as_an_engine in returning[:len(self.gone)]:
            self.come_back_after_the_restart(0, answers, as_an_engine)

    # ---- what holds after every step ----

    @invariant()
    @recorded
    def the_daemon_serves_and_the_victim_is_untouched(self):
        self.world.assert_alive()
        assert self.world.victim() == self.world.victim_status

    @recorded
    def teardown(self):
        try:
            for kind, future in self.background:
                self.finish(kind, future)
        finally:
            for controller in self.controllers:
                controller.close()
            for rank in self.ranks:
                rank.close()
            wire.close_all(self.memory.values())
        self.world.assert_alive()
        assert self.world.victim() == self.world.victim_status
        assert self.world.victim_engine.report() == self.world.victim_report
        assert "Traceback" not in self.new_log(), self.new_log()


# About a minute and a half on two cores. SLEEPD_PROTOCOL_EXAMPLES searches longer, by hand.
MACHINE_SETTINGS = settings(
    max_examples=int(os.environ.get("SLEEPD_PROTOCOL_EXAMPLES", "25")), stateful_step_count=40, deadline=None,
    suppress_health_check=list(HealthCheck), database=None,
    # No shrinking: a run replayed against live processes and a restarted daemon does not draw the same
    # way twice, so the failing run is reported as it happened (`recorded`).
    phases=(Phase.generate,))
# The conditions a session can be in, each of which a run must reach to prove something about it.
CONDITIONS = {"mid-operation", "restart", "handing back", "another rank recovering", "handed_back",
              "handed_back refused"}


def test_no_message_from_any_session_in_any_condition_stops_the_daemon_or_touches_another_model(
        tmp_path, start_daemon, start_engine):
    daemon = start_daemon(*FLAGS[4:])
    victim = start_engine(daemon, "victim", regions=[("weights", 4 * MiB), ("kv_cache", 2 * MiB)], seed=3)
    world = Sessions.world = World(tmp_path, daemon, victim)
    try:
        try:
            run_state_machine_as_test(Sessions, settings=MACHINE_SETTINGS)
        except Exception:
            if world.failure is not None:
                pytest.fail(world.failure, pytrace=False)
            raise
        assert CONDITIONS <= world.reached, f"not reached: {CONDITIONS - world.reached}"
    finally:
        world.close()
