"""`sleepctl top`: a frame of devices, models and recent events, redrawn until interrupted."""

import threading
import time
from collections import deque
from datetime import datetime

import grpc

from sleepd.common.shown import MAX_LINE, shown
from sleepd.common.sizes import format_size
from sleepd.proto import sleepd_pb2 as pb

from .render import as_json, console, devices_table, emit, event_line, model_state, region_summary


def _policy_text(policy: pb.ModelPolicy) -> str:
    parts = [f"priority {policy.priority}", "pinned" if policy.pinned else f"evicts to level {policy.eviction_level}"]
    if policy.idle_seconds:
        parts.append(f"idle sleep {policy.idle_seconds:g} s")
    return ", ".join(parts)


def _frame(reply: pb.StatusReply | None, error: str | None, events: deque, socket_path: str):
    from rich import box
    from rich.console import Group
    from rich.panel import Panel
    from rich.progress_bar import ProgressBar
    from rich.table import Table
    from rich.text import Text

    now = datetime.now().strftime("%H:%M:%S")
    if reply is None:
        return Group(Text(f"sleepctl top · {socket_path} · {now}", style="bold"),
                     Text(f"cannot reach sleepd: {shown(error, MAX_LINE)}; retrying", style="red"))
    header = Table.grid(padding=(0, 1))
    header.add_row(Text(f"sleepctl top · backend {shown(reply.backend)} · {socket_path} · {now}", style="bold"))
    pool = Table.grid(padding=(0, 1))
    pool.add_row("host pool", ProgressBar(total=max(reply.pool.budget, 1), completed=reply.pool.used, width=24),
                 f"{format_size(reply.pool.used)} of {format_size(reply.pool.budget)}")
    models = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for name in ("MODEL", "STATE", "RANKS", "DEVICES", "AWAKE", "OFFLOADED", "DISCARDED", "MOVING", "IDLE",
                 "POLICY"):
        models.add_column(name, justify="right" if name in ("RANKS", "AWAKE", "OFFLOADED", "DISCARDED",
                                                            "MOVING", "IDLE") else "left")
    devices = {device.index: device.name for device in reply.devices}
    colours = {"awake": "green", "asleep": "blue", "partly awake": "yellow", "moving": "magenta"}
    for model in reply.models:
        totals = region_summary(model)
        state = model_state(model)
        models.add_row(shown(model.name), Text(state, style=colours.get(state, "")), str(len(model.ranks)),
                       shown(",".join(sorted({devices.get(rank.device, str(rank.device)) for rank in model.ranks}))),
                       format_size(totals["mapped"]), format_size(totals["offloaded"]),
                       format_size(totals["discarded"]), format_size(totals["moving"]),
                       f"{model.idle_seconds:.0f} s", _policy_text(model.policy))
    parts = [header, pool, Text(""), devices_table(reply, bars=True), Text("")]
    parts.append(models if reply.models else Text("no models"))
    recent = tuple(events)  # one C-level copy: the events thread appends meanwhile
    if recent:
        lines = Text("\n".join(event_line(event) for event in recent))
        parts += [Text(""), Panel(lines, title="recent events", title_align="left", box=box.ROUNDED)]
    return Group(*parts)


def top(stub, args, socket_path: str) -> int:
    request = pb.StatusRequest(model=args.model)
    if args.json:
        while True:
            reply = stub.Status(request, timeout=args.timeout)
            print(as_json(reply), flush=True)
            if args.once:
                return 0
            time.sleep(args.interval)
    if args.once:
        emit(_frame(stub.Status(request, timeout=args.timeout), None, deque(), socket_path))
        return 0
    from rich.live import Live

    events: deque = deque(maxlen=8)
    stream = stub.Events(pb.EventsRequest(model=args.model))

    def follow():
        try:
            for event in stream:
                events.append(event)
        except grpc.RpcError:
            pass

    threading.Thread(target=follow, name="events", daemon=True).start()
    try:
        with Live(_frame(None, "connecting", events, socket_path), console=console(), auto_refresh=False,
                  screen=False) as live:
            while True:
                try:
                    reply, error = stub.Status(request, timeout=max(args.interval, 1.0)), None
                except grpc.RpcError as rpc_error:
                    reply, error = None, rpc_error.details() or rpc_error.code().name
                live.update(_frame(reply, error, events, socket_path), refresh=True)
                time.sleep(args.interval)
    finally:
        stream.cancel()
