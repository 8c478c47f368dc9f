"""Shell completion for sleepctl, done by argcomplete: the script a shell loads, and
completers for the words only the running daemon knows, its model and tag names.

    source <(sleepctl completion bash)       # or save it in /etc/bash_completion.d/sleepctl
"""

import argcomplete

# Someone is waiting at a prompt: a daemon slower than this offers nothing.
ASK_SECONDS = 2.0


def script(shell: str) -> str:
    # No fallback to file names: where sleepctl has nothing to offer (no daemon), offer nothing.
    return argcomplete.shellcode(["sleepctl"], shell=shell, use_defaults=False)


def _status(parsed_args):
    """The StatusReply of the daemon the command line names (--socket, else $SLEEPD_SOCKET, ...); None
    if it does not answer. gRPC loads here, when a word only the daemon knows is asked for."""
    import grpc

    from sleepd.proto import sleepd_pb2 as pb
    from sleepd.proto import sleepd_pb2_grpc as pb_grpc

    from ..control import control_channel
    from ..errors import SleepdError

    try:
        channel, fd_socket = control_channel(parsed_args.socket)
    except SleepdError:
        return None
    try:
        return pb_grpc.SleepdStub(channel).Status(pb.StatusRequest(), timeout=ASK_SECONDS)
    except grpc.RpcError:
        return None
    finally:
        channel.close()
        fd_socket.close()


def models(parsed_args, **_) -> list[str]:
    reply = _status(parsed_args)
    return [] if reply is None else [model.name for model in reply.models]


def tags(parsed_args, **_) -> list[str]:
    reply = _status(parsed_args)
    if reply is None:
        return []
    return sorted({region.tag for model in reply.models for rank in model.ranks for region in rank.regions})


def tag_actions(parsed_args, **_) -> list[str]:
    """--action TAG=ACTION."""
    return [f"{tag}={action}" for tag in tags(parsed_args) for action in ("offload", "discard")]
