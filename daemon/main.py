"""`sleepd`: start the daemon.

With no flags it runs on its embedded default: the host backend (memfd memory
standing in for device memory) when no GPU backend is usable, the system socket
under /run/sleepd (or the per-user one), and metrics on 127.0.0.1:9464.
Settings come from flags, then SLEEPD_* environment variables, then the TOML
file (--config, default /etc/sleepd/sleepd.toml), then defaults: see
daemon/config.py and docs/configuration.md. Under systemd (Type=notify) it
reports readiness, a status line and watchdog pings on $NOTIFY_SOCKET.
"""

import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from concurrent import futures
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from sleepd.common import paths
from sleepd.common.sizes import format_size
from sleepd.proto import sleepd_pb2, sleepd_pb2_grpc as pb_grpc

from . import backends, call_caps, config, core as control_plane, logs
from .auth import Authorizer
from .config_render import render
from .fanout import Fanout
from .fd_socket import FdSocketLimits, FdServer
from .idle import IdleWatcher
from .metrics import Metrics
from .mover import Mover
from .notify import Notifier, StatusReporter, summary
from .pool import HostPool
from .private_paths import PrivateDirectory, UnsafePath, socket_directory
from .rules import SleepRules
from .recovery import StateStore, backup_pieces
from .regions import stop_on_bugs
from .service import SleepdService
from .tcp import TcpCredentials, serve_tcp

log = logging.getLogger("sleepd")

SERVICE_NAME = sleepd_pb2.DESCRIPTOR.services_by_name["Sleepd"].full_name


def parse_args(argv: list[str] | None = None) -> config.Config:
    """The effective configuration: flags over the environment over the file over defaults.
    Exits with EX_CONFIG (78) and one line per problem when something is wrong."""
    try:
        return config.load(argv, description=__doc__.split("\n\n")[0])
    except config.ConfigError as error:
        for problem in error.problems:
            print(f"sleepd: {problem}", file=sys.stderr)
        sys.exit(config.EXIT_CONFIG)


def _claim_socket(path: str) -> str:
    """Checks the socket's directory (UnsafePath unless only this uid may write it) and
    removes a stale socket file, refusing to displace a live daemon. Returns the
    socket's path with the directory's symlinks resolved: the one to bind, chmod and remove."""
    path = os.path.abspath(path)
    path = os.path.join(socket_directory(os.path.dirname(path)), os.path.basename(path))
    if not os.path.lexists(path):
        return path
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)
        return path
    finally:
        probe.close()
    sys.exit(f"sleepd: another daemon is already listening on {path}")


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    if cfg.check_config:
        sys.stdout.write(render(cfg))
        return
    notifier = _set_up_logging(cfg)
    tcp_credentials = _read_tcp_credentials(cfg) if cfg.tcp_enabled else None
    claimed = _claim(cfg)
    movers = _start_movers(claimed.backend, claimed.pool)
    core = _build_core(cfg, claimed, movers)
    idle_watcher = IdleWatcher(core.operations)
    idle_watcher.start()
    listeners = _listen(cfg, core, claimed.socket_path, tcp_credentials)
    _announce_ready(core, claimed, listeners, movers, notifier)
    reporter = StatusReporter(notifier, lambda: summary(core))
    reporter.start()

    _wait_for_a_stop_signal()
    log.info("sleepd stopping")
    reporter.stop()
    notifier.stopping(f"stopping; {summary(core)}")
    _shut_down(core, listeners, idle_watcher, movers, claimed, cfg.weight_sets_stop_offload_seconds)
    notifier.close()


def _set_up_logging(cfg: config.Config) -> Notifier:
    """Logging as configured, and systemd's notifier."""
    logs.setup(cfg.log_level, cfg.log_format)
    # Read (and removed from the environment) before any child process starts.
    notifier = Notifier.from_environment()
    for note in cfg.notes(startup=True):
        log.warning("%s", note)
    log.info("configuration: %s", cfg.path or "no file; flags, environment and defaults")
    return notifier


@dataclass
class _Claimed:
    """What the daemon takes for its own before it serves anything."""
    socket_path: str  # the directory's symlinks resolved: the one to bind, chmod and remove
    state_dir: PrivateDirectory
    backend: backends.DaemonBackend
    store: StateStore
    state: dict | None  # an earlier daemon's of this backend: models to recover, their backups in the pool
    pool: HostPool


def _claim(cfg: config.Config) -> _Claimed:
    """The socket, the state directory, the backend and the host pool. A directory or file of ours that
    may not be this daemon's own stops it: another user could have made it to read or replace tenants'
    memory, or to aim the daemon's writes at a file of theirs."""
    try:
        socket_path = _claim_socket(cfg.socket)
        state_dir = PrivateDirectory(cfg.state_dir, "state directory")
        backend = backends.choose(cfg.backend, cfg.host_devices, cfg.host_device_capacity, cfg.device_reserve)
        store = StateStore(state_dir)
        state = store.load()
        if state is not None and state.get("backend") != backend.name:
            log.warning("the state file is for the %s backend, this daemon runs %s: starting afresh",
                        state.get("backend"), backend.name)
            state = None
        pool = HostPool(cfg.host_pool_dir, cfg.host_pool_budget, prefault=cfg.host_pool_prefault,
                        keep=backup_pieces(state) if state else None,
                        keep_freed_seconds=cfg.host_pool_keep_freed_seconds)
    except UnsafePath as error:
        log.critical("%s", error)
        sys.exit(config.EXIT_CONFIG)
    return _Claimed(socket_path, state_dir, backend, store, state, pool)


def _start_movers(backend: backends.DaemonBackend, pool: HostPool) -> dict[int, Mover]:
    """One mover per device. They start before any gRPC object exists (and by exec, never by fork)."""
    movers = {device.index: Mover(backend.native, backend.name, device.index, pool) for device in backend.devices}
    for mover in movers.values():
        mover.start()
    if pool.prefault:
        _pin_pool(movers, pool)
    return movers


def _build_core(cfg: config.Config, claimed: _Claimed, movers: dict[int, Mover]) -> control_plane.Core:
    """The control plane, with the models of the state file recovered."""
    metrics = Metrics()
    stop_on_bugs()  # a broken state machine stops the daemon; recovery runs when it is restarted
    # [models.NAME] policies apply when a model first attaches.
    core = control_plane.build(claimed.backend, claimed.pool, movers, SleepRules(cfg.rules),
                               Fanout(cfg.hook_timeout, cfg.device_step_timeout), metrics,
                               authorizer=Authorizer(cfg.admin_group), store=claimed.store,
                               default_policies=cfg.models, quotas=cfg.quotas,
                               controller_timeout=cfg.controller_timeout,
                               eviction_answer_seconds=cfg.eviction_answer_seconds,
                               weight_sets=cfg.table("weight_sets"), check_backups=cfg.host_pool_check_backups)
    if claimed.state is not None:
        core.recovery.recover(claimed.state)
        # Engines that do not come back in time lose what only they held.
        expiry = threading.Timer(cfg.reattach_seconds, core.recovery.expire)
        expiry.daemon = True
        expiry.start()
    metrics.watch(core)
    return core


@dataclass
class _Listeners:
    server: grpc.Server  # the Unix socket's
    health: health.HealthServicer
    fd_socket: FdServer
    tcp_server: grpc.Server | None
    metrics_address: str | None  # None: off


def _listen(cfg: config.Config, core: control_plane.Core, socket_path: str,
            tcp_credentials: TcpCredentials | None) -> _Listeners:
    """Binds and starts every listener; the health service says NOT_SERVING until _announce_ready."""
    server, health_service = _grpc_server(cfg, core, socket_path)
    fd_socket = FdServer(paths.fd_socket(socket_path), core, FdSocketLimits(**cfg.table("fd_socket")))
    metrics_address = None
    if cfg.metrics_address != "off":
        metrics_address = core.metrics.serve(cfg.metrics_address, _read_token(cfg.metrics_token_file))

    server.start()
    # Engines of any uid connect; what each may do is decided per request from the
    # credentials the fd socket reads, not by the socket's mode.
    os.chmod(socket_path, 0o666)
    fd_socket.start()
    tcp_server = _serve_tcp(cfg, core, tcp_credentials) if tcp_credentials is not None else None
    return _Listeners(server, health_service, fd_socket, tcp_server, metrics_address)


def _grpc_server(cfg: config.Config, core: control_plane.Core,
                 socket_path: str) -> tuple[grpc.Server, health.HealthServicer]:
    """The Unix socket's gRPC server, bound, not started."""
    limits = call_caps.CallLimits(**cfg.table("grpc"))
    # Each caller may hold only so many of the workers at once (call_caps.py), so no flood starves the rest.
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=limits.workers, thread_name_prefix="grpc"),
                         interceptors=[call_caps.CallCaps(core.registry.caller, core.authorizer, limits)],
                         options=[("grpc.so_reuseport", 0)])
    pb_grpc.add_SleepdServicer_to_server(SleepdService(core, cfg.wake_wait_limit, cfg.swap_batch), server)
    # The standard health service answers NOT_SERVING until both sockets are up,
    # and again from the moment the daemon starts stopping; reflection lets
    # grpcurl and friends discover the API without a copy of sleepd.proto.
    health_service = health.HealthServicer()
    for name in ("", SERVICE_NAME):
        health_service.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_service, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    server.add_insecure_port(f"unix:{socket_path}")
    return server, health_service


def _serve_tcp(cfg: config.Config, core: control_plane.Core, credentials: TcpCredentials) -> grpc.Server:
    """Control from other hosts: TLS and the bearer token only. A listener that cannot start stops the daemon."""
    try:
        tcp_server, tcp_port = serve_tcp(core, cfg.tcp_address, credentials, cfg.wake_wait_limit, cfg.swap_batch)
    except (OSError, ValueError, RuntimeError, grpc.RpcError) as error:
        log.critical("tcp.address %s: cannot serve: %s", cfg.tcp_address, error)
        sys.exit(f"sleepd: tcp.address {cfg.tcp_address}: cannot serve: {error}")
    log.info("TCP listener on %s:%d (TLS, bearer token from %s)", cfg.tcp_address.rpartition(":")[0], tcp_port,
             cfg.tcp_token_file)
    return tcp_server


def _announce_ready(core: control_plane.Core, claimed: _Claimed, listeners: _Listeners, movers: dict[int, Mover],
                    notifier: Notifier) -> None:
    """Both sockets accept from here on: the health service, daemon.json, the log and systemd (Type=notify) say so."""
    for name in ("", SERVICE_NAME):
        listeners.health.set(name, health_pb2.HealthCheckResponse.SERVING)
    _write_runtime_file(claimed.state_dir, claimed.socket_path, listeners.fd_socket.path, listeners.metrics_address,
                        claimed.pool.directory, movers)
    backend, pool = claimed.backend, claimed.pool
    log.info("sleepd ready: backend %s (%s), socket %s, metrics %s, host pool %s (%s budget)", backend.name,
             ", ".join(f"{d.name} {format_size(d.capacity)}" for d in backend.devices), claimed.socket_path,
             listeners.metrics_address or "off", pool.directory, format_size(pool.budget))
    notifier.ready(summary(core))


def _wait_for_a_stop_signal() -> None:
    """Returns once SIGTERM or SIGINT came. The handler only records the signal: one that took a lock
    (Event.set) could deadlock when the signal lands while the main thread holds that same lock."""
    stopping: list[int] = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda signum, _: stopping.append(signum))
    while not stopping:
        time.sleep(0.2)


def _shut_down(core: control_plane.Core, listeners: _Listeners, idle_watcher: IdleWatcher,
               movers: dict[int, Mover], claimed: _Claimed, offload_seconds: float) -> None:
    """Stops serving and leaves what the next daemon needs: the state file, the pool's slabs, and in them the
    kept weight sets that were only on the device, for up to `offload_seconds`."""
    listeners.health.enter_graceful_shutdown()  # every service NOT_SERVING, for good
    core.operations.freeze()  # engines outlive us: their sessions stay recorded for the next daemon
    listeners.fd_socket.stop()
    if listeners.tcp_server is not None:
        listeners.tcp_server.stop(grace=2)
    listeners.server.stop(grace=2).wait()
    idle_watcher.stop()
    # Nothing joins a set any longer; the movers still copy. The checkpoint below records the sets moved.
    core.operations.weight_sets.save_kept_for_restart(offload_seconds)
    for mover in movers.values():
        mover.close()
    core.backup_checks.stop()  # before the pool closes: what it did not check is freed, never left half-owned
    # Engines keep running without us: the state file and the pool's slabs stay for the next daemon.
    core.operations.checkpoint()
    claimed.pool.close(keep_files=True)
    try:
        os.unlink(claimed.socket_path)
    except FileNotFoundError:
        pass
    claimed.state_dir.remove(RUNTIME_FILE)


def _read_tcp_credentials(cfg: config.Config) -> TcpCredentials:
    """Read before the daemon makes anything: a key or token that other users may read stops it."""
    try:
        return TcpCredentials.read(cfg.tcp_cert, cfg.tcp_key, cfg.tcp_token_file)
    except (UnsafePath, ValueError) as error:
        log.critical("%s", error)
    except OSError as error:
        log.critical("TCP listener: cannot read %s: %s; check the tcp settings and start sleepd again",
                     error.filename, error.strerror)
    sys.exit(config.EXIT_CONFIG)


RUNTIME_FILE = "daemon.json"


def _read_token(path: str) -> str:
    """The token in `path` (config.py checked it), or "" for none."""
    if not path:
        return ""
    with open(path) as file:
        return file.read().strip()


def _pin_pool(movers: dict, pool) -> None:
    """Every mover maps and pins the whole pool before the daemon is ready, all at once: one
    after another, an 8-GPU node with a large pool could outlast systemd's start timeout."""
    started = time.monotonic()
    with futures.ThreadPoolExecutor(len(movers), thread_name_prefix="pin") as pinning:
        for done in [pinning.submit(mover.register_pool) for mover in movers.values()]:
            done.result()
    log.info("host pool of %s pinned for %d device(s) in %.1f s", format_size(pool.budget), len(movers),
             time.monotonic() - started)


def _write_runtime_file(state_dir: PrivateDirectory, socket_path, fd_socket_path, metrics_address, pool_dir,
                        movers) -> None:
    """Where this daemon's endpoints are, for tools and tests; replaced atomically."""
    info = {"pid": os.getpid(), "socket": socket_path, "fd_socket": fd_socket_path,
            "handle_socket": fd_socket_path,  # the earlier name, kept for tools on the node that read it
            "metrics_address": metrics_address, "host_pool_dir": pool_dir,
            "movers": {str(device): mover.pid for device, mover in movers.items()}}
    state_dir.replace(RUNTIME_FILE, json.dumps(info).encode())


if __name__ == "__main__":
    main()
