"""What the fit sees of a host: per-cell free threads, memory, pages and devices.

``host_view(snapshot)`` reads a schema-v1 snapshot (topology + config + usage) once into
frozen per-cell records. It never changes the snapshot. The rules (docs/fit.md):

- a *dedicated* thread is online and in ``config.dedicated_cpus``; it is *free* unless
  ``usage.threads`` gives it a guest, an emulator, a shared guest, a hold
  (``held_by``) or a claim (``claim``), or ``usage.cells[].pinned_cpus`` lists it;
- a *core* is the set of a thread's online siblings inside the cell, cores ordered by
  their lowest thread id, threads ascending;
- small-page memory of a cell is ``memory_kib`` minus every hugepage pool minus
  ``config.reserved_memory_kib``; ``usage.cells[].memory_used_kib`` is what guests hold
  of it; hugepages free per size come from ``usage.cells[].hugepages[].free`` (the
  tracker subtracts the reserved pages), else from the topology minus the reserved pages;
- vCPUs and memory of guests bound to no cell (``usage.floating_vcpus`` /
  ``floating_memory_kib``, or ``usage.floating.{vcpus,memory_kib}``) count host-wide only;
  so do their hugepages (``usage.floating_hugepages``): the kernel may have taken them
  from any cell, so no cell offers more pages of a size than all cells together have
  left after them, and a placement's pages of that size must fit in that remainder;
- a PCI function listed in ``usage.pci`` with a guest or a claim (or in
  ``usage.guests[].pci``) is taken;
- cache ways of a ``usage.caches[].allocations[]`` entry with a ``claim`` are held by a
  claim whose resctrl group does not exist yet: the reservations planner counts them as
  taken, and each such claim's group as one CLOSID already promised.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from hostagent.errors import RequestError
from hostagent.model import HostTopology, topology_from_dict

SMALL_PAGE_KIB = 4

# PCI classes never passed through (bridges, host peripherals, memory controllers).
_NON_ASSIGNABLE_CLASSES = ("05", "06", "08")


@dataclass(frozen=True)
class PciDev:
    address: str
    vendor: str
    device: str
    numa_node: int
    free: bool
    assignable: bool


@dataclass(frozen=True)
class HostCell:
    """One host cell as the fit sees it. ``cores``, ``threads_per_core`` and ``socket``
    are worked out from the snapshot's CPUs (``cpus``: id -> CPU entry) when first asked:
    most fits look at one or two cells' cores only."""

    id: int
    members: frozenset[int]  # online threads of the cell
    dedicated: frozenset[int]
    free: frozenset[int]
    shared: tuple[int, ...]
    shared_used: int
    small_total_kib: int
    small_used_kib: int
    pages: Mapping[int, int]  # hugepage size KiB -> free pages
    cpus: Mapping[int, Mapping[str, Any]] = field(repr=False, compare=False)

    @functools.cached_property
    def cores(self) -> tuple[tuple[int, ...], ...]:
        """Each thread's online siblings inside the cell, ascending; cores ordered by
        their lowest thread."""
        return _cores(self.members, self.cpus)

    @functools.cached_property
    def free_split(self) -> tuple[tuple[list[int], ...], tuple[list[int], ...]]:
        """The free threads of each core that has any, in core order: (cores whose threads
        are all free, cores where only some are). Shared by the fits of this view; never
        changed."""
        return split_cores(self.cores, self.free)

    @functools.cached_property
    def threads_per_core(self) -> int:
        """The largest core holding a dedicated thread (1 without any)."""
        return max((len(c) for c in self.cores if not self.dedicated.isdisjoint(c)),
                   default=1)

    @functools.cached_property
    def socket(self) -> int | None:
        """The cell's socket; None when the cell spans several sockets."""
        sockets = {self.cpus[c]["socket"] for c in self.members if c in self.cpus}
        return sockets.pop() if len(sockets) == 1 else None

    @property
    def small_free_kib(self) -> int:
        return max(0, self.small_total_kib - self.small_used_kib)

    def whole_free_cores(self) -> list[tuple[int, ...]]:
        return [c for c in self.cores if all(t in self.free for t in c)]


@dataclass(frozen=True)
class HostView:
    cells: tuple[HostCell, ...]
    topology: Mapping[str, Any]  # the snapshot's topology dict
    cpu_ratio: float
    ram_ratio: float
    shared_cpus: tuple[int, ...]
    floating_used: int  # shared vCPUs not bound to any cell (usage.floating.vcpus)
    floating_memory_kib: int  # guest memory not bound to any cell
    pci: tuple[PciDev, ...]
    snapshot_usage_caches: tuple[Mapping[str, Any], ...]
    # hugepages held by guests bound to no cell (on cells unknown): size KiB -> pages, and
    # for those sizes the pages all cells together have left after them
    floating_pages: Mapping[int, int] = field(default_factory=dict)
    pages_left: Mapping[int, int] = field(default_factory=dict)
    # cache ways claims hold (no resctrl group yet): (resource, cache id) -> mask, and the
    # number of groups those claims will need
    claimed_ways: Mapping[tuple[str, int], int] = field(default_factory=dict)
    claimed_groups: int = 0

    def cell(self, cell_id: int) -> HostCell:
        for c in self.cells:
            if c.id == cell_id:
                return c
        raise KeyError(cell_id)

    @functools.cached_property
    def cache_of(self) -> Mapping[tuple[int, int], int]:
        """(level, cpu) -> the id of the data/unified cache of that level serving the cpu
        (built only when a request reserves cache)."""
        out: dict[tuple[int, int], int] = {}
        for cache in self.topology.get("caches") or []:
            if cache["type"] == "instruction":
                continue
            for cpu in cache["cpus"]:
                out[(cache["level"], cpu)] = cache["id"]
        return out

    @functools.cached_property
    def distances(self) -> Mapping[tuple[int, int], int]:
        """(cell, other cell) -> the kernel's NUMA distance (``topology.cells[].distances``;
        empty when the snapshot has none)."""
        out: dict[tuple[int, int], int] = {}
        for c in self.topology.get("cells") or ():
            for other, dist in (c.get("distances") or {}).items():
                out[(int(c["id"]), int(other))] = int(dist)
        return out

    @functools.cached_property
    def topo(self) -> HostTopology:
        """The ``HostTopology`` (built only when the reservations planner needs it)."""
        return topology_from_dict(self.topology)


def _bad(field: str, why: str) -> RequestError:
    return RequestError(f"snapshot {field}: {why}")


def host_view(snapshot: Mapping[str, Any]) -> HostView:
    """Read the parts of a snapshot the fit needs (raises ``RequestError`` if malformed)."""
    if not isinstance(snapshot, Mapping):
        raise RequestError(f"snapshot must be an object, got {type(snapshot).__name__}")
    for key in ("topology", "config", "usage"):
        if not isinstance(snapshot.get(key), Mapping):
            raise _bad(key, "missing or not an object")
    try:
        return _view(snapshot["topology"], snapshot["config"], snapshot["usage"])
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise _bad("", f"not a valid schema-v1 snapshot ({type(exc).__name__}: {exc})") from None


def _ids(value: Any) -> list[int]:
    if isinstance(value, list):
        return list(map(int, value))
    return []


def _view(
    topo: Mapping[str, Any], config: Mapping[str, Any], usage: Mapping[str, Any]
) -> HostView:
    cpus = topo["cpus"]
    online = {c["id"] for c in cpus if c["online"]}
    dedicated_all = set(_ids(config.get("dedicated_cpus"))) & online
    shared_all = set(_ids(config.get("shared_cpus"))) & online
    reserved_mem = {int(k): int(v) for k, v in (config.get("reserved_memory_kib") or {}).items()}
    reserved_pages: dict[tuple[int, int], int] = {}
    for item in config.get("reserved_hugepages") or []:
        key = (int(item["cell"]), int(item["size_kib"]))
        reserved_pages[key] = reserved_pages.get(key, 0) + int(item["count"])

    # only dedicated threads can be free: the others' flags need no look
    taken = {cpu for t in usage.get("threads") or () if (cpu := int(t["cpu"])) in dedicated_all
             and (t.get("guest") is not None or t.get("emulator") or t.get("shared_guests")
                  or t.get("held_by") or t.get("claim"))}
    ucells = {int(c["id"]): c for c in usage.get("cells") or []}
    for uc in ucells.values():
        taken.update(_ids(uc.get("pinned_cpus")))

    cpu_by_id = {c["id"]: c for c in cpus}
    cells = []
    cell_pages: list[dict[int, int]] = []
    for cell in topo["cells"]:
        cid = int(cell["id"])
        member_set = online.intersection(cell["cpus"])
        dedicated = frozenset(member_set & dedicated_all)
        free = frozenset(dedicated - taken)
        uc = ucells.get(cid, {})
        pools = cell.get("hugepages") or []
        huge_kib = sum(int(p["size_kib"]) * int(p["total"]) for p in pools)
        small_total = int(cell["memory_kib"]) - huge_kib - reserved_mem.get(cid, 0)
        pages: dict[int, int] = {}
        cell_pages.append(pages)  # capped below for floating guests' pages
        upages = {int(h["size_kib"]): h for h in uc.get("hugepages") or []}
        for pool in pools:
            size = int(pool["size_kib"])
            if size in upages and "free" in upages[size]:
                free_pages = int(upages[size]["free"])
            else:
                used = int(upages.get(size, {}).get("used", 0))
                free_pages = int(pool["total"]) - used - reserved_pages.get((cid, size), 0)
            pages[size] = max(0, free_pages)
        cells.append(
            HostCell(
                id=cid,
                members=frozenset(member_set),
                dedicated=dedicated,
                free=free,
                shared=tuple(sorted(member_set & shared_all)),
                shared_used=int(uc.get("shared_vcpus", 0) or 0),
                small_total_kib=max(0, small_total),
                small_used_kib=int(uc.get("memory_used_kib", 0) or 0),
                pages=pages,
                cpus=cpu_by_id,
            )
        )

    used_pci: set[str] = set()
    for item in usage.get("pci") or []:
        if item.get("guest") is not None or item.get("claim") is not None:
            used_pci.add(str(item["address"]))
    for guest in usage.get("guests") or []:
        for addr in guest.get("pci") or guest.get("hostdevs") or []:
            used_pci.add(str(addr["address"] if isinstance(addr, Mapping) else addr))
    pci = tuple(
        PciDev(
            address=p["address"],
            vendor=_hex4(p["vendor"]),
            device=_hex4(p["device"]),
            numa_node=int(p["numa_node"]),
            free=p["address"] not in used_pci,
            assignable=not _hex(p["class"]).startswith(_NON_ASSIGNABLE_CLASSES),
        )
        for p in sorted(topo.get("pci") or [], key=lambda p: p["address"])
    )
    floating_pages = _floating_pages(usage.get("floating_hugepages") or ())
    pages_left: dict[int, int] = {}
    for size, held in floating_pages.items():
        # those pages came from cells unknown: no cell can give more than what all cells
        # together have left after them
        left = pages_left[size] = max(0, sum(p.get(size, 0) for p in cell_pages) - held)
        for p in cell_pages:
            if p.get(size, 0) > left:
                p[size] = left
    floating = usage.get("floating") or {}
    claimed_ways, claimed_groups = _claimed_ways(usage.get("caches") or ())
    return HostView(
        cells=tuple(cells),
        topology=topo,
        cpu_ratio=float(config.get("cpu_allocation_ratio", 4.0) or 4.0),
        ram_ratio=float(config.get("ram_allocation_ratio", 1.0) or 1.0),
        shared_cpus=tuple(sorted(shared_all)),
        floating_used=int(floating.get("vcpus", usage.get("floating_vcpus", 0)) or 0),
        floating_memory_kib=int(
            floating.get("memory_kib", usage.get("floating_memory_kib", 0)) or 0),
        pci=pci,
        snapshot_usage_caches=tuple(usage.get("caches") or ()),
        floating_pages=floating_pages,
        pages_left=pages_left,
        claimed_ways=claimed_ways,
        claimed_groups=claimed_groups,
    )


def split_cores(
    cores: Sequence[tuple[int, ...]], free: frozenset[int]
) -> tuple[tuple[list[int], ...], tuple[list[int], ...]]:
    """The free threads of each core that has any, in core order: (whole cores — every
    thread free —, broken ones)."""
    whole: list[list[int]] = []
    broken: list[list[int]] = []
    for core in cores:
        avail = [t for t in core if t in free]
        if avail:
            (whole if len(avail) == len(core) else broken).append(avail)
    return tuple(whole), tuple(broken)


def _cores(members: frozenset[int], cpu_by_id: Mapping[int, Mapping[str, Any]]
           ) -> tuple[tuple[int, ...], ...]:
    """The cell's cores: each thread's online siblings inside the cell, ascending; cores
    ordered by their lowest thread."""
    seen: set[int] = set()
    cores: list[tuple[int, ...]] = []
    for cpu in sorted(members):
        if cpu in seen:
            continue
        entry = cpu_by_id.get(cpu)
        sib = members.intersection(entry["siblings"]) if entry is not None else ()
        core = (cpu,) if not sib or (len(sib) == 1 and cpu in sib) else \
            tuple(sorted(sib | {cpu}))
        seen.update(core)
        cores.append(core)
    return tuple(cores)


def _claimed_ways(caches: Any) -> tuple[dict[tuple[str, int], int], int]:
    """The ways claims hold per (resource, cache id), from the allocations of
    ``usage.caches`` that name a claim, and how many resctrl groups those claims need."""
    ways: dict[tuple[str, int], int] = {}
    groups: set[tuple[str, str]] = set()
    for cache in caches:
        for alloc in cache.get("allocations") or ():
            claim = alloc.get("claim")
            if claim is None:
                continue
            key = (str(cache["resource"]), int(cache["id"]))
            ways[key] = ways.get(key, 0) | int(str(alloc["mask"]), 16)
            groups.add((str(claim), str(alloc.get("group"))))
    return ways, len(groups)


def _floating_pages(items: Any) -> dict[int, int]:
    """``usage.floating_hugepages`` (``[{size_kib, pages}]``) as {size KiB: pages}."""
    out: dict[int, int] = {}
    for item in items:
        try:
            size, pages = int(item["size_kib"]), int(item["pages"])
        except (KeyError, TypeError, ValueError):
            size = pages = -1
        if size <= 0 or pages < 0:
            raise ValueError(f"usage.floating_hugepages entry {item!r}: expected "
                             "{size_kib: a positive integer, pages: an integer >= 0}")
        out[size] = out.get(size, 0) + pages
    return out


def _hex(text: str) -> str:
    t = str(text).strip().lower()
    return t[2:] if t.startswith("0x") else t


def _hex4(text: str) -> str:
    return _hex(text).rjust(4, "0")[-4:]
