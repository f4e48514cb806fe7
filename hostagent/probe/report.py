"""The readable ``hostagent probe`` report: cells, cores and threads, caches, resctrl.

Pure: ``render(topo)`` turns a ``HostTopology`` into text. Cache-way maps are drawn like
the kernel's ``info/<res>/bit_usage``, most significant way first, one character per way:

    ``.`` free (no group holds it)          ``D`` the default group
    ``A``, ``b``, ... named groups (legend)  ``*`` held by two or more groups
    ``-`` free, but in ``shareable_bits`` (I/O such as DDIO also fills it)

A group's letter comes from its name (``group_letters``), so it is the same on every run;
the legend names only the symbols the maps show. Sizes and counts use
``hostagent.units`` (``4.5 MiB``, ``1 way``), as every command's text does.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable

from hostagent.cpulist import format_cpulist
from hostagent.model import Cache, HostTopology
from hostagent.resctrl_cbm import cache_ways, parse_mask
from hostagent.units import format_size, plural

#: the letters named groups get in way maps (``D`` is the default group's)
GROUP_LETTERS = "ABCEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
#: the symbols of a way map other than group letters, with what the legend says of them
WAY_SYMBOLS = (
    (".", ". free"),
    ("-", "- free but shared with I/O (shareable_bits)"),
    ("D", "D the default group"),
    ("*", "* held by several groups"),
)
_TYPE_SUFFIX = {"data": "d", "instruction": "i", "unified": ""}
WIDTH = 100


def group_letters(names: Iterable[str]) -> dict[str, str]:
    """Each resctrl group's letter in way maps: ``D`` for the default group (``""``);
    for a named group, the letter of ``GROUP_LETTERS`` its name hashes to (CRC-32 of the
    UTF-8 name), so it does not depend on the order groups are listed or on the run.
    Names are taken in sorted order; one whose letter is taken gets the next free one
    (wrapping round); ``?`` once every letter is used."""
    letters = {"": "D"}
    taken: set[str] = set()
    n = len(GROUP_LETTERS)
    for name in sorted({x for x in names if x}):
        start = zlib.crc32(name.encode("utf-8", "surrogateescape")) % n
        letter = "?"
        for i in range(n):
            cand = GROUP_LETTERS[(start + i) % n]
            if cand not in taken:
                letter = cand
                taken.add(cand)
                break
        letters[name] = letter
    return letters


def way_legend(maps: Iterable[str]) -> str:
    """What the symbols in ``maps`` mean: only those that appear (``"-"`` when none)."""
    shown = set("".join(maps))
    parts = [text for sym, text in WAY_SYMBOLS if sym in shown]
    if shown - {sym for sym, _ in WAY_SYMBOLS}:
        parts.append("letters: the groups listed")
    return ", ".join(parts) or "-"


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
            "  ".join(f"{format_size(p.size_kib * 1024)}: {p.total}/{p.free}/{p.surplus}"
                      for p in c.hugepages)
            or "none"
        )
        dist = " ".join(f"{k}:{v}" for k, v in sorted(c.distances.items()))
        out.append(
            f"  cell {c.id}: cpus {format_cpulist(c.cpus) or '-'}"
            f"  memory {format_size(c.memory_kib * 1024, approx=True)}"
            f" ({format_size(c.memory_free_kib * 1024, approx=True)} free)"
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


def core_legend(cores: list[tuple[int, ...]]) -> str:
    """How to read the ``core=threads`` tokens, with this host's first token as the
    example (``cores``: the first socket's (core, thread, thread...) in token order);
    about hyperthreads only when its first core has more than one thread."""
    c0 = cores[0]
    noun = "threads" if len(c0) > 2 else "thread"
    example = core_runs(cores)[0]
    text = f"core={noun}; {example} is core {c0[0]} = {noun} {','.join(map(str, c0[1:]))}"
    if "-" in example.partition("=")[0]:
        c1 = cores[1]
        text += f", core {c1[0]} = {','.join(map(str, c1[1:]))}, ..."
    return f"  ({text})"


def _thread_counts(counts: Iterable[int]) -> str:
    """``[2]`` → ``2 threads``; ``[1, 2]`` → ``1 or 2 threads``."""
    ns = sorted(set(counts))
    return " or ".join(map(str, ns[:-1])) + (" or " if len(ns) > 1 else "") \
        + plural(ns[-1], "thread")


def _cores(topo: HostTopology) -> list[str]:
    online = [c for c in topo.cpus if c.online]
    offline = [c.id for c in topo.cpus if not c.online]
    isolated = [c.id for c in topo.cpus if c.isolated]
    out = [
        f"CPUs: {len(topo.cpus)} ({len(online)} online"
        + (f", offline {format_cpulist(offline)}" if offline else "")
        + (f", isolated {format_cpulist(isolated)}" if isolated else "")
        + ")",
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
    for i, ((sock, die), cores) in enumerate(sorted(sockets.items())):
        cores = sorted(cores, key=lambda t: t[1])
        if i == 0:
            out.append(core_legend(cores))
        threads = [len(t) - 1 for t in cores]
        cells = ",".join(str(x) for x in sorted(cells_of[(sock, die)]))
        out.append(
            f"  socket {sock} die {die} (cell {cells}): {plural(len(cores), 'core')}, "
            f"{_thread_counts(threads)} each"
        )
        out += _wrap(core_runs(cores), "    ")
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
        desc = ", ".join(f"{format_size(s)} {w}-way" for s, w in sizes)
        if all(c.cpus in cores for c in items) and len(items) > 1:
            out.append(f"  {name:4} {desc}: {len(items)}, one per core")
            continue
        out.append(f"  {name:4} {desc}: {len(items)}")
        shown = items if len(items) <= 32 else items[:32]
        out += _wrap((f"id {c.id}={format_cpulist(c.cpus)}" for c in shown), "       ")
        if len(items) > len(shown):
            out.append(f"       ... {len(items) - len(shown)} more")
    return out


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
    letters = group_letters(g.name for g in rc.groups)
    cdp = ", ".join(k for k, v in sorted(rc.cdp.items()) if v)
    out = [f"resctrl (CDP: {cdp or 'off'})"]
    for g in rc.groups:
        out.append(
            f"  group {letters[g.name]} {g.name or '(default)'}: {g.mode}, "
            f"{plural(g.tasks, 'task')}"
            + (f", cpus {format_cpulist(g.cpus)}" if g.cpus else "")
        )
    ways = {(w["resource"], w["id"]): w for w in cache_ways(topo)}
    maps: list[str] = []
    for res in rc.resources:
        full = parse_mask(res.cbm_mask)
        shareable = parse_mask(res.shareable_bits)
        out.append(
            f"  {res.name}: {plural(res.cbm_bits, 'way')} of "
            f"{format_size(res.granularity_bytes)}, min {plural(res.min_cbm_bits, 'way')}, "
            f"{res.num_closids} CLOSIDs, "
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
            maps.append(way_map(full, shareable, holders))
            out.append(
                f"    {res.name}:{cid} = {maps[-1]}"
                f"  free {plural(w['free_ways'], 'way')} ({format_size(w['free_bytes'])}),"
                f" largest run {plural(w['largest_free_run'], 'way')}"
                f" ({format_size(w['largest_free_bytes'])})"
            )
    if maps:
        out.append(f"  legend: {way_legend(maps)}")
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
