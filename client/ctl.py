"""`sleepctl`: look at and control a running sleepd.

    sleepctl status                        devices, models, ranks, tags, bytes, state
    sleepctl sleep --model qwen --level 2
    sleepctl wake  --model qwen --tags weights
    sleepctl swap  --to llama --from qwen      overlapped: qwen out, llama in
    sleepctl policy --model qwen --priority 5 --pinned yes
    sleepctl events                        slept, woke, evicted, refused, rank_lost as they happen

Global options (--socket, --json) come before the command. Exit status is 0 on
success; on failure one line goes to stderr and the status is non-zero.
"""

import argparse
import json
import sys
from datetime import datetime

import grpc
from google.protobuf.json_format import MessageToDict

from sleepd.common import paths
from sleepd.common.sizes import format_size
from sleepd.proto import sleepd_pb2 as pb
from sleepd.proto import sleepd_pb2_grpc as pb_grpc

_STATE_NAMES = {value: name.lower() for name, value in pb.RegionState.items()}


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
    parser = argparse.ArgumentParser(prog="sleepctl", description="Look at and control a running sleepd.")
    parser.add_argument("--socket", help="sleepd's gRPC socket (default $SLEEPD_SOCKET or /run/sleepd/sleepd.sock)")
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the daemon")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    status = commands.add_parser("status", aliases=["ls"], help="devices, models, ranks, tags, bytes and state")
    status.add_argument("--model", default="", help="only this model")

    sleep = commands.add_parser("sleep", help="put a model to sleep")
    sleep.add_argument("--model", required=True)
    sleep.add_argument("--level", type=int, default=1, help="0 quiesce, 1 weights offloaded and kv_cache "
                                                            "discarded, 2 both discarded (default 1)")
    sleep.add_argument("--tags", nargs="+", help="only these tags")
    sleep.add_argument("--action", nargs="+", metavar="TAG=ACTION", help="explicit offload or discard per tag")

    wake = commands.add_parser("wake", help="wake a model, all tags or some")
    wake.add_argument("--model", required=True)
    wake.add_argument("--tags", nargs="+", help="only these tags")
    wake.add_argument("--evict", action="store_true", help="put other models to sleep to make room")

    swap = commands.add_parser("swap", help="put models to sleep and wake another in their place, overlapped")
    swap.add_argument("--to", required=True, dest="to_model", help="the model to wake")
    swap.add_argument("--from", nargs="+", dest="from_models", default=[],
                      help="the models to put to sleep (default: as eviction policy picks)")

    policy = commands.add_parser("policy", help="show or change a model's eviction policy")
    policy.add_argument("--model", required=True)
    policy.add_argument("--priority", type=int, help="lower is evicted first")
    policy.add_argument("--pinned", choices=["yes", "no"], help="a pinned model is never evicted")
    policy.add_argument("--eviction-level", type=int, help="the sleep level eviction uses (default 1)")
    policy.add_argument("--idle-seconds", type=float, help="sleep by itself after this long idle (0: never)")

    events = commands.add_parser("events", help="stream state changes as they happen")
    events.add_argument("--model", default="", help="only this model")
    events.add_argument("--count", type=int, help="stop after this many events")
    return parser


def _print_status(reply: pb.StatusReply) -> None:
    print(f"backend {reply.backend}; host pool {format_size(reply.pool.used)} used of "
          f"{format_size(reply.pool.budget)} ({reply.pool.directory})")
    for device in reply.devices:
        print(f"\n{device.name}: budget {format_size(device.budget)} (capacity {format_size(device.capacity)} "
              f"less {format_size(device.reserve)} reserve): {format_size(device.used)} used, "
              f"{format_size(device.free)} free, {format_size(device.committed)} committed")
        rows = []
        for model in reply.models:
            for rank in model.ranks:
                if rank.device != device.index:
                    continue
                by_tag: dict[tuple[str, str], list[int]] = {}
                for region in rank.regions:
                    entry = by_tag.setdefault((region.tag, _STATE_NAMES[region.state]), [0, 0])
                    entry[0] += 1
                    entry[1] += region.size
                for (tag, state), (count, size) in sorted(by_tag.items()):
                    rows.append((model.name + (" (asleep)" if model.sleeping else ""), str(rank.rank),
                                 str(rank.pid), tag, str(count), format_size(size), state))
                if not rank.regions:
                    rows.append((model.name, str(rank.rank), str(rank.pid), "-", "0", "0 B", "-"))
        if not rows:
            print("  no models")
            continue
        header = ("MODEL", "RANK", "PID", "TAG", "REGIONS", "BYTES", "STATE")
        widths = [max(len(row[i]) for row in rows + [header]) for i in range(len(header))]
        for row in [header] + rows:
            print("  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def _describe(verb: str, reply: pb.OperationReply) -> str:
    parts = [f"{reply.regions} regions"]
    for amount, what in ((reply.bytes_offloaded, "offloaded"), (reply.bytes_discarded, "discarded"),
                         (reply.bytes_restored, "restored"), (reply.bytes_zeroed, "zero-filled")):
        if amount:
            parts.append(f"{format_size(amount)} {what}")
    state = "asleep" if reply.sleeping else "awake"
    return f"{verb} {reply.model}: {', '.join(parts)} in {reply.seconds:.3f} s; now {state}"


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


def _stream_events(stub, args) -> int:
    seen = 0
    for event in stub.Events(pb.EventsRequest(model=args.model)):
        if args.json:
            print(json.dumps(MessageToDict(event, always_print_fields_with_no_presence=True)), flush=True)
        else:
            stamp = datetime.fromtimestamp(event.time).strftime("%H:%M:%S.%f")[:-3]
            size = f" ({format_size(event.bytes)})" if event.bytes else ""
            print(f"{stamp} {event.kind:9} {event.model} {event.detail}{size}".rstrip(), flush=True)
        seen += 1
        if args.count and seen >= args.count:
            return 0
    return 0


def _call(stub, args):
    """The request for `args.command`, and the line to print for it (None: a table)."""
    if args.command in ("status", "ls"):
        return stub.Status(pb.StatusRequest(model=args.model), timeout=args.timeout), None
    if args.command == "sleep":
        reply = stub.Sleep(pb.SleepRequest(model=args.model, level=args.level, tags=_tags(args.tags),
                                           actions=_actions(args.action)), timeout=args.timeout)
        return reply, _describe("slept", reply)
    if args.command == "wake":
        reply = stub.Wake(pb.WakeRequest(model=args.model, tags=_tags(args.tags), evict=args.evict),
                          timeout=args.timeout)
        text = _describe("woke", reply)
        if reply.evicted:
            text += f" (evicted {', '.join(reply.evicted)})"
        return reply, text
    if args.command == "swap":
        reply = stub.Swap(pb.SwapRequest(to_model=args.to_model, from_models=args.from_models), timeout=args.timeout)
        return reply, _describe_swap(reply)
    changes = {"priority": args.priority, "eviction_level": args.eviction_level, "idle_seconds": args.idle_seconds,
               "pinned": None if args.pinned is None else args.pinned == "yes"}
    reply = stub.SetPolicy(pb.PolicyRequest(model=args.model, **{k: v for k, v in changes.items() if v is not None}),
                           timeout=args.timeout)
    return reply, _describe_policy(args.model, reply)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    channel = grpc.insecure_channel(f"unix:{paths.client_socket(args.socket)}")
    stub = pb_grpc.SleepdStub(channel)
    try:
        if args.command == "events":
            return _stream_events(stub, args)
        reply, text = _call(stub, args)
    except grpc.RpcError as error:
        print(f"sleepctl: {error.details()} [{error.code().name}]", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        channel.close()
    if args.json:
        print(json.dumps(MessageToDict(reply, always_print_fields_with_no_presence=True), indent=2))
    elif text is None:
        _print_status(reply)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
