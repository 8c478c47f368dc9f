"""A hostile local tenant, for tests/test_tenants.py.

Started as root so that Python and sleepd load, it drops to the uid it is given
before it opens any socket, then runs one attack against the daemon and prints
one JSON line: what the daemon answered.

    python hostile_tenant.py UID SOCKET ATTACK [ARGS...]
"""

import json
import os
import socket
import sys
import tempfile
import threading

import grpc

from sleepd.client.control import control_channel
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


def watch_events(daemon_socket: str, seconds: str) -> dict:
    """With its own token: every event the daemon shows this uid for a while. Says
    'ready' on a line of its own once subscribed, so the test knows when to act."""
    channel, handles = control_channel(daemon_socket)
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
        handles.close()
    return {"events": seen}


ATTACKS = {"relay": relay_attack, "events": watch_events}


def main() -> None:
    uid, daemon_socket, attack, *args = sys.argv[1:]
    drop_to(int(uid))
    print(json.dumps(ATTACKS[attack](daemon_socket, *args)), flush=True)


if __name__ == "__main__":
    main()
