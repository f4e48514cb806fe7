"""``hostagent probe``: print this host's topology (and free cache ways).

A readable report by default (``hostagent.probe.report``); ``--json`` prints
``probe_json``: the schema-v1 ``topology`` dict plus ``free_cache``. Roots: ``--sysfs-root``
(default ``/sys``) and ``--resctrl-root`` (default ``<sysfs-root>/fs/resctrl`` when
``--sysfs-root`` is given, else ``/sys/fs/resctrl``). Imports stay light: no libvirt, zmq
or psutil on this path.
"""

from __future__ import annotations

from hostagent.commands.options import ROOT_OPTIONS, Option, add_options, roots

TYPE_CHECKING = False  # typing is not imported at run time (start-up time)
if TYPE_CHECKING:
    import argparse

QUICK_OPTIONS = (
    *ROOT_OPTIONS,
    Option("--json", None, "print the schema-v1 topology plus free_cache"),
)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "probe",
        help="show this host's NUMA cells, cores, caches, hugepages, resctrl and PCI",
        description="Read the host topology from sysfs and resctrl and print it.",
    )
    add_options(p, QUICK_OPTIONS)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import gc

    # one short pass that builds thousands of objects, none in a cycle: collecting
    # garbage while it runs only costs time (docs/probe.md §Speed)
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        return _run(args)
    finally:
        if was_enabled:
            gc.enable()


def _run(args: argparse.Namespace) -> int:
    import sys

    from hostagent.probe.host import probe_host

    sysfs, resctrl = roots(args)
    topo = probe_host(sysfs, resctrl)
    if args.json:
        from hostagent.probe.host import probe_json_text

        sys.stdout.write(probe_json_text(topo) + "\n")
    else:
        from hostagent.probe.report import render

        sys.stdout.write(render(topo))
    return 0
