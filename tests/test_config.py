"""An operator configures sleepd with one TOML file: `sleepd --check-config` accepts the shipped
example and prints the effective settings, names every mistake by key and line, and a daemon
started from a file runs as the file says, with flags over the environment over the file."""

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from sleepd.daemon import config
from support import MiB, wait_for

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "deploy" / "sleepd.toml"


@pytest.fixture
def backend():
    """Configuration does not depend on the memory backend."""
    return "host"


def sleepd(*args, env=None) -> subprocess.CompletedProcess:
    environment = {key: value for key, value in os.environ.items() if not key.startswith("SLEEPD_")}
    environment.update(env or {})
    return subprocess.run([sys.executable, "-m", "sleepd.daemon.main", *args], capture_output=True, text=True,
                          timeout=60, env=environment)


def test_the_shipped_example_passes_check_config_and_prints_toml_that_reads_back_the_same(tmp_path):
    result = sleepd("--check-config", "--config", str(EXAMPLE))
    assert result.returncode == 0, result.stderr
    effective = tomllib.loads(result.stdout)
    assert effective["models"]["qwen"] == {"priority": 10, "pinned": True}
    assert effective["models"]["llama"] == {"priority": 0, "eviction_level": 2, "idle_seconds": 600.0}
    assert effective["rules"]["1"] == {"weights": "offload", "kv_cache": "discard"}
    assert effective["metrics"]["address"] == "127.0.0.1:9464"
    assert f"{EXAMPLE}:16" in result.stdout  # each value says where it came from: backend is on line 16

    # What --check-config prints is itself a configuration that means the same.
    printed = tmp_path / "effective.toml"
    printed.write_text(result.stdout)
    again = sleepd("--check-config", "--config", str(printed))
    assert again.returncode == 0, again.stderr
    assert tomllib.loads(again.stdout) == effective


def test_the_example_documents_every_setting():
    text = EXAMPLE.read_text()
    for setting in config.SETTINGS:
        table, _, key = setting.key.rpartition(".")
        assert (f"[{table}]" in text if table else True) and f"{key} =" in text, f"{setting.key} is not in {EXAMPLE}"


def test_every_mistake_is_named_by_key_and_line_in_one_run(tmp_path):
    path = tmp_path / "sleepd.toml"
    path.write_text("\n".join([
        'backend = "host"',              # 1
        "[host_pool]",                   # 2
        'budget = "12 apples"',          # 3
        "bugdet = 3",                    # 4
        "[rules.1]",                     # 5
        'buffers = "shred"',             # 6
        "[models.qwen]",                 # 7
        "idle_secs = 3",                 # 8
        "[metrics]",                     # 9
        'address = "localhost"',         # 10
        "[tcp]",                         # 11
        'address = "0.0.0.0:7443"',      # 12
        'models.llama = { pinned = "maybe" }',  # 13: an inline table inside [tcp] is still a key of tcp
    ]) + "\n")
    result = sleepd("--check-config", "--config", str(path), env={"SLEEPD_HOOK_TIMEOUT": "-1"})
    assert result.returncode == config.EXIT_CONFIG
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    expected = [
        (f"{path}:3: host_pool.budget:", "is not a size"),
        (f"{path}:4: host_pool.bugdet:", "did you mean host_pool.budget?"),
        (f"{path}:6: rules.1.buffers:", "is not offload or discard"),
        (f"{path}:8: models.qwen.idle_secs:", "did you mean idle_seconds?"),
        (f"{path}:10: metrics.address:", "is not HOST:PORT"),
        (f"{path}:12: tcp.cert:", "is required with tcp.address"),
        (f"{path}:13: tcp.models:", "unknown key"),
        ("environment SLEEPD_HOOK_TIMEOUT: hook_timeout:", "must be positive"),
    ]
    for prefix, words in expected:
        assert any(line.startswith(f"sleepd: {prefix}") and words in line for line in lines), \
            f"no line {prefix} ... {words} in:\n{result.stderr}"


def test_a_syntax_error_names_its_line_and_column(tmp_path):
    path = tmp_path / "sleepd.toml"
    path.write_text('backend = "host"\n[host]\ndevices = = 2\n')
    result = sleepd("--check-config", "--config", str(path))
    assert result.returncode == config.EXIT_CONFIG
    assert result.stderr.startswith(f"sleepd: {path}:3:")
    assert len(result.stderr.splitlines()) == 1


def test_a_missing_file_is_an_error_only_when_it_was_asked_for(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere.toml"
    result = sleepd("--check-config", "--config", str(missing))
    assert result.returncode == config.EXIT_CONFIG and "not found" in result.stderr
    result = sleepd("--check-config", env={"SLEEPD_CONFIG": str(missing)})
    assert result.returncode == config.EXIT_CONFIG and str(missing) in result.stderr
    # The default path may be absent: the defaults apply.
    monkeypatch.setattr(config, "DEFAULT_PATH", str(missing))
    effective = config.load([], environ={})
    assert effective.path is None and effective.backend == "auto"


def test_flags_beat_the_environment_which_beats_the_file_which_beats_the_default(tmp_path):
    path = tmp_path / "sleepd.toml"
    path.write_text('[host]\ndevices = 2\ndevice_capacity = "64MiB"\n[log]\nformat = "json"\n')

    def effective(*flags, **env):
        result = sleepd("--check-config", "--config", str(path), *flags, env=env)
        assert result.returncode == 0, result.stderr
        return tomllib.loads(result.stdout), result.stdout

    values, text = effective("--host-devices", "4", SLEEPD_HOST_DEVICES="3")
    assert values["host"]["devices"] == 4 and "# flag --host-devices" in text
    values, text = effective(SLEEPD_HOST_DEVICES="3")
    assert values["host"]["devices"] == 3 and "# environment SLEEPD_HOST_DEVICES" in text
    values, _ = effective()
    assert values["host"]["devices"] == 2 and values["host"]["device_capacity"] == "64MiB"
    assert values["log"]["format"] == "json" and values["log"]["level"] == "INFO"  # file, then default
    values, _ = effective("--no-host-pool-prefault", SLEEPD_HOST_POOL_PREFAULT="yes")
    assert values["host_pool"]["prefault"] is False


def test_every_setting_has_a_flag_and_an_environment_variable_named_after_its_key():
    parser = config.parser()
    flags = {option for action in parser._actions for option in action.option_strings}
    for setting in config.SETTINGS:
        assert setting.flag in flags
        assert setting.env == "SLEEPD_" + setting.key.replace(".", "_").upper()
    assert config.BY_KEY["socket"].env == "SLEEPD_SOCKET"  # the variable engines and sleepctl read too


def test_key_lines_are_found_in_headers_dotted_keys_inline_tables_and_after_multiline_strings():
    text = "\n".join([
        "# comment",                        # 1
        'a = """',                          # 2
        "b = 1",                            # 3: inside a string
        '"""',                              # 4
        "[models.\"my model\"]",            # 5
        "priority = 1",                     # 6
        "[x]",                              # 7
        "y.z = { p = 1, 'q' = 2 }",         # 8
    ])
    lines = config.key_lines(text)
    assert lines[("a",)] == 2 and ("b",) not in lines
    assert lines[("models", "my model")] == 5 and lines[("models", "my model", "priority")] == 6
    assert lines[("x", "y", "z")] == 8 and lines[("x", "y", "z", "q")] == 8


def test_a_daemon_runs_as_its_file_says_with_the_environment_over_the_file(tmp_path, monkeypatch, start_daemon,
                                                                           start_engine):
    path = tmp_path / "sleepd.toml"
    path.write_text("\n".join([
        "[host]", "devices = 3", 'device_capacity = "32MiB"',
        "[device]", 'reserve = "2MiB"',
        "[rules.1]", 'buffers = "discard"',
        "[log]", 'level = "WARNING"',
    ]) + "\n")
    monkeypatch.setenv("SLEEPD_HOST_DEVICE_CAPACITY", "48MiB")
    # The fixture passes --host-devices 2: the flag wins over the file's 3.
    daemon = start_daemon("--config", str(path), devices=2, capacity="16MiB")
    devices = daemon.status()["devices"]
    # The fixture's --host-device-capacity flag beats both the variable and the file.
    assert [int(d["capacity"]) for d in devices] == [16 * MiB] * 2
    assert [int(d["reserve"]) for d in devices] == [2 * MiB] * 2
    assert "sleepd ready" not in daemon.log()  # an INFO line, below the file's log level

    # The file's tag rule: buffers are discarded at level 1 (by default they would be offloaded).
    engine = start_engine(daemon, "qwen", regions=[("weights", MiB), ("buffers", MiB)])
    daemon.ctl("sleep", "--model", "qwen", "--level", "1")
    states = {region["tag"]: region["state"] for region in engine.report()["regions"]}
    assert states == {"weights": "offloaded", "buffers": "discarded"}


def test_the_environment_sets_what_no_flag_names(tmp_path, monkeypatch, start_daemon):
    path = tmp_path / "sleepd.toml"
    path.write_text('[device]\nreserve = "8MiB"\n')
    monkeypatch.setenv("SLEEPD_DEVICE_RESERVE", "4MiB")
    daemon = start_daemon("--config", str(path), devices=1, capacity="16MiB")
    device = daemon.status()["devices"][0]
    assert int(device["reserve"]) == 4 * MiB and int(device["budget"]) == 12 * MiB


def test_a_model_gets_its_configured_policy_when_it_first_attaches(tmp_path, start_daemon, start_engine):
    path = tmp_path / "sleepd.toml"
    path.write_text("[models.qwen]\npriority = 7\npinned = true\nidle_seconds = 600\n")
    daemon = start_daemon("--config", str(path))
    start_engine(daemon, "qwen", regions=[("weights", MiB)])
    start_engine(daemon, "llama", regions=[("weights", MiB)])
    policies = {model["name"]: model["policy"] for model in daemon.status()["models"]}
    assert policies["qwen"] == {"priority": 7, "pinned": True, "evictionLevel": 1, "idleSeconds": 600.0}
    assert policies["llama"]["priority"] == 0 and not policies["llama"]["pinned"]


def test_a_bad_file_stops_the_daemon_before_it_binds_anything(tmp_path):
    path = tmp_path / "sleepd.toml"
    path.write_text('backend = "tpu"\n')
    socket_path = tmp_path / "sleepd.sock"
    result = sleepd("--config", str(path), "--socket", str(socket_path), "--metrics-address", "off")
    assert result.returncode == config.EXIT_CONFIG
    assert f"{path}:1: backend:" in result.stderr and "auto, host, cuda" in result.stderr
    assert not socket_path.exists()


def test_check_config_prints_the_socket_and_pool_directory_the_daemon_then_uses(tmp_path):
    # No socket named, and a system socket directory not even root can create: both fall back.
    code = ("import sys, sleepd.common.paths as p; p.SYSTEM_SOCKET = '/proc/sleepd/sleepd.sock'; "
            "import sleepd.daemon.main as m; m.main(sys.argv[1:])")
    flags = ["--backend", "host", "--host-device-capacity", "16MiB", "--host-pool-budget", "64MiB",
             "--metrics-address", "off", "--state-dir", str(tmp_path / "state")]
    env = {key: value for key, value in os.environ.items() if not key.startswith("SLEEPD_")}
    env["XDG_RUNTIME_DIR"] = str(tmp_path)
    checked = subprocess.run([sys.executable, "-c", code, "--check-config", *flags], capture_output=True,
                             text=True, timeout=60, env=env)
    assert checked.returncode == 0, checked.stderr
    effective = tomllib.loads(checked.stdout)
    assert effective["socket"] == str(tmp_path / "sleepd" / "sleepd.sock")
    assert "not writable" in checked.stdout  # and says why

    daemon = subprocess.Popen([sys.executable, "-c", code, *flags], env=env, stderr=subprocess.DEVNULL)
    runtime = tmp_path / "state" / "daemon.json"
    try:
        wait_for(lambda: runtime.exists() or daemon.poll() is not None, what="daemon.json")
        used = json.loads(runtime.read_text())
        assert used["socket"] == effective["socket"]
        # The fd socket beside it, under its name and, for tools that read daemon.json, its earlier one.
        assert used["fd_socket"] == used["handle_socket"] == effective["socket"] + ".fds"
        assert used["host_pool_dir"] == effective["host_pool"]["dir"]
    finally:
        daemon.terminate()
        daemon.wait(timeout=20)
        shutil.rmtree(effective["host_pool"]["dir"], ignore_errors=True)


def test_a_metrics_token_that_others_may_read_stops_the_daemon_through_a_symlink_too(tmp_path):
    token = tmp_path / "token"
    token.write_text("a token\n")
    token.chmod(0o644)
    link = tmp_path / "link"  # Kubernetes mounts a Secret's keys as symlinks
    link.symlink_to(token)
    result = sleepd("--check-config", "--metrics-token-file", str(link))
    assert result.returncode == config.EXIT_CONFIG
    assert result.stderr.strip() == (f"sleepd: flag --metrics-token-file: metrics.token_file: {link} has mode 0644, "
                                     f"so other users may read the token; chmod 600 {link}")
    token.chmod(0o400)
    assert sleepd("--check-config", "--metrics-token-file", str(link)).returncode == 0
    token.write_text("\n")
    assert "holds no token" in sleepd("--check-config", "--metrics-token-file", str(link)).stderr


def test_the_daemons_caps_waits_and_swap_batch_are_read_from_the_file(tmp_path):
    path = tmp_path / "sleepd.toml"
    path.write_text("\n".join([
        "reattach_seconds = 5", "wake_wait_limit = 30",
        "[fd_socket]", "connections_per_uid = 10", "connections = 100", "workers = 4", "allocates_per_uid = 3",
        "allocate_wait_seconds = 0.5",
        "[grpc]", "workers = 64", "admin_reserve = 8", "calls_per_uid = 20", "event_streams_per_uid = 5",
        "sessions_per_uid = 10", "anonymous_calls = 0", "anonymous_event_streams = 0",
        "[swap]", 'batch = "16MiB"',
    ]) + "\n")
    result = sleepd("--check-config", "--config", str(path))
    assert result.returncode == 0, result.stderr
    effective = tomllib.loads(result.stdout)
    assert (effective["reattach_seconds"], effective["wake_wait_limit"]) == (5.0, 30.0)
    assert effective["fd_socket"] == {"connections_per_uid": 10, "connections": 100, "workers": 4,
                                    "allocates_per_uid": 3, "allocate_wait_seconds": 0.5}
    assert effective["grpc"] == {"workers": 64, "admin_reserve": 8, "calls_per_uid": 20, "event_streams_per_uid": 5,
                                 "sessions_per_uid": 10, "anonymous_calls": 0, "anonymous_event_streams": 0}
    assert effective["swap"] == {"batch": "16MiB"}
    assert f"# file {path}:4" in result.stdout  # fd_socket.connections_per_uid, under [fd_socket] on line 3


@pytest.mark.parametrize("file, flags, env, line", [
    ("", ["--grpc-calls-per-uid", "0"], {},
     "flag --grpc-calls-per-uid: grpc.calls_per_uid: 0 is out of range; it must be from 1 to 16384"),
    ("", [], {"SLEEPD_FD_SOCKET_ALLOCATE_WAIT_SECONDS": "120"},
     "environment SLEEPD_FD_SOCKET_ALLOCATE_WAIT_SECONDS: fd_socket.allocate_wait_seconds: 120 is too long; "
     "it must be at most 60 seconds"),
    ("reattach_seconds = 0\n", [], {}, "{path}:1: reattach_seconds: 0 must be positive"),
    ("wake_wait_limit = 1e9\n", [], {},
     "{path}:1: wake_wait_limit: 1000000000.0 is too long; it must be at most 86400 seconds"),
    ('[swap]\nbatch = "4KiB"\n', [], {},
     "{path}:2: swap.batch: '4KiB' is too small; it must be at least 1048576 bytes"),
    ("[fd_socket]\nworkers = 2\n", [], {},
     "{path}:2: fd_socket.workers: 2 is too few for fd_socket.allocates_per_uid (2 by default), which must be "
     "less than it: one uid's waiting allocates must leave the other uids a worker"),
    ("", ["--grpc-event-streams-per-uid", "200"], {},
     "flag --grpc-event-streams-per-uid: grpc.event_streams_per_uid: 200 must be at most grpc.calls_per_uid "
     "(128): each Events stream is one of its uid's calls"),
], ids=["cap-zero", "wait-too-long", "reattach-zero", "limit-past-a-day", "batch-too-small", "workers-too-few",
        "streams-past-calls"])
def test_a_bad_cap_wait_or_batch_is_refused_in_one_line(tmp_path, file, flags, env, line):
    path = tmp_path / "sleepd.toml"
    path.write_text(file)
    result = sleepd("--check-config", "--config", str(path), *flags, env=env)
    assert result.returncode == config.EXIT_CONFIG
    assert result.stderr.splitlines() == ["sleepd: " + line.format(path=path)]


def test_a_daemon_whose_caps_contradict_each_other_stops_before_it_binds_anything(tmp_path):
    socket_path = tmp_path / "sleepd.sock"
    result = sleepd("--grpc-workers", "64", "--socket", str(socket_path), "--metrics-address", "off")
    assert result.returncode == config.EXIT_CONFIG
    assert result.stderr.splitlines() == [
        "sleepd: flag --grpc-workers: grpc.workers: 64 is too few for grpc.admin_reserve (64 by default), which "
        "must be less than it: the callers other than root and admin_group need a worker"]
    assert not socket_path.exists()
