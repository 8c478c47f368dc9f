"""The state machines are the only writers of state, and a bug in one stops the
daemon instead of being rolled back as if it were a failed operation."""

import ast
import os
import sys

import pytest

from support import MiB, Daemon, by_tag, wait_for

DAEMON = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "daemon")
STATE_MODULES = {"regions.py", "sessions.py", "model.py", "weight_sets.py"}
# What the state machines own: a region's state, memory and owner; a rank's condition and whether its
# engine runs its own sleep; a model's pause and its controller.
STATE_ATTRIBUTES = {"state", "handle", "backup", "session", "paused", "ended", "_goodbye", "_placeholder",
                    "_handing_back", "regions", "policy", "needs_controller", "controller"}
# Membership: a model's ranks and orphans, a rank's regions. Changed in place only by their own transitions.
MEMBERSHIP = {"ranks", "orphans", "regions"}
CHANGING_IN_PLACE = {"pop", "popitem", "setdefault", "update", "clear", "__setitem__", "__delitem__"}


def _assigned_attributes(tree):
    """(line, attribute) for every attribute written on anything but `self`."""
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr"
              and len(node.args) > 1 and isinstance(node.args[1], ast.Constant)):
            yield node.lineno, node.args[1].value
        for target in targets:
            for part in ast.walk(target):
                if isinstance(part, ast.Attribute) and isinstance(part.ctx, ast.Store) \
                        and not (isinstance(part.value, ast.Name) and part.value.id == "self"):
                    yield part.lineno, part.attr


def _changed_members(tree):
    """(line, attribute) for every `x.attr[k] = ...`, `del x.attr[k]` and `x.attr.pop(...)` (and the like)."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Delete)):
            targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]
            for target in targets:
                if isinstance(target, ast.Subscript) and isinstance(target.value, ast.Attribute):
                    yield target.lineno, target.value.attr
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr in CHANGING_IN_PLACE and isinstance(node.func.value, ast.Attribute)):
            yield node.lineno, node.func.value.attr


def _outside_the_state_modules(find, attributes):
    found = []
    for name in sorted(os.listdir(DAEMON)):
        if name.endswith(".py") and name not in STATE_MODULES:
            with open(os.path.join(DAEMON, name)) as source:
                tree = ast.parse(source.read())
            found += [f"daemon/{name}:{line} changes .{attribute}" for line, attribute in find(tree)
                      if attribute in attributes]
    return found


def test_only_the_state_machine_modules_assign_region_rank_or_model_state():
    assert _outside_the_state_modules(_assigned_attributes, STATE_ATTRIBUTES) == []


def test_only_the_state_machine_modules_change_who_belongs_to_a_model_or_a_rank():
    assert _outside_the_state_modules(_changed_members, MEMBERSHIP) == []
    # The check sees each kind of change it claims to.
    sample = ast.parse("m.ranks[0] = s\ndel m.orphans[1]\ns.regions.pop(2)\ns.regions.setdefault(3, r)\n")
    assert [attribute for _, attribute in _changed_members(sample)] == ["ranks", "orphans", "regions", "regions"]


def test_each_daemon_module_says_its_one_job_and_stays_small():
    for name in sorted(os.listdir(DAEMON)):
        if name.endswith(".py") and name != "__init__.py":
            with open(os.path.join(DAEMON, name)) as source:
                text = source.read()
            assert ast.get_docstring(ast.parse(text)), f"daemon/{name} has no opening comment"
            assert text.count("\n") <= 450, f"daemon/{name} has {text.count(chr(10))} lines"


# A daemon whose region table lost a transition: the next sleep asks for it.
BROKEN = ("import sys; import sleepd.daemon.regions as regions; "
          "del regions.TRANSITIONS[(regions.RegionState.MAPPED, 'offload')]; "
          "import sleepd.daemon.main as main; main.main(sys.argv[1:])")


@pytest.fixture
def backend():
    return "host"


def test_an_illegal_transition_stops_the_daemon_and_a_restart_recovers_every_byte(tmp_path, start_engine):
    flags = ("--host-devices", "1", "--host-device-capacity", "64MiB")
    broken = Daemon(tmp_path, "host", *flags, launcher=(sys.executable, "-c", BROKEN))
    engine = start_engine(broken, "qwen", regions=[("weights", 4 * MiB), ("kv_cache", 2 * MiB)])
    refused = broken.ctl("sleep", "--model", "qwen", check=False)
    assert refused.returncode != 0
    assert broken.process.wait(timeout=30) == 70  # EX_SOFTWARE: systemd restarts it
    line = [line for line in broken.log().splitlines() if "CRITICAL" in line]
    assert len(line) == 1 and "region" in line[0] and "qwen rank 0" in line[0] \
        and "no transition from mapped on offload" in line[0], broken.log()
    broken.stop()

    again = Daemon(tmp_path, "host", *flags)
    try:
        wait_for(lambda: again.status()["models"] and not again.status()["models"][0]["ranks"][0].get("orphaned"),
                 what="the engine to hand its memory back")
        assert engine.report()["regions"] == engine.initial["regions"]
        again.ctl("sleep", "--model", "qwen")
        again.ctl("wake", "--model", "qwen")
        assert by_tag(engine.report())["weights"]["sha256"] == by_tag(engine.initial)["weights"]["sha256"]
    finally:
        again.stop()


def _doc_table(heading: str) -> list[list[str]]:
    """The rows of the first table under `heading` in docs/architecture.md, cells stripped."""
    with open(os.path.join(os.path.dirname(DAEMON), "docs", "architecture.md")) as doc:
        section = doc.read().split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line.strip("|").split("|") for line in section.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in row] for row in rows[2:]]


def test_the_architecture_document_states_the_tables_the_code_has():
    from sleepd.daemon.regions import TRANSITIONS
    from sleepd.daemon.sessions import Condition

    documented = {(row[0], row[1]): row[2] for row in _doc_table("A region's life")}
    coded = {(state.name, event): after.name if after else None for (state, event), after in TRANSITIONS.items()}
    assert set(documented) == set(coded)
    for key, after in coded.items():
        assert after is None or documented[key] == after, key
    assert {row[0] for row in _doc_table("A session")} == {condition.value for condition in Condition}
