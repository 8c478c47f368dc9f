"""A real controller process for the end-to-end tests: the front end of a small
engine whose ranks (tests/engine_process.py --listen) it reaches on Unix sockets.

It attaches as its model's controller and, for each request the daemon forwards,
has every rank call sleep or wake at the same time, as vLLM has every worker do.
It prints one JSON line when attached ({"attached": true} or the refusal), then
answers one-line JSON commands on stdin:

    {"op": "requests"}                      the requests the daemon forwarded so far
    {"op": "ensure_awake", "wake": bool}    ensure the model awake from here
"""

import argparse
import json
import os
import socket
import sys
import threading

from sleepd.client import Controller, SleepdError


def ask_ranks(paths: list[str], command: dict) -> None:
    """Sends `command` to every rank at once; raises if any of them failed."""
    replies = {}

    def ask(path):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.connect(path)
            with conn.makefile("rw") as lines:
                lines.write(json.dumps(command) + "\n")
                lines.flush()
                replies[path] = json.loads(lines.readline())

    threads = [threading.Thread(target=ask, args=(path,)) for path in paths]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    failed = [f"{path}: {reply['error']}" for path, reply in replies.items() if "error" in reply]
    if failed or len(replies) != len(paths):
        raise RuntimeError("; ".join(failed) or "a rank did not answer")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--socket", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--rank", action="append", default=[], help="a rank's command socket")
    parser.add_argument("--on-sleep", choices=["ok", "fail", "hang"], default="ok")
    parser.add_argument("--as-uid", type=int)
    args = parser.parse_args()
    if args.as_uid is not None:
        os.setgroups([])
        os.setgid(args.as_uid)
        os.setuid(args.as_uid)

    forwarded = []

    def on_sleep(level, tags, actions):
        forwarded.append({"sleep": level, "tags": tags, "actions": actions})
        if args.on_sleep == "fail":
            raise RuntimeError("the scheduler would not pause")
        if args.on_sleep == "hang":
            threading.Event().wait()
        ask_ranks(args.rank, {"op": "sleep", "level": level, "tags": tags, "actions": actions})

    def on_wake(tags):
        forwarded.append({"wake": tags})
        ask_ranks(args.rank, {"op": "wake", "tags": tags})

    try:
        controller = Controller.connect(args.model, on_sleep, on_wake, socket=args.socket)
    except SleepdError as error:
        print(json.dumps({"error": error.message, "code": error.code.name}), flush=True)
        return
    print(json.dumps({"attached": True}), flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        try:
            if command["op"] == "requests":
                reply = {"requests": forwarded}
            elif command["op"] == "ensure_awake":
                answer = controller.ensure_awake(wake=command.get("wake"), timeout=command.get("timeout", 0.0))
                reply = {"woke": answer.woke, "waited": answer.waited_seconds}
            else:
                reply = {"error": f"unknown op {command['op']}"}
        except SleepdError as error:
            reply = {"error": error.message, "code": error.code.name}
        print(json.dumps(reply), flush=True)
    controller.close()


if __name__ == "__main__":
    main()
