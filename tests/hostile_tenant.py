"""A hostile local tenant, for tests/test_tenants.py.

Started as root so that Python and sleepd load, it drops to the uid it is given
before it opens any socket or file, then runs one attack against the daemon, or
plants something where root's daemon will look, and prints one JSON line: what
the daemon answered, or what it planted.

    python hostile_tenant.py UID SOCKET ATTACK [ARGS...]
"""

import hashlib
import json
import os
import socket
import sys
import tempfile
import threading

import grpc

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
ATTACKS = {"relay": relay_attack, "plant_pool": plant_pool, "look_in": look_in, "make_directory": make_directory}


def main() -> None:
    uid, daemon_socket, attack, *args = sys.argv[1:]
    drop_to(int(uid))
    print(json.dumps(ATTACKS[attack](daemon_socket, *args)), flush=True)


if __name__ == "__main__":
    main()
