"""The ``hostagent`` entry point: one sub-command per module in ``hostagent.commands``.

Each command module defines ``register(subparsers)``, which adds its parser and sets
``func`` (a callable taking the parsed args and returning an exit code). Modules import
their heavy dependencies inside ``func`` so that ``hostagent --help`` stays fast.
Every ``HostagentError`` is printed as ``hostagent: <message>`` with exit code 2.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import os
import sys
from collections.abc import Sequence

from hostagent import __version__
from hostagent.errors import HostagentError

COMMANDS = (
    "probe",
    "capture",
    "snapshot",
    "run",
    "watch",
    "show",
    "resctrl",
    "fit",
    "keys",
)


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
    ``shutil`` (and with it bz2, lzma, fnmatch) on the first, about 2 ms of every run.
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
        try:
            module = importlib.import_module(f"hostagent.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"hostagent.commands.{name}":
                continue  # command not built yet
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command (``argv``, else the program's arguments); returns its exit code.

    Run as the program (no ``argv``), once the command is done every object left is moved
    out of the cyclic garbage collector's reach (``gc.freeze``): the interpreter's shutdown
    then does not walk them all once more, several milliseconds of every run on a big host.
    """
    if argv is not None:
        return _main(argv)
    try:
        return _main(None)
    finally:
        gc.freeze()


def _main(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    only = argv[0] if argv and argv[0] in COMMANDS else None
    parser = build_parser(only)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except HostagentError as exc:
        print(f"hostagent: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
