"""``hostagent place``: which host, and where on it, for a request (docs/fleet.md).

Subscribes to every ``--source`` (``STREAM[,REQUEST]``: an agent or a forwarder), gathers
the hosts they carry into a fleet index (until every source has delivered a host and
``SETTLE_SECONDS`` pass with no new host, at most ``--wait`` seconds), and prints the
ranked hosts with their exact placements; with ``--claim`` it claims the best at its
agent (``place_and_claim``: on a refusal the next, with the host's snapshot refreshed).
Exit status: 0 placed (and claimed with ``--claim``), 1 no host fits (the reasons per
host class), 2 invalid input (``hostagent: ...``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

#: seconds with no new host after which the gathered fleet is taken as complete
SETTLE_SECONDS = 0.3


def register(subparsers: argparse._SubParsersAction) -> None:
    from hostagent.claim_limits import MAX_TTL_SECONDS, MIN_TTL_SECONDS
    from hostagent.fleet.index import MAX_COUNT
    from hostagent.fleet.weighers import DEFAULT_WEIGHER, WEIGHERS

    p = subparsers.add_parser(
        "place",
        help="rank the hosts of many agents for a request (and claim the best)",
        description="Gather the hosts of every source into a fleet index, rank those where "
        "the request fits (weighers), print their placements; --claim claims the best.",
    )
    p.add_argument("--source", action="append", metavar="E", default=[],
                   help="STREAM[,REQUEST] endpoints of an agent or forwarder (repeatable; "
                   "default: from the config)")
    p.add_argument("--request", metavar="FILE", required=True,
                   help="fit request JSON file ('-' = stdin)")
    p.add_argument("--count", type=int, default=1, metavar="N",
                   help=f"hosts to list (1-{MAX_COUNT}, default 1)")
    p.add_argument("--weigher", metavar="W", default=DEFAULT_WEIGHER,
                   help=f"weighers with weights, from {', '.join(WEIGHERS)} (default "
                   f"{DEFAULT_WEIGHER!r}; e.g. 'pack', 'spread:2,numa:1')")
    p.add_argument("--claim", action="store_true", help="claim the best host's placement")
    p.add_argument("--ttl", type=float, metavar="S",
                   help=f"with --claim: seconds the claim is held ({MIN_TTL_SECONDS:g}-"
                   f"{MAX_TTL_SECONDS:g}; default: the agent's)")
    p.add_argument("--claimant", metavar="TEXT", help="with --claim: who claims")
    p.add_argument("--wait", type=float, default=5.0, metavar="S",
                   help="gather hosts at most this long (default 5)")
    p.add_argument("--timeout", type=float, default=5.0, metavar="S",
                   help="seconds to wait for an agent's reply to a claim (default 5)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    from hostagent.commands.watch import add_client_options

    add_client_options(p)
    p.set_defaults(func=run)


def gather(args: argparse.Namespace) -> tuple[Any, Any]:
    """(subscriber, fleet) with the hosts every source carried within ``--wait``."""
    from hostagent.commands.watch import client_curve, sources_from
    from hostagent.errors import HostagentError
    from hostagent.fleet import Fleet, feed
    from hostagent.subscriber import Subscriber

    if not args.wait > 0:
        raise HostagentError(f"--wait {args.wait:g}: must be a number of seconds > 0")
    sources = sources_from(args, args.source)
    sub = Subscriber(sources, curve=client_curve(args))
    fleet = Fleet()
    deadline = time.monotonic() + args.wait
    settled = None
    try:
        while time.monotonic() < deadline:
            before = len(fleet.hosts())
            feed(sub, fleet, timeout=min(SETTLE_SECONDS, max(0.0, deadline - time.monotonic())))
            heard = {st.source for st in sub.hosts.values() if st.snapshot is not None}
            if len(fleet.hosts()) != before or len(heard) < len(sources):
                settled = None
                continue
            settled = settled or time.monotonic()
            if time.monotonic() - settled >= SETTLE_SECONDS:
                break
    except BaseException:
        sub.close()
        raise
    if not fleet.hosts():
        sub.close()
        streams = ", ".join(s.stream for s in sources)
        raise HostagentError(f"no host heard within --wait {args.wait:g} s from {streams}")
    return sub, fleet


def run(args: argparse.Namespace) -> int:
    from hostagent.commands.fit import _load_json
    from hostagent.commands.watch import client_curve
    from hostagent.errors import HostagentError
    from hostagent.fit import parse_request
    from hostagent.fleet import parse_weigher, place_and_claim
    from hostagent.fleet.index import MAX_COUNT
    from hostagent.wire import MAX_REQUEST_BYTES

    request = _load_json(args.request, "--request", MAX_REQUEST_BYTES)
    parse_request(request)  # invalid input before subscribing
    parse_weigher(args.weigher)
    if not 1 <= args.count <= MAX_COUNT:
        raise HostagentError(f"--count {args.count}: must be from 1 to {MAX_COUNT}")
    sub, fleet = gather(args)
    try:
        cands = fleet.place(request, count=args.count, weigher=args.weigher)
        claimed = None
        if args.claim and cands:
            claimed = place_and_claim(fleet, request, weigher=args.weigher,
                                      claimant=args.claimant, ttl_s=args.ttl,
                                      timeout=args.timeout, curve=client_curve(args))
        reasons = fleet.why_not(request) if not cands or (args.claim and not claimed) else {}
    finally:
        sub.close()
    ok = bool(cands) and (claimed is not None or not args.claim)
    if args.json:
        doc = {"candidates": [{"host": c.host, "score": c.score, "endpoint": c.endpoint,
                               "answer": c.answer} for c in cands],
               "claim": None if claimed is None else dict(claimed.claim, host=claimed.host),
               "reasons": reasons, "hosts": len(fleet.hosts())}
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
    else:
        sys.stdout.write(describe(cands, claimed, reasons, len(fleet.hosts()), args.claim))
    return 0 if ok else 1


def _cells(answer: dict[str, Any]) -> str:
    from hostagent.cpulist import format_cpulist

    p = answer["placement"]
    if p["floating"]:
        return "floating (no NUMA cell)"
    parts = []
    for c in p["cells"]:
        cpus = sorted(set(c["pinning"].values()) | set(c["shared_cpus"]))
        parts.append(f"cell {c['host_cell']}: cpus {format_cpulist(cpus) or '-'}")
    return "; ".join(parts)


def describe(cands: list[Any], claimed: Any, reasons: dict[str, list[str]], hosts: int,
             claim: bool) -> str:
    """The result as text: ranked hosts, the claim, or why nothing fits."""
    lines = []
    if cands:
        lines.append(f"{len(cands)} of {hosts} host{'s' * (hosts != 1)} (best first):")
        for i, c in enumerate(cands, 1):
            lines.append(f"  {i}. {c.host}  score {c.score:.3f}  {_cells(c.answer)}")
    if claimed is not None:
        from hostagent.commands.claim import describe as describe_claim

        lines.append(f"on {claimed.host} ({claimed.endpoint}, {claimed.attempts} "
                     f"claim{'s' * (claimed.attempts != 1)}):")
        lines.append(describe_claim({"claimed": True, "claim": claimed.claim}).rstrip("\n"))
    elif claim and cands:
        lines.append("not claimed: every candidate was refused or did not answer")
    if reasons:
        lines.append(f"no host fits ({hosts} heard); per host class:" if not cands else
                     "why the other hosts do not take it, per host class:")
        for cls, whys in reasons.items():
            lines.append(f"  {cls}:")
            lines.extend(f"    {w}" for w in whys)
    return "\n".join(lines) + "\n"
