# PYTHON_ARGCOMPLETE_OK (argcomplete's global completion looks for this marker)
"""`sleepctl`: look at and control a running sleepd.

    sleepctl status                        devices, models, ranks, tags, bytes, state
    sleepctl sleep --model qwen --level 2
    sleepctl wake  --model qwen --tags weights
    sleepctl swap  --to llama --from qwen      overlapped: qwen out, llama in
    sleepctl policy --model qwen --priority 5 --pinned yes
    sleepctl events                        slept, woke, evicted, refused, rank_lost as they happen
    sleepctl top                           a live view of devices, models and states
    sleepctl completion bash               a completion script: source <(sleepctl completion bash)

Global options (--socket, --json, --timeout) go before or after the command.
Tables are for people; --json prints JSON for scripts. A sleep, wake or swap
that takes more than about a second shows a progress bar when stdout is a
terminal. Exit status is 0 on success; on failure one line goes to stderr and
the status is non-zero.
"""

import argparse
import json
import sys
import threading
import time
from collections import deque
from datetime import datetime

import argcomplete
import grpc
from google.protobuf.json_format import MessageToDict

from sleepd.common import paths
from sleepd.common.shown import MAX_LINE, shown
from sleepd.common.sizes import format_size
from sleepd.common.limits import MAX_LEVEL
from sleepd.proto import sleepd_pb2 as pb
from sleepd.proto import sleepd_pb2_grpc as pb_grpc

from . import completion
from .control import control_channel
from .errors import SleepdError

_STATE_NAMES = {value: name.lower() for name, value in pb.RegionState.items()}
_ASLEEP = (pb.OFFLOADED, pb.DISCARDED)
# A sleep, wake or swap still running after this many seconds gets a progress bar.
PROGRESS_AFTER = 1.0
POLL_SECONDS = 0.1


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line, like every other error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _tags(values: list[str] | None) -> list[str]:
    """--tags accepts `a b` and `a,b` alike."""
    return [tag for value in values or [] for tag in value.split(",") if tag]


def _actions(values: list[str] | None) -> list[pb.TagAction]:
    actions = []
    for value in values or []:
        tag, _, action = value.partition("=")
        if action.lower() not in ("offload", "discard"):
            raise SystemExit(f"sleepctl: --action takes TAG=offload or TAG=discard, got {value!r}")
        actions.append(pb.TagAction(tag=tag, action=pb.Action.Value(action.upper())))
    return actions


def _parser() -> argparse.ArgumentParser:
    def global_options(target: argparse.ArgumentParser, top: bool) -> None:
        # Accepted after the command too; there they override what came before it.
        default = (lambda value: value) if top else (lambda value: argparse.SUPPRESS)
        socket = target.add_argument("--socket", default=default(None),
                                     help="sleepd's gRPC socket (default $SLEEPD_SOCKET, else "
                                          "/run/sleepd/sleepd.sock, else $XDG_RUNTIME_DIR/sleepd/sleepd.sock)")
        socket.completer = argcomplete.FilesCompleter()
        target.add_argument("--json", action="store_true", default=default(False), help="print JSON for scripts")
        target.add_argument("--timeout", type=float, default=default(600.0),
                            help="seconds to wait for the daemon (default 600)")

    parser = _Parser(prog="sleepctl", description="Look at and control a running sleepd.",
                     epilog="Run `sleepctl COMMAND --help` for a command's options.")
    global_options(parser, top=True)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name, help, **kwargs):
        sub = commands.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".", **kwargs)
        global_options(sub, top=False)
        return sub

    levels = argcomplete.ChoicesCompleter(range(MAX_LEVEL + 1))

    status = command("status", "devices, models, ranks, tags, bytes and state", aliases=["ls"])
    status.add_argument("--model", default="", help="only this model").completer = completion.models

    sleep = command("sleep", "put a model to sleep")
    sleep.add_argument("--model", required=True).completer = completion.models
    level = sleep.add_argument("--level", type=int, default=1, help="0 quiesce, 1 weights offloaded and kv_cache "
                                                                    "discarded, 2 both discarded (default 1)")
    level.completer = levels
    sleep.add_argument("--tags", nargs="+", help="only these tags").completer = completion.tags
    action = sleep.add_argument("--action", nargs="+", metavar="TAG=ACTION", help="explicit offload or discard per tag")
    action.completer = completion.tag_actions

    wake = command("wake", "wake a model, all tags or some")
    wake.add_argument("--model", required=True).completer = completion.models
    wake.add_argument("--tags", nargs="+", help="only these tags").completer = completion.tags
    wake.add_argument("--evict", action="store_true", help="put other models to sleep to make room")

    swap = command("swap", "put models to sleep and wake another in their place, overlapped")
    swap.add_argument("--to", required=True, dest="to_model", help="the model to wake").completer = completion.models
    from_models = swap.add_argument("--from", nargs="+", dest="from_models", default=[],
                                    help="the models to put to sleep (default: as eviction policy picks)")
    from_models.completer = completion.models

    policy = command("policy", "show or change a model's eviction policy")
    policy.add_argument("--model", required=True).completer = completion.models
    policy.add_argument("--priority", type=int, help="lower is evicted first")
    policy.add_argument("--pinned", choices=["yes", "no"], help="a pinned model is never evicted")
    eviction_level = policy.add_argument("--eviction-level", type=int, help="the sleep level eviction uses (default 1)")
    eviction_level.completer = levels
    policy.add_argument("--idle-seconds", type=float, help="sleep by itself after this long idle (0: never)")

    events = command("events", "stream state changes as they happen")
    events.add_argument("--model", default="", help="only this model").completer = completion.models
    events.add_argument("--count", type=int, help="stop after this many events")

    top = command("top", "a live view of devices, models and states")
    top.add_argument("--model", default="", help="only this model").completer = completion.models
    top.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes (default 1)")
    top.add_argument("--once", action="store_true", help="print one frame and exit")

    completion_command = command("completion", "print a shell completion script",
                                 epilog="bash: source <(sleepctl completion bash), or save it in "
                                        "/etc/bash_completion.d/sleepctl; zsh: sleepctl completion zsh > "
                                        "\"${fpath[1]}/_sleepctl\"")
    completion_command.add_argument("shell", choices=["bash", "zsh"])
    return parser


# ---- rendering ----

def _console(stream=None):
    from rich.console import Console

    stream = stream or sys.stdout
    # Piped output never wraps (whatever $COLUMNS says): a table row stays one line, for grep and friends.
    width = None if stream.isatty() else 4096
    # No markup: a "[" in what the daemon sent is text, never a style.
    return Console(file=stream, width=width, highlight=False, soft_wrap=False, markup=False)


def _emit(renderable, console=None) -> None:
    """Prints a table or frame; piped, without the padding rich adds at the end of lines."""
    console = console or _console()
    if console.is_terminal:
        console.print(renderable)
        return
    with console.capture() as captured:
        console.print(renderable)
    sys.stdout.write("\n".join(line.rstrip() for line in captured.get().split("\n")))


def _region_summary(model: pb.ModelStatus) -> dict[str, int]:
    totals = {"mapped": 0, "offloaded": 0, "discarded": 0, "moving": 0}
    for rank in model.ranks:
        for region in rank.regions:
            state = _STATE_NAMES[region.state]
            totals[state if state in totals else "moving"] += region.size
    return totals


def _model_state(model: pb.ModelStatus) -> str:
    totals = _region_summary(model)
    if totals["moving"]:
        return "moving"
    if not model.sleeping:
        return "awake"
    return "partly awake" if totals["mapped"] else "asleep"


def _policy_text(policy: pb.ModelPolicy) -> str:
    parts = [f"priority {policy.priority}", "pinned" if policy.pinned else f"evicts to level {policy.eviction_level}"]
    if policy.idle_seconds:
        parts.append(f"idle sleep {policy.idle_seconds:g} s")
    return ", ".join(parts)


def _devices_table(reply: pb.StatusReply, bars: bool = False):
    from rich import box
    from rich.progress_bar import ProgressBar
    from rich.table import Table

    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    # What the driver reports (NVML) shows only where the daemon has it: memory other processes hold.
    driver = any(device.HasField("driver_used") for device in reply.devices)
    headers = ["DEVICE", "USED", "FREE", "BUDGET", "COMMITTED", "CAPACITY", "RESERVE"]
    for header in headers + (["DRIVER USED"] if driver else []):
        table.add_column(header, justify="left" if header == "DEVICE" else "right")
    if bars:
        table.add_column("")
    for device in reply.devices:
        row = [shown(device.name), format_size(device.used), format_size(device.free), format_size(device.budget),
               format_size(device.committed), format_size(device.capacity), format_size(device.reserve)]
        if driver:
            row.append(format_size(device.driver_used) if device.HasField("driver_used") else "-")
        if bars:
            row.append(ProgressBar(total=max(device.budget, 1), completed=device.used, width=24))
        table.add_row(*row)
    return table


def _models_table(reply: pb.StatusReply):
    from rich import box
    from rich.table import Table

    devices = {device.index: device.name for device in reply.devices}
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for header in ("MODEL", "STATE", "RANK", "DEVICE", "PID", "TAG", "REGIONS", "BYTES", "REGION STATE"):
        table.add_column(header, justify="right" if header in ("RANK", "PID", "REGIONS", "BYTES") else "left")
    for model in reply.models:
        first = True
        for rank in model.ranks:
            by_tag: dict[tuple[str, str], list[int]] = {}
            for region in rank.regions:
                entry = by_tag.setdefault((region.tag, _STATE_NAMES[region.state]), [0, 0])
                entry[0] += 1
                entry[1] += region.size
            rows = [(shown(tag), str(count), format_size(size), state)
                    for (tag, state), (count, size) in sorted(by_tag.items())] or [("-", "0", "0 B", "-")]
            for index, (tag, count, size, state) in enumerate(rows):
                table.add_row(shown(model.name) if first else "", _model_state(model) if first else "",
                              str(rank.rank) if index == 0 else "", devices.get(rank.device, str(rank.device))
                              if index == 0 else "", str(rank.pid) if index == 0 else "", tag, count, size, state)
                first = False
        if first:  # a model with no ranks left (between a rank's loss and its removal)
            table.add_row(shown(model.name), _model_state(model), "", "", "", "-", "0", "0 B", "-")
    return table


def _controller_lines(reply: pb.StatusReply) -> list[str]:
    """Who runs each model's outside sleeps, for the models whose engine runs its own or that have a controller."""
    lines = []
    for model in reply.models:
        if model.controller_pid:
            lines.append(f"{shown(model.name)}: outside sleeps and wakes go through its controller, "
                         f"pid {model.controller_pid}")
        elif model.needs_controller:
            lines.append(f"{shown(model.name)}: its engine runs its own sleep and has no controller attached; "
                         "outside sleeps are refused")
    return lines


def _print_status(reply: pb.StatusReply) -> None:
    from rich.console import Group
    from rich.text import Text

    controllers = [Text(line) for line in _controller_lines(reply)]
    _emit(Group(Text(f"backend {shown(reply.backend)}; host pool {format_size(reply.pool.used)} used of "
                     f"{format_size(reply.pool.budget)} ({shown(reply.pool.directory)})"), Text(""),
                _devices_table(reply), Text(""), _models_table(reply) if reply.models else Text("no models"),
                *([Text("")] + controllers if controllers else [])))


def _top_frame(reply: pb.StatusReply | None, error: str | None, events: deque, socket_path: str):
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
        totals = _region_summary(model)
        state = _model_state(model)
        models.add_row(shown(model.name), Text(state, style=colours.get(state, "")), str(len(model.ranks)),
                       shown(",".join(sorted({devices.get(rank.device, str(rank.device)) for rank in model.ranks}))),
                       format_size(totals["mapped"]), format_size(totals["offloaded"]),
                       format_size(totals["discarded"]), format_size(totals["moving"]),
                       f"{model.idle_seconds:.0f} s", _policy_text(model.policy))
    parts = [header, pool, Text(""), _devices_table(reply, bars=True), Text("")]
    parts.append(models if reply.models else Text("no models"))
    recent = tuple(events)  # one C-level copy: the events thread appends meanwhile
    if recent:
        lines = Text("\n".join(_event_line(event) for event in recent))
        parts += [Text(""), Panel(lines, title="recent events", title_align="left", box=box.ROUNDED)]
    return Group(*parts)


def _event_line(event: pb.Event) -> str:
    stamp = datetime.fromtimestamp(event.time).strftime("%H:%M:%S.%f")[:-3]
    size = f" ({format_size(event.bytes)})" if event.bytes else ""
    return f"{stamp} {shown(event.kind):9} {shown(event.model)} {shown(event.detail, MAX_LINE)}{size}".rstrip()


def _describe(verb: str, reply: pb.OperationReply) -> str:
    parts = [f"{reply.regions} regions"]
    for amount, what in ((reply.bytes_offloaded, "offloaded"), (reply.bytes_discarded, "discarded"),
                         (reply.bytes_restored, "restored"), (reply.bytes_zeroed, "zero-filled")):
        if amount:
            parts.append(f"{format_size(amount)} {what}")
    state = "asleep" if reply.sleeping else "awake"
    return f"{verb} {shown(reply.model)}: {', '.join(parts)} in {reply.seconds:.3f} s; now {state}"


def _describe_swap(reply: pb.SwapReply) -> str:
    lines = [_describe("slept", slept) for slept in reply.slept] + [_describe("woke", reply.woke)]
    if reply.sequential_estimate_seconds:
        lines.append(f"swap took {reply.seconds:.3f} s; one direction after the other would take about "
                     f"{reply.sequential_estimate_seconds:.3f} s at the movers' measured throughput "
                     f"({reply.seconds / reply.sequential_estimate_seconds:.2f} x)")
    else:
        lines.append(f"swap took {reply.seconds:.3f} s")
    return "\n".join(lines)


def _describe_policy(model: str, policy: pb.ModelPolicy) -> str:
    idle = f"sleeps after {policy.idle_seconds:g} s idle" if policy.idle_seconds else "no idle sleep"
    return (f"{model}: priority {policy.priority}, {'pinned' if policy.pinned else 'evictable'} "
            f"at level {policy.eviction_level}, {idle}")


# ---- progress of a sleep, wake or swap ----

class _Tracker:
    """How far an operation is, from the region states Status reports.

    The RPCs are unary: the daemon reports nothing until the end. What it does
    show meanwhile is each region's state, so progress is the bytes of the
    operation's regions that have reached their end state (asleep for a model
    going to sleep, mapped for one waking), out of those that started elsewhere.
    """

    def __init__(self, before: pb.StatusReply, going_out: set[str], coming_in: set[str], tags: set[str],
                 others_may_go: bool):
        self._out, self._in, self._tags = going_out, coming_in, tags
        self._sizes: dict[int, int] = {}
        self._direction: dict[int, str] = {}
        self._candidates: dict[int, int] = {}
        for model in before.models:
            for region in _regions(model):
                if model.name in self._out and region.state == pb.MAPPED and self._wanted(region):
                    self._track(region, "out")
                elif model.name in self._in and region.state in _ASLEEP and self._wanted(region):
                    self._track(region, "in")
                elif others_may_go and region.state == pb.MAPPED and model.name not in coming_in:
                    # Eviction (wake --evict, swap without --from) picks whom: counted once they move.
                    self._candidates[region.id] = region.size
        self.phase = ""

    def _wanted(self, region) -> bool:
        return not self._tags or region.tag in self._tags

    def _track(self, region, direction: str) -> None:
        self._sizes[region.id] = region.size
        self._direction[region.id] = direction

    @property
    def total(self) -> int:
        return sum(self._sizes.values())

    def done(self, now: pb.StatusReply) -> int:
        states = {}
        for model in now.models:
            for region in _regions(model):
                states[region.id] = region.state
                if region.id in self._candidates and region.state != pb.MAPPED:
                    self._track(region, "out")  # eviction picked this model
                    del self._candidates[region.id]
        done, moving, started = 0, False, False
        for region_id, direction in self._direction.items():
            state = states.get(region_id)
            finished = state is None or (state in _ASLEEP if direction == "out" else state == pb.MAPPED)
            if finished:
                done += self._sizes[region_id]
            moving |= state in (pb.OFFLOADING, pb.RESTORING)
            started |= finished or state in (pb.OFFLOADING, pb.RESTORING)
        if moving:
            self.phase = "copying"
        elif started:
            self.phase = "finishing"
        else:  # a sleep waits for the engines' hooks; a wake may first make room
            self.phase = "waiting for the engines" if self._out else "starting"
        return done


def _rate(bytes_per_second: float) -> str:
    for unit, scale in (("GB/s", 1e9), ("MB/s", 1e6), ("kB/s", 1e3)):
        if bytes_per_second >= scale:
            return f"{bytes_per_second / scale:.2f} {unit}"
    return f"{bytes_per_second:.0f} B/s"


def _regions(model: pb.ModelStatus):
    for rank in model.ranks:
        yield from rank.regions


def _with_progress(stub, args, call, request, title: str, tracker_for):
    """Runs a unary operation; after PROGRESS_AFTER seconds on a terminal, shows a bar
    fed by polling Status (never with --json, never when stdout is not a terminal)."""
    if args.json or not sys.stdout.isatty():
        return call(request, timeout=args.timeout)
    try:
        before = stub.Status(pb.StatusRequest(), timeout=min(args.timeout, 5))
    except grpc.RpcError:
        return call(request, timeout=args.timeout)  # the operation itself reports what is wrong
    future = call.future(request, timeout=args.timeout)
    started = time.monotonic()
    try:
        return future.result(timeout=PROGRESS_AFTER)
    except grpc.FutureTimeoutError:
        pass
    from rich.progress import BarColumn, DownloadColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
    from rich.text import Text

    class Rate(ProgressColumn):
        """Bytes done over the time since the request went out (decimal units, as bandwidth is quoted)."""

        def render(self, task):
            elapsed = time.monotonic() - started
            return Text(_rate(task.completed / elapsed if elapsed > 0 else 0.0))

    tracker = tracker_for(before)
    progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(binary_units=True), Rate(),
                        TimeElapsedColumn(), TextColumn("{task.fields[phase]}"), console=_console())
    with progress:
        task = progress.add_task(title, total=tracker.total or None, phase="", completed=0)
        while not future.done():
            try:
                done = tracker.done(stub.Status(pb.StatusRequest(), timeout=5))
                progress.update(task, total=tracker.total or None, completed=done, phase=tracker.phase)
            except grpc.RpcError:
                pass
            try:
                future.result(timeout=POLL_SECONDS)
            except grpc.FutureTimeoutError:
                continue
            except grpc.RpcError:
                break
        failed = future.exception() is not None
        progress.update(task, total=tracker.total or 1, completed=(tracker.total or 1) if not failed else
                        progress.tasks[0].completed, phase="failed" if failed else "done")
    return future.result()


# ---- commands ----

def _stream_events(stub, args) -> int:
    seen = 0
    for event in stub.Events(pb.EventsRequest(model=args.model)):
        if event.kind == "subscribed":  # the stream is live; scripts may wait for this line
            if args.json:
                print(json.dumps(MessageToDict(event, always_print_fields_with_no_presence=True)), flush=True)
            continue
        if args.json:
            print(json.dumps(MessageToDict(event, always_print_fields_with_no_presence=True)), flush=True)
        else:
            print(_event_line(event), flush=True)
        seen += 1
        if args.count and seen >= args.count:
            return 0
    return 0


def _top(stub, args, socket_path: str) -> int:
    request = pb.StatusRequest(model=args.model)
    if args.json:
        while True:
            reply = stub.Status(request, timeout=args.timeout)
            print(json.dumps(MessageToDict(reply, always_print_fields_with_no_presence=True)), flush=True)
            if args.once:
                return 0
            time.sleep(args.interval)
    if args.once:
        _emit(_top_frame(stub.Status(request, timeout=args.timeout), None, deque(), socket_path))
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
        with Live(_top_frame(None, "connecting", events, socket_path), console=_console(), auto_refresh=False,
                  screen=False) as live:
            while True:
                try:
                    reply, error = stub.Status(request, timeout=max(args.interval, 1.0)), None
                except grpc.RpcError as rpc_error:
                    reply, error = None, rpc_error.details() or rpc_error.code().name
                live.update(_top_frame(reply, error, events, socket_path), refresh=True)
                time.sleep(args.interval)
    finally:
        stream.cancel()


def _call(stub, args):
    """The request for `args.command`, and the line to print for it (None: a table)."""
    if args.command in ("status", "ls"):
        return stub.Status(pb.StatusRequest(model=args.model), timeout=args.timeout), None
    if args.command == "sleep":
        tags, actions = _tags(args.tags), _actions(args.action)
        request = pb.SleepRequest(model=args.model, level=args.level, tags=tags, actions=actions)
        selected = set(tags) | {action.tag for action in actions}
        reply = _with_progress(stub, args, stub.Sleep, request, f"sleep {args.model}",
                               lambda before: _Tracker(before, {args.model}, set(), selected, False))
        return reply, _describe("slept", reply)
    if args.command == "wake":
        tags = _tags(args.tags)
        request = pb.WakeRequest(model=args.model, tags=tags, evict=args.evict)
        reply = _with_progress(stub, args, stub.Wake, request, f"wake {args.model}",
                               lambda before: _Tracker(before, set(), {args.model}, set(tags), args.evict))
        text = _describe("woke", reply)
        if reply.evicted:
            text += f" (evicted {shown(', '.join(reply.evicted), MAX_LINE)})"
        return reply, text
    if args.command == "swap":
        request = pb.SwapRequest(to_model=args.to_model, from_models=args.from_models)
        title = f"swap {', '.join(args.from_models) or '(eviction picks)'} -> {args.to_model}"
        reply = _with_progress(stub, args, stub.Swap, request, title,
                               lambda before: _Tracker(before, set(args.from_models), {args.to_model}, set(),
                                                       not args.from_models))
        return reply, _describe_swap(reply)
    changes = {"priority": args.priority, "eviction_level": args.eviction_level, "idle_seconds": args.idle_seconds,
               "pinned": None if args.pinned is None else args.pinned == "yes"}
    reply = stub.SetPolicy(pb.PolicyRequest(model=args.model, **{k: v for k, v in changes.items() if v is not None}),
                           timeout=args.timeout)
    return reply, _describe_policy(args.model, reply)


def _rpc_failure(error: grpc.RpcError, socket_path: str, timeout: float) -> str:
    """One line. The daemon's own refusals pass through as they are; failures of the
    connection itself (no daemon, our deadline) get a hint."""
    code, details = error.code(), (error.details() or "").strip()
    if code == grpc.StatusCode.UNAVAILABLE and details.lower().startswith("failed to connect"):
        return (f"cannot reach sleepd on {socket_path}; is it running? Pass --socket or set $SLEEPD_SOCKET "
                "for another daemon [UNAVAILABLE]")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED and details.lower() == "deadline exceeded":
        return f"sleepd did not answer within {timeout:g} s; raise --timeout [DEADLINE_EXCEEDED]"
    return f"{shown(' '.join(details.split()), MAX_LINE)} [{code.name}]"


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    # Under a shell's completion (argcomplete's environment) this prints the words and exits. Options are
    # offered once a word starts with "-"; options without a completer (numbers) offer nothing, not file names.
    argcomplete.autocomplete(parser, always_complete_options=False, default_completer=argcomplete.SuppressCompleter())
    args = parser.parse_args(argv)
    if args.command == "completion":
        sys.stdout.write(completion.script(args.shell))
        return 0
    socket_path = paths.client_socket(args.socket)
    try:
        # The daemon authorises control requests by the uid it reads on the handle socket.
        channel, handles = control_channel(socket_path)
    except SleepdError as error:
        print(f"sleepctl: {shown(error.message, MAX_LINE)} [{error.code.name}]", file=sys.stderr)
        return 1
    stub = pb_grpc.SleepdStub(channel)
    try:
        if args.command == "events":
            return _stream_events(stub, args)
        if args.command == "top":
            return _top(stub, args, socket_path)
        reply, text = _call(stub, args)
    except grpc.RpcError as error:
        print(f"sleepctl: {_rpc_failure(error, socket_path, args.timeout)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0 if args.command in ("top", "events") else 130
    finally:
        channel.close()
        handles.close()
    if args.json:
        print(json.dumps(MessageToDict(reply, always_print_fields_with_no_presence=True), indent=2))
    elif text is None:
        _print_status(reply)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
