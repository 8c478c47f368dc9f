"""Where the daemon listens and keeps its pool and state when nobody says."""

import pytest

from sleepd.common import paths


def test_explicit_socket_wins_then_the_environment(monkeypatch):
    monkeypatch.setenv("SLEEPD_SOCKET", "/tmp/env.sock")
    assert paths.daemon_socket("/tmp/flag.sock") == ("/tmp/flag.sock", None)
    assert paths.daemon_socket(None) == ("/tmp/env.sock", None)
    assert paths.client_socket(None) == "/tmp/env.sock"


def test_an_unwritable_system_directory_falls_back_to_the_runtime_directory(monkeypatch, tmp_path):
    monkeypatch.delenv("SLEEPD_SOCKET", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    monkeypatch.setattr(paths, "SYSTEM_SOCKET", "/proc/sleepd/sleepd.sock")  # not even root can create it
    path, note = paths.daemon_socket(None)
    assert path == str(tmp_path / "sleepd" / "sleepd.sock")
    assert "not writable" in note and path in note
    # A client finds the same socket when the system one is not there.
    assert paths.client_socket(None) == path


def test_pool_directories_differ_per_socket():
    assert paths.default_pool_dir("/run/a.sock") != paths.default_pool_dir("/run/b.sock")
    assert paths.default_pool_dir("/run/a.sock").startswith("/dev/shm/")


def test_state_directory_follows_systemd_then_the_user(monkeypatch, tmp_path):
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/sleepd-unit:/var/lib/other")
    assert paths.default_state_dir() == "/var/lib/sleepd-unit"
    monkeypatch.delenv("STATE_DIRECTORY")
    monkeypatch.setattr(paths.os, "geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    assert paths.default_state_dir() == str(tmp_path / "sleepd")
    monkeypatch.setattr(paths.os, "geteuid", lambda: 0)
    assert paths.default_state_dir() == "/var/lib/sleepd"


def test_the_fd_socket_sits_beside_the_grpc_socket():
    assert paths.fd_socket("/run/sleepd/sleepd.sock") == "/run/sleepd/sleepd.sock.fds"


def test_the_daemon_logs_its_fallback(tmp_path):
    import os
    import subprocess
    import sys

    if os.path.exists(paths.SYSTEM_SOCKET):
        pytest.skip("a system sleepd is running here")
    # A daemon run with no socket flag, where the system directory is taken by a file.
    env = dict(os.environ, XDG_RUNTIME_DIR=str(tmp_path))
    env.pop("SLEEPD_SOCKET", None)
    code = ("import sleepd.common.paths as p; p.SYSTEM_SOCKET = '/proc/sleepd/sleepd.sock'; "
            "import sleepd.daemon.main as m; m.main(['--metrics-address', 'off', '--state-dir', %r])"
            % str(tmp_path / "state"))
    process = subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stderr.readline()
        assert "not writable" in line and str(tmp_path / "sleepd" / "sleepd.sock") in line
    finally:
        process.terminate()
        process.wait(timeout=20)


def test_the_system_socket_directory_is_made_writable_by_its_owner_only(monkeypatch, tmp_path):
    import os

    monkeypatch.delenv("SLEEPD_SOCKET", raising=False)
    monkeypatch.setattr(paths, "SYSTEM_SOCKET", str(tmp_path / "run" / "sleepd.sock"))
    umask = os.umask(0)  # whatever the umask: the daemon checks the directory and would refuse a 0777 one
    try:
        assert paths.daemon_socket(None) == (paths.SYSTEM_SOCKET, None)
    finally:
        os.umask(umask)
    assert (tmp_path / "run").stat().st_mode & 0o777 == 0o755
