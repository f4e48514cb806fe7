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
                "release": ["--endpoint", "e", "claim-1"]}
    parser = build_parser()
    for name in COMMANDS:
        args = parser.parse_args([name, *required.get(name, [])])
        assert args.func.__module__ == f"hostagent.commands.{name}"
