"""The daemon's layers, read from its imports: a request goes one way down, from the edges (gRPC, the
fd socket) through the operations to the planner and the executor, and on to the state. The planner
takes no lock and starts no thread, and knows no transport; the state knows nobody above it."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DAEMON = os.path.join(ROOT, "daemon")

PLANNER = "sleepd.daemon.planner"
STATE = {f"sleepd.daemon.{name}" for name in ("regions", "sessions", "model", "views", "registry")}
EDGES = {f"sleepd.daemon.{name}"
         for name in ("service", "fd_socket", "tcp", "main", "external", "swap", "idle", "core")}
# What a planner has no use for: locks, threads, transports, the native extension.
NOT_FOR_THE_PLANNER = ("threading", "queue", "concurrent", "socket", "select", "grpc", "google.protobuf", "sleepd.proto",
                       "sleepd._C", "sleepd.daemon.locks")


def _source(module: str) -> str | None:
    """The file of a module of this repository (sleepd.X maps onto the checkout), or None."""
    if not module.startswith("sleepd."):
        return None
    path = os.path.join(ROOT, *module.split(".")[1:])
    for candidate in (path + ".py", os.path.join(path, "__init__.py")):
        if os.path.exists(candidate):
            return candidate
    return None


def imports(module: str) -> set[str]:
    """What `module` imports when it is loaded (imports under `if TYPE_CHECKING:` are for readers only)."""
    with open(_source(module)) as source:
        tree = ast.parse(source.read())
    package = module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            node.body = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(module.split(".")[:-node.level] + ([base] if base else [])) if node.level > 1 \
                    else f"{package}.{base}" if base else package
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names if _source(f"{base}.{alias.name}")}
    return found


def closure(module: str) -> set[str]:
    """Everything loading `module` loads, following this repository's modules."""
    seen, pending = set(), [module]
    while pending:
        current = pending.pop()
        if current in seen:
            continue
        seen.add(current)
        if _source(current):
            pending += imports(current)
    return seen - {module}


def daemon_modules() -> list[str]:
    return sorted(f"sleepd.daemon.{name[:-3]}" for name in os.listdir(DAEMON)
                  if name.endswith(".py") and name != "__init__.py")


def test_the_planner_imports_no_lock_thread_transport_or_executor():
    loaded = closure(PLANNER)
    forbidden = sorted(m for m in loaded if m.startswith(NOT_FOR_THE_PLANNER))
    assert forbidden == [], f"the planner loads {forbidden}"
    above = sorted(m for m in loaded if m in EDGES | {"sleepd.daemon.executor", "sleepd.daemon.operations"})
    assert above == [], f"the planner loads {above}"


def test_the_state_modules_know_neither_the_planner_nor_the_executor_nor_the_edges():
    for module in sorted(STATE):
        above = sorted(m for m in closure(module) if m in EDGES | {PLANNER, "sleepd.daemon.plans",
                                                                   "sleepd.daemon.executor", "sleepd.daemon.operations"})
        assert above == [], f"{module} loads {above}"


def test_the_executor_and_the_operations_never_reach_back_up_to_the_edges():
    for module in ("sleepd.daemon.executor", "sleepd.daemon.operations", "sleepd.daemon.recovery"):
        above = sorted(m for m in closure(module) if m in EDGES)
        assert above == [], f"{module} loads {above}"
    assert "sleepd.daemon.operations" not in closure("sleepd.daemon.executor")


def test_protobuf_and_grpc_stay_at_the_edges_and_the_engine_stream():
    # The engine stream: fanout builds its commands, sessions queue them, controllers forward requests.
    allowed = EDGES | {f"sleepd.daemon.{name}" for name in ("fanout", "sessions", "controllers", "call_caps")}
    speaking = sorted(m for m in daemon_modules() if m not in allowed
                      and any(i.startswith(("grpc", "sleepd.proto", "google.protobuf")) for i in imports(m)))
    assert speaking == []


def test_the_layering_check_sees_an_upward_import():
    # The check reads what it claims to: the service is an edge, and it loads the planner.
    assert PLANNER in closure("sleepd.daemon.service")
    assert any(m.startswith("grpc") for m in closure("sleepd.daemon.service"))
