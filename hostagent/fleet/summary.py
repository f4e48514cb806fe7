"""A host's free resources in a few numbers, and the prefilter that reads them (pure).

``Shape`` is what hosts of one kind share (topology + config, interned by the fleet index
under a hash of their bytes): per cell its socket, threads per core, dedicated and
shared threads, small-page memory, distances; assignable PCI functions; cache ids.
``HostSummary`` is one snapshot's usage read into tuples per cell (free dedicated
threads, whole free cores, free small-page memory, free pages per size, shared
headroom), free cache ways per cache id, free PCI functions per (vendor:device, cell).

``prefilter(shape, summary, needs)`` returns ``None`` when the exact fit *may* succeed
and otherwise the first reason it cannot: every test is a necessary condition of
``hostagent.fit.fit`` (docs/fleet.md §3), so a host it refuses never fits, and most of
the fleet is refused before any exact fit runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hostagent.fit.request import FitRequest

# PCI classes never passed through (the fit's rule, hostagent.fit.host)
_NON_ASSIGNABLE_CLASSES = ("05", "06", "08")
#: distance the kernel reports for a node to itself
LOCAL_DISTANCE = 10


def _hex4(text: Any) -> str:
    t = str(text).strip().lower()
    t = t[2:] if t.startswith("0x") else t
    return t.rjust(4, "0")[-4:]


@dataclass(frozen=True)
class ShapeCell:
    """One cell of a host shape (what does not change between snapshots), read as
    ``hostagent.fit.host`` reads it."""

    id: int
    socket: int | None  # None: no CPU, or CPUs of several sockets
    threads_per_core: int  # the largest core holding a dedicated thread (1 without)
    dedicated: frozenset[int]  # online dedicated threads
    whole_cores: tuple[tuple[int, ...], ...]  # cores whose every online thread is dedicated
    cores: int  # cores holding a dedicated thread
    shared: int  # online shared threads
    shared_limit: int  # floor(shared threads x cpu_allocation_ratio)
    small_kib: int  # memory_kib - hugepage pools - reserved memory
    pools: tuple[tuple[int, int, int], ...]  # (size KiB, total, reserved) per pool


@dataclass(frozen=True)
class Shape:
    """The topology + config part of a snapshot, shared by every host of that kind."""

    key: str  # short hash of the topology and config bytes
    topology: Mapping[str, Any]
    config: Mapping[str, Any]
    cells: tuple[ShapeCell, ...]
    distances: Mapping[tuple[int, int], int]
    pci: tuple[tuple[str, str, int], ...]  # assignable: (address, vendor:device, cell)
    dedicated: int  # online dedicated threads of the host
    dedicated_set: frozenset[int]
    ram_ratio: float
    cache_ways: int  # total ways over the resctrl cache ids (0: no resctrl)
    name: str  # "48 threads, 2 cells, 2 sockets" (host classes in reasons)

    def distance(self, a: int, b: int) -> int:
        """The kernel's distance between cells ``a`` and ``b`` (local if unknown)."""
        if a == b:
            return LOCAL_DISTANCE
        return self.distances.get((a, b), 2 * LOCAL_DISTANCE + 1)


def _cell_cores(members: set[int], cpus: Mapping[int, Mapping[str, Any]]
                ) -> list[tuple[int, ...]]:
    """Each thread's online siblings inside the cell (the fit's cores)."""
    seen: set[int] = set()
    out = []
    for cpu in sorted(members):
        if cpu in seen:
            continue
        core = tuple(sorted(members.intersection(int(x) for x in cpus[cpu]["siblings"])
                            | {cpu}))
        seen.update(core)
        out.append(core)
    return out


def make_shape(key: str, topology: Mapping[str, Any], config: Mapping[str, Any]) -> Shape:
    """Read the shared part of a snapshot (raises KeyError/TypeError/ValueError if malformed)."""
    cpus = {int(c["id"]): c for c in topology["cpus"]}
    online = {i for i, c in cpus.items() if c["online"]}
    dedicated = {int(i) for i in config.get("dedicated_cpus") or ()} & online
    shared = {int(i) for i in config.get("shared_cpus") or ()} & online
    cpu_ratio = float(config.get("cpu_allocation_ratio", 4.0) or 4.0)
    reserved_mem = {int(k): int(v) for k, v in (config.get("reserved_memory_kib") or {}).items()}
    reserved_pages: dict[tuple[int, int], int] = {}
    for item in config.get("reserved_hugepages") or ():
        k = (int(item["cell"]), int(item["size_kib"]))
        reserved_pages[k] = reserved_pages.get(k, 0) + int(item["count"])
    cells = []
    distances: dict[tuple[int, int], int] = {}
    for c in topology["cells"]:
        cid = int(c["id"])
        members = {int(i) for i in c["cpus"]} & online
        sockets = {int(cpus[i]["socket"]) for i in members}
        cores = [k for k in _cell_cores(members, cpus) if dedicated.intersection(k)]
        pools = tuple((int(p["size_kib"]), int(p["total"]),
                       reserved_pages.get((cid, int(p["size_kib"])), 0))
                      for p in c.get("hugepages") or ())
        n_shared = len(members & shared)
        cells.append(ShapeCell(
            id=cid, socket=sockets.pop() if len(sockets) == 1 else None,
            threads_per_core=max((len(k) for k in cores), default=1),
            dedicated=frozenset(members & dedicated),
            whole_cores=tuple(k for k in cores if dedicated.issuperset(k)),
            cores=len(cores), shared=n_shared, shared_limit=int(n_shared * cpu_ratio),
            small_kib=max(0, int(c["memory_kib"]) - sum(z * t for z, t, _ in pools)
                          - reserved_mem.get(cid, 0)),
            pools=pools))
        for other, dist in (c.get("distances") or {}).items():
            distances[(cid, int(other))] = int(dist)
    pci = tuple((str(d["address"]), f"{_hex4(d['vendor'])}:{_hex4(d['device'])}",
                 int(d["numa_node"]))
                for d in topology.get("pci") or ()
                if not str(d.get("class", "")).strip().lower().removeprefix("0x")
                .startswith(_NON_ASSIGNABLE_CLASSES))
    ways = 0
    resctrl = topology.get("resctrl")
    if resctrl:
        caches = [x for x in topology.get("caches") or () if x["type"] != "instruction"]
        for res in resctrl.get("resources") or ():
            n = sum(1 for x in caches if int(x["level"]) == int(res["level"]))
            ways += n * int(res["cbm_bits"])
    sockets_n = len({c.socket for c in cells if c.socket is not None})
    name = (f"{len(online)} threads, {len(cells)} cell{'s' * (len(cells) != 1)}, "
            f"{sockets_n} socket{'s' * (sockets_n != 1)}")
    return Shape(key=key, topology=topology, config=config, cells=tuple(cells),
                 distances=distances, pci=pci, dedicated=len(dedicated),
                 dedicated_set=frozenset(dedicated),
                 ram_ratio=float(config.get("ram_allocation_ratio", 1.0) or 1.0),
                 cache_ways=ways, name=name)


@dataclass(frozen=True)
class CellFree:
    """What one cell has free in one snapshot."""

    id: int
    free_threads: int  # free dedicated threads
    whole_cores: int  # cores whose every thread is dedicated and free
    memory_kib: int  # free small-page memory, an upper bound for every kind of guest
    shared_room: int  # shared vCPUs that may still be added (limit - used)
    pages: tuple[tuple[int, int], ...]  # (size KiB, free pages)


@dataclass(frozen=True)
class HostSummary:
    """One snapshot's free resources (the fleet keeps one per host)."""

    cells: tuple[CellFree, ...]
    free_threads: int
    whole_cores: int
    free_ways: tuple[tuple[str, int, int], ...]  # (resource, cache id, free ways)
    pci_free: tuple[tuple[str, int, int], ...]  # (vendor:device, cell, free functions)
    memory_total_kib: int  # the cells' small-page memory together

    @property
    def total_free_ways(self) -> int:
        return sum(w for _, _, w in self.free_ways)


def _taken(shape: Shape, usage: Mapping[str, Any]) -> set[int]:
    """The dedicated threads held (the fit's rule: a guest, an emulator, shared guests, a
    hold, a claim, or a cell's ``pinned_cpus``)."""
    ded = shape.dedicated_set
    taken = {cpu for t in usage.get("threads") or () if (cpu := int(t["cpu"])) in ded
             and (t.get("guest") is not None or t.get("emulator") or t.get("shared_guests")
                  or t.get("held_by") or t.get("claim"))}
    for uc in usage.get("cells") or ():
        taken.update(int(x) for x in uc.get("pinned_cpus") or ())
    return taken


def summarize(shape: Shape, usage: Mapping[str, Any]) -> HostSummary:
    """The summary of one snapshot's ``usage`` on a host of ``shape``, read by the fit's
    rules (``hostagent.fit.host``); raises KeyError/TypeError/ValueError if malformed."""
    taken = _taken(shape, usage)
    by_id = {int(c["id"]): c for c in usage.get("cells") or ()}
    cells = []
    for sc in shape.cells:
        uc = by_id.get(sc.id, {})
        used = int(uc.get("memory_used_kib", 0) or 0)
        # pinned guests: memory <= small - used; shared: used + memory <= small x ratio
        mem = max(sc.small_kib, int(sc.small_kib * shape.ram_ratio)) - used
        upages = {int(h["size_kib"]): h for h in uc.get("hugepages") or ()}
        pages = []
        for size, total, reserved in sc.pools:
            if size in upages and "free" in upages[size]:
                free = int(upages[size]["free"])
            else:
                free = total - int(upages.get(size, {}).get("used", 0)) - reserved
            pages.append((size, max(0, free)))
        cells.append(CellFree(
            id=sc.id, free_threads=len(sc.dedicated - taken),
            whole_cores=sum(1 for k in sc.whole_cores if taken.isdisjoint(k)),
            memory_kib=max(0, mem),
            shared_room=max(0, sc.shared_limit - int(uc.get("shared_vcpus", 0) or 0)),
            pages=tuple(sorted(pages))))
    ways = tuple((str(c["resource"]), int(c["id"]), int(c.get("free_ways") or 0))
                 for c in usage.get("caches") or ())
    taken_pci = {str(p["address"]) for p in usage.get("pci") or ()
                 if p.get("guest") is not None or p.get("claim") is not None}
    for g in usage.get("guests") or ():
        taken_pci.update(str(a.get("address")) if isinstance(a, Mapping) else str(a)
                         for a in g.get("pci") or g.get("hostdevs") or ())
    pci: dict[tuple[str, int], int] = {}
    for address, vd, cell in shape.pci:
        if address not in taken_pci:
            pci[(vd, cell)] = pci.get((vd, cell), 0) + 1
    return HostSummary(
        cells=tuple(cells), free_threads=sum(c.free_threads for c in cells),
        whole_cores=sum(c.whole_cores for c in cells), free_ways=ways,
        pci_free=tuple((vd, cell, n) for (vd, cell), n in sorted(pci.items())),
        memory_total_kib=sum(max(sc.small_kib, int(sc.small_kib * shape.ram_ratio))
                             for sc in shape.cells))


# ------------------------------------------------------------------------ the prefilter

@dataclass(frozen=True)
class Needs:
    """What a request needs, in the summary's terms (``needs_of``)."""

    pinned: bool
    numa: bool
    dedicated: int  # dedicated vCPUs (+1 for an isolated emulator thread)
    whole_core_policy: str | None  # "isolate" / "require" / None
    cells: tuple[tuple[int, int, int], ...]  # per guest cell: (dedicated, shared, memory KiB)
    page_size: str | int | None
    vcpus: int
    memory_kib: int
    pci: tuple[tuple[str, int], ...]  # (vendor:device, count)
    cache: bool


def needs_of(req: FitRequest) -> Needs:
    """The request in the summary's terms."""
    emu = 1 if req.emulator_policy == "isolate" else 0
    policy = req.thread_policy if req.thread_policy in ("isolate", "require") else None
    return Needs(
        pinned=req.pinned, numa=req.numa, dedicated=len(req.dedicated_vcpus) + emu,
        whole_core_policy=policy,
        cells=tuple((len(c.dedicated), len(c.shared), c.memory_kib) for c in req.cells),
        page_size=req.page_size, vcpus=req.vcpus, memory_kib=req.memory_mib * 1024,
        pci=tuple((f"{p.vendor}:{p.device}", p.count) for p in req.pci),
        cache=bool(req.cache))


def _cell_memory(cell: CellFree, page_size: str | int | None) -> int:
    """The most memory (KiB) a guest cell asking for ``page_size`` could get in ``cell``."""
    if isinstance(page_size, int):
        return sum(n * s for s, n in cell.pages if s == page_size)
    large = max((n * s for s, n in cell.pages), default=0)
    if page_size == "large":
        return large
    if page_size == "any":
        return max(large, cell.memory_kib)
    return cell.memory_kib


def prefilter(shape: Shape, summary: HostSummary, needs: Needs) -> str | None:
    """``None`` if the exact fit may succeed, else why it cannot (the resource and the
    numbers). Every check is a necessary condition of the fit (docs/fleet.md §3)."""
    return _host_wide(shape, summary, needs) or _per_cell(summary, needs)


def _host_wide(shape: Shape, summary: HostSummary, needs: Needs) -> str | None:
    for vd, count in needs.pci:
        have = sum(n for v, _, n in summary.pci_free if v == vd)
        if have < count:
            return f"pci_devices: needs {count} free {vd}, the host has {have}"
    if needs.cache and summary.total_free_ways == 0:
        return "cache_ways: no free cache ways"
    if not needs.numa:
        shared = sum(sc.shared for sc in shape.cells)
        if shared < needs.vcpus:
            return (f"shared_threads: {needs.vcpus} vCPUs exceed the host's {shared} shared "
                    "threads")
        return None
    if needs.pinned and summary.free_threads < needs.dedicated:
        return (f"dedicated_threads: needs {needs.dedicated} free dedicated threads, the "
                f"host has {summary.free_threads}")
    if needs.whole_core_policy is not None:
        if needs.whole_core_policy == "isolate":
            want = sum(d for d, _, _ in needs.cells)
        else:
            per_core = max((sc.threads_per_core for sc in shape.cells), default=1)
            want = sum(-(-d // per_core) for d, _, _ in needs.cells)
        if summary.whole_cores < want:
            return (f"whole_cores: needs {want} whole free cores, the host has "
                    f"{summary.whole_cores}")
    k = len(needs.cells)
    if k > len(summary.cells):
        return f"cells: the guest has {k} NUMA cells, the host {len(summary.cells)}"
    return None


def _per_cell(summary: HostSummary, needs: Needs) -> str | None:
    """One resource at a time, guest cells onto distinct host cells: sorted, the largest
    guest cell against the largest host cell, and so on (exact for one resource)."""
    if not needs.numa:
        return None
    k = len(needs.cells)
    checks: list[tuple[str, list[int], list[int]]] = [
        ("memory", [m for _, _, m in needs.cells],
         [_cell_memory(c, needs.page_size) for c in summary.cells])]
    if needs.pinned:
        checks.append(("dedicated_threads", [d for d, _, _ in needs.cells],
                       [c.free_threads for c in summary.cells]))
    if any(s for _, s, _ in needs.cells):
        checks.append(("shared_threads", [s for _, s, _ in needs.cells],
                       [c.shared_room for c in summary.cells]))
    for resource, want_cells, have_cells in checks:
        want_sorted = sorted(want_cells, reverse=True)
        have_sorted = sorted(have_cells, reverse=True)
        for w, h in zip(want_sorted, have_sorted, strict=False):
            if w > h:
                return (f"{resource}: no {k} distinct cells hold the guest's cells "
                        f"(needs {want_sorted}, the cells have {have_sorted[:k]})")
    return None
