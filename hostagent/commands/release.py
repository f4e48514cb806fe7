"""``hostagent release``: give a claim back to the agent (docs/claims.md).

Exit status: 0 released, 2 an unknown id, a client that may not release, or no reply
(``hostagent: ...`` on stderr).
"""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    from hostagent.commands.claim import add_key_options

    p = subparsers.add_parser(
        "release", help="give a claim back (its resources are free at once)",
        description="Release a claim made with `hostagent claim` (or the claim op).")
    p.add_argument("--endpoint", metavar="E", required=True,
                   help="agent request endpoint, e.g. tcp://127.0.0.1:6511")
    p.add_argument("id", metavar="ID", help="the claim id")
    p.add_argument("--timeout", type=float, default=10.0, metavar="S",
                   help="seconds to wait for the agent's reply (default 10)")
    add_key_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hostagent.commands.watch import client_curve
    from hostagent.subscriber import release

    reply = release(args.endpoint, args.id, timeout=args.timeout, curve=client_curve(args))
    sys.stdout.write(f"released {reply['released']}\n")
    return 0
