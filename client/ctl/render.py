"""What sleepctl prints: for people, the status tables and one line per finished operation or event, with
everything the daemon sent escaped (shown) before it reaches the terminal; for scripts, JSON."""

import json
import sys
from datetime import datetime

from google.protobuf.json_format import MessageToDict

from sleepd.common.shown import MAX_LINE, shown
from sleepd.common.sizes import format_size
from sleepd.proto import sleepd_pb2 as pb

_STATE_NAMES = {value: name.lower() for name, value in pb.RegionState.items()}


def as_json(message, indent: int | None = None) -> str:
    """A reply or event for scripts: every field, set or not."""
    return json.dumps(MessageToDict(message, always_print_fields_with_no_presence=True), indent=indent)


def console(stream=None):
    from rich.console import Console

    stream = stream or sys.stdout
    # Piped output never wraps (whatever $COLUMNS says): a table row stays one line, for grep and friends.
    width = None if stream.isatty() else 4096
    # No markup: a "[" in what the daemon sent is text, never a style.
    return Console(file=stream, width=width, highlight=False, soft_wrap=False, markup=False)


def emit(renderable) -> None:
    """Prints a table or frame; piped, without the padding rich adds at the end of lines."""
    out = console()
    if out.is_terminal:
        out.print(renderable)
        return
    with out.capture() as captured:
        out.print(renderable)
    sys.stdout.write("\n".join(line.rstrip() for line in captured.get().split("\n")))


def regions(model: pb.ModelStatus):
    for rank in model.ranks:
        yield from rank.regions


def region_summary(model: pb.ModelStatus) -> dict[str, int]:
    totals = {"mapped": 0, "offloaded": 0, "discarded": 0, "moving": 0}
    for region in regions(model):
        state = _STATE_NAMES[region.state]
        totals[state if state in totals else "moving"] += region.size
    return totals


def model_state(model: pb.ModelStatus) -> str:
    totals = region_summary(model)
    if totals["moving"]:
        return "moving"
    if not model.sleeping:
        return "awake"
    return "partly awake" if totals["mapped"] else "asleep"


def devices_table(reply: pb.StatusReply, bars: bool = False):
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
                state = _STATE_NAMES[region.state] + (f" (set {region.weight_set})" if region.weight_set else "")
                entry = by_tag.setdefault((region.tag, state), [0, 0])
                entry[0] += 1
                entry[1] += region.size
            rows = [(shown(tag), str(count), format_size(size), state)
                    for (tag, state), (count, size) in sorted(by_tag.items())] or [("-", "0", "0 B", "-")]
            for index, (tag, count, size, state) in enumerate(rows):
                table.add_row(shown(model.name) if first else "", model_state(model) if first else "",
                              str(rank.rank) if index == 0 else "", devices.get(rank.device, str(rank.device))
                              if index == 0 else "", str(rank.pid) if index == 0 else "", tag, count, size, state)
                first = False
        if first:  # a model with no ranks left (between a rank's loss and its removal)
            table.add_row(shown(model.name), model_state(model), "", "", "", "-", "0", "0 B", "-")
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


def print_status(reply: pb.StatusReply) -> None:
    from rich.console import Group
    from rich.text import Text

    controllers = [Text(line) for line in _controller_lines(reply)]
    emit(Group(Text(f"backend {shown(reply.backend)}; host pool {format_size(reply.pool.used)} used of "
                    f"{format_size(reply.pool.budget)} ({shown(reply.pool.directory)})"), Text(""),
               devices_table(reply), Text(""), _models_table(reply) if reply.models else Text("no models"),
               *([Text("")] + controllers if controllers else [])))


def key_text(key: bytes, width: int = 48) -> str:
    """What a weight set's key says: its text where it is text (escaped), else its bytes in hex; cut to `width`."""
    try:
        text = shown(key.decode())
    except UnicodeDecodeError:
        text = key.hex()
    return text if len(text) <= width else text[:width - 1] + "…"


def print_weight_sets(reply: pb.ListWeightSetsReply) -> None:
    from rich import box
    from rich.table import Table

    if not reply.weight_sets:
        emit("no weight sets")
        return
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for header in ("SET", "KEY", "BYTES", "WHERE", "DEVICE", "OWNER", "ENGINES", "IDLE"):
        table.add_column(header, justify="right" if header in ("BYTES", "DEVICE", "OWNER", "IDLE") else "left")
    for weight_set in reply.weight_sets:
        engines = ", ".join(f"{shown(e.model)} rank {e.rank} (pid {e.pid}{'' if e.awake else ', asleep'})"
                            for e in weight_set.engines) or "none: kept"
        table.add_row(weight_set.id, key_text(weight_set.key), format_size(weight_set.bytes), weight_set.where,
                      str(weight_set.device), str(weight_set.owner_uid), engines, f"{weight_set.idle_seconds:.0f} s")
    emit(table)


def event_line(event: pb.Event) -> str:
    stamp = datetime.fromtimestamp(event.time).strftime("%H:%M:%S.%f")[:-3]
    size = f" ({format_size(event.bytes)})" if event.bytes else ""
    return f"{stamp} {shown(event.kind):9} {shown(event.model)} {shown(event.detail, MAX_LINE)}{size}".rstrip()


def describe(verb: str, reply: pb.OperationReply) -> str:
    parts = [f"{reply.regions} regions"]
    for amount, what in ((reply.bytes_offloaded, "offloaded"), (reply.bytes_discarded, "discarded"),
                         (reply.bytes_restored, "restored"), (reply.bytes_zeroed, "zero-filled")):
        if amount:
            parts.append(f"{format_size(amount)} {what}")
    state = "asleep" if reply.sleeping else "awake"
    return f"{verb} {shown(reply.model)}: {', '.join(parts)} in {reply.seconds:.3f} s; now {state}"


def describe_swap(reply: pb.SwapReply) -> str:
    lines = [describe("slept", slept) for slept in reply.slept] + [describe("woke", reply.woke)]
    if reply.sequential_estimate_seconds:
        lines.append(f"swap took {reply.seconds:.3f} s; one direction after the other would take about "
                     f"{reply.sequential_estimate_seconds:.3f} s at the movers' measured throughput "
                     f"({reply.seconds / reply.sequential_estimate_seconds:.2f} x)")
    else:
        lines.append(f"swap took {reply.seconds:.3f} s")
    return "\n".join(lines)


def describe_policy(model: str, policy: pb.ModelPolicy) -> str:
    idle = f"sleeps after {policy.idle_seconds:g} s idle" if policy.idle_seconds else "no idle sleep"
    return (f"{model}: priority {policy.priority}, {'pinned' if policy.pinned else 'evictable'} "
            f"at level {policy.eviction_level}, {idle}")
