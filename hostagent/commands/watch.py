"""``hostagent watch [SOURCE ...] [--json]``: follow agents' snapshots live.

A SOURCE is ``STREAM[,REQUEST]`` (the agent's XPUB endpoint and optionally its request
endpoint, used to fetch a missed snapshot); without one, the endpoints of the config
file (``--config``, else ``/etc/hostagent/hostagent.toml`` if present, else the defaults)
are used, with wildcard binds (``tcp://*:P``, ``tcp://0.0.0.0:P``) read as 127.0.0.1.

Default output: one line per new snapshot of a host, at most ``LINE_WIDTH`` (80)
columns — ``HOST seq N  conflicts C  free: pCPUs 7/16 2MiB 10 1GiB 0 ways 18  guests 3``
(host-wide totals: free/dedicated pCPUs, free hugepages per size, free cache ways;
``conflicts C`` and ``LIBVIRT DOWN`` only when there are some, right after the seq so that
they are never cut; fields that do not fit are dropped from the end and ``…`` says so).
``--wide`` prints everything per cell and cache ID, the accounting's free hugepages beside
the kernel's: ``HOST seq N  pCPUs free/dedicated c0:3/8 c1:4/8  hugepages free/kernel
c0:2MiB=10/10,1GiB=0/0  cache ways free L3#0=7 L3#1=11  guests 3  conflicts 0``. Both
end with ``claims N`` when claims are outstanding, and under the line each claim that is
new since the host's previous snapshot is drawn as ``hostagent show`` draws it (``  +
ID  by CLAIMANT``, its expiry in ISO-8601 UTC, what it holds; within 80 columns) and each
claim gone since then is one line (``  - ID gone: released, expired or consumed``). Plus a
line when a host goes silent (no message for ``--dead-after`` seconds), restarts (new
epoch) or a snapshot was missed. ``--json`` prints each snapshot as one JSON line.
``--count N`` / ``--seconds S`` stop after N snapshots or S seconds (exit 0); Ctrl-C
stops too. When nothing arrived for ``--dead-after`` seconds from the start, one line on
stderr says so (``watch: no snapshot within S s from ENDPOINT ...``); a watch that ends
with no snapshot shown says ``watch: no snapshot within S s`` and exits 1.

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

from hostagent.units import format_kib

#: the default line's width in columns: one host per line on an 80-column terminal
LINE_WIDTH = 80


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
    p.add_argument("--wide", action="store_true",
                   help="per cell and cache ID, kernel's free hugepages too (lines may be "
                   f"longer than {LINE_WIDTH} columns)")
    p.add_argument("--host", action="append", metavar="NAME",
                   help="only this host (repeatable; default all)")
    p.add_argument("--count", type=int, metavar="N", help="stop after N snapshots")
    p.add_argument("--seconds", type=float, metavar="S", help="stop after S seconds")
    p.add_argument("--dead-after", type=float, default=5.0, metavar="S",
                   help="report a host silent for S seconds, and say so when no snapshot "
                   "came in the first S seconds (default 5)")
    add_client_options(p)
    p.set_defaults(func=run)


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


def summary(snap: dict[str, Any], wide: bool = False) -> str:
    """The one-line summary of a snapshot: ``compact_line``, or ``wide_line`` with
    ``wide`` (``KeyError``/``TypeError``/... on values it cannot read, see
    ``UNREADABLE``)."""
    return wide_line(snap) if wide else compact_line(snap)


def _alarms(snap: dict[str, Any]) -> list[str]:
    usage = snap.get("usage", {})
    out = []
    if usage.get("conflicts"):
        out.append(f"conflicts {len(usage['conflicts'])}")
    if not snap.get("agent", {}).get("libvirt", {}).get("connected", True):
        out.append("LIBVIRT DOWN")
    return out


def fit_width(fields: list[tuple[str, str]], width: int = LINE_WIDTH) -> str:
    """``fields`` — (separator before it, text) — joined, at most ``width`` columns:
    fields that do not fit are dropped from the end (the first always stays, cut if it
    must be) and ``…`` says so."""
    def joined(fs: list[tuple[str, str]]) -> str:
        return fs[0][1] + "".join(sep + text for sep, text in fs[1:])

    line = joined(fields)
    if len(line) <= width:
        return line
    kept = list(fields)
    while len(kept) > 1 and len(joined(kept)) + 3 > width:
        kept.pop()
    line = joined(kept) + "  …"
    return line if len(line) <= width else line[:width - 1] + "…"


def compact_line(snap: dict[str, Any]) -> str:
    """``HOST seq N  [conflicts C]  [LIBVIRT DOWN]  free: pCPUs F/D 2MiB N 1GiB N ways W
    guests G``: host-wide totals (free/dedicated pCPUs, free hugepages per size by the
    accounting, free cache ways), within ``LINE_WIDTH`` columns (``fit_width``)."""
    usage = snap.get("usage", {})
    cells = usage.get("cells", [])
    fields = [("", f"{snap.get('host')} seq {snap.get('seq')}")]
    fields += [("  ", alarm) for alarm in _alarms(snap)]
    if cells:
        free = sum(int(c["free_pcpus"]) for c in cells)
        dedicated = sum(int(c["dedicated_cpus"]) for c in cells)
        fields.append(("  ", f"free: pCPUs {free}/{dedicated}"))
    else:
        fields.append(("  ", "free: pCPUs -"))
    pages: dict[int, int] = {}
    for c in cells:
        for h in c.get("hugepages", []):
            size = int(h["size_kib"])
            pages[size] = pages.get(size, 0) + int(h["free"])
    fields += [(" ", f"{format_kib(size, sep='')} {n}") for size, n in sorted(pages.items())]
    caches = usage.get("caches", [])
    if caches:
        fields.append((" ", f"ways {sum(int(c['free_ways']) for c in caches)}"))
    fields.append(("  ", f"guests {len(usage.get('guests', []))}"))
    if usage.get("claims"):
        fields.append(("  ", f"claims {len(usage['claims'])}"))
    return fit_width(fields)


def wide_line(snap: dict[str, Any]) -> str:
    """Everything, per cell and cache ID: ``HOST seq N  pCPUs free/dedicated c0:F/D ...
    hugepages free/kernel c0:2MiB=F/K,... cache ways free L3#0=W ...  guests G
    conflicts C``; ``K`` is the kernel's free count (``-`` when the topology has no such
    pool)."""
    usage = snap.get("usage", {})
    cells = usage.get("cells", [])
    kernel = {(c["id"], p["size_kib"]): p["free"]
              for c in snap.get("topology", {}).get("cells", []) for p in c.get("hugepages", [])}
    pcpus = " ".join(f"c{c['id']}:{c.get('free_pcpus', '?')}/{c.get('dedicated_cpus', '?')}"
                     for c in cells)
    pages = " ".join(
        f"c{c['id']}:" + ",".join(
            f"{format_kib(h['size_kib'], sep='')}={h['free']}/"
            f"{kernel.get((c['id'], h['size_kib']), '-')}" for h in c["hugepages"])
        for c in cells if c.get("hugepages"))
    caches = " ".join(
        f"{c.get('resource') or 'L' + str(c.get('level'))}#{c['id']}={c['free_ways']}"
        for c in usage.get("caches", []))
    lv = "" if snap.get("agent", {}).get("libvirt", {}).get("connected", True) \
        else "  LIBVIRT DOWN"
    return (f"{snap.get('host')} seq {snap.get('seq')}  pCPUs free/dedicated {pcpus or '-'}"
            f"  hugepages free/kernel {pages or '-'}  cache ways free {caches or '-'}"
            f"  guests {len(usage.get('guests', []))}"
            + (f"  claims {len(usage['claims'])}" if usage.get("claims") else "")
            + f"  conflicts {len(usage.get('conflicts', []))}{lv}")


def claim_changes(seen: set[str], snap: dict[str, Any]) -> tuple[list[str], set[str]]:
    """The lines for the claims of ``snap`` not in ``seen`` (drawn whole) and for those
    of ``seen`` gone from it; and the ids now outstanding."""
    from hostagent.commands.show import claim_lines

    entries = snap.get("usage", {}).get("claims") or []
    now = {str(e["id"]) for e in entries}
    lines = [line for e in entries if e["id"] not in seen
             for line in claim_lines(e, indent="  + ")]
    lines += [f"  - {claim_id} gone: released, expired or consumed"
              for claim_id in sorted(seen - now)]
    return lines, now


def _show(args: argparse.Namespace, upd: Any, out: Any, epochs: dict[str, str | None],
          claims_seen: dict[str, set[str]]) -> bool:
    """Print one update; False when it is a snapshot the summary or JSON cannot show
    (one line says why)."""
    if upd.kind == "snapshot":
        try:
            if args.json:
                line = json.dumps(upd.snapshot, separators=(",", ":"), allow_nan=False)
            else:
                line = summary({**upd.snapshot, "host": upd.host, "seq": upd.seq},
                               wide=args.wide)
                changes, outstanding = claim_changes(claims_seen.get(upd.host, set()),
                                                     upd.snapshot)
                if changes:
                    line += "\n" + "\n".join(changes)
                claims_seen[upd.host] = outstanding
        except UNREADABLE as exc:
            print(f"{upd.host} seq {upd.seq}: skipped, unreadable snapshot: "
                  f"{type(exc).__name__}: {exc}",
                  file=sys.stderr if args.json else out, flush=True)
            return False
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
    return True


def run(args: argparse.Namespace) -> int:
    from hostagent.subscriber import Subscriber

    sources = sources_from(args, args.sources)
    sub = Subscriber(sources, hosts=args.host, curve=client_curve(args),
                     dead_after=args.dead_after)
    out = sys.stdout
    streams = ", ".join(s.stream for s in sources)
    if not args.json:
        legend = "" if args.wide else (" (free: pCPUs free/dedicated, hugepages per size, "
                                       "cache ways; all cells; --wide: per cell)")
        print(f"watching {streams}{legend}", file=sys.stderr, flush=True)
    start = time.monotonic()
    end = None if args.seconds is None else start + args.seconds
    # say once that nothing came, when nothing did within --dead-after seconds
    notice: float | None = start + args.dead_after
    seen = skipped = 0
    epochs: dict[str, str | None] = {}
    claims_seen: dict[str, set[str]] = {}  # host → the claims of its last snapshot shown
    try:
        while args.count is None or seen < args.count:
            now = time.monotonic()
            if notice is not None and now >= notice:
                notice = None
                print(f"watch: no snapshot within {args.dead_after:g} s from {streams} "
                      "(is the agent running, and is this its stream endpoint?)",
                      file=sys.stderr, flush=True)
            if end is not None and now >= end:
                break
            waits = [t - now for t in (end, notice) if t is not None]
            for upd in sub.poll(min(waits) if waits else None):
                if upd.kind == "snapshot":
                    notice = None
                if not _show(args, upd, out, epochs, claims_seen):
                    skipped += 1
                elif upd.kind == "snapshot":
                    seen += 1
                if args.count is not None and seen >= args.count:
                    break
    except KeyboardInterrupt:
        pass
    finally:
        sub.close()
        report = drop_report(sub.stats, skipped)
        if report:
            print(report, file=sys.stderr, flush=True)
    if seen:
        return 0
    waited = args.seconds if args.seconds is not None else round(time.monotonic() - start, 1)
    print(f"watch: no {'readable ' if skipped else ''}snapshot within {waited:g} s",
          file=sys.stderr, flush=True)
    return 1
