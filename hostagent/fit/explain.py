"""A fit answer as readable text (what ``hostagent fit`` prints without ``--json``).

A reason the fitter gives for several host cells (or guest cells) in the same words is
printed once: ``every host cell: guest cells 0-1: dedicated_threads: ...`` rather than
once per cell (the JSON answer keeps one reason per cell). Sizes and counts use
``hostagent.units``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from hostagent.cpulist import format_cpulist
from hostagent.units import format_kib, format_size, plural


def _host_head(cells: Sequence[int | None], every: frozenset[int]) -> str:
    if cells == [None]:
        return "host"
    if len(cells) == 1:
        return f"host cell {cells[0]}"
    if len(cells) == len(every) and set(cells) == every:
        return "every host cell"
    return f"host cells {format_cpulist(cells)}"


def _guest_head(cells: Sequence[int | None]) -> str:
    if cells == [None]:
        return ""
    if len(cells) == 1:
        return f"guest cell {cells[0]}: "
    return f"guest cells {format_cpulist(cells)}: "


def reason_lines(reasons: Iterable[Mapping[str, Any]],
                 host_cells: Iterable[int] = ()) -> list[str]:
    """One line per distinct (resource, message), with the host cells and guest cells it
    holds for; ``host_cells``: the host's cells, to say ``every host cell``. Host-wide
    reasons (``host_cell`` null) come last, as the fitter's order otherwise."""
    ordered = sorted(reasons, key=lambda r: (r["host_cell"] is None, r["host_cell"] or 0))
    hosts: dict[tuple[Any, str, str], list[int | None]] = {}
    for r in ordered:
        cells = hosts.setdefault((r["guest_cell"], r["resource"], r["message"]), [])
        if r["host_cell"] not in cells:
            cells.append(r["host_cell"])
    guests: dict[tuple[tuple[int | None, ...], str, str], list[int | None]] = {}
    for (gcell, resource, message), hcells in hosts.items():
        cells = guests.setdefault((tuple(hcells), resource, message), [])
        if gcell not in cells:
            cells.append(gcell)
    every = frozenset(host_cells)
    return [f"  {_host_head(list(hcells), every)}: {_guest_head(gcells)}{resource}: {message}"
            for (hcells, resource, message), gcells in guests.items()]


def explain(answer: Mapping[str, Any], host_cells: Iterable[int] = ()) -> str:
    """The answer as text; ``host_cells`` (the snapshot's cell ids) lets a reason that
    holds for all of them read ``every host cell``."""
    lines: list[str] = []
    if not answer["fits"]:
        lines.append(f"does not fit (strategy {answer['strategy']}):")
        lines += reason_lines(answer["reasons"], host_cells)
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
        desc.append(f"{format_kib(c['memory_mib'] * 1024)} on "
                    f"{format_kib(c['page_size_kib'])} pages")
        if c["reserved_cpus"]:
            desc.append(f"idle siblings {format_cpulist(c['reserved_cpus'])}")
        lines.append(f"  guest cell {c['guest_cell']} -> host cell {c['host_cell']}: "
                     + "; ".join(desc))
    if p["emulator_cpus"]:
        lines.append(f"  emulator threads: {format_cpulist(p['emulator_cpus'])}")
    if p["realtime_vcpus"]:
        lines.append(f"  realtime vCPUs: {format_cpulist(p['realtime_vcpus'])}")
    t = p["topology"]
    lines.append(f"  topology: {plural(t['sockets'], 'socket')} x "
                 f"{plural(t['cores'], 'core')} x {plural(t['threads'], 'thread')}")
    for d in p["pci"]:
        lines.append(f"  pci {d['address']} {d['vendor']}:{d['device']} (node {d['numa_node']})")
    for e in p["cache"]:
        lines.append(f"  cache vCPUs {format_cpulist(e['vcpus'])}: {e['resource']} id {e['id']} "
                     f"mask {e['mask']} ({plural(e['ways'], 'way')}, "
                     f"{format_size(e['bytes'])})")
    lines.append("libvirt XML fragments:")
    for name, text in answer["libvirt_xml"].items():
        lines.append(f"  {name}: {text}")
    return "\n".join(lines) + "\n"
