"""Module boundaries: no import cycle between the CLI and its parser, and the commands
share their root options through ``hostagent.commands.options``, not through ``probe``."""

import subprocess
import sys

import pytest


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
