"""A fit answer as readable text (what ``hostagent fit`` prints without ``--json``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hostagent.cpulist import format_cpulist


def explain(answer: Mapping[str, Any]) -> str:
    lines: list[str] = []
    if not answer["fits"]:
        lines.append(f"does not fit (strategy {answer['strategy']}):")
        by_cell: dict[Any, list[Mapping[str, Any]]] = {}
        for r in answer["reasons"]:
            by_cell.setdefault(r["host_cell"], []).append(r)
        for cell in sorted(by_cell, key=lambda c: (c is None, c if c is not None else 0)):
            head = "host" if cell is None else f"host cell {cell}"
            for r in by_cell[cell]:
                who = f"guest cell {r['guest_cell']}: " if r["guest_cell"] is not None else ""
                lines.append(f"  {head}: {who}{r['resource']}: {r['message']}")
        return "\n".join(lines) + "\n"
    p = answer["placement"]
    lines.append(f"fits (strategy {answer['strategy']})")
    if p["floating"]:
        lines.append(f"  floating guest: vCPUs {format_cpulist(p['shared_vcpus'])} on the "
                     "host's shared threads")
    for c in p["cells"]:
        pins = " ".join(f"{v}->{cpu}" for v, cpu in c["pinning"].items())
        desc = []
        if pins:
            desc.append(f"pinned {pins}")
        if c["shared_vcpus"]:
            desc.append(f"shared vCPUs {format_cpulist(c['shared_vcpus'])} on threads "
                        f"{format_cpulist(c['shared_cpus'])}")
        desc.append(f"{c['memory_mib']} MiB on {c['page_size_kib']} KiB pages")
        if c["reserved_cpus"]:
            desc.append(f"idle siblings {format_cpulist(c['reserved_cpus'])}")
        lines.append(f"  guest cell {c['guest_cell']} -> host cell {c['host_cell']}: "
                     + "; ".join(desc))
    if p["emulator_cpus"]:
        lines.append(f"  emulator threads: {format_cpulist(p['emulator_cpus'])}")
    if p["realtime_vcpus"]:
        lines.append(f"  realtime vCPUs: {format_cpulist(p['realtime_vcpus'])}")
    t = p["topology"]
    lines.append(f"  topology: {t['sockets']} sockets x {t['cores']} cores x "
                 f"{t['threads']} threads")
    for d in p["pci"]:
        lines.append(f"  pci {d['address']} {d['vendor']}:{d['device']} (node {d['numa_node']})")
    for e in p["cache"]:
        lines.append(f"  cache vCPUs {format_cpulist(e['vcpus'])}: {e['resource']} id {e['id']} "
                     f"mask {e['mask']} ({e['ways']} ways, {e['bytes']} bytes)")
    lines.append("libvirt XML fragments:")
    for name, text in answer["libvirt_xml"].items():
        lines.append(f"  {name}: {text}")
    return "\n".join(lines) + "\n"
