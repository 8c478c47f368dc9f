"""Two tenants on one node: each uid acts on its own models only; root and the
admin group act on all. Real processes under two uids, identified by the kernel."""

import os
import stat

import pytest

from support import OTHER, MiB, ctl_as, second_tenant_unavailable

pytestmark = pytest.mark.skipif(second_tenant_unavailable() is not None, reason=str(second_tenant_unavailable()))


@pytest.fixture
def backend():
    """Host only: the CUDA double lives in a directory only root may read."""
    return "host"


def test_a_uid_may_act_only_on_its_own_models(shared_daemon, start_engine):
    daemon = shared_daemon()
    start_engine(daemon, "root-model", regions=[("weights", 4 * MiB)])
    theirs = start_engine(daemon, "nobody-model", regions=[("weights", 4 * MiB)], as_uid=OTHER)
    before = daemon.status()

    refused = ctl_as(daemon, OTHER, "sleep", "--model", "root-model")  # as if it did not exist
    assert refused.returncode != 0 and "NOT_FOUND" in refused.stderr and "(attached: nobody-model)" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    assert daemon.status() == before

    assert ctl_as(daemon, OTHER, "sleep", "--model", "nobody-model").returncode == 0
    assert [r["state"] for r in theirs.report()["regions"]] == ["offloaded"]
    assert ctl_as(daemon, 0, "wake", "--model", "nobody-model").returncode == 0  # root acts on all
    models = {m["name"]: m for m in daemon.status()["models"]}
    assert models["nobody-model"]["ranks"][0]["pid"] == theirs.pid


def test_another_uid_cannot_attach_to_a_model_it_does_not_own(shared_daemon, start_engine):
    daemon = shared_daemon()
    start_engine(daemon, "root-model", regions=[("weights", 4 * MiB)])
    with pytest.raises(AssertionError, match="exited at start"):
        start_engine(daemon, "root-model", rank=1, regions=[("weights", 4 * MiB)], as_uid=OTHER)
    assert [r["rank"] for r in daemon.status()["models"][0]["ranks"]] == [0]


def test_members_of_the_admin_group_act_on_every_model(shared_daemon, start_engine):
    daemon = shared_daemon("--admin-group", "nogroup")
    engine = start_engine(daemon, "root-model", regions=[("weights", 4 * MiB)])
    assert ctl_as(daemon, OTHER, "sleep", "--model", "root-model").returncode == 0
    assert [r["state"] for r in engine.report()["regions"]] == ["offloaded"]


def test_only_admins_set_priority_and_pinning(shared_daemon, start_engine):
    daemon = shared_daemon()
    start_engine(daemon, "nobody-model", regions=[("weights", 4 * MiB)], as_uid=OTHER)
    refused = ctl_as(daemon, OTHER, "policy", "--model", "nobody-model", "--pinned", "yes")
    assert refused.returncode != 0 and "PERMISSION_DENIED" in refused.stderr
    assert ctl_as(daemon, OTHER, "policy", "--model", "nobody-model", "--idle-seconds", "60").returncode == 0
    assert ctl_as(daemon, 0, "policy", "--model", "nobody-model", "--pinned", "yes").returncode == 0


def test_the_sockets_let_every_uid_connect_and_requests_without_credentials_are_refused(shared_daemon,
                                                                                        start_engine):
    daemon = shared_daemon()
    engine = start_engine(daemon, "root-model", regions=[("weights", 4 * MiB)])
    for path in (daemon.socket, daemon.socket + ".fds"):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o666  # authorisation is per request, by uid
    import grpc

    from sleepd.proto import sleepd_pb2 as pb
    from sleepd.proto import sleepd_pb2_grpc as pb_grpc

    before = daemon.status()
    # On a model that exists, so that only the missing credentials can be what is refused;
    # and the same on one that does not, so that the answer says nothing about which models exist.
    answers = {}
    with grpc.insecure_channel(f"unix:{daemon.socket}") as channel:
        stub = pb_grpc.SleepdStub(channel)
        for model in ("root-model", "absent"):
            for call in (lambda: stub.Sleep(pb.SleepRequest(model=model), timeout=30),
                         lambda: stub.Wake(pb.WakeRequest(model=model), timeout=30),
                         lambda: stub.SetPolicy(pb.PolicyRequest(model=model, idle_seconds=1), timeout=30)):
                with pytest.raises(grpc.RpcError) as error:
                    call()
                assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED, error.value.details()
                assert "carries no credentials" in error.value.details()
                answers.setdefault(model, []).append(error.value.details().replace(model, "NAME"))
    assert answers["root-model"] == answers["absent"]
    assert daemon.status() == before and [r["state"] for r in engine.report()["regions"]] == ["mapped"]
