"""`sleepd`: start the daemon.

With no flags it runs on its embedded default: the host backend (memfd memory
standing in for device memory) when no GPU backend is usable, the system socket
under /run/sleepd (or the per-user one), and metrics on 127.0.0.1:9464.
"""

import argparse
import json
import logging
import os
import signal
import socket
import sys
import threading
from concurrent import futures

import grpc
import psutil
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from sleepd.common import paths
from sleepd.common.sizes import format_size, parse_size
from sleepd.proto import sleepd_pb2, sleepd_pb2_grpc as pb_grpc

from . import backends
from .handles import HandleServer
from .idle import IdleWatcher
from .manager import MemoryManager
from .metrics import Metrics
from .mover import Mover
from .pool import HostPool
from .rules import SleepRules
from .service import SleepdService

log = logging.getLogger("sleepd")

SERVICE_NAME = sleepd_pb2.DESCRIPTOR.services_by_name["Sleepd"].full_name


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="sleepd", description=__doc__.split("\n\n")[0])
    parser.add_argument("--socket", help="gRPC Unix socket (default $SLEEPD_SOCKET or /run/sleepd/sleepd.sock)")
    parser.add_argument("--metrics-address", default="127.0.0.1:9464",
                        help="HOST:PORT for Prometheus /metrics; port 0 picks a free one; 'off' disables")
    parser.add_argument("--backend", choices=["auto", "host", "cuda"], default="auto",
                        help="memory backend (auto: a GPU backend when one is usable, else host)")
    parser.add_argument("--host-devices", type=int, default=1, help="devices the host backend simulates")
    parser.add_argument("--host-device-capacity", type=_size, default=parse_size("4GiB"),
                        help="bytes per simulated host device, e.g. 512MiB or 4GiB")
    parser.add_argument("--device-reserve", type=_size, default=0,
                        help="bytes per device kept outside sleepd (CUDA context, NCCL, activations); "
                             "the device's budget is its capacity less this")
    parser.add_argument("--host-pool-dir", help="tmpfs directory of the host backup pool "
                                                "(default: unique per socket under /dev/shm)")
    parser.add_argument("--host-pool-budget", type=_size,
                        default=psutil.virtual_memory().total // 2 // 4096 * 4096,
                        help="bytes the host backup pool may hold (default: half the RAM)")
    parser.add_argument("--host-pool-prefault", action="store_true",
                        help="fault in the whole pool at start so that even the first sleep runs at full speed")
    parser.add_argument("--state-dir", help="where the daemon keeps its state "
                                            "(default $STATE_DIRECTORY, /var/lib/sleepd, or $XDG_STATE_HOME/sleepd)")
    parser.add_argument("--hook-timeout", type=float, default=30.0,
                        help="seconds each engine has to answer a quiesce, unmap, remap or resume")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    args = parser.parse_args(argv)
    if args.host_devices < 1:
        parser.error("--host-devices must be at least 1")
    if args.hook_timeout <= 0:
        parser.error("--hook-timeout must be positive")
    return args


def _claim_socket(path: str) -> None:
    """Removes a stale socket file, refusing to displace a live daemon."""
    os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
    if not os.path.exists(path):
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)
        return
    finally:
        probe.close()
    sys.exit(f"sleepd: another daemon is already listening on {path}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    socket_path, fallback_note = paths.daemon_socket(args.socket)
    if fallback_note:
        log.info(fallback_note)
    _claim_socket(socket_path)
    state_dir = args.state_dir or paths.default_state_dir()
    os.makedirs(state_dir, mode=0o700, exist_ok=True)

    backend = backends.choose(args.backend, args.host_devices, args.host_device_capacity, args.device_reserve)
    pool = HostPool(args.host_pool_dir or paths.default_pool_dir(socket_path), args.host_pool_budget,
                    prefault=args.host_pool_prefault)
    # Movers start before any gRPC object exists (and by exec, never by fork).
    movers = {device.index: Mover(backend.native, backend.name, device.index, pool) for device in backend.devices}
    for mover in movers.values():
        mover.start()
        if pool.prefault:
            mover.register_pool()

    metrics = Metrics()
    manager = MemoryManager(backend, pool, movers, SleepRules(), args.hook_timeout, metrics)
    metrics.watch(manager)
    idle_watcher = IdleWatcher(manager)
    idle_watcher.start()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1024, thread_name_prefix="grpc"),
                         options=[("grpc.so_reuseport", 0)])
    pb_grpc.add_SleepdServicer_to_server(SleepdService(manager, metrics), server)
    # The standard health service answers NOT_SERVING until both sockets are up,
    # and again from the moment the daemon starts stopping; reflection lets
    # grpcurl and friends discover the API without a copy of sleepd.proto.
    health_service = health.HealthServicer()
    for name in ("", SERVICE_NAME):
        health_service.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_service, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    server.add_insecure_port(f"unix:{socket_path}")
    handles = HandleServer(paths.handle_socket(socket_path), manager)

    metrics_address = None
    if args.metrics_address != "off":
        metrics_address = metrics.serve(args.metrics_address)

    server.start()
    # Engines of any uid connect; what each may do is decided per request from the
    # credentials the handle socket reads, not by the socket's mode.
    os.chmod(socket_path, 0o666)
    handles.start()
    for name in ("", SERVICE_NAME):
        health_service.set(name, health_pb2.HealthCheckResponse.SERVING)
    _write_runtime_file(state_dir, socket_path, handles.path, metrics_address, pool.directory, movers)
    log.info("sleepd ready: backend %s (%s), socket %s, metrics %s, host pool %s (%s budget)", backend.name,
             ", ".join(f"{d.name} {format_size(d.capacity)}" for d in backend.devices), socket_path,
             metrics_address or "off", pool.directory, format_size(pool.budget))

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    stop.wait()
    log.info("sleepd stopping")
    health_service.enter_graceful_shutdown()  # every service NOT_SERVING, for good
    handles.stop()
    server.stop(grace=2).wait()
    idle_watcher.stop()
    for mover in movers.values():
        mover.close()
    pool.close()
    for name in (socket_path, os.path.join(state_dir, RUNTIME_FILE)):
        try:
            os.unlink(name)
        except FileNotFoundError:
            pass


RUNTIME_FILE = "daemon.json"


def _write_runtime_file(state_dir, socket_path, handle_path, metrics_address, pool_dir, movers) -> None:
    """Where this daemon's endpoints are, for tools and tests; replaced atomically."""
    info = {"pid": os.getpid(), "socket": socket_path, "handle_socket": handle_path,
            "metrics_address": metrics_address, "host_pool_dir": pool_dir,
            "movers": {str(device): mover.pid for device, mover in movers.items()}}
    path = os.path.join(state_dir, RUNTIME_FILE)
    with open(path + ".tmp", "w") as file:
        json.dump(info, file)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    main()
