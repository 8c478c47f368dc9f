"""A hostile local tenant, for tests/test_tenants.py.

Started as root so that Python and sleepd load, it drops to the uid it is given
before it opens any socket, then runs one attack against the daemon and prints
one JSON line: what the daemon answered. (The stream flood prints a line first,
when its flood is in place, and holds it until a line arrives on stdin.)

    python hostile_tenant.py UID SOCKET ATTACK [ARGS...]
"""

import json
import os
import socket
import sys
import tempfile
import threading
import time

import grpc

from sleepd.client.handles import HandleConnection
from sleepd.common import paths
from sleepd.common.wire import TOKEN_METADATA
from sleepd.proto import sleepd_pb2 as pb
from sleepd.proto import sleepd_pb2_grpc as pb_grpc


def drop_to(uid: int) -> None:
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        for end in (source, sink):
            try:
                end.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def abstract_relay(daemon_socket: str) -> str:
    """A relay whose connections reach the daemon from an abstract address
    (gRPC reports such a peer as 'unix-abstract:…'); returns the path to dial."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    path = os.path.join(tempfile.mkdtemp(prefix="relay-"), "relay.sock")
    listener.bind(path)
    listener.listen(8)

    def serve():
        for number in range(1000):
            client, _ = listener.accept()
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            upstream.bind(f"\0sleepd-relay-{os.getpid()}-{number}")
            upstream.connect(daemon_socket)
            threading.Thread(target=_pipe, args=(client, upstream), daemon=True).start()
            threading.Thread(target=_pipe, args=(upstream, client), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return path


def answer(call) -> dict:
    """{'code': the gRPC status name, 'details': its message}; OK with no details on success."""
    try:
        call()
    except grpc.RpcError as error:
        return {"code": error.code().name, "details": error.details()}
    return {"code": "OK", "details": ""}


def relay_attack(daemon_socket: str, victim: str) -> dict:
    """Through the abstract-address relay, with no token: sleep the victim at
    level 2 (its weights discarded) and pin it."""
    with grpc.insecure_channel(f"unix:{abstract_relay(daemon_socket)}") as channel:
        stub = pb_grpc.SleepdStub(channel)
        return {"sleep": answer(lambda: stub.Sleep(pb.SleepRequest(model=victim, level=2), timeout=30)),
                "policy": answer(lambda: stub.SetPolicy(pb.PolicyRequest(model=victim, priority=99), timeout=30))}


# A safety net: every call of a flood ends by itself after this long.
FLOOD_DEADLINE = 120


class Flood:
    """Many calls held open at once on a few connections: Events streams, and Status calls
    whose request never comes (a caller that only sends headers still holds a worker)."""

    def __init__(self, daemon_socket: str, connections: int = 8):
        # Each channel its own connection, so no one connection's stream limit bounds the flood.
        self.channels = [grpc.insecure_channel(f"unix:{daemon_socket}", options=[("grpc.use_local_subchannel_pool", 1)])
                         for _ in range(connections)]
        self.calls = []
        self._silence = threading.Event()

    def events(self, count: int, metadata=()) -> dict:
        """Opens `count` Events streams; tallies those the daemon let in and those it refused."""
        streams = [pb_grpc.SleepdStub(self.channels[n % len(self.channels)]).Events(
            pb.EventsRequest(), metadata=metadata, timeout=FLOOD_DEADLINE) for n in range(count)]
        self.calls += streams
        refusals = []
        for stream in streams:
            try:
                next(stream)  # "subscribed": the stream is open
            except grpc.RpcError as error:
                refusals.append(error)
        return _tally(count, refusals)

    def silent_calls(self, count: int, metadata=()) -> dict:
        """Opens `count` Status calls that never send their request; tallies them once the
        daemon has answered all it is going to (those it let in wait for the request)."""
        def nothing():
            self._silence.wait()
            yield from ()

        pending = [self.channels[n % len(self.channels)].stream_unary(
            f"/{pb.DESCRIPTOR.services_by_name['Sleepd'].full_name}/Status",
            request_serializer=pb.StatusRequest.SerializeToString,
            response_deserializer=pb.StatusReply.FromString).future(nothing(), metadata=metadata,
                                                                     timeout=FLOOD_DEADLINE)
            for n in range(count)]
        self.calls += pending
        answered, steady_since = -1, time.monotonic()
        while time.monotonic() - steady_since < 1.0:
            now_answered = sum(call.done() for call in pending)
            if now_answered != answered:
                answered, steady_since = now_answered, time.monotonic()
            time.sleep(0.05)
        return _tally(count, [call.exception() for call in pending if call.done()])

    def close(self) -> None:
        for call in self.calls:
            call.cancel()
        self._silence.set()
        for channel in self.channels:
            channel.close()


def _tally(count: int, refusals: list) -> dict:
    """{"open": calls let in, "refused": {code: how many}, "details": the distinct refusals}."""
    codes = {}
    for error in refusals:
        codes[error.code().name] = codes.get(error.code().name, 0) + 1
    return {"open": count - len(refusals), "refused": codes,
            "details": sorted({error.details() for error in refusals})}


def flood_round(daemon_socket: str, token: str, anonymous_events: int, own_events: int, anonymous_silent: int,
                own_silent: int) -> tuple[Flood, dict]:
    """Events streams without a token and with this uid's own, then silent calls likewise."""
    flood = Flood(daemon_socket)
    mine = [(TOKEN_METADATA, token)]
    return flood, {"anonymous_events": flood.events(anonymous_events), "own_events": flood.events(own_events, mine),
                   "anonymous_silent": flood.silent_calls(anonymous_silent),
                   "own_silent": flood.silent_calls(own_silent, mine)}


def stream_flood(daemon_socket: str, *counts: str) -> dict:
    """Holds a flood open (its tally printed as the first line) until a line arrives on
    stdin, closes it, and floods again until it gets as far as the first time: then the
    daemon has given back everything the first flood held. Returns the second tally.
    `counts`: as flood_round takes them."""
    counts = [int(count) for count in counts]
    handles = HandleConnection(paths.handle_socket(daemon_socket))  # this uid's token, as any engine gets one
    flood, first = flood_round(daemon_socket, handles.token, *counts)
    print(json.dumps(first), flush=True)
    sys.stdin.readline()
    flood.close()
    deadline = time.monotonic() + 30
    while True:
        flood, again = flood_round(daemon_socket, handles.token, *counts)
        flood.close()
        if again == first or time.monotonic() > deadline:
            handles.close()
            return again
        time.sleep(0.5)


ATTACKS = {"relay": relay_attack, "stream_flood": stream_flood}


def main() -> None:
    uid, daemon_socket, attack, *args = sys.argv[1:]
    drop_to(int(uid))
    print(json.dumps(ATTACKS[attack](daemon_socket, *args)), flush=True)


if __name__ == "__main__":
    main()
