"""``hostagent watch [SOURCE ...] [--json]``: follow agents' snapshots live.

A SOURCE is ``STREAM[,REQUEST]`` (the agent's XPUB endpoint and optionally its request
endpoint, used to fetch a missed snapshot); without one, the endpoints of the config
file (``--config``, else ``/etc/hostagent/hostagent.toml`` if present, else the defaults)
are used, with wildcard binds (``tcp://*:P``, ``tcp://0.0.0.0:P``) read as 127.0.0.1.

Default output: one line per new snapshot of a host —
``HOST seq N  pCPUs free c0:3/8 c1:4/8  hugepages free c0:2M=10,1G=0  cache ways free
L3#0=7 L3#1=11  guests 3  conflicts 0`` — plus a line when a host goes silent
(no message for ``--dead-after`` seconds), restarts (new epoch) or a snapshot was missed.
``--json`` prints each snapshot as one JSON line. ``--count N`` / ``--seconds S`` stop
after N snapshots or S seconds (exit 0); Ctrl-C stops too.

Snapshots the subscriber drops (wrong shape, a host from another source, bad messages)
are logged by it once per host and source; a snapshot that passed its checks but holds
values the summary or JSON cannot show is skipped with one line saying why
(``HOST seq N: skipped, unreadable snapshot: ...``, on stderr with ``--json``). At exit a
line on stderr counts what was dropped or skipped, if anything was.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any


def add_client_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="F",
                   help="take the endpoints from this config file")
    p.add_argument("--client-key", metavar="F",
                   help="CURVE: this subscriber's .key_secret file (with --server-key)")
    p.add_argument("--server-key", metavar="F", help="CURVE: the agent's public .key file")


def _connectable(ep: str) -> str:
    for wild in ("tcp://*:", "tcp://0.0.0.0:"):
        if ep.startswith(wild):
            return "tcp://127.0.0.1:" + ep[len(wild):]
    if ep.startswith("tcp://[::]:"):
        return "tcp://[::1]:" + ep[len("tcp://[::]:"):]
    return ep


def sources_from(args: argparse.Namespace, given: list[str]) -> list[Any]:
    """The subscriber sources: the arguments, else the config's endpoints."""
    from hostagent.config import config_path, load_config
    from hostagent.subscriber import Source

    if given:
        return [Source.parse(s) for s in given]
    pub = load_config(config_path(args.config)).publisher
    req = pub.request_endpoints[0] if pub.request_endpoints else None
    return [Source(_connectable(pub.endpoints[0]), _connectable(req) if req else None)]


def client_curve(args: argparse.Namespace) -> Any:
    from hostagent.curve import ClientCurve
    from hostagent.errors import HostagentError

    if bool(args.client_key) != bool(args.server_key):
        raise HostagentError("--client-key and --server-key go together")
    if not args.client_key:
        return None
    return ClientCurve.load(args.client_key, args.server_key)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "watch",
        help="follow snapshots live (one line per change, or --json)",
        description="Subscribe to one or more agents and print each new snapshot: a "
        "one-line summary per host, or the whole snapshot as JSON with --json.",
    )
    p.add_argument("sources", nargs="*", metavar="SOURCE",
                   help="STREAM[,REQUEST] endpoints, e.g. tcp://10.0.0.5:6510,"
                   "tcp://10.0.0.5:6511 (default: from the config)")
    p.add_argument("--json", action="store_true", help="print whole snapshots, one per line")
    p.add_argument("--host", action="append", metavar="NAME",
                   help="only this host (repeatable; default all)")
    p.add_argument("--count", type=int, metavar="N", help="stop after N snapshots")
    p.add_argument("--seconds", type=float, metavar="S", help="stop after S seconds")
    p.add_argument("--dead-after", type=float, default=5.0, metavar="S",
                   help="report a host silent for S seconds (default 5)")
    add_client_options(p)
    p.set_defaults(func=run)


def _size(kib: int) -> str:
    if kib % (1024 * 1024) == 0:
        return f"{kib // (1024 * 1024)}G"
    if kib % 1024 == 0:
        return f"{kib // 1024}M"
    return f"{kib}K"


#: what a snapshot that passed the subscriber's shape check can still hold that the summary
#: or JSON cannot show (a missing key, a string for a number, bin data, NaN, deep nesting)
UNREADABLE = (KeyError, TypeError, ValueError, AttributeError, IndexError, RecursionError)
#: the subscriber's counters reported at exit: (stats key, singular, plural, verb)
DROP_COUNTERS = (
    ("invalid_snapshots", "invalid snapshot", "invalid snapshots", "dropped"),
    ("foreign_source", "message for a host bound to another source",
     "messages for hosts bound to another source", "dropped"),
    ("bad_messages", "bad message", "bad messages", "dropped"),
    ("reconnects", "dropped connection", "dropped connections", "reconnected"),
)


def drop_report(stats: dict[str, int], skipped: int) -> str | None:
    """The exit line counting what was dropped or skipped (``None``: nothing was)."""
    parts = [f"{stats[key]} {one if stats[key] == 1 else many} {verb}"
             for key, one, many, verb in DROP_COUNTERS if stats.get(key)]
    if skipped:
        parts.append(f"{skipped} unreadable snapshot{'' if skipped == 1 else 's'} skipped")
    return "watch: " + ", ".join(parts) if parts else None


def summary(snap: dict[str, Any]) -> str:
    """The one-line summary of a snapshot (``KeyError``/``TypeError``/... on values it
    cannot read, see ``UNREADABLE``)."""
    usage = snap.get("usage", {})
    cells = usage.get("cells", [])
    pcpus = " ".join(f"c{c['id']}:{c.get('free_pcpus', '?')}/{c.get('dedicated_cpus', '?')}"
                     for c in cells)
    pages = " ".join(
        f"c{c['id']}:" + ",".join(f"{_size(h['size_kib'])}={h['free']}"
                                  for h in c.get("hugepages", []))
        for c in cells if c.get("hugepages"))
    caches = " ".join(
        f"{c.get('resource') or 'L' + str(c.get('level'))}#{c['id']}={c['free_ways']}"
        for c in usage.get("caches", []))
    agent = snap.get("agent", {})
    lv = "" if agent.get("libvirt", {}).get("connected", True) else "  LIBVIRT DOWN"
    return (f"{snap.get('host')} seq {snap.get('seq')}  pCPUs free {pcpus or '-'}"
            f"  hugepages free {pages or '-'}  cache ways free {caches or '-'}"
            f"  guests {len(usage.get('guests', []))}"
            f"  conflicts {len(usage.get('conflicts', []))}{lv}")


def run(args: argparse.Namespace) -> int:
    from hostagent.subscriber import Subscriber

    sources = sources_from(args, args.sources)
    sub = Subscriber(sources, hosts=args.host, curve=client_curve(args),
                     dead_after=args.dead_after)
    out = sys.stdout
    if not args.json:
        print("watching " + ", ".join(s.stream for s in sources), file=sys.stderr, flush=True)
    end = None if args.seconds is None else time.monotonic() + args.seconds
    seen = skipped = 0
    epochs: dict[str, str | None] = {}
    try:
        while args.count is None or seen < args.count:
            left = None if end is None else end - time.monotonic()
            if left is not None and left <= 0:
                break
            for upd in sub.poll(left):
                if upd.kind == "snapshot":
                    try:
                        if args.json:
                            line = json.dumps(upd.snapshot, separators=(",", ":"),
                                              allow_nan=False)
                        else:
                            line = summary({**upd.snapshot, "host": upd.host,
                                            "seq": upd.seq})
                    except UNREADABLE as exc:
                        skipped += 1
                        print(f"{upd.host} seq {upd.seq}: skipped, unreadable snapshot: "
                              f"{type(exc).__name__}: {exc}",
                              file=sys.stderr if args.json else out, flush=True)
                        continue
                    seen += 1
                    if not args.json and epochs.get(upd.host) not in (None, upd.epoch):
                        out.write(f"{upd.host}: agent restarted (new epoch {upd.epoch})\n")
                    out.write(line + "\n")
                    epochs[upd.host] = upd.epoch
                elif not args.json and upd.kind == "dead":
                    out.write(f"{upd.host}: no message for {args.dead_after:g} s "
                              "(agent down or unreachable?)\n")
                elif not args.json and upd.kind == "stale":
                    out.write(f"{upd.host}: missed a snapshot after seq {upd.seq}; "
                              "fetching or waiting for the next one\n")
                out.flush()
                if args.count is not None and seen >= args.count:
                    break
    except KeyboardInterrupt:
        pass
    finally:
        sub.close()
        report = drop_report(sub.stats, skipped)
        if report:
            print(report, file=sys.stderr, flush=True)
    return 0
