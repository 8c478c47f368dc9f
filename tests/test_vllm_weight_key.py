"""The key of a vLLM server's weight set (integrations/vllm/weight_key.py and checkpoint_hashes.py),
without vLLM: a checkpoint's content decides the key, a file is read again only when its stat
changed (ctime included, which a user cannot set back), and the last key of a path and its options
is remembered for when the checkpoint is gone."""

import os

from sleepd.integrations.vllm import weight_key
from sleepd.integrations.vllm.checkpoint_hashes import CheckpointHashes

OPTIONS = {"model": "/models/qwen", "dtype": "bfloat16", "tp": [0, 1], "pp": [0, 1]}


def checkpoint(tmp_path, content: bytes = b"\x01" * 4096) -> str:
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    return str(path)


def key_of(hashes: CheckpointHashes, path: str, **options) -> str:
    files = {os.path.basename(p): digest for p, digest in hashes.digests([path]).items()}
    return weight_key.key(weight_key.label("qwen", (0, 1), (0, 1)), {**OPTIONS, **options}, files)


def test_a_second_start_reads_no_checkpoint_byte_and_gets_the_same_key(tmp_path):
    path = checkpoint(tmp_path)
    first = CheckpointHashes(str(tmp_path / "cache"))
    key = key_of(first, path)
    assert first.hashed == [os.path.realpath(path)]

    # (Not proven by making the file unreadable: that changes its ctime, so it is rightly hashed again.)
    again = CheckpointHashes(str(tmp_path / "cache"))
    assert key_of(again, path) == key
    assert again.hashed == []
    assert key.startswith("vllm qwen tp0/1 pp0/1 ")


def test_content_changed_in_place_with_size_and_mtime_set_back_changes_the_key(tmp_path):
    path = checkpoint(tmp_path)
    hashes = CheckpointHashes(str(tmp_path / "cache"))
    key = key_of(hashes, path)
    before = os.stat(path)
    with open(path, "r+b") as file:  # same size, other values
        file.write(b"\x02" * 16)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert os.stat(path).st_size == before.st_size and os.stat(path).st_mtime_ns == before.st_mtime_ns

    assert key_of(CheckpointHashes(str(tmp_path / "cache")), path) != key


def test_a_checkpoint_replaced_by_a_rename_is_hashed_again(tmp_path):
    path = checkpoint(tmp_path)
    key = key_of(CheckpointHashes(str(tmp_path / "cache")), path)
    replacement = tmp_path / "new"
    replacement.write_bytes(b"\x03" * 4096)
    os.replace(replacement, path)
    again = CheckpointHashes(str(tmp_path / "cache"))
    assert key_of(again, path) != key and again.hashed == [os.path.realpath(path)]


def test_every_option_that_decides_the_bytes_changes_the_key(tmp_path):
    path = checkpoint(tmp_path)
    hashes = CheckpointHashes(str(tmp_path / "cache"))
    plain = key_of(hashes, path)
    for change in ({"dtype": "float16"}, {"tp": [1, 2]}, {"pp": [0, 2]}, {"quantization": "fp8"},
                   {"vllm": "0.33.0"}, {"load_format": "pt"}):
        assert key_of(hashes, path, **change) != plain, change


def test_a_damaged_cache_costs_a_hash_not_a_wrong_key(tmp_path):
    path = checkpoint(tmp_path)
    key = key_of(CheckpointHashes(str(tmp_path / "cache")), path)
    (tmp_path / "cache" / "checkpoint-hashes.json").write_text("{not json")
    again = CheckpointHashes(str(tmp_path / "cache"))
    assert key_of(again, path) == key and again.hashed == [os.path.realpath(path)]


def test_the_last_key_of_a_path_and_its_options_is_remembered(tmp_path):
    hashes = CheckpointHashes(str(tmp_path / "cache"))
    options = weight_key.options_digest(OPTIONS)
    assert hashes.last_key(options) is None
    hashes.remember_key(options, "vllm qwen tp0/1 pp0/1 abc")
    assert CheckpointHashes(str(tmp_path / "cache")).last_key(options) == "vllm qwen tp0/1 pp0/1 abc"
    assert hashes.last_key(weight_key.options_digest({**OPTIONS, "dtype": "float16"})) is None


def test_the_label_keeps_what_reaches_a_terminal_plain():
    assert weight_key.label("/m/qw\x1b[31men 7b", (1, 2), (0, 1)) == "vllm /m/qw__31men_7b tp1/2 pp0/1"
    assert len(weight_key.label("x" * 1000, (0, 1), (0, 1))) < 130
