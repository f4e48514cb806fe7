"""``hostagent show [--endpoint E | --file F]``: one snapshot drawn for a person.

The snapshot comes from a file (JSON: a snapshot, a stream body / request reply
holding one in ``data``, or a SIGUSR1 debug dump holding one in ``snapshot``; ``-`` is
stdin) or from an agent (``--endpoint
STREAM[,REQUEST]``: subscribe and take the first snapshot, which the agent sends to
every new subscriber at once; default: the config's endpoints).

Drawn: the summary of ``hostagent snapshot`` (cells, guests, conflicts), the hugepage
pools per cell (the accounting's free count beside the kernel's, and the pages used
outside the tracked guests when there are any), a thread map (one line per core: each
thread with its owner — ``guest/v3`` a pinned vCPU, ``guest/emu`` an emulator thread,
``free`` a free dedicated thread, ``shared(N)`` a shared thread with N guests floating
on it, ``host``, ``offline``), and per cache ID a map of its ways by group (most
significant way first; ``.`` free, ``-`` free but shared with I/O, a letter per group as
listed, derived from the group's name as in ``hostagent probe``; the legend names only
the symbols shown).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from hostagent.commands.watch import add_client_options, client_curve, sources_from
from hostagent.errors import HostagentError
from hostagent.units import format_kib, plural


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "show",
        help="draw one snapshot: cells, thread map by owner, hugepages, cache-way maps",
        description="Draw one snapshot for a person, from an agent (--endpoint) or a "
        "JSON file (--file).",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--endpoint", metavar="E",
                     help="agent STREAM[,REQUEST] endpoint (default: from the config)")
    src.add_argument("--file", metavar="F",
                     help="snapshot JSON file, or a debug dump ('-' = stdin)")
    src.add_argument("--fleet", action="store_true",
                     help="a table of every host the --source endpoints carry: free threads/"
                     "whole cores, pages and cache ways per cell")
    p.add_argument("--source", action="append", metavar="E", default=[],
                   help="with --fleet: STREAM[,REQUEST] of an agent or forwarder (repeatable;"
                   " default: from the config)")
    p.add_argument("--host", metavar="NAME", help="which host (when E carries several)")
    p.add_argument("--timeout", type=float, default=5.0, metavar="S",
                   help="wait this long for a snapshot (default 5)")
    add_client_options(p)
    p.set_defaults(func=run)


def load_file(path: str) -> dict[str, Any]:
    try:
        text = sys.stdin.read() if path == "-" else open(path).read()
    except OSError as exc:
        raise HostagentError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise HostagentError(f"{path}: not JSON: {exc}") from None
    if isinstance(doc, dict) and isinstance(doc.get("data"), dict):
        doc = doc["data"]
    elif isinstance(doc, dict) and "snapshot" in doc and "usage" not in doc:  # a debug dump
        if doc["snapshot"] is None:
            raise HostagentError(f"{path}: a debug dump without a snapshot (the agent had "
                                 "published none yet)")
        doc = doc["snapshot"]
    if not isinstance(doc, dict) or not isinstance(doc.get("usage"), dict) or \
            not isinstance(doc.get("topology"), dict):
        raise HostagentError(f"{path}: not a snapshot (no 'topology' and 'usage' maps)")
    return doc


def fetch(args: argparse.Namespace) -> dict[str, Any]:
    from hostagent.subscriber import Subscriber

    sources = sources_from(args, [args.endpoint] if args.endpoint else [])
    with Subscriber(sources, hosts=[args.host] if args.host else None,
                    curve=client_curve(args)) as sub:
        return sub.wait_snapshot(args.host, timeout=args.timeout)


def thread_map(snap: dict[str, Any]) -> list[str]:
    usage, topo = snap["usage"], snap["topology"]
    names = {g["uuid"]: g["name"] for g in usage.get("guests", [])}
    threads = {t["cpu"]: t for t in usage.get("threads", [])}

    def owner(cpu: int) -> str:
        t = threads.get(cpu)
        if t is None:
            return "?"
        if t.get("guest"):
            who = names.get(t["guest"], t["guest"][:8])
            if t.get("vcpu") is not None:
                return f"{who}/v{t['vcpu']}"
            if t.get("emulator"):
                return f"{who}/emu"
            if t.get("iothread") is not None:
                return f"{who}/io{t['iothread']}"
            return who
        role = t.get("role", "")
        shared = t.get("shared_guests") or []
        if role == "dedicated":
            return "free" + (f"+shared({len(shared)})" if shared else "")
        if role == "shared":
            return f"shared({len(shared)})" if shared else "shared"
        return role or "?"

    cores: dict[tuple[int, int, int, int], list[int]] = {}
    offline = []
    for c in topo.get("cpus", []):
        if not c.get("online", True):
            offline.append(c["id"])
            continue
        key = (c["cell"], c["socket"], c.get("die", 0), c["core"])
        cores.setdefault(key, []).append(c["id"])
    out = ["threads (cell socket:core  cpu=owner ...)"]
    for (cell, sock, _die, core), cpus in sorted(cores.items(), key=lambda kv: (kv[0], kv[1])):
        cells = "  ".join(f"{cpu}={owner(cpu)}" for cpu in sorted(cpus))
        out.append(f"  c{cell} {sock}:{core:<4} {cells}")
    if offline:
        out.append(f"  offline: {' '.join(map(str, offline))}")
    return out


def kernel_free_pages(snap: dict[str, Any]) -> dict[tuple[int, int], int]:
    """(cell, size KiB) → the kernel's free pages, from the snapshot's topology."""
    return {(c["id"], p["size_kib"]): p["free"]
            for c in snap["topology"].get("cells", []) for p in c.get("hugepages", [])}


def hugepage_pools(snap: dict[str, Any]) -> list[str]:
    kernel = kernel_free_pages(snap)
    out = ["hugepage pools (cell size: total, reserved, used by guests, free by accounting "
           "/ by the kernel)"]
    for c in snap["usage"].get("cells", []):
        for h in c.get("hugepages", []):
            kfree = kernel.get((c["id"], h["size_kib"]))
            total, used = h.get("total", "?"), h.get("used", "?")
            line = (f"  c{c['id']} {format_kib(h['size_kib']):>6}: total {total}"
                    f"  reserved {h.get('reserved', 0)}  used {used}  free {h.get('free', '?')}"
                    f" / kernel {'-' if kfree is None else kfree}")
            if all(isinstance(x, int) for x in (kfree, total, used)):
                outside = total - kfree - used
                if outside > 0:
                    line += f"  ({plural(outside, 'page')} used outside the tracked guests)"
            out.append(line)
    if len(out) == 1:
        out.append("  none")
    return out


def way_maps(snap: dict[str, Any]) -> list[str]:
    from hostagent.probe.report import group_letters, way_legend, way_map
    from hostagent.resctrl_cbm import parse_mask

    caches = snap["usage"].get("caches", [])
    if not caches:
        return ["cache ways: no resctrl allocation on this host"]
    names = {g["uuid"]: g["name"] for g in snap["usage"].get("guests", [])}
    resources = {r["name"]: r for r in (snap["topology"].get("resctrl") or {}).get(
        "resources", [])}
    letters = group_letters(a["group"] for c in caches for a in c.get("allocations", []))
    rows = []
    for c in caches:
        res = resources.get(c.get("resource", ""), {})
        full = parse_mask(c.get("cbm_mask") or res.get("cbm_mask", "0"))
        shareable = parse_mask(c.get("shareable_mask") or res.get("shareable_bits") or "0")
        holders = [(letters[a["group"]], parse_mask(a["mask"]) & full)
                   for a in c.get("allocations", [])]
        rows.append((c, way_map(full, shareable, holders)))
    out = [f"cache ways (most significant first; {way_legend(m for _, m in rows)})"]
    for c, drawn in rows:
        out.append(f"  {c.get('resource') or 'L' + str(c['level'])}#{c['id']:<3} "
                   f"{drawn}  free {plural(c['free_ways'], 'way')}, "
                   f"largest run {plural(c['largest_free_run'], 'way')}")
    out.append("  groups:")
    guest_of = {a["group"]: a.get("guest") for c in caches for a in c.get("allocations", [])}
    for group, letter in sorted(letters.items(), key=lambda kv: (kv[0] != "", kv[0])):
        g = guest_of.get(group)
        who = f"  guest {names.get(g, g)}" if g else ""
        out.append(f"    {letter} {group or '(default group)'}{who}")
    return out


def render(snap: dict[str, Any]) -> str:
    from hostagent.commands.snapshot import render as summary

    parts = [summary(snap).rstrip("\n"), "", *hugepage_pools(snap), "", *thread_map(snap),
             "", *way_maps(snap)]
    return "\n".join(parts) + "\n"


def run(args: argparse.Namespace) -> int:
    from hostagent.commands.watch import UNREADABLE

    if args.fleet:
        return show_fleet(args)
    if args.source:
        raise HostagentError("--source goes with --fleet (one agent: --endpoint)")
    snap = load_file(args.file) if args.file else fetch(args)
    try:
        sys.stdout.write(render(snap))
    except UNREADABLE as exc:
        raise HostagentError(f"snapshot is missing or has a bad field: {exc!r}") from None
    return 0


def show_fleet(args: argparse.Namespace) -> int:
    """``show --fleet``: gather the sources' hosts (``hostagent place``'s rule, at most
    ``--timeout`` seconds) and print one line per host."""
    from hostagent.commands.place import gather

    args.wait = args.timeout
    sub, fleet = gather(args)
    sub.close()
    sys.stdout.write(fleet_table(fleet))
    return 0


def fleet_table(fleet: Any, now: float | None = None) -> str:
    """One line per host within ``LINE_WIDTH`` columns (cut with ``>``): its state, per
    cell free dedicated threads / whole free cores, free hugepages per size per cell,
    free cache ways per cache id."""
    import time

    from hostagent.commands.watch import LINE_WIDTH

    now = time.monotonic() if now is None else now
    out = ["host             state threads/cores per cell | pages per cell | ways per cache"]
    for host in fleet.hosts():
        e = fleet.entry(host)
        why = fleet.why_not_offered(host, now)
        state = "ok" if why is None else why.split(" ")[0][:5]
        s = e.summary
        cells = " ".join(f"{c.free_threads}/{c.whole_cores}" for c in s.cells)
        sizes = sorted({z for c in s.cells for z, _ in c.pages})
        pages = " ".join(format_kib(z, sep="") + " "
                         + "/".join(str(dict(c.pages).get(z, 0)) for c in s.cells)
                         for z in sizes) or "-"
        ways = "/".join(str(w) for _, _, w in s.free_ways) or "-"
        line = f"{host[:16]:<16} {state:<5} {cells} | {pages} | {ways}"
        out.append(line if len(line) <= LINE_WIDTH else line[:LINE_WIDTH - 1] + ">")
    return "\n".join(out) + "\n"
