"""The ``hostagent`` entry point: one sub-command per module in ``hostagent.commands``.

Each command module defines ``register(subparsers)``, which adds its parser and sets
``func`` (a callable taking the parsed args and returning an exit code). Modules import
their heavy dependencies inside ``func`` so that ``hostagent --help`` stays fast.
Every ``HostagentError`` is printed as ``hostagent: <message>`` with exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
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


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The full parser, or (``only``) one with just that command's module imported.

    Importing one command module instead of all of them keeps start-up short for the
    commands that run often (``probe``, ``snapshot``): they never load zmq or libvirt.
    """
    parser = argparse.ArgumentParser(
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
