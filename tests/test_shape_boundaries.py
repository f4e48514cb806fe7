"""Module boundaries: no import cycle between the CLI and its parser, and the commands
share their root options through ``hostagent.commands.options``, not through ``probe``."""

import subprocess
import sys
from pathlib import Path

import pytest

import hostagent


def imported_after(statement: str) -> set[str]:
    """The ``hostagent`` modules loaded by ``statement`` in a fresh interpreter."""
    code = (f"import sys\n{statement}\n"
            "print(' '.join(m for m in sys.modules if m.startswith('hostagent')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    return set(out.split())


def test_the_parser_does_not_import_the_entry_point():
    assert "hostagent.cli" not in imported_after("import hostagent.cli_parser")


@pytest.mark.parametrize("command", ["capture", "resctrl", "snapshot"])
def test_commands_reading_the_trees_do_not_import_the_probe_command(command):
    loaded = imported_after(f"import hostagent.commands.{command}")
    assert "hostagent.commands.options" in loaded
    assert "hostagent.commands.probe" not in loaded


def test_every_command_in_the_table_has_its_module():
    from hostagent.cli_parser import build_parser
    from hostagent.commands import COMMANDS

    required = {"capture": ["out"], "resctrl": ["free"], "keys": ["dir"],
                "fit": ["--snapshot", "s", "--request", "r"],
                "claim": ["--endpoint", "e", "--request", "r"],
                "release": ["--endpoint", "e", "claim-1"], "place": ["--request", "r"]}
    parser = build_parser()
    for name in COMMANDS:
        args = parser.parse_args([name, *required.get(name, [])])
        assert args.func.__module__ == f"hostagent.commands.{name}"


def test_the_daemon_is_only_the_agent():
    """The test driver's op and the demo guests reach the agent through its extension
    points (the publisher's op registry, connect_hooks), from hostagent.agent.test_driver."""
    import ast
    import inspect

    import hostagent.agent.daemon as daemon

    tree = ast.parse(inspect.getsource(daemon))
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "hostagent.agent.demo" not in imported
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, ast.Module | ast.ClassDef | ast.FunctionDef
                                | ast.AsyncFunctionDef)
                  and n.body and isinstance(n.body[0], ast.Expr)}
    strings = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)
               and isinstance(n.value, str) and id(n) not in docstrings]
    assert not any("test-domain" in s for s in strings)
    assert not hasattr(daemon.Agent, "op_test_domain")


def test_test_driver_attaches_its_op_and_the_demo_hook():
    from hostagent.agent import test_driver

    class Publisher:
        def __init__(self):
            self.handlers = {}

        def register(self, op, handler):
            self.handlers[op] = handler

    class AgentShape:
        publisher = Publisher()
        connect_hooks: list = []

    agent = AgentShape()
    test_driver.attach(agent)
    assert set(agent.publisher.handlers) == {"test-domain"}
    assert len(agent.connect_hooks) == 1
    assert test_driver.is_test_uri("test:///default")
    assert not test_driver.is_test_uri("qemu:///system")


def _layout_names() -> set[str]:
    """The paths the README's Layout drawing names under hostagent/ (``agent/daemon.py``,
    ``fleet/``, ``cli.py``), read from its indentation."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = readme.split("## Layout", 1)[1].split("```", 2)[1]
    names: set[str] = set()
    parents: list[tuple[int, str]] = []
    for line in block.splitlines()[1:]:
        words = line.split()
        if not words or line.startswith(("fixtures", "bench", "examples")):
            continue
        indent = len(line) - len(line.lstrip())
        first = words[0]
        if not (first.endswith((".py", "/", ".py,")) and (first[0].isalpha() or first[0] == "_")):
            continue  # a continuation line of a description
        while parents and parents[-1][0] >= indent:
            parents.pop()
        prefix = parents[-1][1] if parents else ""
        for word in words[:2]:
            if word.rstrip(",").endswith(".py"):
                names.add(prefix + word.rstrip(","))
        if first.endswith("/") and first != "hostagent/":
            names.add(prefix + first)
            parents.append((indent, prefix + first))
    return names


def test_the_readme_layout_names_every_module_and_only_existing_ones():
    """README "Layout" matches the tree: every module at the top of hostagent/ and in
    agent/ is named (the packages probe/, guests/, fit/, fleet/, commands/ as a whole),
    and every name in the drawing exists."""
    pkg = Path(hostagent.__file__).parent
    names = _layout_names()
    want = {p.name for p in pkg.glob("*.py") if p.name not in ("__init__.py", "__main__.py")}
    want |= {f"agent/{p.name}" for p in (pkg / "agent").glob("*.py")
             if p.name != "__init__.py"}
    want |= {f"{p.name}/" for p in pkg.iterdir()
             if p.is_dir() and (p / "__init__.py").exists() and p.name != "agent"}
    want.add("agent/")
    assert sorted(want - names) == [], "modules missing from the README's Layout drawing"
    assert sorted(n for n in names if not (pkg / n).exists()) == [], \
        "names in the README's Layout drawing that are not in the tree"
