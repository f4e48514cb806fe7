"""The argparse side of the ``hostagent`` CLI: the parser, its help formatter.

``hostagent.cli`` imports this only when a command line needs argparse (help, errors,
commands without an option table): see ``hostagent.commands.options``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from hostagent import __version__
from hostagent.commands import COMMANDS


def terminal_columns() -> int:
    """Columns for help text: ``$COLUMNS``, else stdout's terminal width, else 80 (the rule
    of ``shutil.get_terminal_size``, without importing ``shutil`` and what it loads)."""
    try:
        return int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        pass
    try:
        return os.get_terminal_size(sys.__stdout__.fileno()).columns
    except (AttributeError, ValueError, OSError):
        return 80


class HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter, told the width instead of asking ``shutil`` for it.

    argparse builds a formatter for every ``add_argument``; the stock one imports
    ``shutil`` (and with it bz2, lzma, fnmatch) on the first (docs/probe.md §Speed).
    """

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24,
                 width: int | None = None) -> None:
        if width is None:
            width = max(terminal_columns() - 2, 20)
        super().__init__(prog, indent_increment, max_help_position, width)


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` with ``HelpFormatter`` as the default formatter; the
    sub-command parsers are of this class too."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The full parser, or (``only``) one with just that command's module imported.

    Importing one command module instead of all of them keeps start-up short for the
    commands that run often (``probe``, ``snapshot``): they never load zmq or libvirt.
    """
    parser = ArgumentParser(
        prog="hostagent",
        description="Per-host NUMA, thread, hugepage and cache-way tracker for KVM hosts.",
    )
    parser.add_argument("--version", action="version", version=f"hostagent {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in (only,) if only else COMMANDS:
        importlib.import_module(f"hostagent.commands.{name}").register(sub)
    return parser
