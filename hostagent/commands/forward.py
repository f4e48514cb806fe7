"""``hostagent forward [--config F]``: the XSUB/XPUB forwarder (``hostagent.forward``).

Reads ``/etc/hostagent/forward.toml`` without ``--config`` (docs/daemon.md §11). A bad
config or an endpoint that cannot be bound is one ``hostagent: <message>`` line and exit
code 2; SIGTERM/SIGINT stop it with exit code 0; SIGUSR1 writes a debug dump.
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "forward",
        help="forward many agents' streams to many subscribers (XSUB/XPUB)",
        description="Run the forwarder: connect to agents' stream endpoints (and/or let "
        "agents connect), and let subscribers connect to one endpoint for all of them. "
        "SIGUSR1 writes a debug dump, SIGTERM stops.",
    )
    p.add_argument("--config", metavar="F", default=None,
                   help="config file (default /etc/hostagent/forward.toml)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hostagent.forward import DEFAULT_PATH, run_forwarder

    return run_forwarder(args.config or DEFAULT_PATH)
