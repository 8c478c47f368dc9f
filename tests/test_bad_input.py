"""Bad requests get the right gRPC status and one readable line, and change nothing."""

import socket

import grpc
import pytest

from sleepd.client import SleepClient, SleepdError
from sleepd.common import paths, wire

from support import MiB


@pytest.fixture
def qwen(daemon, start_engine):
    return start_engine(daemon, "qwen", regions=[("weights", 2 * MiB), ("kv_cache", MiB)])


def refused(daemon, *args) -> str:
    """Runs sleepctl expecting failure; returns its one line of stderr."""
    before = daemon.status()
    result = daemon.ctl(*args, check=False)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line, got: {result.stderr!r}"
    assert daemon.status() == before, "a refused request changed state"
    return lines[0]


def test_unknown_model_is_not_found(daemon, qwen):
    line = refused(daemon, "sleep", "--model", "mistral")
    assert "NOT_FOUND" in line and "mistral" in line and "qwen" in line
    assert "NOT_FOUND" in refused(daemon, "wake", "--model", "mistral")
    assert "NOT_FOUND" in refused(daemon, "status", "--model", "mistral")


def test_unknown_tag_is_not_found(daemon, qwen):
    line = refused(daemon, "sleep", "--model", "qwen", "--tags", "lora")
    assert "NOT_FOUND" in line and "lora" in line
    assert "NOT_FOUND" in refused(daemon, "wake", "--model", "qwen", "--tags", "lora")


def test_level_7_is_invalid(daemon, qwen):
    line = refused(daemon, "sleep", "--model", "qwen", "--level", "7")
    assert "INVALID_ARGUMENT" in line and "7" in line


def test_invalid_action_is_refused(daemon, qwen):
    result = daemon.ctl("sleep", "--model", "qwen", "--action", "weights=shred", check=False)
    assert result.returncode != 0 and "TAG=offload or TAG=discard" in result.stderr
    # The daemon checks too, for callers that are not sleepctl.
    from sleepd.proto import sleepd_pb2 as pb
    from sleepd.proto import sleepd_pb2_grpc as pb_grpc

    from sleepd.client.control import control_channel

    before = daemon.status()
    channel, fd_socket = control_channel(daemon.socket)
    with channel, pytest.raises(grpc.RpcError) as error:
        pb_grpc.SleepdStub(channel).Sleep(pb.SleepRequest(model="qwen", actions=[pb.TagAction(tag="weights")]))
    fd_socket.close()
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert daemon.status() == before


@pytest.mark.parametrize("size, code", [(0, "INVALID_ARGUMENT"), (-4096, "INVALID_ARGUMENT"),
                                        (1 << 40, "RESOURCE_EXHAUSTED")])
def test_bad_allocation_sizes_are_refused(daemon, size, code):
    with SleepClient.connect("qwen", socket=daemon.socket) as client:
        before = daemon.status()
        with pytest.raises(SleepdError) as error:
            client.alloc(size, "weights")
        assert error.value.code.name == code
        assert "\n" not in error.value.message
        assert daemon.status() == before


def test_allocation_past_the_device_capacity_changes_nothing(daemon):
    with SleepClient.connect("qwen", socket=daemon.socket) as client:
        client.alloc(200 * MiB, "weights")
        before = daemon.status()
        with pytest.raises(SleepdError) as error:
            client.alloc(100 * MiB, "kv_cache")
        assert error.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"{daemon.backend}:0" in error.value.message and "qwen" in error.value.message
        assert daemon.status() == before


def test_a_region_that_is_not_yours_is_refused(daemon):
    from sleepd.proto import sleepd_pb2 as pb

    with SleepClient.connect("qwen", socket=daemon.socket) as owner, \
            SleepClient.connect("llama", socket=daemon.socket) as other:
        region = owner.alloc(MiB, "weights")
        region.write(b"\x2a")
        before = daemon.status()
        # A hostile client asking for someone else's region by id, on both sockets: as if there were none,
        # so that counting region ids shows no other model.
        with pytest.raises(grpc.RpcError) as error:
            other._lease.stub.Free(pb.FreeRequest(session_id=other._session_id, region_id=region.id))
        assert error.value.code() == grpc.StatusCode.NOT_FOUND and "qwen" not in error.value.details()
        refusals = []
        for region_id in (region.id, 999_999):
            with pytest.raises(SleepdError) as error:
                other._mappings.fetch(other._lease.fd_socket, [region_id])
            assert error.value.code == grpc.StatusCode.NOT_FOUND
            refusals.append(error.value.message.replace(str(region_id), "ID"))
        assert refusals[0] == refusals[1]
        assert daemon.status() == before
        assert region.read(0, 1) == b"\x2a"


def test_sleeping_twice_and_waking_an_awake_model_succeed(daemon, qwen):
    daemon.ctl("wake", "--model", "qwen")  # awake already: a no-op
    assert qwen.report()["hooks"] == {"sleep": 0, "wake": 0}
    daemon.ctl("sleep", "--model", "qwen")
    status = daemon.status()
    out = daemon.ctl("sleep", "--model", "qwen").stdout
    assert "0 regions" in out
    assert daemon.status() == status
    assert qwen.report()["hooks"] == {"sleep": 1, "wake": 0}


def test_a_rank_cannot_attach_twice(daemon, qwen):
    with pytest.raises(SleepdError) as error:
        SleepClient.connect("qwen", rank=0, socket=daemon.socket)
    assert error.value.code == grpc.StatusCode.ALREADY_EXISTS


def test_a_missing_device_or_bad_model_name_is_invalid(daemon):
    with pytest.raises(SleepdError) as error:
        SleepClient.connect("qwen", device=5, socket=daemon.socket)
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT and f"{daemon.backend}:1" in error.value.message
    with pytest.raises(SleepdError) as error:
        SleepClient.connect("bad name!", socket=daemon.socket)
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_garbage_on_the_fd_socket_drops_only_that_connection(daemon, qwen):
    for garbage in (b"\xff\x00not json", b"[1, 2]", b'{"op": "format_disk"}'):
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
            sock.connect(paths.fd_socket(daemon.socket))
            sock.send(garbage)
            assert wire.recv(sock) == (None, [])  # the daemon hung up
    assert qwen.report()["regions"][0]["state"] == "mapped"
    assert daemon.status()["models"][0]["name"] == "qwen"


def test_sleepctl_without_a_daemon_fails_in_one_line(tmp_path):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "sleepd.client.ctl", "--socket", str(tmp_path / "none.sock"),
                             "--timeout", "2", "status"], capture_output=True, text=True)
    assert result.returncode != 0
    assert len(result.stderr.strip().splitlines()) == 1
