"""The daemon's log: one line per sleep and wake with the model, the level or tags, the bytes and
the duration; and with --log-format json, one JSON object per line that a log shipper can parse."""

import json
import re
from datetime import datetime

import pytest

from support import MiB


@pytest.fixture
def backend():
    return "host"


def sleep_and_wake(daemon, start_engine) -> None:
    """A sleep, a partial wake and a full wake; then the engine and the daemon stop, so that the log is whole."""
    engine = start_engine(daemon, "qwen", regions=[("weights", 4 * MiB), ("kv_cache", 2 * MiB)])
    daemon.ctl("sleep", "--model", "qwen", "--level", "1")
    daemon.ctl("wake", "--model", "qwen", "--tags", "weights")
    daemon.ctl("wake", "--model", "qwen")
    engine.close()  # before the daemon: a session still open would hold its shutdown for the grace period
    daemon.stop()


def test_each_sleep_and_wake_logs_one_line_with_model_level_bytes_and_duration(start_daemon, start_engine):
    daemon = start_daemon()
    sleep_and_wake(daemon, start_engine)
    log = daemon.log()
    slept = [line for line in log.splitlines() if "slept qwen" in line]
    assert len(slept) == 1
    assert re.search(r"slept qwen at level 1\b.*4\.0 MiB offloaded, 2\.0 MiB discarded\)?, \d+\.\d{3} s", slept[0])
    woke = [line for line in log.splitlines() if "woke qwen" in line]
    assert len(woke) == 2
    assert re.search(r"woke qwen \(weights\).*4\.0 MiB restored.*\d+\.\d{3} s", woke[0])
    assert re.search(r"woke qwen \(all tags\).*2\.0 MiB zero-filled.*\d+\.\d{3} s", woke[1])


def test_json_logs_are_one_object_per_line_with_time_level_logger_and_message(start_daemon, start_engine):
    daemon = start_daemon("--log-format", "json")
    sleep_and_wake(daemon, start_engine)
    entries = []
    for number, line in enumerate(daemon.log().splitlines(), 1):
        entry = json.loads(line)  # every line, not only ours: nothing else may write to the log
        assert isinstance(entry, dict), f"line {number}: {line}"
        assert {"time", "level", "logger", "message"} <= entry.keys(), f"line {number}: {line}"
        assert datetime.fromisoformat(entry["time"]).utcoffset().total_seconds() == 0
        entries.append(entry)
    assert any(entry["message"].startswith("sleepd ready") and entry["logger"] == "sleepd" for entry in entries)
    slept = [entry for entry in entries if entry["message"].startswith("slept qwen at level 1")]
    assert len(slept) == 1 and slept[0]["level"] == "INFO" and slept[0]["logger"].startswith("sleepd.")
    assert "offloaded" in slept[0]["message"] and "discarded" in slept[0]["message"]
    assert len([entry for entry in entries if entry["message"].startswith("woke qwen")]) == 2


def test_json_logs_carry_extra_fields_and_tracebacks_as_fields():
    import io
    import logging
    import sys
    import threading

    from sleepd.daemon import logs

    stream = io.StringIO()
    root = logging.getLogger()
    saved = list(root.handlers), root.level, sys.excepthook, threading.excepthook
    try:
        logs.setup("INFO", "json", stream)
        log = logging.getLogger("sleepd.test")
        log.info("slept %s", "qwen", extra={"model": "qwen", "bytes_freed": 6 * MiB})
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("it failed")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        sys.excepthook, threading.excepthook = saved[2], saved[3]
        logging.captureWarnings(False)
    first, second = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert first["message"] == "slept qwen" and first["model"] == "qwen" and first["bytes_freed"] == 6 * MiB
    assert second["level"] == "ERROR" and "ValueError: boom" in second["exception"]


def test_sleep_and_wake_lines_name_bytes_freed_and_carry_structured_fields(start_daemon, start_engine):
    daemon = start_daemon("--log-format", "json")
    sleep_and_wake(daemon, start_engine)
    entries = [json.loads(line) for line in daemon.log().splitlines()]
    slept = next(entry for entry in entries if entry["message"].startswith("slept qwen"))
    assert "6.0 MiB freed" in slept["message"]
    assert {key: slept.get(key) for key in ("operation", "model", "sleep_level", "bytes_freed", "bytes_offloaded",
                                           "bytes_discarded")} == {
        "operation": "sleep", "model": "qwen", "sleep_level": 1, "bytes_freed": 6 * MiB,
        "bytes_offloaded": 4 * MiB, "bytes_discarded": 2 * MiB}
    assert slept["seconds"] > 0
    woke = [entry for entry in entries if entry["message"].startswith("woke qwen")]
    assert [entry.get("tags") for entry in woke] == [["weights"], []]
    assert [entry.get("bytes_restored") for entry in woke] == [4 * MiB, 0]
