"""The commands that talk to the daemon: each sends its request, prints the answer, and turns a
failure into one line on stderr and a non-zero exit status. gRPC loads with this module."""

import sys

import grpc

from sleepd.common import paths
from sleepd.common.shown import MAX_LINE, shown
from sleepd.common.sizes import format_size
from sleepd.proto import sleepd_pb2 as pb
from sleepd.proto import sleepd_pb2_grpc as pb_grpc

from ..control import control_channel
from ..errors import SleepdError
from .progress import Tracker, with_progress
from .render import as_json, describe, describe_policy, describe_swap, event_line, print_status, print_weight_sets
from .top import top


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


def _stream_events(stub, args) -> int:
    seen = 0
    for event in stub.Events(pb.EventsRequest(model=args.model)):
        if args.json:
            print(as_json(event), flush=True)
        if event.kind == "subscribed":  # the stream is live; scripts may wait for this line
            continue
        if not args.json:
            print(event_line(event), flush=True)
        seen += 1
        if args.count and seen >= args.count:
            return 0
    return 0


def _call(stub, args):
    """The request for `args.command`, and the line to print for it (None: a table)."""
    if args.command in ("status", "ls"):
        return stub.Status(pb.StatusRequest(model=args.model), timeout=args.timeout), None
    if args.command == "sleep":
        tags, actions = _tags(args.tags), _actions(args.action)
        request = pb.SleepRequest(model=args.model, level=args.level, tags=tags, actions=actions)
        selected = set(tags) | {action.tag for action in actions}
        reply = with_progress(stub, args, stub.Sleep, request, f"sleep {args.model}",
                              lambda before: Tracker(before, {args.model}, set(), selected, False))
        return reply, describe("slept", reply)
    if args.command == "wake":
        tags = _tags(args.tags)
        request = pb.WakeRequest(model=args.model, tags=tags, evict=args.evict)
        reply = with_progress(stub, args, stub.Wake, request, f"wake {args.model}",
                              lambda before: Tracker(before, set(), {args.model}, set(tags), args.evict))
        text = describe("woke", reply)
        if reply.evicted:
            text += f" (evicted {shown(', '.join(reply.evicted), MAX_LINE)})"
        return reply, text
    if args.command == "sets":
        return stub.ListWeightSets(pb.ListWeightSetsRequest(), timeout=args.timeout), None
    if args.command == "drop-set":
        reply = stub.DropWeightSet(pb.DropWeightSetRequest(weight_set=args.weight_set), timeout=args.timeout)
        return reply, f"dropped weight set {shown(reply.id)} ({format_size(reply.bytes)})"
    if args.command == "swap":
        request = pb.SwapRequest(to_model=args.to_model, from_models=args.from_models)
        title = f"swap {', '.join(args.from_models) or '(eviction picks)'} -> {args.to_model}"
        reply = with_progress(stub, args, stub.Swap, request, title,
                              lambda before: Tracker(before, set(args.from_models), {args.to_model}, set(),
                                                     not args.from_models))
        return reply, describe_swap(reply)
    changes = {"priority": args.priority, "eviction_level": args.eviction_level, "idle_seconds": args.idle_seconds,
               "pinned": None if args.pinned is None else args.pinned == "yes"}
    reply = stub.SetPolicy(pb.PolicyRequest(model=args.model, **{k: v for k, v in changes.items() if v is not None}),
                           timeout=args.timeout)
    return reply, describe_policy(args.model, reply)


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


def run(args) -> int:
    """Runs the parsed command line's command against the daemon it names; the exit status."""
    socket_path = paths.client_socket(args.socket)
    try:
        # The daemon authorises control requests by the uid it reads on the fd socket.
        channel, fd_socket = control_channel(socket_path)
    except SleepdError as error:
        print(f"sleepctl: {shown(error.message, MAX_LINE)} [{error.code.name}]", file=sys.stderr)
        return 1
    stub = pb_grpc.SleepdStub(channel)
    try:
        if args.command == "events":
            return _stream_events(stub, args)
        if args.command == "top":
            return top(stub, args, socket_path)
        reply, text = _call(stub, args)
    except grpc.RpcError as error:
        print(f"sleepctl: {_rpc_failure(error, socket_path, args.timeout)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0 if args.command in ("top", "events") else 130
    finally:
        channel.close()
        fd_socket.close()
    if args.json:
        print(as_json(reply, indent=2))
    elif args.command == "sets":
        print_weight_sets(reply)
    elif text is None:
        print_status(reply)
    else:
        print(text)
    return 0
