"""The readable ``hostagent probe`` report: cells, cores and threads, caches, resctrl.

Pure: ``render(topo)`` turns a ``HostTopology`` into text. Cache-way maps are drawn like
the kernel's ``info/<res>/bit_usage``, most significant way first, one character per way:

    ``.`` free (no group holds it)          ``D`` the default group
    ``A``, ``B``, ... named groups (legend)  ``*`` held by two or more groups
    ``-`` free, but in ``shareable_bits`` (I/O such as DDIO also fills it)
"""

from __future__ import annotations

from collections.abc import Iterable

from hostagent.cbm import cache_ways, parse_mask
from hostagent.cpulist import format_cpulist
from hostagent.model import Cache, HostTopology, Resctrl

_GROUP_LETTERS = "ABCEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
_TYPE_SUFFIX = {"data": "d", "instruction": "i", "unified": ""}
WIDTH = 100


def human_bytes(n: int) -> str:
    """``33554432`` → ``"32 MiB"``; non-integral values get one decimal."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            value = n / scale
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{n} B"


def _wrap(tokens: Iterable[str], indent: str) -> list[str]:
    lines: list[str] = []
    cur = indent
    for tok in tokens:
        if len(cur) + len(tok) + 1 > WIDTH and cur.strip():
            lines.append(cur.rstrip())
            cur = indent
        cur += tok + " "
    if cur.strip():
        lines.append(cur.rstrip())
    return lines


def _cells(topo: HostTopology) -> list[str]:
    out = ["Cells"]
    for c in topo.cells:
        pools = (
            "  ".join(f"{human_bytes(p.size_kib * 1024)}: {p.total}/{p.free}/{p.surplus}"
                      for p in c.hugepages)
            or "none"
        )
        dist = " ".join(f"{k}:{v}" for k, v in sorted(c.distances.items()))
        out.append(
            f"  cell {c.id}: cpus {format_cpulist(c.cpus) or '-'}"
            f"  memory {human_bytes(c.memory_kib * 1024)}"
            f" ({human_bytes(c.memory_free_kib * 1024)} free)"
        )
        out.append(f"    hugepages (total/free/surplus): {pools}   distances {dist or '-'}")
    return out


def core_runs(cores: list[tuple[int, ...]]) -> list[str]:
    """``[(core, thread, thread...), ...]`` → compact tokens ``core=threads``.

    Consecutive cores whose id and every thread go up by one are folded into one token:
    ``0-7=0-7/224-231`` pairs core 0 with threads 0 and 224, core 1 with 1 and 225, ...
    """
    tokens: list[str] = []
    i = 0
    while i < len(cores):
        j = i
        while (
            j + 1 < len(cores)
            and len(cores[j + 1]) == len(cores[i])
            and all(b == a + 1 for a, b in zip(cores[j], cores[j + 1], strict=True))
        ):
            j += 1
        first, last = cores[i], cores[j]
        if i == j:
            tokens.append(f"{first[0]}={','.join(map(str, first[1:]))}")
        else:
            threads = "/".join(f"{a}-{b}" for a, b in zip(first[1:], last[1:], strict=True))
            tokens.append(f"{first[0]}-{last[0]}={threads}")
        i = j + 1
    return tokens


def _cores(topo: HostTopology) -> list[str]:
    online = [c for c in topo.cpus if c.online]
    offline = [c.id for c in topo.cpus if not c.online]
    isolated = [c.id for c in topo.cpus if c.isolated]
    out = [
        f"CPUs: {len(topo.cpus)} ({len(online)} online"
        + (f", offline {format_cpulist(offline)}" if offline else "")
        + (f", isolated {format_cpulist(isolated)}" if isolated else "")
        + ")",
        "  (core=threads; 0-7=0-7/224-231 is core 0 = threads 0,224, core 1 = 1,225, ...)",
    ]
    sockets: dict[tuple[int, int], list[tuple[int, ...]]] = {}
    cells_of: dict[tuple[int, int], set[int]] = {}
    seen: set[tuple[int, ...]] = set()
    for c in online:
        key = (c.socket, c.die)
        cells_of.setdefault(key, set()).add(c.cell)
        if c.siblings not in seen:
            seen.add(c.siblings)
            sockets.setdefault(key, []).append((c.core, *c.siblings))
    for (sock, die), cores in sorted(sockets.items()):
        threads = sorted({len(t) - 1 for t in cores})
        cells = ",".join(str(x) for x in sorted(cells_of[(sock, die)]))
        out.append(
            f"  socket {sock} die {die} (cell {cells}): {len(cores)} cores, "
            f"{'/'.join(map(str, threads))} thread(s) each"
        )
        out += _wrap(core_runs(sorted(cores, key=lambda t: t[1])), "    ")
    return out


def _caches(topo: HostTopology) -> list[str]:
    out = ["Caches"]
    cores = {c.siblings for c in topo.cpus if c.online}
    groups: dict[tuple[int, str], list[Cache]] = {}
    for cache in topo.caches:
        groups.setdefault((cache.level, cache.type), []).append(cache)
    for (level, ctype), items in groups.items():
        name = f"L{level}{_TYPE_SUFFIX[ctype]}"
        sizes = sorted({(c.size_bytes, c.ways) for c in items})
        desc = ", ".join(f"{human_bytes(s)} {w}-way" for s, w in sizes)
        if all(c.cpus in cores for c in items) and len(items) > 1:
            out.append(f"  {name:4} {desc}: {len(items)}, one per core")
            continue
        out.append(f"  {name:4} {desc}: {len(items)}")
        shown = items if len(items) <= 32 else items[:32]
        out += _wrap((f"id {c.id}={format_cpulist(c.cpus)}" for c in shown), "       ")
        if len(items) > len(shown):
            out.append(f"       ... {len(items) - len(shown)} more")
    return out


def _letters(rc: Resctrl) -> dict[str, str]:
    letters = {"": "D"}
    for i, grp in enumerate(g for g in rc.groups if g.name):
        letters[grp.name] = _GROUP_LETTERS[i] if i < len(_GROUP_LETTERS) else "?"
    return letters


def way_map(full: int, shareable: int, holders: list[tuple[str, int]]) -> str:
    """One character per way of ``full``, most significant first (see module docstring)."""
    chars = []
    for bit in range(full.bit_length() - 1, -1, -1):
        who = [letter for letter, mask in holders if mask >> bit & 1]
        if len(who) > 1:
            chars.append("*")
        elif who:
            chars.append(who[0])
        else:
            chars.append("-" if shareable >> bit & 1 else ".")
    return "".join(chars)


def _resctrl(topo: HostTopology) -> list[str]:
    rc = topo.resctrl
    if rc is None:
        return ["resctrl: not mounted"]
    letters = _letters(rc)
    cdp = ", ".join(k for k, v in sorted(rc.cdp.items()) if v)
    out = [f"resctrl (CDP: {cdp or 'off'})"]
    for g in rc.groups:
        out.append(
            f"  group {letters[g.name]} {g.name or '(default)'}: {g.mode}, {g.tasks} tasks"
            + (f", cpus {format_cpulist(g.cpus)}" if g.cpus else "")
        )
    ways = {(w["resource"], w["id"]): w for w in cache_ways(topo)}
    for res in rc.resources:
        full = parse_mask(res.cbm_mask)
        shareable = parse_mask(res.shareable_bits)
        out.append(
            f"  {res.name}: {res.cbm_bits} ways of {human_bytes(res.granularity_bytes)}, "
            f"min {res.min_cbm_bits} way(s), {res.num_closids} CLOSIDs, "
            f"{'sparse' if res.sparse_masks else 'contiguous'} masks, "
            f"shareable_bits {res.shareable_bits}"
        )
        ids = sorted(cid for (name, cid) in ways if name == res.name)
        for cid in ids:
            holders = [
                (letters[g.name], parse_mask(g.schemata[res.name][cid]) & full)
                for g in rc.groups
                if cid in g.schemata.get(res.name, {})
            ]
            w = ways[(res.name, cid)]
            out.append(
                f"    {res.name}:{cid} = {way_map(full, shareable, holders)}"
                f"  free {w['free_ways']} ({human_bytes(w['free_bytes'])}),"
                f" largest run {w['largest_free_run']}"
                f" ({human_bytes(w['largest_free_bytes'])})"
            )
    out.append(
        "  legend: . free, - free but shared with I/O (shareable_bits), * held by several "
        "groups, letters: the groups above"
    )
    if rc.mb is not None:
        mb = rc.mb
        out.append(
            f"  MB ({mb.unit}, granularity {mb.bandwidth_gran}, min {mb.min_bandwidth}, "
            f"{mb.num_closids} CLOSIDs):"
        )
        for g in rc.groups:
            vals = " ".join(f"{k}={v}" for k, v in sorted(g.mb.items()))
            out.append(f"    {letters[g.name]} {g.name or '(default)'}: {vals or '-'}")
    return out


def _pci(topo: HostTopology) -> list[str]:
    if not topo.pci:
        return ["PCI: none"]
    by_node: dict[int, int] = {}
    for dev in topo.pci:
        by_node[dev.numa_node] = by_node.get(dev.numa_node, 0) + 1
    summary = ", ".join(
        f"{'unknown cell' if n < 0 else f'cell {n}'}: {k}" for n, k in sorted(by_node.items())
    )
    out = [f"PCI: {len(topo.pci)} functions ({summary})"]
    for dev in topo.pci:
        if dev.sriov_totalvfs:
            out.append(
                f"  {dev.address} {dev.vendor}:{dev.device} class {dev.class_} "
                f"cell {dev.numa_node}: SR-IOV, up to {dev.sriov_totalvfs} VFs"
            )
    return out


def render(topo: HostTopology) -> str:
    """The whole report, newline-terminated."""
    sections = [_cells(topo), _cores(topo), _caches(topo), _resctrl(topo), _pci(topo)]
    return "\n\n".join("\n".join(s) for s in sections) + "\n"
