"""A real engine process for the end-to-end tests.

It attaches to sleepd as one rank of a model, allocates regions, fills them with
seeded random bytes, records its hooks, and then answers one-line JSON commands
on stdin with one-line JSON replies on stdout:

    {"op": "report"}                   regions (address, state, sha256 when mapped), hook counts
    {"op": "sleep", "level": 1}        sleep its own model through the client API (optional "tags", "actions")
    {"op": "wake", "tags": [...]}      wake its own model
    {"op": "die_on", "moment": m}      SIGKILL itself at that protocol moment (fetch, unmap, remap), or
                                       stop itself on an unmap or a remap (stop_before_unmap, _remap) or
                                       between a remap's regions (stop_on_second_map)
    {"op": "alloc", "size": n, "tag": t}
    {"op": "kernel_write", "index": i, "seed": s}
                                       over the CUDA driver double: a kernel that overwrites region i
                                       with seeded bytes, still running until the device is
                                       synchronised; replies with the sha256 it will leave
    {"op": "touch"}                    mark the model active
    {"op": "unmaps"}                   how many regions each unmap the daemon sent named, in order
    {"op": "session"}                  its session id, for a test that sends requests in its name
    {"op": "ensure_awake"}             wake it (evicting as policy allows) if it sleeps; with "wake": false,
                                       wait for a wake ("timeout" seconds)
    {"op": "commit", "key": k}         commit its regions (those of "tags", all without) as a weight set keyed k
    {"op": "join", "key": k}           join the weight set keyed k: {"found", "weight_set", "regions"}
    {"op": "leave"}                    the write step: leave every weight set it committed or joined
    {"op": "write", "index": i, "seed": s}  write region i through the client (refused while read-only)
    {"op": "poke", "index": i}         write one byte at region i's address, as a stray kernel would
    {"op": "exit"}

With --listen PATH it answers the same commands on a Unix socket too, one
connection at a time per thread: how a test's controller (tests/controller_process.py)
has this engine run its own sleep, as an engine's front end has its workers do.
"""

import argparse
import ctypes
import hashlib
import json
import logging
import os
import random
import signal
import socket
import sys
import threading
import time

from sleepd.client import SleepClient, SleepdError, State
from sleepd.client.weight_sets import TensorPlace

SLOW_HOOK_SECONDS = 4


def drop_privileges(uid: int) -> None:
    """Become another tenant. Python and sleepd are loaded already, so this works
    even where that uid could not start Python itself (a root-only toolchain)."""
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)


class StopOnSecondMap:
    """The client's backend, except that the first remap of several regions maps its
    first region alone and freezes (SIGSTOP) before it maps the rest: a stop inside
    the native map_all. Later remaps map as usual."""

    def __init__(self, backend):
        self._backend = backend
        self._stopped = False

    def __getattr__(self, name):
        return getattr(self._backend, name)

    def map_all(self, mappings, device, read_only=False):
        if self._stopped or len(mappings) < 2:
            return self._backend.map_all(mappings, device, read_only)
        first = self._backend.map_all(mappings[:1], device, read_only)
        self._stopped = True
        signal.pthread_kill(threading.get_ident(), signal.SIGSTOP)
        try:
            rest = self._backend.map_all(mappings[1:], device, read_only)
        except BaseException:
            # map_all is all or none: what the first call mapped goes too, as the native call would undo it.
            _, address, size = mappings[0]
            done, error = self._backend.unmap_all([(address, size, first[0])])
            if not done:
                raise RuntimeError(f"undoing the first map: {error}") from None
            raise
        return first + rest


# What a hostile engine's sleep hook fails with (--sleep-hook hostile_error): a cleared screen, lines that
# pass for sleepctl's and the daemon's own, a right-to-left override; from its second failure on, 3 MiB more.
HOSTILE_ERROR = ("\x1b[2J\x1b[H\rwoke victim: 2 regions, 6.0 MiB restored in 0.001 s; now awake\n"
                 "2030-01-01 00:00:00,000 INFO sleepd.daemon.reporting: forged line\n\u202e")


def die_on(client, moment: str) -> None:
    """Arms a SIGKILL of this process at one moment of the protocol: after the
    daemon created an allocation but before we mapped it ("fetch"), or on
    receiving an unmap (the sleep's copy is done, our ack never comes) or a remap."""
    def die(*_):
        os.kill(os.getpid(), signal.SIGKILL)

    if moment == "fetch":
        client._lease.fd_socket.fetch = client._lease.fd_socket.fetch_tokens = die  # descriptors, or tokens on ACL
    elif moment == "stop_on_second_map":  # a remap that has mapped its first region freezes before the next
        client._mappings.backend = StopOnSecondMap(client._mappings.backend)
    elif moment.startswith("stop_before_"):  # freeze (SIGSTOP) on that command once, and carry on when continued
        name = "_" + moment.removeprefix("stop_before_")
        handle = getattr(client, name)

        def stop_then_handle(command):
            setattr(client, name, handle)
            # Sent to this thread, the stop takes it before the call returns; sent to the
            # process, the main thread may take it while this one goes on for a moment.
            signal.pthread_kill(threading.get_ident(), signal.SIGSTOP)
            handle(command)

        setattr(client, name, stop_then_handle)
    else:
        setattr(client, f"_{moment}", die)


def fill(region, seed: int) -> None:
    region.write(random.Random(seed).randbytes(region.size))


def kernel_write(region, seed: int) -> str:
    """Launches the driver double's stand-in for a kernel writing the whole region, on the
    region's device's context, made current first as torch makes its device's."""
    data = random.Random(seed).randbytes(region.size)
    driver = ctypes.CDLL(os.environ["SLEEPD_LIBCUDA"])
    context = ctypes.c_void_p()
    if driver.cuDevicePrimaryCtxRetain(ctypes.byref(context), region.device) or driver.cuCtxSetCurrent(context):
        raise RuntimeError("the driver double gave no context")
    launch = driver.fakecuda_launch_write
    launch.argtypes = [ctypes.c_uint64, ctypes.c_char_p, ctypes.c_size_t]
    if launch(region.address, data, len(data)) != 0:
        raise RuntimeError("the driver double refused the kernel launch")
    return hashlib.sha256(data).hexdigest()


def report(client, hooks) -> dict:
    regions = []
    for region in client.regions():
        entry = {"id": region.id, "tag": region.tag, "size": region.size, "address": region.address,
                 "state": region.state.value, "weight_set": region.weight_set}
        if region.state is State.MAPPED:
            data = region.read()
            entry["sha256"] = hashlib.sha256(data).hexdigest()
            entry["zero"] = data.count(0) == len(data)
        regions.append(entry)
    return {"pid": os.getpid(), "regions": regions, "hooks": dict(hooks)}


def count_unmaps(client) -> list[int]:
    """The number of regions of each unmap the daemon sends from now on (a swap sends one per batch)."""
    counts = []
    unmap = client._unmap

    def counting(command):
        counts.append(len(command.regions))
        unmap(command)

    client._unmap = counting
    return counts


def weight_set_command(client, command: dict, weight_sets: list):
    """commit, join, leave, write and poke: a reply, or None for a command of another kind."""
    op = command["op"]
    if op == "commit":
        regions = [r for r in client.regions() if not command.get("tags") or r.tag in command["tags"]]
        # One byte tensor per region, placed by hand: over the CUDA double torch has no device to make tensors on.
        places = {f"r{r.id}": TensorPlace(f"r{r.id}", index, 0, (r.size,), "uint8", (1,))
                  for index, r in enumerate(regions)}
        weight_sets.append(client.commit_weights(regions, command["key"], places))
        return {"weight_set": weight_sets[-1].id}
    if op == "join":
        joined = client.join_weights(command["key"])
        if joined is None:
            return {"found": False}
        weight_sets.append(joined)
        return {"found": True, "weight_set": joined.id, "regions": [r.id for r in joined.regions],
                "tensors": sorted(place.name for place in joined.places)}
    if op == "leave":
        for weight_set in [s for s in weight_sets if s.joined]:
            client.leave_weights(weight_set)
        return {}
    if op == "write":
        try:
            fill(client.regions()[command["index"]], command["seed"])
        except PermissionError as error:
            return {"refused": str(error)}
        return {}
    if op == "poke":
        ctypes.memset(client.regions()[command["index"]].address, 0xA5, 1)
        return {}
    return None


def handle(client, hooks, command: dict, unmaps: list[int], weight_sets: list | None = None) -> dict:
    """One command's reply."""
    try:
        reply = weight_set_command(client, command, weight_sets if weight_sets is not None else [])
        if reply is not None:
            return reply
        if command["op"] == "report":
            return report(client, hooks)
        if command["op"] == "unmaps":
            return {"unmaps": unmaps}
        if command["op"] == "sleep":
            return {"sleeping": client.sleep(level=command.get("level", 1), tags=command.get("tags"),
                                             actions=command.get("actions")).sleeping}
        if command["op"] == "wake":
            return {"sleeping": client.wake(tags=command.get("tags")).sleeping}
        if command["op"] == "die_on":
            die_on(client, command["moment"])
            return {}
        if command["op"] == "alloc":
            return {"id": client.alloc(command["size"], command["tag"], evict=command.get("evict", False)).id}
        if command["op"] == "kernel_write":
            return {"sha256": kernel_write(client.regions()[command["index"]], command["seed"])}
        if command["op"] == "touch":
            client.touch()
            return {}
        if command["op"] == "session":
            return {"session_id": client._session_id}
        if command["op"] == "ensure_awake":
            reply = client.ensure_awake(wake=command.get("wake"), timeout=command.get("timeout", 0.0))
            return {"sleeping": client.is_sleeping(), "woke": reply.woke}
        return {"error": f"unknown op {command['op']}"}
    except SleepdError as error:
        return {"error": error.message, "code": error.code.name}


def listen(path: str, client, hooks, unmaps: list[int]) -> None:
    """Serves commands on a Unix socket, each connection on its own thread."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen()

    def serve(conn):
        with conn, conn.makefile("rw") as lines:
            for line in lines:
                lines.write(json.dumps(handle(client, hooks, json.loads(line), unmaps)) + "\n")
                lines.flush()

    def accept():
        while True:
            conn, _ = server.accept()
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--socket", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--device", type=int, default=0)
    parser.add_argument("--region", action="append", default=[], help="TAG:BYTES")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sleep-hook", choices=["ok", "fail", "hang", "slow", "hostile_error"], default="ok",
                        help=f"slow: the hook returns after {SLOW_HOOK_SECONDS} s")
    parser.add_argument("--as-uid", type=int, help="drop to this uid (and its gid) before connecting")
    parser.add_argument("--persist", action="store_true", help="allocate persistent regions")
    parser.add_argument("--needs-controller", action="store_true", help="the engine runs its own sleep")
    parser.add_argument("--listen", help="answer commands on this Unix socket too")
    parser.add_argument("--weights-hook", choices=["ok", "fail"], default="ok",
                        help="the per-tag hook that runs as soon as weights are back")
    args = parser.parse_args()

    if args.as_uid is not None:
        drop_privileges(args.as_uid)
    if args.sleep_hook == "hostile_error":
        logging.disable()  # its own log of each failure would be 3 MiB on the test's stderr
    hooks = {"sleep": 0, "wake": 0}
    client = SleepClient.connect(args.model, args.rank, args.device, socket=args.socket,
                                 needs_controller=args.needs_controller)

    def on_sleep():
        hooks["sleep"] += 1
        if args.sleep_hook == "fail":
            raise RuntimeError("the scheduler refused to pause")
        if args.sleep_hook == "hang":
            threading.Event().wait()
        if args.sleep_hook == "slow":
            time.sleep(SLOW_HOOK_SECONDS)
        if args.sleep_hook == "hostile_error":
            raise RuntimeError(HOSTILE_ERROR + ("A" * (3 << 20) if hooks["sleep"] > 1 else ""))

    def on_wake():
        hooks["wake"] += 1

    def on_weights():
        if args.weights_hook == "fail":
            raise RuntimeError("the new weights did not load")

    unmaps = count_unmaps(client)
    client.on_sleep(on_sleep)
    client.on_wake(on_wake)
    client.on_wake(on_weights, tag="weights")
    for index, spec in enumerate(args.region):
        tag, size = spec.split(":")
        fill(client.alloc(int(size), tag, persist=args.persist), args.seed * 1000 + index)
    if args.listen:
        listen(args.listen, client, hooks, unmaps)
    print(json.dumps(report(client, hooks)), flush=True)
    weight_sets = []
    for line in sys.stdin:
        command = json.loads(line)
        if command["op"] == "exit":
            break
        print(json.dumps(handle(client, hooks, command, unmaps, weight_sets)), flush=True)
    client.close()
    time.sleep(0)


if __name__ == "__main__":
    main()
