"""The ``hostagent`` entry point: one sub-command per module in ``hostagent.commands``.

Each command module defines ``register(subparsers)``, which adds its parser and sets
``func`` (a callable taking the parsed args and returning an exit code). Modules import
their heavy dependencies inside ``func`` so that ``hostagent --help`` stays fast.
Every ``HostagentError`` is printed as ``hostagent: <message>`` with exit code 2.

The command table is ``hostagent.commands.COMMANDS``. Only the named command's module is
imported. A command with an option table (``QUICK_OPTIONS``,
``hostagent.commands.options``) whose command line is a plain one is run without argparse;
every other line goes through the argparse parser of ``hostagent.cli_parser``.
"""

from __future__ import annotations

import gc
import sys

from hostagent.commands import COMMANDS
from hostagent.errors import HostagentError

TYPE_CHECKING = False  # typing is not imported at run time (start-up time)
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command (``argv``, else the program's arguments); returns its exit code.

    Run as the program (no ``argv``), once the command is done every object left is moved
    out of the cyclic garbage collector's reach (``gc.freeze``): the interpreter's shutdown
    then does not walk them all once more (docs/probe.md §Speed).
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
    args = _quick_args(only, argv[1:]) if only else None
    if args is None:
        from hostagent.cli_parser import build_parser

        parser = build_parser(only)
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
    return run_command(args)


def _quick_args(command: str, argv: list[str]) -> Any:
    """The parsed arguments of a command with an option table (``QUICK_OPTIONS``, see
    ``hostagent.commands.options``) when its line needs no argparse; else ``None``."""
    name = f"hostagent.commands.{command}"
    __import__(name)  # not importlib.import_module: importlib is one more module to load
    module = sys.modules[name]
    options = getattr(module, "QUICK_OPTIONS", None)
    if options is None:
        return None
    from hostagent.commands.options import QuickArgs, quick_parse

    values = quick_parse(argv, options)
    if values is None:
        return None
    return QuickArgs(command=command, func=module.run, **values)


def run_command(args: Any) -> int:
    """Call ``args.func(args)``; a ``HostagentError`` is one ``hostagent: ...`` line on
    stderr and exit code 2."""
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
