"""``hostagent resctrl free|reserve|release|carve``: see and reserve cache ways safely.

``free`` draws, per resource and cache ID, every way by owner (the way map of
``hostagent probe``: ``hostagent.probe.report.way_map``) with free ways, the largest
contiguous run and bytes. ``reserve``, ``release`` and ``carve`` call
``hostagent.resctrl_fs`` (lock, plan, write). Roots: ``--resctrl-root`` and
``--sysfs-root`` as for ``hostagent probe``. ``--json`` outputs are documented in
docs/resctrl.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from hostagent.commands.options import add_root_options, roots
from hostagent.units import format_size, plural


def _common(json_help: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    add_root_options(p)
    p.add_argument("--json", action="store_true", help=json_help)
    p.add_argument(
        "--lock-timeout", metavar="SECONDS",
        help="wait at most this long for the resctrl lock (default 10, at most 3600)",
    )
    return p


def _lock_options(args: argparse.Namespace) -> dict[str, Any]:
    """``lock_timeout`` and ``on_wait`` (one line on stderr) for ``hostagent.resctrl_fs``."""
    from hostagent.resctrl_fs import lock_timeout_arg

    def on_wait(message: str) -> None:
        print(f"hostagent: {message}", file=sys.stderr, flush=True)

    return {"lock_timeout": lock_timeout_arg(args.lock_timeout), "on_wait": on_wait}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "resctrl",
        help="see free cache ways and reserve them (Intel RDT / AMD PQoS)",
        description="Cache (CAT/CDP) and memory-bandwidth (MBA) reservations in resctrl.",
    )
    sub = p.add_subparsers(dest="resctrl_command", metavar="ACTION")
    f = sub.add_parser(
        "free", parents=[_common("print the map as JSON")],
        help="free ways per resource and cache ID, with a map of every way by owner",
    )
    f.set_defaults(func=run_free)
    r = sub.add_parser(
        "reserve", parents=[_common("print the plan and what was done as JSON")],
        help="reserve cache ways (and bandwidth) for a group",
        description="Reserve SPEC for group hostagent-GROUP, e.g. "
        "'type=both,size=4608k,cache-id=0;mb=50,node=0'.",
    )
    r.add_argument("group", metavar="GROUP", help="group name (created as hostagent-GROUP)")
    r.add_argument("spec", metavar="SPEC", help="reservation items separated by ';'")
    who = r.add_mutually_exclusive_group()
    who.add_argument("--cpus", metavar="LIST", help="CPUs to move into the group (0-3,8)")
    who.add_argument("--tasks", metavar="PIDS", help="process ids to move into the group")
    who.add_argument("--guest", metavar="NAME",
                     help="a running guest (name or uuid) whose threads go into the group: "
                     "--vcpus and/or --emulator")
    r.add_argument("--vcpus", metavar="LIST", help="with --guest: these vCPUs' threads (0-1)")
    r.add_argument("--emulator", action="store_true",
                   help="with --guest: its emulator threads")
    r.add_argument("--uri", default="qemu:///system",
                   help="with --guest: the libvirt URI (default qemu:///system)")
    r.add_argument("--dry-run", action="store_true", help="print the plan, write nothing")
    r.set_defaults(func=run_reserve)
    rel = sub.add_parser(
        "release", parents=[_common("print the outcome as JSON")],
        help="remove a group created by reserve",
    )
    rel.add_argument("group", metavar="GROUP")
    rel.set_defaults(func=run_release)
    c = sub.add_parser(
        "carve", parents=[_common("print the change as JSON")],
        help="shrink the default group so that N contiguous ways per cache ID are free",
    )
    c.add_argument("--ways", type=int, required=True, metavar="N")
    c.add_argument("--cache-id", type=int, metavar="ID", help="only this cache ID")
    c.add_argument("--level", type=int, default=3, metavar="L", help="cache level (3)")
    c.add_argument("--dry-run", action="store_true", help="print the change, write nothing")
    c.set_defaults(func=run_carve)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _out(text: str) -> None:
    sys.stdout.write(text if text.endswith("\n") else text + "\n")


def _json(doc: Any) -> None:
    _out(json.dumps(doc, indent=2, sort_keys=False))


# ----------------------------------------------------------------------------- free


def free_report(topo: Any, leftovers: Sequence[Any] = ()) -> dict[str, Any]:
    """The ``resctrl free --json`` document (see docs/resctrl.md); ``leftovers`` are
    ``hostagent.resctrl_fs.Leftover``."""
    from hostagent.probe.report import group_letters, way_map
    from hostagent.resctrl_cbm import cache_ways, parse_mask

    rc = topo.resctrl
    letters = group_letters(g.name for g in rc.groups)
    limits = [r.num_closids for r in rc.resources if r.num_closids]
    if rc.mb is not None and rc.mb.num_closids:
        limits.append(rc.mb.num_closids)
    caches = []
    for entry in cache_ways(topo):
        res = rc.resource(entry["resource"])
        full = parse_mask(res.cbm_mask)
        shareable = parse_mask(res.shareable_bits) if res.shareable_bits else 0
        holders = [(letters[a["group"]], parse_mask(a["mask"])) for a in entry["allocations"]]
        ways = []
        for bit in range(full.bit_length() - 1, -1, -1):
            ways.append(
                {
                    "way": bit,
                    "owners": [a["group"] for a in entry["allocations"]
                               if parse_mask(a["mask"]) >> bit & 1],
                    "shareable": bool(shareable >> bit & 1),
                }
            )
        caches.append(
            {**entry, "granularity_bytes": res.granularity_bytes,
             "map": way_map(full, shareable, holders), "ways": ways}
        )
    return {
        "cdp": dict(rc.cdp),
        "closids": {"used": len(rc.groups), "limit": min(limits) if limits else None},
        "groups": [
            {"name": g.name, "letter": letters[g.name], "mode": g.mode,
             "cpus": list(g.cpus), "tasks": g.tasks,
             "mb": {str(k): v for k, v in sorted(g.mb.items())}}
            for g in rc.groups
        ],
        "mb": None if rc.mb is None else {
            "unit": rc.mb.unit, "bandwidth_gran": rc.mb.bandwidth_gran,
            "min_bandwidth": rc.mb.min_bandwidth, "num_closids": rc.mb.num_closids,
        },
        "caches": caches,
        "leftovers": [x.to_dict() for x in leftovers],
    }


def render_free(doc: dict[str, Any]) -> str:
    from hostagent.probe.report import way_legend

    cdp = ", ".join(k for k, v in sorted(doc["cdp"].items()) if v) or "off"
    cl = doc["closids"]
    out = [f"resctrl: CDP {cdp}; groups {cl['used']} of {cl['limit'] or '?'} CLOSIDs "
           "(the default group counts)"]
    for g in doc["groups"]:
        out.append(f"  {g['letter']} {g['name'] or '(default)'}: {g['mode']}, "
                   f"{plural(g['tasks'], 'task')}"
                   + (f", cpus {_cpus(g['cpus'])}" if g["cpus"] else ""))
    for c in doc["caches"]:
        out.append(
            f"{c['resource']}:{c['id']}  {c['map']}  free {plural(c['free_ways'], 'way')} "
            f"({format_size(c['free_bytes'])}), largest run "
            f"{plural(c['largest_free_run'], 'way')} "
            f"({format_size(c['largest_free_bytes'])}), free mask {c['free_mask']}"
        )
    if doc["caches"]:
        out.append("  ways: highest first; " + way_legend(c["map"] for c in doc["caches"]))
    if doc["mb"] is not None:
        mb = doc["mb"]
        out.append(f"MB ({mb['unit']}, granularity {mb['bandwidth_gran']}, "
                   f"min {mb['min_bandwidth']}):")
        for g in doc["groups"]:
            vals = " ".join(f"{k}={v}" for k, v in g["mb"].items())
            out.append(f"  {g['letter']} {g['name'] or '(default)'}: {vals or '-'}")
    for x in doc.get("leftovers", ()):
        short = x["group"].removeprefix("hostagent-")
        then = ("and the next 'hostagent resctrl reserve {0} ...' replaces it"
                if x["state"] == "incomplete" else
                "or 'hostagent resctrl reserve {0} ...' completes it")
        out.append(
            f"warning: {x['group']} is {x['state']}: {x['detail']}; 'hostagent resctrl "
            f"release {short}' removes it, " + then.format(short)
        )
    return "\n".join(out) + "\n"


def _cpus(cpus: list[int]) -> str:
    from hostagent.cpulist import format_cpulist

    return format_cpulist(cpus)


def run_free(args: argparse.Namespace) -> int:
    from hostagent.resctrl_fs import find_leftovers, locked, read_topology

    sysfs, resctrl = roots(args)
    lock = _lock_options(args)
    with locked(resctrl, exclusive=False, timeout=lock["lock_timeout"],
                on_wait=lock["on_wait"]):
        topo = read_topology(resctrl, sysfs)
        leftovers = find_leftovers(resctrl, topo)
    doc = free_report(topo, leftovers)
    if args.json:
        _json(doc)
    else:
        _out(render_free(doc))
    return 0


# ----------------------------------------------------------------------------- changes


def _guest_targets(args: argparse.Namespace) -> tuple[int, list[Any]] | None:
    """``--guest``: (QEMU pid, the threads to move), found before anything is written."""
    from hostagent.cpulist import parse_cpulist
    from hostagent.errors import RequestError
    from hostagent.resctrl_tasks import guest_threads, select_threads

    if args.guest is None:
        if args.vcpus is not None or args.emulator:
            raise RequestError("--vcpus and --emulator go with --guest NAME")
        return None
    try:
        vcpus = parse_cpulist(args.vcpus) if args.vcpus is not None else ()
    except ValueError as exc:
        raise RequestError(f"--vcpus: {exc}") from None
    if not vcpus and not args.emulator:
        raise RequestError(f"--guest {args.guest}: give --vcpus LIST and/or --emulator")
    name, pid, threads = guest_threads(args.uri, args.guest)
    return pid, select_threads(name, threads, vcpus, args.emulator)


def _attach_guest(args: argparse.Namespace, resctrl: str, result: Any,
                  found: tuple[int, list[Any]]) -> Any:
    """Move the guest's threads into the reserved group; a group this command created is
    removed again when that fails (the error says so)."""
    from hostagent.resctrl_fs import ResctrlApplyError, release
    from hostagent.resctrl_tasks import attach_threads

    pid, targets = found
    try:
        return attach_threads(resctrl, result.group, targets, pid=pid, **_lock_options(args))
    except ResctrlApplyError as exc:
        if result.action != "created":
            raise
        try:
            release(resctrl, result.group, **_lock_options(args))
            undo = f"group {result.group} removed again (this command created it)"
        except Exception as rm_exc:  # noqa: BLE001 - said in the message
            undo = f"removing group {result.group} (created by this command) failed: {rm_exc}"
        raise ResctrlApplyError(f"{exc}; {undo}", path=exc.path, status=exc.status) from None


def run_reserve(args: argparse.Namespace) -> int:
    from hostagent.resctrl import describe_items
    from hostagent.resctrl_fs import reserve

    sysfs, resctrl = roots(args)
    found = _guest_targets(args)
    result = reserve(
        resctrl, sysfs, args.group, args.spec, cpus=args.cpus, tasks=args.tasks,
        dry_run=args.dry_run, **_lock_options(args),
    )
    attached = None
    if found is not None and not args.dry_run:
        attached = _attach_guest(args, resctrl, result, found)
    if args.json:
        doc = result.to_dict()
        if found is not None:
            doc["threads"] = None if attached is None else attached.to_dict()
        _json(doc)
        return 0
    plan = result.plan
    out = [f"group {result.group}: {result.action} ({result.path})"]
    if result.cleaned:
        out.append(f"cleaned: {result.cleaned}")
    out.append("schemata:")
    out += ["  " + line for line in plan.text.splitlines()]
    out.append("reserved:")
    out += ["  " + line for line in describe_items(plan.caches)]
    out += [f"  MB:{b.node}={b.value} ({b.unit})" for b in plan.bandwidth]
    if result.cpus is not None:
        out.append(f"cpus: {_cpus(list(result.cpus))}")
    if result.tasks is not None:
        out.append("tasks: " + ",".join(map(str, result.tasks)))
    if attached is not None:
        out += [f"thread: {t.label} (tid {t.tid}) moved in" for t in attached.moved]
        out += [f"thread: {t.label} (tid {t.tid}) already in" for t in attached.already]
    elif found is not None:
        out += [f"thread: {t.label} (tid {t.tid}) would move in" for t in found[1]]
    _out("\n".join(out))
    return 0


def run_release(args: argparse.Namespace) -> int:
    from hostagent.resctrl_fs import group_dir_name, release

    _, resctrl = roots(args)
    name = group_dir_name(args.group)
    removed = release(resctrl, args.group, **_lock_options(args))
    if args.json:
        _json({"group": name, "removed": removed})
    else:
        _out(f"group {name}: {'removed' if removed else 'not present, nothing to release'}")
    return 0


def run_carve(args: argparse.Namespace) -> int:
    from hostagent.resctrl_fs import carve

    sysfs, resctrl = roots(args)
    plan = carve(resctrl, sysfs, args.ways, args.cache_id, level=args.level,
                 dry_run=args.dry_run, **_lock_options(args))
    if args.json:
        _json({**plan.to_dict(), "dry_run": args.dry_run})
        return 0
    state = "would change" if args.dry_run and plan.changed else (
        "changed" if plan.changed else "unchanged")
    out = [f"default group: {state}"]
    for ch in plan.changes:
        d = ch.to_dict()
        out.append(
            f"  {d['resource']}:{d['cache_id']} {d['before']} -> {d['after']}"
            f"  free {d['free_before']} -> {d['free_after']} "
            f"(largest run {plural(d['largest_free_run'], 'way')})"
        )
    _out("\n".join(out))
    return 0
