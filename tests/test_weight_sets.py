"""Weight sets with real engine processes, on the host backend and over the CUDA
driver double: committed weights outlive their engine, later engines join them
read-only and hold their bytes once, a write needs the write step first,
sleep, wake, eviction and a dead engine each leave the bytes right, and a set in
the host pool outlives the daemon."""

import json
import os
import signal

import pytest

from kernel import memfd_bytes
from support import MiB, by_tag, scrape, value, wait_for

WEIGHTS = 3 * MiB + 123
KEY = '{"model": "qwen", "revision": "abc123", "dtype": "bfloat16", "tp": 1, "rank": 0}'
OTHER_KEY = '{"model": "llama", "revision": "def456", "dtype": "bfloat16", "tp": 1, "rank": 0}'


@pytest.fixture(params=["host", "cuda"])
def backend(request) -> str:
    """Weight sets share descriptors: the host backend and CUDA (ACL's tokens refuse them; see below)."""
    return request.param


def weight_sets(daemon) -> list[dict]:
    return json.loads(daemon.ctl("--json", "sets").stdout).get("weightSets", [])


def device_used(daemon) -> int:
    return int(daemon.status()["devices"][0]["used"])


def own_bytes(daemon) -> int:
    """Bytes of the models' regions that are memory of their own (not a weight set's views)."""
    return sum(int(r["mappedSize"]) for model in daemon.status()["models"] for rank in model["ranks"]
               for r in rank["regions"] if not r["weightSet"] and r["state"] == "MAPPED")


def committed(daemon, start_engine, model="qwen", seed=1):
    """An engine that loaded weights and a kv cache, and committed its weights: (engine, set id, weights' sha256)."""
    engine = start_engine(daemon, model, regions=[("weights", WEIGHTS), ("kv_cache", 2 * MiB)], seed=seed)
    set_id = engine.request("commit", key=KEY, tags=["weights"])["weight_set"]
    return engine, set_id, by_tag(engine.initial)["weights"]["sha256"]


def test_an_engine_joins_committed_weights_read_only_and_they_are_held_once(daemon, start_engine):
    writer, set_id, weights = committed(daemon, start_engine)
    after_commit = by_tag(writer.report())["weights"]
    assert after_commit["sha256"] == weights and after_commit["weight_set"] == set_id
    assert after_commit["address"] == by_tag(writer.initial)["weights"]["address"], "a commit keeps the address"

    reader = start_engine(daemon, "qwen-b", regions=[("kv_cache", MiB)], seed=2)
    joined = reader.request("join", key=KEY)
    assert joined["found"] and joined["weight_set"] == set_id
    assert joined["tensors"] == [f"r{after_commit['id']}"], "the manifest names the committer's tensors"
    assert by_tag(reader.report())["weights"]["sha256"] == weights

    # Held once: the join made no device memory, as the daemon and the kernel count it.
    assert device_used(daemon) == own_bytes(daemon) + int(weight_sets(daemon)[0]["bytes"])
    if daemon.backend == "host":
        holders = [daemon.pid, writer.pid, reader.pid, *daemon.mover_pids()]
        assert memfd_bytes(holders, "/memfd:sleepd:") == own_bytes(daemon) + int(weight_sets(daemon)[0]["bytes"])

    (listed,) = weight_sets(daemon)
    assert listed["id"] == set_id and listed["where"] == "device"
    assert sorted(e["model"] for e in listed["engines"]) == ["qwen", "qwen-b"]

    assert reader.request("join", key="another key") == {"found": False}


def test_a_set_outlives_its_engine_and_a_dead_writer_leaves_no_half_set(daemon, start_engine):
    writer, set_id, weights = committed(daemon, start_engine)
    half = start_engine(daemon, "half", regions=[("weights", MiB)], seed=5)
    half.kill()  # died loading, before its commit
    writer.kill()  # a crash, after its commit
    wait_for(lambda: not [e for s in weight_sets(daemon) for e in s["engines"]], what="the writer's end")
    (kept,) = weight_sets(daemon)
    assert kept["id"] == set_id and kept["where"] == "device" and not kept["engines"]

    again = start_engine(daemon, "qwen", regions=[("kv_cache", MiB)], seed=3)
    used = device_used(daemon)
    assert again.request("join", key=KEY)["weight_set"] == set_id
    assert device_used(daemon) == used, "joining a kept set makes no memory"
    assert by_tag(again.report())["weights"]["sha256"] == weights


def test_a_write_needs_the_write_step_and_then_changes_only_that_engine(daemon, start_engine):
    writer, set_id, weights = committed(daemon, start_engine)
    reader = start_engine(daemon, "qwen-b", regions=[("kv_cache", MiB)], seed=2)
    reader.request("join", key=KEY)
    index = [r["tag"] for r in reader.report()["regions"]].index("weights")

    assert "read-only" in reader.request("write", index=index, seed=9)["refused"]
    reader.send("poke", index=index)  # a stray kernel's write, past the client's check
    assert reader.process.wait(timeout=30) == -signal.SIGSEGV
    assert by_tag(writer.report())["weights"]["sha256"] == weights, "the fault left the set unchanged"

    updater = start_engine(daemon, "qwen-c", regions=[("kv_cache", MiB)], seed=4)
    updater.request("join", key=KEY)
    address = by_tag(updater.report())["weights"]["address"]
    assert updater.request("leave") == {}
    own = by_tag(updater.report())["weights"]
    assert own["weight_set"] == "" and own["address"] == address and own["sha256"] == weights
    assert updater.request("write", index=index, seed=9) == {}
    assert by_tag(updater.report())["weights"]["sha256"] != weights
    assert by_tag(writer.report())["weights"]["sha256"] == weights, "the update stayed the updater's"
    (listed,) = weight_sets(daemon)
    assert [e["model"] for e in listed["engines"]] == ["qwen"]


def test_a_set_sleeps_once_no_engine_that_joined_it_is_awake(daemon, start_engine):
    first, set_id, weights = committed(daemon, start_engine)
    second = start_engine(daemon, "qwen-b", regions=[("kv_cache", MiB)], seed=2)
    second.request("join", key=KEY)

    daemon.ctl("sleep", "--model", "qwen", "--level", "1")
    assert by_tag(first.report())["weights"]["state"] == "offloaded"
    assert weight_sets(daemon)[0]["where"] == "device", "the other engine still computes with it"
    assert by_tag(second.report())["weights"]["sha256"] == weights

    daemon.ctl("sleep", "--model", "qwen-b", "--level", "1")
    assert weight_sets(daemon)[0]["where"] == "host"
    assert device_used(daemon) == 0, "every byte of both models left the device"
    if daemon.backend == "host":
        assert memfd_bytes([daemon.pid, first.pid, second.pid, *daemon.mover_pids()], "/memfd:sleepd:") == 0

    daemon.ctl("wake", "--model", "qwen")
    assert weight_sets(daemon)[0]["where"] == "device"
    assert by_tag(first.report())["weights"]["sha256"] == weights
    assert by_tag(second.report())["weights"]["state"] == "offloaded", "the other engine sleeps on"
    daemon.ctl("wake", "--model", "qwen-b")
    assert by_tag(second.report())["weights"]["sha256"] == weights


def test_a_level_2_sleep_leaves_the_set_and_wakes_ready_for_a_weight_update(daemon, start_engine):
    first, set_id, weights = committed(daemon, start_engine)
    second = start_engine(daemon, "qwen-b", regions=[("kv_cache", MiB)], seed=2)
    second.request("join", key=KEY)

    daemon.ctl("sleep", "--model", "qwen-b", "--level", "2")
    assert by_tag(second.report())["weights"] == {**by_tag(second.report())["weights"], "state": "discarded",
                                                  "weight_set": ""}
    assert [e["model"] for e in weight_sets(daemon)[0]["engines"]] == ["qwen"]
    daemon.ctl("wake", "--model", "qwen-b")
    woken = by_tag(second.report())["weights"]
    assert woken["zero"] and woken["weight_set"] == ""
    index = [r["tag"] for r in second.report()["regions"]].index("weights")
    assert second.request("write", index=index, seed=7) == {}, "the new weights go into memory of its own"
    assert by_tag(first.report())["weights"]["sha256"] == weights


def test_a_kept_set_gives_way_first_to_the_host_pool_then_is_dropped(start_daemon, start_engine):
    daemon = start_daemon("--host-pool-budget", "4MiB", devices=1, capacity="12MiB")
    writer, set_id, weights = committed(daemon, start_engine)
    writer.close()
    wait_for(lambda: not weight_sets(daemon)[0]["engines"], what="the set kept")

    big = start_engine(daemon, "big", regions=[("kv_cache", 9 * MiB)], seed=6)  # too many beside the set
    assert big.report()["regions"][0]["state"] == "mapped"
    (evicted,) = weight_sets(daemon)
    assert evicted["where"] == "host"

    reader = start_engine(daemon, "reader", regions=[], seed=7)
    big.close()
    assert reader.request("join", key=KEY)["weight_set"] == set_id
    assert by_tag(reader.report())["weights"]["sha256"] == weights, "it came back from the pool intact"
    reader.close()
    wait_for(lambda: not weight_sets(daemon)[0]["engines"], what="the set kept again")

    # The pool full, eviction drops it: nothing is lost that the key cannot load again.
    hog = start_engine(daemon, "hog", regions=[("weights", 3 * MiB)], seed=8)
    daemon.ctl("sleep", "--model", "hog")  # fills the pool
    start_engine(daemon, "big", regions=[("kv_cache", 10 * MiB)], seed=6)
    assert weight_sets(daemon) == []
    assert hog.request("join", key=KEY) == {"found": False}


def test_sleepctl_drops_a_kept_set_and_refuses_a_joined_one(daemon, start_engine):
    writer, set_id, _ = committed(daemon, start_engine)
    refused = daemon.ctl("drop-set", "--set", set_id, check=False)
    assert refused.returncode == 1 and "FAILED_PRECONDITION" in refused.stderr and "qwen rank 0" in refused.stderr
    missing = daemon.ctl("drop-set", "--set", "\x1b[2Jnope", check=False)
    assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr and "\x1b" not in missing.stderr
    assert "none: kept" not in daemon.ctl("sets").stdout
    writer.close()
    wait_for(lambda: "none: kept" in daemon.ctl("sets").stdout, what="the set kept")
    assert daemon.ctl("drop-set", "--set", set_id).stdout.startswith(f"dropped weight set {set_id}")
    assert weight_sets(daemon) == [] and device_used(daemon) == 0


def test_bad_commits_and_joins_are_refused_in_one_line_and_change_nothing(daemon, start_engine):
    engine = start_engine(daemon, "qwen", regions=[("weights", WEIGHTS), ("kv_cache", 2 * MiB)], seed=1)
    other = start_engine(daemon, "other", regions=[("weights", MiB)], seed=2)
    client = engine_stub(daemon, engine)
    ids = [r["id"] for r in engine.initial["regions"]]
    refusals = {
        "a key too long": client.commit(ids[:1], b"k" * 4097, b""),
        "no key": client.commit(ids[:1], b"", b""),
        "a manifest too large": client.commit(ids[:1], b"key", b"m" * ((1 << 20) + 1)),
        "no regions": client.commit([], b"key", b""),
        "a region twice": client.commit([ids[0], ids[0]], b"key", b""),
        "another engine's region": client.commit([other.initial["regions"][0]["id"]], b"key", b""),
        "a region that does not exist": client.commit([10 ** 9], b"key", b""),
        "a join with a key too long": client.join(b"k" * 4097),
        "a leave of a set that does not exist": client.leave("\x1b[2Jnope"),
    }
    for what, (code, message) in refusals.items():
        assert code in ("INVALID_ARGUMENT", "NOT_FOUND"), (what, code, message)
        assert "\n" not in message and "\x1b" not in message and len(message) < 300, (what, message)
    assert weight_sets(daemon) == []
    assert engine.report()["regions"] == engine.initial["regions"]

    daemon.ctl("sleep", "--model", "qwen")
    code, message = client.commit(ids[:1], b"key", b"")
    assert code == "FAILED_PRECONDITION" and "awake" in message, "an asleep region cannot go into a set"
    daemon.ctl("wake", "--model", "qwen")
    engine.request("commit", key=KEY, tags=["weights"])
    again = start_engine(daemon, "again", regions=[("weights", WEIGHTS)], seed=1)
    code, message = engine_stub(daemon, again).commit([again.initial["regions"][0]["id"]], KEY.encode(), b"")
    assert code == "ALREADY_EXISTS" and "join it instead" in message


class engine_stub:
    """Requests in an engine's name (its session id, over the daemon's socket), as a buggy or hostile
    engine would send them past the client's checks: each returns (status code name, details)."""

    def __init__(self, daemon, engine):
        import grpc

        from sleepd.client.control import control_channel
        from sleepd.proto import sleepd_pb2 as pb
        from sleepd.proto import sleepd_pb2_grpc as pb_grpc

        self._grpc, self._pb = grpc, pb
        self._session = engine.request("session")["session_id"]
        channel, self._fd_socket = control_channel(daemon.socket)
        self._stub = pb_grpc.SleepdStub(channel)

    def _call(self, method, request):
        try:
            getattr(self._stub, method)(request, timeout=30)
        except self._grpc.RpcError as error:
            return error.code().name, error.details()
        return "OK", ""

    def commit(self, region_ids, key, manifest):
        return self._call("CommitWeights", self._pb.CommitWeightsRequest(
            session_id=self._session, region_ids=region_ids, key=key, manifest=manifest))

    def join(self, key):
        return self._call("JoinWeights", self._pb.JoinWeightsRequest(session_id=self._session, key=key))

    def leave(self, set_id):
        return self._call("LeaveWeights", self._pb.LeaveWeightsRequest(session_id=self._session, weight_set=set_id))


@pytest.mark.parametrize("backend", ["acl"], indirect=True)
def test_a_token_backend_refuses_to_share_weights_and_keeps_the_engines_own(daemon, start_engine):
    """ACL shares memory by tokens, each for one process: a set cannot be mapped by several."""
    writer = start_engine(daemon, "qwen", regions=[("weights", WEIGHTS)], seed=1)
    for refused in (writer.request("commit", key=KEY), writer.request("join", key=KEY)):
        assert refused.get("code") == "FAILED_PRECONDITION" and "tokens" in refused["error"], refused
    assert writer.report()["regions"] == writer.initial["regions"]
    assert writer.request("write", index=0, seed=3) == {}, "its weights stayed its own"


def test_metrics_give_weight_set_bytes_by_state_and_where_and_the_joins(daemon, start_engine):
    first, set_id, _ = committed(daemon, start_engine)
    second = start_engine(daemon, "qwen-b", regions=[], seed=2)
    second.request("join", key=KEY)
    size = int(weight_sets(daemon)[0]["bytes"])
    samples = scrape(daemon)
    assert value(samples, "sleepd_weight_set_bytes", state="joined", where="device") == size
    assert value(samples, "sleepd_weight_set_bytes", state="kept", where="device") == 0
    assert value(samples, "sleepd_weight_set_joins_total") == 1

    daemon.ctl("sleep", "--model", "qwen")
    daemon.ctl("sleep", "--model", "qwen-b")
    assert value(scrape(daemon), "sleepd_weight_set_bytes", state="joined", where="host") == size
    first.kill()  # an engine killed while joined: one fewer, the other wakes on the set as before
    daemon.ctl("wake", "--model", "qwen-b")
    assert by_tag(second.report())["weights"]["sha256"] == by_tag(first.initial)["weights"]["sha256"]
    second.close()
    wait_for(lambda: value(scrape(daemon), "sleepd_weight_set_bytes", state="kept", where="device") == size,
             what="the set kept")


def pooled_and_on_device(daemon, start_engine) -> dict[str, tuple[str, str, str]]:
    """Two kept sets: one the host pool holds (its engine slept, then exited), one only on the device.
    {key: (set id, its tensor's name in the manifest, the weights' sha256)}."""
    sets = {}
    for key, model, seed in ((KEY, "qwen", 1), (OTHER_KEY, "llama", 2)):
        engine = start_engine(daemon, model, regions=[("weights", WEIGHTS)], seed=seed)
        set_id = engine.request("commit", key=key, tags=["weights"])["weight_set"]
        weights = by_tag(engine.initial)["weights"]
        sets[key] = (set_id, f"r{weights['id']}", weights["sha256"])
        if key == KEY:
            daemon.ctl("sleep", "--model", model, "--level", "1")  # its set goes to the host pool
        engine.close()
    wait_for(lambda: {s["id"]: (s["where"], s["engines"]) for s in weight_sets(daemon)}
             == {sets[KEY][0]: ("host", []), sets[OTHER_KEY][0]: ("device", [])}, what="both sets kept")
    return sets


def restarted(daemon, start_daemon, stop: signal.Signals):
    """The daemon stopped by `stop`, and a new one on the same state directory and host pool."""
    os.kill(daemon.pid, stop)
    assert daemon.process.wait(timeout=30) == (0 if stop == signal.SIGTERM else -stop)
    return start_daemon()


def assert_joins_intact(daemon, start_engine, key: str, recorded: tuple[str, str, str], model: str) -> None:
    set_id, tensor, weights = recorded
    engine = start_engine(daemon, model, regions=[("kv_cache", MiB)], seed=9)
    joined = engine.request("join", key=key)
    assert joined["weight_set"] == set_id and joined["tensors"] == [tensor], "the same set, manifest and all"
    assert by_tag(engine.report())["weights"]["sha256"] == weights


def test_kept_sets_survive_a_clean_restart_and_the_stop_moves_those_only_on_the_device_to_the_pool(
        start_daemon, start_engine):
    daemon = start_daemon()
    sets = pooled_and_on_device(daemon, start_engine)

    again = restarted(daemon, start_daemon, signal.SIGTERM)
    listed = weight_sets(again)
    assert {s["id"]: (s["where"], s["engines"]) for s in listed} == {set_id: ("host", []) for set_id, _, _ in
                                                                      sets.values()}
    assert again.status()["pool"]["used"] == str(sum(int(s["bytes"]) for s in listed)), "both sets' backups kept"
    assert device_used(again) == 0
    assert_joins_intact(again, start_engine, KEY, sets[KEY], "qwen")
    assert_joins_intact(again, start_engine, OTHER_KEY, sets[OTHER_KEY], "llama")
    assert again.status()["pool"]["used"] == "0", "their backups were freed once they were back on the device"


def test_a_killed_daemon_keeps_the_sets_in_the_pool_and_loses_those_only_on_the_device_leaking_nothing(
        start_daemon, start_engine):
    daemon = start_daemon()
    sets = pooled_and_on_device(daemon, start_engine)

    again = restarted(daemon, start_daemon, signal.SIGKILL)
    (listed,) = weight_sets(again)
    assert listed["id"] == sets[KEY][0] and listed["where"] == "host"
    assert again.status()["pool"]["used"] == listed["bytes"], "the lost set left no backup behind"
    assert device_used(again) == 0
    assert start_engine(again, "llama", regions=[], seed=3).request("join", key=OTHER_KEY) == {"found": False}
    assert_joins_intact(again, start_engine, KEY, sets[KEY], "qwen")
    assert again.status()["pool"]["used"] == "0"


def test_engines_asleep_on_a_set_in_the_pool_attach_again_after_a_restart_and_wake_with_its_bytes(
        start_daemon, start_engine):
    daemon = start_daemon()
    first, set_id, weights = committed(daemon, start_engine)
    second = start_engine(daemon, "qwen-b", regions=[("kv_cache", MiB)], seed=2)
    second.request("join", key=KEY)
    for model in ("qwen", "qwen-b"):
        daemon.ctl("sleep", "--model", model, "--level", "1")
    assert weight_sets(daemon)[0]["where"] == "host"

    again = restarted(daemon, start_daemon, signal.SIGTERM)
    wait_for(lambda: {m["name"]: [r.get("orphaned", False) for r in m["ranks"]] for m in again.status()["models"]}
             == {"qwen": [False], "qwen-b": [False]}, timeout=30, what="both engines to attach again")
    (listed,) = weight_sets(again)
    assert listed["id"] == set_id and listed["where"] == "host"
    assert sorted(e["model"] for e in listed["engines"]) == ["qwen", "qwen-b"], "still joined, asleep"

    again.ctl("wake", "--model", "qwen-b")
    assert by_tag(second.report())["weights"]["sha256"] == weights
    assert weight_sets(again)[0]["where"] == "device"
    again.ctl("wake", "--model", "qwen")
    assert by_tag(first.report())["weights"]["sha256"] == weights
    assert device_used(again) == own_bytes(again) + int(listed["bytes"]), "held once, as before the restart"
    assert again.status()["pool"]["used"] == "0"


def test_kept_sets_stay_within_their_budget_least_recently_used_out_first(start_daemon, start_engine):
    daemon = start_daemon("--weight-sets-kept-budget", "6MiB", devices=1, capacity="64MiB")
    older = start_engine(daemon, "older", regions=[("weights", WEIGHTS)], seed=1)
    older_id = older.request("commit", key="older")["weight_set"]
    newer = start_engine(daemon, "newer", regions=[("weights", WEIGHTS)], seed=2)
    newer_id = newer.request("commit", key="newer")["weight_set"]
    older.close()  # one kept set: within the budget, it stays on the device
    wait_for(lambda: not {s["id"]: s for s in weight_sets(daemon)}[older_id]["engines"], what="older kept")
    assert {s["id"]: s["where"] for s in weight_sets(daemon)} == {older_id: "device", newer_id: "device"}
    newer.close()  # two: over 6 MiB, the one kept longest leaves for the host pool
    wait_for(lambda: {s["id"]: s["where"] for s in weight_sets(daemon)} == {older_id: "host", newer_id: "device"},
             what="the older set in the pool")
    reader = start_engine(daemon, "reader", regions=[], seed=3)
    assert reader.request("join", key="older")["weight_set"] == older_id
    assert by_tag(reader.report())["weights"]["sha256"] == by_tag(older.initial)["weights"]["sha256"]


def test_a_swap_brings_the_targets_weight_set_back_and_sends_the_victims_to_the_pool(daemon, start_engine):
    first, set_id, weights = committed(daemon, start_engine)
    other = start_engine(daemon, "other", regions=[("weights", 2 * MiB)], seed=4)
    other_set = other.request("commit", key="other's")["weight_set"]
    daemon.ctl("sleep", "--model", "qwen")
    assert {s["id"]: s["where"] for s in weight_sets(daemon)} == {set_id: "host", other_set: "device"}

    daemon.ctl("swap", "--to", "qwen", "--from", "other")
    assert {s["id"]: s["where"] for s in weight_sets(daemon)} == {set_id: "device", other_set: "host"}
    assert by_tag(first.report())["weights"]["sha256"] == weights
    assert by_tag(other.report())["weights"]["state"] == "offloaded"
    daemon.ctl("wake", "--model", "other")
    assert by_tag(other.report())["weights"]["sha256"] == by_tag(other.initial)["weights"]["sha256"]
