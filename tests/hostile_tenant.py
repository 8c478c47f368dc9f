"""A hostile local tenant, for tests/test_tenants.py.

Started as root so that Python and sleepd load, it drops to the uid it is given
before it opens any socket or file, then runs one attack against the daemon, or
plants something where root's daemon will look, and prints one JSON line: what
the daemon answered, or what it planted. An attack that holds connections keeps
them until its stdin closes. (The stream flood prints a line first, when its
flood is in place, and holds it until a line arrives on stdin.)

    python hostile_tenant.py UID SOCKET ATTACK [ARGS...]
"""

import contextlib
import encodings.idna  # noqa: F401  (loaded lazily by socket for host names, and perhaps unreadable after the drop)
import hashlib
import json
import os
import queue
import select
import socket
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

import grpc

from sleepd.client import SleepClient
from sleepd.client.control import control_channel
from sleepd.client.errors import SleepdError
from sleepd.client.fd_socket import FdConnection
from sleepd.common import paths, wire
from sleepd.common.fd_messages import Allocate, Allocated, Hello, Refused, Welcome, decode_reply
from sleepd.common.wire import TOKEN_METADATA
from sleepd.proto import sleepd_pb2 as pb
from sleepd.proto import sleepd_pb2_grpc as pb_grpc

MiB = 1 << 20


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


def watch_events(daemon_socket: str, seconds: str) -> dict:
    """With its own token: every event the daemon shows this uid for a while. Says
    'ready' on a line of its own once subscribed, so the test knows when to act."""
    channel, fd_socket = control_channel(daemon_socket)
    seen = []
    stream = pb_grpc.SleepdStub(channel).Events(pb.EventsRequest(), timeout=float(seconds))
    try:
        for event in stream:
            if event.kind == "subscribed":
                print("ready", flush=True)
            else:
                seen.append({"kind": event.kind, "model": event.model, "detail": event.detail})
    except grpc.RpcError as error:
        if error.code() is not grpc.StatusCode.DEADLINE_EXCEEDED:
            raise
    finally:
        channel.close()
        fd_socket.close()
    return {"events": seen}


# What an attack keeps open until the test lets go.
HELD: list = []


def census(socks: list[socket.socket]) -> dict:
    """Says hello on every connection and counts the answers: welcomed, refused
    (by status code), closed, and still waiting once no answer has come for 2 s."""
    for sock in socks:
        try:
            wire.send(sock, *Hello().encode())
        except BrokenPipeError:
            pass  # refused and closed already: the refusal is still there to read
    counts, waiting = {"welcomed": 0, "refused": {}, "closed": 0}, {sock.fileno(): sock for sock in socks}
    poller = select.poll()
    for fd in waiting:
        poller.register(fd, select.POLLIN)
    quiet_until = time.monotonic() + 2
    while waiting and time.monotonic() < quiet_until:
        for fd, _ in poller.poll(200):
            poller.unregister(fd)
            sock = waiting.pop(fd)
            try:
                frame, fds = wire.recv(sock)
            except ConnectionResetError:  # refused with our hello unread: the refusal follows
                frame, fds = wire.recv(sock)
            wire.close_all(fds)
            if frame is None:
                counts["closed"] += 1
            elif isinstance(reply := decode_reply(frame, [], Welcome), Refused):
                counts["refused"][reply.code] = counts["refused"].get(reply.code, 0) + 1
            else:
                counts["welcomed"] += 1
            quiet_until = time.monotonic() + 2
    counts["waiting"] = len(waiting)
    return counts


def flood_fd_socket(daemon_socket: str, most: str) -> dict:
    """Opens up to `most` connections to the fd socket, within 30 s, until
    the daemon's backlog has stayed full for 3 s; holds them, and reports how many
    it opened, why it stopped and what the daemon answered on each."""
    path, stopped, deadline = paths.fd_socket(daemon_socket), None, time.monotonic() + 30
    full_since = None
    while len(HELD) < int(most) and time.monotonic() < deadline:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.setblocking(False)
        try:
            sock.connect(path)
        except BlockingIOError as error:  # the backlog is full: the daemon is behind, or no longer accepts
            sock.close()
            full_since = full_since or time.monotonic()
            if time.monotonic() - full_since > 3:
                stopped = error.strerror
                break
            time.sleep(0.01)
            continue
        HELD.append(sock)
        full_since = None
    return {"opened": len(HELD), "stopped": stopped, **census(HELD)}


PLANTED_SLAB = b"attacker" * (MiB // 8)


def _digests(directory: str) -> dict:
    """{name: sha256 of what this uid reads there, or why it cannot}, symlinks named as such."""
    found = {}
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if os.path.islink(path):
            found[name] = f"symlink to {os.readlink(path)}"
            continue
        try:
            with open(path, "rb") as file:
                found[name] = hashlib.sha256(file.read()).hexdigest()
        except OSError as error:
            found[name] = error.strerror
    return found


def plant_pool(_daemon_socket: str, pool_dir: str, target: str) -> dict:
    """While root's daemon is down and /dev/shm freshly wiped: the host pool directory, made
    first, with a slab of this uid's own and a second 'slab' that is a symlink to `target`."""
    os.mkdir(pool_dir)
    os.chmod(pool_dir, 0o777)
    with open(os.path.join(pool_dir, "slab-0000"), "wb") as slab:
        slab.write(PLANTED_SLAB)
    os.chmod(os.path.join(pool_dir, "slab-0000"), 0o666)
    os.symlink(target, os.path.join(pool_dir, "slab-0001"))
    return _digests(pool_dir)


def look_in(_daemon_socket: str, directory: str) -> dict:
    """What this uid finds, and can read, in a directory."""
    try:
        return _digests(directory)
    except OSError as error:
        return {"error": error.strerror}


def make_directory(_daemon_socket: str, path: str) -> dict:
    """A directory at a path root's daemon is going to use, made first."""
    os.mkdir(path, 0o755)
    return {"made": path}


# Planting and looking need no daemon (it is not up yet, or is not asked): they ignore its socket.


def fake_daemon(daemon_socket: str, seconds: str) -> dict:
    """A fake sleepd in a directory of this uid's: says 'ready PATH' (its gRPC socket path),
    accepts on the fd socket for a while, and reports how many bytes clients sent it."""
    directory = tempfile.mkdtemp(prefix="sleepd-")
    path = os.path.join(directory, "sleepd.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(paths.fd_socket(path))
    listener.listen(8)
    listener.settimeout(float(seconds))
    print(f"ready {path}", flush=True)
    received, accepted = 0, 0
    deadline = time.monotonic() + float(seconds)
    try:
        while time.monotonic() < deadline:
            conn, _ = listener.accept()
            accepted += 1
            conn.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                while data := conn.recv(65536):
                    received += len(data)
            except OSError:
                pass
            conn.close()
    except OSError:
        pass
    return {"accepted": accepted, "received": received}


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
    fd_socket = FdConnection(paths.fd_socket(daemon_socket))  # this uid's token, as any engine gets one
    flood, first = flood_round(daemon_socket, fd_socket.token, *counts)
    print(json.dumps(first), flush=True)
    sys.stdin.readline()
    flood.close()
    deadline = time.monotonic() + 30
    while True:
        flood, again = flood_round(daemon_socket, fd_socket.token, *counts)
        flood.close()
        if again == first or time.monotonic() > deadline:
            fd_socket.close()
            return again
        time.sleep(0.5)


def premature_hand_back(daemon_socket: str, model: str) -> dict:
    """Says it has handed back everything after a daemon restart, when there was none: first on a
    fd socket connection that never attached, then as an attached rank of its own model with memory."""
    unattached = FdConnection(paths.fd_socket(daemon_socket))
    answers = {"unattached": _client_answer(unattached.handed_back)}
    unattached.close()
    with SleepClient.connect(model=model, socket=daemon_socket) as client:
        region = client.alloc(MiB, tag="weights")
        region.write(b"mine" * (MiB // 4))
        answers["attached"] = _client_answer(client._lease.fd_socket.handed_back)
        answers["twice"] = _client_answer(client._lease.fd_socket.handed_back)
        answers["bytes_kept"] = region.read() == b"mine" * (MiB // 4)
    return answers


def quota_race(daemon_socket: str, models: str, size: str) -> dict:
    """Attaches `models` models of this uid and has each allocate `size` bytes at the same moment;
    reports how many allocations the daemon granted and what it answered the others."""
    clients = [SleepClient.connect(model=f"race-{n}", socket=daemon_socket) for n in range(int(models))]
    start, answers = threading.Barrier(len(clients)), []

    def allocate(client):
        start.wait()
        try:
            client.alloc(int(size), tag="kv_cache")
            answers.append("granted")
        except SleepdError as error:
            answers.append(error.code.name)

    threads = [threading.Thread(target=allocate, args=(client,)) for client in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for client in clients:
        client.close()
    return {"granted": answers.count("granted"), "refused": sorted(a for a in answers if a != "granted")}


def stall_device(daemon_socket: str, model: str, ranks: str) -> dict:
    """Attaches `ranks` ranks of its own model, each with a region, that acknowledge a sleep's
    quiesce and then never answer; sleeps that model, and once the sleep waits on them, closes
    the fd socket connections of all ranks but the first. Says 'ready' and holds until stdin closes."""
    stub, streams = None, []
    for rank in range(int(ranks)):
        channel, fd_socket = control_channel(daemon_socket)
        stub = pb_grpc.SleepdStub(channel)
        outgoing: "queue.Queue[pb.EngineMessage]" = queue.Queue()
        outgoing.put(pb.EngineMessage(attach=pb.Attach(token=fd_socket.token, model=model, rank=rank)))
        stream = stub.Session(iter(outgoing.get, None))
        session_id = next(stream).attached.session_id
        stub.Allocate(pb.AllocateRequest(session_id=session_id, size=MiB, tag="weights"), timeout=30)
        streams.append((fd_socket, stream, outgoing))
    quiesced = threading.Semaphore(0)

    def answer_quiesce_only(stream, outgoing):
        with contextlib.suppress(grpc.RpcError):
            for command in stream:
                if command.WhichOneof("kind") == "quiesce":
                    outgoing.put(pb.EngineMessage(ack=pb.Ack(op_id=command.op_id, ok=True)))
                    quiesced.release()

    for _, stream, outgoing in streams:
        threading.Thread(target=answer_quiesce_only, args=(stream, outgoing), daemon=True).start()
    threading.Thread(target=lambda: answer(lambda: stub.Sleep(pb.SleepRequest(model=model, level=1), timeout=600)),
                     daemon=True).start()
    for _ in streams:
        quiesced.acquire()
    time.sleep(0.5)  # the daemon has sent the unmaps, holding the device, and waits for the answers
    for fd_socket, _, _ in streams[1:]:
        fd_socket.close()
    HELD.extend(streams)
    return {"ready": True}


def _client_answer(request) -> dict:
    """{'code', 'details'} of a client call (a request on the fd socket, or SleepClient's), as answer()
    gives them for gRPC calls."""
    try:
        request()
    except SleepdError as error:
        return {"code": error.code.name, "details": error.message}
    return {"code": "OK", "details": ""}


def churn_models(daemon_socket: str, count: str) -> dict:
    """Attaches `count` throwaway models one after another, each slept, woken by a request and
    detached, so that each leaves every per-model series it can; reports their names."""
    names = [f"throwaway-{os.getpid()}-{number}" for number in range(int(count))]
    for name in names:
        with SleepClient.connect(model=name, socket=daemon_socket) as client:
            client.alloc(MiB, tag="weights")
            client.sleep(level=1)
            client.ensure_awake()
    return {"names": names}


def exceed_caps(daemon_socket: str, models: str, regions: str) -> dict:
    """Attaches one model more than `models`, then allocates one region more than `regions`
    in its first model; reports how far each got and the refusal that stopped it."""
    clients, answers = [], {}
    try:
        for number in range(int(models) + 1):
            clients.append(SleepClient.connect(model=f"tenant-{number}", socket=daemon_socket))
    except SleepdError as error:
        answers["attach"] = {"code": error.code.name, "details": error.message}
    answers["attached"] = len(clients)
    allocated = []
    try:
        for _ in range(int(regions) + 1):
            allocated.append(clients[0].alloc(MiB, tag="weights"))
    except SleepdError as error:
        answers["alloc"] = {"code": error.code.name, "details": error.message}
    answers["allocated"] = len(allocated)
    for client in clients:
        client.close()
    return answers


def hold_metrics_connections(_daemon_socket: str, address: str, count: str) -> dict:
    """Opens `count` connections to the metrics endpoint, every other one with half a request
    sent, and holds them; reports how many it opened."""
    host, _, port = address.rpartition(":")
    for number in range(int(count)):
        sock = socket.create_connection((host, int(port)), timeout=10)
        if number % 2:
            try:
                sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: sleepd\r\n")
            except OSError:
                pass  # closed by the daemon already
        HELD.append(sock)
    return {"opened": len(HELD)}


def read_metrics(_daemon_socket: str, address: str) -> dict:
    """Reads /metrics without a token, and with a guessed one: what each answered."""
    answers = {}
    for name, headers in (("anonymous", {}), ("guessed", {"Authorization": "Bearer guessed"})):
        try:
            with urllib.request.urlopen(urllib.request.Request(f"http://{address}/metrics", headers=headers),
                                        timeout=10) as response:
                answers[name] = {"status": response.status, "text": response.read().decode()}
        except urllib.error.HTTPError as error:
            answers[name] = {"status": error.code, "text": error.read().decode()}
    return answers


def _what_is_left(fd: int) -> dict:
    """What the kernel still holds behind a kept descriptor, and whether it can be grown back."""
    held = os.fstat(fd)
    answer = {"size": held.st_size, "blocks": held.st_blocks}
    try:
        os.ftruncate(fd, MiB)
        answer["regrown"] = True
    except OSError as error:
        answer["regrown"] = error.strerror
    os.close(fd)
    return answer


def keep_freed_memory(daemon_socket: str, times: str, size: str) -> dict:
    """Allocates `size` bytes over the fd socket `times` times, keeps each descriptor, and
    frees the region over gRPC; then sleeps and wakes an ordinary region of its own after
    taking a second descriptor of it. What the kernel still holds behind every kept descriptor."""
    answers = {"freed": []}
    with SleepClient.connect(model="keeper", socket=daemon_socket) as client:
        for _ in range(int(times)):
            allocated = client._lease.fd_socket._request(Allocate(int(size), "kv_cache"), Allocated)
            client._lease.stub.Free(pb.FreeRequest(session_id=client._session_id, region_id=allocated.region), timeout=30)
            answers["freed"].append(_what_is_left(allocated.fd))
        region = client.alloc(4 * MiB, tag="weights")
        region.write(b"kept" * MiB)
        ((kept, _),) = client._mappings.fetch(client._lease.fd_socket, [region.id])
        client.sleep(level=1)
        answers["slept"] = _what_is_left(kept)
        client.ensure_awake()
        answers["woke_intact"] = region.read() == b"kept" * MiB
    return answers


# Names and tags no rule allows: a good one with a newline after it (what a regex's $ lets through),
# a terminal escape, a right-to-left override, one too long.
BAD_NAMES = ["mine\n", "mine\x1b[2J", "\u202emine", "m" * 129]
BAD_TAGS = ["weights\n", "kv\x1b[2J", "\u202eweights", "w" * 65]


def bad_names(daemon_socket: str, model: str) -> dict:
    """Every kind of message that carries a name or a tag, with each bad one: the fd socket's
    allocate, a session's attach, and the gRPC calls, on this uid's own `model`. What each got."""
    answers = {}
    channel, fd_socket = control_channel(daemon_socket)
    stub = pb_grpc.SleepdStub(channel)
    with SleepClient.connect(model=model, socket=daemon_socket) as client:
        client.alloc(MiB, tag="weights")
        for number, tag in enumerate(BAD_TAGS):
            answers[f"fd socket allocate {number}"] = _client_answer(
                lambda: wire.close_all([client._lease.fd_socket._request(Allocate(MiB, tag), Allocated).fd]))
            answers[f"allocate {number}"] = _client_answer(lambda: client.alloc(MiB, tag=tag))
            answers[f"sleep {number}"] = answer(lambda: stub.Sleep(pb.SleepRequest(model=model, tags=[tag]),
                                                                   timeout=30))
            answers[f"sleep action {number}"] = answer(lambda: stub.Sleep(pb.SleepRequest(
                model=model, actions=[pb.TagAction(tag=tag, action=pb.DISCARD)]), timeout=30))
            answers[f"wake {number}"] = answer(lambda: stub.Wake(pb.WakeRequest(model=model, tags=[tag]), timeout=30))
        for number, name in enumerate(BAD_NAMES):
            answers[f"attach {number}"] = _client_answer(lambda: SleepClient.connect(model=name,
                                                                                      socket=daemon_socket).close())
            answers[f"status {number}"] = answer(lambda: stub.Status(pb.StatusRequest(model=name), timeout=30))
            answers[f"events {number}"] = answer(lambda: next(stub.Events(pb.EventsRequest(model=name), timeout=30)))
            answers[f"policy {number}"] = answer(lambda: stub.SetPolicy(
                pb.PolicyRequest(model=name, idle_seconds=60), timeout=30))
            answers[f"swap {number}"] = answer(lambda: stub.Swap(pb.SwapRequest(to_model=model, from_models=[name]),
                                                                 timeout=30))
    channel.close()
    fd_socket.close()
    return answers


ATTACKS = {"relay": relay_attack, "events": watch_events, "flood": flood_fd_socket, "plant_pool": plant_pool,
           "look_in": look_in, "make_directory": make_directory, "fake_daemon": fake_daemon,
           "stream_flood": stream_flood, "premature_hand_back": premature_hand_back,
           "quota_race": quota_race, "stall_device": stall_device,
           "churn_models": churn_models, "exceed_caps": exceed_caps,
           "hold_metrics_connections": hold_metrics_connections, "read_metrics": read_metrics,
           "bad_names": bad_names, "keep_freed_memory": keep_freed_memory}


def main() -> None:
    uid, daemon_socket, attack, *args = sys.argv[1:]
    drop_to(int(uid))
    print(json.dumps(ATTACKS[attack](daemon_socket, *args)), flush=True)
    if HELD:
        sys.stdin.read()


if __name__ == "__main__":
    main()
