"""``hostagent snapshot``: probe, read the guests once, run the tracker, print one snapshot.

``--json`` prints the whole schema-v1 document (one line); the default is a readable
summary (per cell: free pCPUs and cores, shared vCPUs, memory, hugepages; the guests;
the conflicts). Roots and URI: the options, else the config file's ``[probe]`` and
``[libvirt]`` values (``--sysfs-root D`` alone implies ``--resctrl-root D/fs/resctrl``).
The config file is ``--config``, else ``/etc/hostagent/hostagent.toml`` when it exists
(``hostagent.config.config_path``: the file ``run`` and ``watch`` read), else none.
A bad config, an unreadable tree or an unreachable libvirt URI is one
``hostagent: <message>`` line and exit code 2.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hostagent.commands.options import ROOT_OPTIONS, Option, add_options
from hostagent.cpulist import format_cpulist
from hostagent.units import format_kib, plural

if TYPE_CHECKING:
    import argparse

    from hostagent.config import Config
    from hostagent.guests.xml import GuestRecord
    from hostagent.model import HostTopology

QUICK_OPTIONS = (
    Option("--config", "F", "config file (default /etc/hostagent/hostagent.toml if it "
           "exists, else built-in defaults)"),
    *ROOT_OPTIONS,
    Option("--libvirt", "URI", "libvirt URI (default from the config, qemu:///system)"),
    Option("--host", "NAME", "host name to publish (default: config, else the hostname)"),
    Option("--libvirt-timeout", "S", "seconds one libvirt call may take (default: the "
           "config's [libvirt] call_timeout_seconds, 10)"),
    Option("--json", None, "print the whole snapshot as JSON"),
)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "snapshot",
        help="print one snapshot: topology, config and who holds what",
        description="Probe the host, read the guests from libvirt once, and print the "
        "schema-v1 snapshot (a readable summary, or --json).",
    )
    add_options(p, QUICK_OPTIONS)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import secrets
    import sys
    import time

    from hostagent.config import config_path, load_config
    from hostagent.guests.source import read_guests_once
    from hostagent.probe.host import probe_host
    from hostagent.probe.roots import default_resctrl_root
    from hostagent.snapshot import build_snapshot

    cfg = load_config(config_path(args.config))
    sysfs = args.sysfs_root or cfg.probe.sysfs_root
    if args.resctrl_root:
        resctrl = args.resctrl_root
    elif args.sysfs_root:
        resctrl = default_resctrl_root(args.sysfs_root)
    else:
        resctrl = cfg.probe.resctrl_root
    uri = args.libvirt or cfg.libvirt.uri
    timeout = cfg.libvirt.call_timeout_seconds
    if args.libvirt_timeout is not None:
        timeout = _libvirt_timeout(args.libvirt_timeout)
    topo = probe_host(sysfs, resctrl)
    guests = read_guests_once(uri, timeout)
    snap = build_snapshot(
        topo, cfg, guests, host=args.host or cfg.host_name, epoch=secrets.token_hex(8),
        seq=0, now=time.time(), thread_check=_thread_check(cfg, topo, uri, guests),
    )
    if args.json:
        import json

        sys.stdout.write(json.dumps(snap) + "\n")
    else:
        sys.stdout.write(render(snap, uri=uri))
    return 0


def _thread_check(cfg: Config, topo: HostTopology, uri: str,
                  guests: list[GuestRecord]) -> dict[str, Any] | None:
    """One check of the guests' threads (``qemu…`` URIs) and the host's intruders, as the
    daemon's (``hostagent.guests.intruders.check_threads``); None when the config turns
    the check off (``[libvirt] thread_check_seconds = 0``, or not set with another URI)."""
    from dataclasses import replace

    from hostagent.config import resolve_resources, thread_check_period
    from hostagent.guests.intruders import IntruderScope, check_threads

    if thread_check_period(replace(cfg.libvirt, uri=uri)) <= 0:
        return None
    scope = IntruderScope.for_host(topo, resolve_resources(cfg.resources, topo),
                                   cfg.resources.host_tasks_conflict)
    specs = {g.uuid: g.spec for g in guests if g.active and g.spec is not None}
    return check_threads(specs, {}, scope, guests=uri.startswith("qemu"))


def _libvirt_timeout(text: str) -> float:
    """``--libvirt-timeout S``: seconds, more than 0 and at most a day."""
    from hostagent.errors import ConfigError

    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value <= 86400:  # NaN fails too
        raise ConfigError(f"--libvirt-timeout {text!r}: give a number of seconds above 0 "
                          "and at most 86400")
    return value


# --------------------------------------------------------------------------- summary


def _intruder_lines(intruders: list[dict[str, Any]]) -> list[str]:
    """Host tasks allowed per dedicated thread, threads with the same counts together."""
    if not intruders:
        return ["host tasks on dedicated threads: no dedicated threads"]
    groups: dict[tuple[int, int], list[int]] = {}
    for t in intruders:
        groups.setdefault((t["tasks"], t["conflicting"]), []).append(t["cpu"])
    return ["host tasks allowed on dedicated threads:"] + [
        f"  {format_cpulist(cpus)}: {plural(n, 'task')}, {m} conflicting"
        for (n, m), cpus in sorted(groups.items(), key=lambda kv: min(kv[1]))]


def _mib(kib: int) -> str:
    return f"{kib // 1024}"


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
            for r in rows]


def render(snap: dict[str, Any], uri: str = "") -> str:
    """A readable summary of one snapshot."""
    usage, config = snap["usage"], snap["config"]
    out = [f"host {snap['host']}  seq {snap['seq']}" + (f"  libvirt {uri}" if uri else "")]
    ded, sh = config.get("dedicated_cpus", []), config.get("shared_cpus", [])
    out.append(
        f"dedicated CPUs {format_cpulist(ded) or '-'} ({len(ded)})   "
        f"shared CPUs {format_cpulist(sh) or '-'} ({len(sh)})   "
        f"cpu ratio {config.get('cpu_allocation_ratio')}   "
        f"ram ratio {config.get('ram_allocation_ratio')}"
    )
    out.append("")
    rows = [["cell", "free pCPUs", "free cores", "pinned", "shared vCPUs",
             "memory used/free MiB", "hugepages used/free"]]
    for c in usage["cells"]:
        pages = ", ".join(f"{format_kib(h['size_kib'])} {h['used']}/{h['free']}"
                          for h in c["hugepages"]) or "-"
        rows.append([
            str(c["id"]),
            f"{c['free_pcpus']}/{c['dedicated_cpus']}",
            str(c["free_cores"]),
            format_cpulist(c["pinned_cpus"]) or "-",
            f"{c['shared_vcpus']}/{c['shared_vcpus_limit']}",
            f"{_mib(c['memory_used_kib'])}/{_mib(c['memory_free_kib'])}",
            pages,
        ])
    out.extend(_table(rows))
    fv, fm = usage.get("floating_vcpus", 0), usage.get("floating_memory_kib", 0)
    fh = usage.get("floating_hugepages", [])
    if fv or fm or fh:
        pages = ", ".join(f"{plural(h['pages'], 'page')} of {format_kib(h['size_kib'])}"
                          for h in fh)
        out.append(f"not bound to a cell: {plural(fv, 'vCPU')}, {format_kib(fm)}"
                   + (f", hugepages {pages}" if pages else ""))
    out.append("")
    guests = usage["guests"]
    out.append(f"guests: {len(guests)} active")
    if guests:
        rows = [["name", "state", "vcpus", "memory MiB", "pages", "cells g>h",
                 "dedicated", "emulator", "cache"]]
        for g in guests:
            if g.get("error"):
                rows.append([g["name"], g["state"], "?", "?", "", "", "", "",
                             "unparsable XML"])
                continue
            cells = " ".join(
                f"{c['guest_cell']}>"
                + (str(c["host_cell"]) if c["host_cell"] is not None
                   else ("+".join(map(str, c["host_cells"])) or "*"))
                for c in g["cells"]
            )
            cache = " ".join(
                f"L{c['level']}#{c['id']}:{c['mask'] or '?'}" for c in g["cache"]
            )
            rows.append([
                g["name"], g["state"], str(g["vcpus"]), _mib(g["memory_kib"]),
                format_kib(g["page_size_kib"]) if g["page_size_kib"] else "-",
                cells, format_cpulist(g["dedicated_cpus"]) or "-",
                format_cpulist(g["emulator_cpus"]) or "-", cache or "-",
            ])
        out.extend("  " + line for line in _table(rows))
    if "intruders" in usage:
        out.append("")
        out.extend(_intruder_lines(usage["intruders"]))
    conflicts = usage["conflicts"]
    out.append("")
    out.append(f"conflicts: {len(conflicts) or 'none'}")
    for c in conflicts:
        out.append(f"  {c['kind']}: {c['detail']}")
    return "\n".join(out) + "\n"
