"""Option tables: the options of a command declared once, for argparse and a quick parser.

A command whose options are all ``--name VALUE`` or ``--flag`` (``probe``, ``snapshot``)
lists them as ``QUICK_OPTIONS``, a tuple of ``Option``. ``add_options`` adds them to the
command's argparse parser, which gives ``--help``, the usage line and the error messages.
``quick_parse`` reads an ordinary command line against the same table without importing
argparse, the ``gettext`` and ``locale`` modules it loads, or building the parser: a
noticeable part of a short command such as ``hostagent probe --json`` (docs/probe.md
§Speed).

The quick parser only answers when the line is one it reads exactly as argparse would:
known long options, each given in full, values after a space or ``=``. For anything
else — ``-h``/``--help``, an unknown or abbreviated option, a value starting with ``-``
after a space, a missing value, a positional argument, ``--`` — it returns ``None`` and the
caller lets argparse parse the line with its own rules and messages. The tests check that
the two give the same values on a table of command lines.

``ROOT_OPTIONS`` (``--sysfs-root``, ``--resctrl-root``) and ``roots`` are shared by every
command that reads the host's trees: ``probe``, ``capture``, ``snapshot``, ``resctrl``.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing is not imported at run time (start-up time)
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any


class QuickArgs:
    """A quick-parsed command line: its values as attributes, like argparse's ``Namespace``
    (a class of its own: ``types.SimpleNamespace`` would import ``types`` at start-up)."""

    def __init__(self, **values: Any) -> None:
        self.__dict__.update(values)

    def __repr__(self) -> str:
        items = ", ".join(f"{k}={v!r}" for k, v in self.__dict__.items())
        return f"QuickArgs({items})"

    def __eq__(self, other: object) -> bool:
        return other.__class__ is QuickArgs and vars(self) == vars(other)


class Option:
    """``--name METAVAR`` (a string value, default ``None``) or, with ``metavar=None``, a
    ``--flag`` (``True`` when given, default ``False``)."""

    __slots__ = ("flag", "metavar", "help", "dest")

    def __init__(self, flag: str, metavar: str | None, help: str) -> None:
        if not flag.startswith("--") or len(flag) < 3 or "=" in flag:
            raise ValueError(f"option {flag!r}: expected a long option such as --name")
        self.flag = flag
        self.metavar = metavar
        self.help = help
        self.dest = flag[2:].replace("-", "_")

    def __repr__(self) -> str:
        return f"Option({self.flag!r}, {self.metavar!r})"


def add_options(parser: Any, options: Sequence[Option]) -> None:
    """Add ``options`` to an ``argparse.ArgumentParser``."""
    for opt in options:
        if opt.metavar is None:
            parser.add_argument(opt.flag, action="store_true", help=opt.help)
        else:
            parser.add_argument(opt.flag, metavar=opt.metavar, help=opt.help)


ROOT_OPTIONS = (
    Option("--sysfs-root", "D", "sysfs tree to read (default /sys)"),
    Option(
        "--resctrl-root",
        "D",
        "resctrl mount to read (default <sysfs-root>/fs/resctrl, or /sys/fs/resctrl)",
    ),
)


def add_root_options(parser: Any) -> None:
    """Add ``ROOT_OPTIONS`` to an ``argparse.ArgumentParser``."""
    add_options(parser, ROOT_OPTIONS)


def roots(args: Any) -> tuple[str, str]:
    """(sysfs root, resctrl root) from parsed ``ROOT_OPTIONS``: ``--sysfs-root``, default
    ``/sys``; ``--resctrl-root``, default ``<sysfs-root>/fs/resctrl`` (the rule of
    ``hostagent.probe.roots``, which the config file's ``[probe]`` follows too)."""
    from hostagent.probe.roots import DEFAULT_SYSFS_ROOT, default_resctrl_root

    sysfs = args.sysfs_root or DEFAULT_SYSFS_ROOT
    return sysfs, args.resctrl_root or default_resctrl_root(sysfs)


def quick_parse(argv: Sequence[str], options: Sequence[Option]) -> dict[str, Any] | None:
    """``{dest: value}`` for every option (defaults filled in), or ``None`` when the line
    is not one this parser reads exactly as argparse would (see the module docstring)."""
    by_flag = {opt.flag: opt for opt in options}
    values: dict[str, Any] = {
        opt.dest: (False if opt.metavar is None else None) for opt in options
    }
    i, n = 0, len(argv)
    while i < n:
        name, eq, value = argv[i].partition("=")
        opt = by_flag.get(name)
        if opt is None:
            return None
        if opt.metavar is None:
            if eq:
                return None  # argparse: "ignored explicit argument"
            values[opt.dest] = True
        elif eq:
            values[opt.dest] = value
        else:
            i += 1
            if i == n or argv[i].startswith("-"):
                return None  # missing value, or argparse's own rules for "-..." values
            values[opt.dest] = argv[i]
        i += 1
    return values
