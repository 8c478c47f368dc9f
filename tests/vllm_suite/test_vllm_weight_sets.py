"""vLLM on weight sets (docs/vllm.md, "Restarts and shared weights"): a restarted server joins the
weights the daemon kept and reads no tensor bytes, a second server of the same weights holds them
once (even with the checkpoint's files gone), a weight update takes the write step and changes
only that server, and a checkpoint changed in place is never served from the old set.

One story over four `vllm serve` starts (eager: compile is not the point here), in order; each
test leaves the servers the next one needs."""

import os
import shutil
import struct

import pytest

from kernel import cached_pages, drop_from_page_cache
from servers import VllmServer, model_status
from support import Daemon, wait_for

pytestmark = pytest.mark.timeout(1200)

EAGER = ("--enforce-eager",)
WEIGHTS = "model.safetensors"


@pytest.fixture(scope="module")
def node(tmp_path_factory, tiny_models):
    """A daemon, a checkpoint of our own (the tests change it), the plugin's hash cache, and what the
    servers saw, shared by the tests in order."""
    root = tmp_path_factory.mktemp("weight-sets")
    (root / "sleepd").mkdir()
    daemon = Daemon(root / "sleepd", "host")
    checkpoint = str(root / "qwen")
    shutil.copytree(tiny_models["a"], checkpoint)
    state = {"daemon": daemon, "checkpoint": checkpoint, "root": root, "servers": {}, "tiny_models": tiny_models,
             "environment": {"SLEEPD_CACHE_DIR": str(root / "cache")}}
    yield state
    for server in state["servers"].values():
        server.stop()
    daemon.stop()


def start(node, name: str, model: str) -> VllmServer:
    server = VllmServer(node["daemon"], model, node["checkpoint"], str(node["root"] / f"{name}.log"), *EAGER,
                        environment=node["environment"])
    node["servers"][name] = server
    return server


def log_of(server: VllmServer) -> str:
    with open(server.log_path) as log:
        return log.read()


def weight_sets(daemon) -> list[dict]:
    import json

    return json.loads(daemon.ctl("--json", "sets").stdout).get("weightSets", [])


def header_end(path: str) -> int:
    """Where a safetensors file's tensor bytes begin: after its 8-byte length and its JSON header."""
    with open(path, "rb") as file:
        (length,) = struct.unpack("<Q", file.read(8))
    return 8 + length


def test_a_restarted_server_joins_the_kept_set_reads_no_tensor_byte_and_answers_as_before(node):
    daemon, weights = node["daemon"], os.path.join(node["checkpoint"], WEIGHTS)
    first = start(node, "first", "qwen")
    node["answers_a"] = first.answers()
    assert "committed the loaded weights as weight set" in log_of(first)
    (committed,) = weight_sets(daemon)
    first.stop()
    wait_for(lambda: not weight_sets(daemon)[0]["engines"], what="the first server's end")

    drop_from_page_cache(weights)
    assert cached_pages(weights) == 0
    tensors_from = header_end(weights)
    again = start(node, "again", "qwen")
    log = log_of(again)
    assert f"joined weight set {committed['id']}" in log and "no checkpoint read" in log
    assert "hashed" not in log, "the checkpoint was hashed again though its stat did not change"
    # A header read may bring its readahead window back with it (read_ahead_kb, 128 KiB here); no tensor
    # page past that came back, while loading would have read them all.
    readahead = 128 << 10
    assert cached_pages(weights, tensors_from + readahead) == 0
    assert again.answers() == node["answers_a"]
    assert [e["model"] for e in weight_sets(daemon)[0]["engines"]] == ["qwen"]


def test_a_second_server_with_the_files_gone_starts_from_the_set_and_holds_the_weights_once(node):
    daemon, weights = node["daemon"], os.path.join(node["checkpoint"], WEIGHTS)
    away = str(node["root"] / "away.safetensors")
    os.rename(weights, away)
    try:
        second = start(node, "second", "qwen-b")
    finally:
        os.rename(away, weights)
    assert "checkpoint files are gone: serving the weight set last committed" in log_of(second)
    assert second.answers() == node["answers_a"]

    (shared,) = weight_sets(daemon)
    assert sorted(e["model"] for e in shared["engines"]) == ["qwen", "qwen-b"]
    for model in ("qwen", "qwen-b"):  # neither holds weights of its own: the set's bytes are there once
        regions = [r for rank in model_status(daemon, model)["ranks"] for r in rank["regions"]
                   if r["tag"] == "weights" and int(r["mappedSize"]) > 4096]
        assert regions and all(r["weightSet"] == shared["id"] for r in regions), model

    # Each sleeps and wakes on its own.
    second.call("POST", "/sleep?level=1")
    assert node["servers"]["again"].answers() == node["answers_a"]
    second.call("POST", "/wake_up")
    assert second.answers() == node["answers_a"]


def test_a_weight_update_takes_the_write_step_and_changes_only_that_servers_answers(node):
    again, second = node["servers"]["again"], node["servers"]["second"]
    second.call("POST", "/collective_rpc", {"method": "reload_weights",
                                            "kwargs": {"weights_path": node["tiny_models"]["b"]}})
    assert "left weight set" in log_of(second)
    node["answers_b"] = second.answers()
    assert node["answers_b"] != node["answers_a"], "the two checkpoints answer alike: the test proves nothing"
    assert again.answers() == node["answers_a"], "the update reached the other server"
    (shared,) = weight_sets(node["daemon"])
    assert [e["model"] for e in shared["engines"]] == ["qwen"]


def test_a_checkpoint_changed_in_place_is_never_served_from_the_old_set(node):
    for name in ("again", "second"):
        node["servers"].pop(name).stop()
    weights = os.path.join(node["checkpoint"], WEIGHTS)
    other = os.path.join(node["tiny_models"]["b"], WEIGHTS)
    before = os.stat(weights)
    with open(other, "rb") as source:
        content = source.read()
    assert len(content) == before.st_size and header_end(other) == header_end(weights)
    with open(weights, "r+b") as file:  # the same names, shapes and header; other values
        file.write(content)
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert os.stat(weights).st_mtime_ns == before.st_mtime_ns

    changed = start(node, "changed", "qwen")
    log = log_of(changed)
    assert "joined weight set" not in log and "committed the loaded weights" in log
    assert changed.answers() == node["answers_b"]
    assert len(weight_sets(node["daemon"])) == 2
