"""``hostagent claim``: claim a placement at a running agent (docs/claims.md).

One ``{op: "claim"}`` request to the agent's request endpoint: the agent fits the request
(or takes ``--placement``, the placement of a fit answer) against its own state and every
outstanding claim, and holds it for ``--ttl`` seconds. Prints the claim (its id, until
when, the placement and the libvirt XML to boot it with; ``--json``: the whole reply).
Exit status: 0 claimed, 1 not claimed (does not fit, or taken: the reasons are printed),
2 invalid input or an error reply (``hostagent: ...`` on stderr).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from typing import Any


def register(subparsers: argparse._SubParsersAction) -> None:
    from hostagent.claim_limits import MAX_TTL_SECONDS, MIN_TTL_SECONDS

    p = subparsers.add_parser(
        "claim",
        help="claim a placement at an agent (held until released, consumed or expired)",
        description="Ask an agent to claim a placement for a request: decided by the agent "
        "against its state and every outstanding claim, so concurrent schedulers never get "
        "the same thread, page, cache way or PCI function.",
    )
    p.add_argument("--endpoint", metavar="E", required=True,
                   help="agent request endpoint, e.g. tcp://127.0.0.1:6511")
    p.add_argument("--request", metavar="FILE", required=True,
                   help="fit request JSON file ('-' = stdin)")
    p.add_argument("--placement", metavar="FILE",
                   help="claim this placement (JSON: a fit answer's placement, or the whole "
                   "answer) instead of the agent's fit")
    p.add_argument("--ttl", type=float, metavar="S",
                   help=f"seconds the claim is held ({MIN_TTL_SECONDS:g}-{MAX_TTL_SECONDS:g}; "
                   "default: the agent's [claims] default_ttl_seconds)")
    p.add_argument("--strategy", choices=("spread", "pack"),
                   help="cell choice (default: the agent's [fit] cell_strategy)")
    p.add_argument("--claimant", metavar="TEXT", help="who claims (shown in the snapshot)")
    p.add_argument("--timeout", type=float, default=10.0, metavar="S",
                   help="seconds to wait for the agent's reply (default 10)")
    p.add_argument("--json", action="store_true", help="print the reply as JSON")
    add_key_options(p)
    p.set_defaults(func=run)


def add_key_options(p: argparse.ArgumentParser) -> None:
    """``--client-key``/``--server-key``: CURVE (the client's key must be a claimant's)."""
    p.add_argument("--client-key", metavar="F",
                   help="CURVE: this client's .key_secret file (with --server-key); its public "
                   "key must be in the agent's [curve] claimants_dir")
    p.add_argument("--server-key", metavar="F", help="CURVE: the agent's public .key file")


def run(args: argparse.Namespace) -> int:
    from hostagent.commands.fit import _load_json
    from hostagent.commands.watch import client_curve
    from hostagent.subscriber import claim
    from hostagent.wire import MAX_REQUEST_BYTES

    request = _load_json(args.request, "--request", MAX_REQUEST_BYTES)
    placement = None
    if args.placement:
        placement = _load_json(args.placement, "--placement", MAX_REQUEST_BYTES)
        if isinstance(placement, dict) and isinstance(placement.get("placement"), dict):
            placement = placement["placement"]  # a whole fit answer
    reply = claim(args.endpoint, request, ttl_s=args.ttl, strategy=args.strategy,
                  claimant=args.claimant, placement=placement, timeout=args.timeout,
                  curve=client_curve(args))
    if args.json:
        sys.stdout.write(json.dumps(reply, indent=2) + "\n")
    else:
        sys.stdout.write(describe(reply))
    return 0 if reply.get("claimed") else 1


def describe(reply: dict[str, Any]) -> str:
    """The reply as text: the claim and its placement, or why it was not claimed."""
    from hostagent.fit.explain import explain

    if not reply.get("claimed"):
        lines = ["not claimed:"]
        for r in reply.get("reasons") or []:
            where = "host" if r.get("host_cell") is None else f"host cell {r['host_cell']}"
            who = f"guest cell {r['guest_cell']}: " if r.get("guest_cell") is not None else ""
            lines.append(f"  {where}: {who}{r.get('resource')}: {r.get('message')}")
        return "\n".join(lines) + "\n"
    c = reply["claim"]
    until = datetime.datetime.fromtimestamp(c["expires"]).isoformat(timespec="seconds")
    head = f"claimed {c['id']} until {until}" + (f" for {c['claimant']}" if c["claimant"]
                                                  else "") + "\n"
    body = explain({"fits": True, "strategy": c.get("strategy"), "placement": c["placement"],
                    "reasons": [], "libvirt_xml": c["libvirt_xml"]})
    return head + body.split("\n", 1)[1]
