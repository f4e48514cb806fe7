"""Valid schema-v1 snapshot dicts for small hosts, for the fit tests and the fit bench.

``make_snapshot`` builds topology (through the model's own ``topology_to_dict``), config
and a consistent ``usage`` from a few numbers: cells, cores per cell, threads per core,
which threads are dedicated, which are taken, memory and hugepages used. CPU ids follow
Linux on x86: thread t of global core k is CPU ``t * total_cores + k``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from hostagent.model import (
    Cache,
    Cell,
    Cpu,
    HostTopology,
    HugepagePool,
    PciDevice,
    Resctrl,
    ResctrlGroup,
    ResctrlResource,
    topology_to_dict,
)


def cpu_id(cell: int, core: int, thread: int, cells: int, cores: int) -> int:
    return thread * cells * cores + cell * cores + core


def _l3(cid: int, cpus: list[int], ways: int) -> Cache:
    return Cache(level=3, id=cid, type="unified", size_bytes=(ways or 16) * 1024 * 1024,
                 ways=ways or 16, line_bytes=64, cpus=tuple(cpus))


def make_topology(
    cells: int = 2,
    cores: int = 4,
    threads: int = 2,
    *,
    memory_mib: int = 16384,
    hugepages: Mapping[int, int] | None = None,
    cells_per_socket: int = 1,
    l3_per_cell: int = 1,
    l3_cells: int = 1,
    pci: Iterable[tuple[str, int, str, str]] = (),
    resctrl_ways: int = 0,
    default_mask: int | Mapping[int, int] | None = None,
) -> HostTopology:
    """``hugepages`` maps size KiB -> pages per cell; ``pci`` is (address, node, vendor,
    device); ``resctrl_ways`` > 0 mounts resctrl with that many L3 ways (1 MiB each), the
    default group holding ``default_mask`` (an int, or {cache id: int}; default: the lower
    half of the ways). ``l3_per_cell`` splits a cell's cores over several L3s (AMD CCX);
    ``l3_cells`` > 1 makes one L3 serve that many cells (sub-NUMA clustering)."""
    hugepages = dict(hugepages or {})
    cpus: list[Cpu] = []
    cell_objs: list[Cell] = []
    caches: list[Cache] = []
    for c in range(cells):
        ids: list[int] = []
        for k in range(cores):
            sib = tuple(cpu_id(c, k, t, cells, cores) for t in range(threads))
            for t in range(threads):
                cid = sib[t]
                ids.append(cid)
                cpus.append(Cpu(id=cid, online=True, cell=c, socket=c // cells_per_socket,
                                die=0, cluster=k, core=k, siblings=sib, isolated=False))
        pools = tuple(HugepagePool(size_kib=s, total=n, free=n, surplus=0)
                      for s, n in sorted(hugepages.items()))
        cell_objs.append(Cell(
            id=c, cpus=tuple(sorted(ids)), memory_kib=memory_mib * 1024,
            memory_free_kib=memory_mib * 1024, distances={o: 10 if o == c else 21
                                                          for o in range(cells)},
            hugepages=pools))
        if l3_cells > 1:
            continue
        per = cores // l3_per_cell
        for j in range(l3_per_cell):
            ccpus = sorted(cpu_id(c, k, t, cells, cores) for k in range(j * per, (j + 1) * per)
                           for t in range(threads))
            caches.append(_l3(c * l3_per_cell + j, ccpus, resctrl_ways))
    if l3_cells > 1:
        for j in range(cells // l3_cells):
            ccpus = sorted(cpu_id(c, k, t, cells, cores)
                           for c in range(j * l3_cells, (j + 1) * l3_cells)
                           for k in range(cores) for t in range(threads))
            caches.append(_l3(j, ccpus, resctrl_ways))
    cpus.sort(key=lambda x: x.id)
    resctrl = None
    if resctrl_ways:
        full = (1 << resctrl_ways) - 1
        width = (resctrl_ways + 3) // 4
        half = (1 << (resctrl_ways // 2)) - 1
        ids = [c.id for c in caches]
        dmasks = (dict(default_mask) if isinstance(default_mask, Mapping) else
                  {i: half if default_mask is None else default_mask for i in ids})
        resctrl = Resctrl(
            cdp={"L3": False, "L2": False},
            resources=(ResctrlResource(
                name="L3", level=3, type="both", cbm_mask=format(full, f"0{width}x"),
                cbm_bits=resctrl_ways, min_cbm_bits=1, num_closids=16,
                shareable_bits="0" * width, sparse_masks=False,
                granularity_bytes=1 << 20, min_bytes=1 << 20),),
            mb=None,
            groups=(ResctrlGroup(name="", mode="shareable",
                                 schemata={"L3": {i: format(dmasks.get(i, half), f"0{width}x")
                                                 for i in ids}},
                                 mb={}, cpus=tuple(c.id for c in cpus), tasks=100),),
        )
    pcis = tuple(PciDevice(address=a, numa_node=n, class_="0x020000", vendor=f"0x{v}",
                           device=f"0x{d}", sriov_totalvfs=0) for a, n, v, d in pci)
    return HostTopology(cells=tuple(cell_objs), cpus=tuple(cpus), caches=tuple(caches),
                        resctrl=resctrl, pci=pcis)


def make_snapshot(
    topo: HostTopology,
    *,
    dedicated: Iterable[int] | None = None,
    shared: Iterable[int] | None = None,
    taken: Mapping[int, str] | None = None,
    shared_used: Mapping[int, int] | None = None,
    memory_used_kib: Mapping[int, int] | None = None,
    pages_used: Mapping[tuple[int, int], int] | None = None,
    reserved_memory_kib: Mapping[int, int] | None = None,
    reserved_hugepages: Iterable[tuple[int, int, int]] = (),
    cpu_ratio: float = 4.0,
    ram_ratio: float = 1.0,
    pci_used: Iterable[str] = (),
    floating_vcpus: int = 0,
    floating_memory_kib: int = 0,
) -> dict[str, Any]:
    """A snapshot; ``dedicated`` None = every online CPU dedicated, ``shared`` None = the rest.

    ``taken`` maps a CPU to the guest pinned there; ``pages_used`` maps (cell, size) to
    pages used by guests.
    """
    online = [c.id for c in topo.cpus if c.online]
    ded = sorted(set(online if dedicated is None else dedicated))
    sha = sorted(set(online) - set(ded)) if shared is None else sorted(set(shared))
    taken = dict(taken or {})
    shared_used = dict(shared_used or {})
    memory_used_kib = dict(memory_used_kib or {})
    pages_used = dict(pages_used or {})
    reserved_memory_kib = dict(reserved_memory_kib or {})
    rpages: dict[tuple[int, int], int] = {}
    for cell, size, count in reserved_hugepages:
        rpages[(cell, size)] = rpages.get((cell, size), 0) + count
    cpu_by_id = {c.id: c for c in topo.cpus}
    ucells = []
    for cell in topo.cells:
        members = set(cell.cpus)
        pinned = sorted(c for c in taken if c in members)
        free_p = sorted(c for c in ded if c in members and c not in taken)
        cores = {cpu_by_id[c].siblings for c in members}
        free_cores = sum(1 for s in cores if not any(t in taken for t in s))
        huge_kib = sum(p.size_kib * p.total for p in cell.hugepages)
        total_small = cell.memory_kib - huge_kib - reserved_memory_kib.get(cell.id, 0)
        used = memory_used_kib.get(cell.id, 0)
        ucells.append({
            "id": cell.id,
            "pinned_cpus": pinned,
            "free_pcpus": free_p,
            "free_cores": free_cores,
            "shared_vcpus": shared_used.get(cell.id, 0),
            "memory_used_kib": used,
            "memory_free_kib": max(0, total_small - used),
            "hugepages": [
                {"size_kib": p.size_kib, "used": pages_used.get((cell.id, p.size_kib), 0),
                 "free": p.total - pages_used.get((cell.id, p.size_kib), 0)
                 - rpages.get((cell.id, p.size_kib), 0)}
                for p in cell.hugepages
            ],
        })
    threads = [{"cpu": c, "guest": taken.get(c), "vcpu": 0 if c in taken else None,
                "emulator": False, "shared_guests": []} for c in online]
    cfg = {
        "dedicated_cpus": ded,
        "shared_cpus": sha,
        "online_cpus": online,
        "reserved_memory_kib": {str(k): v for k, v in reserved_memory_kib.items()},
        "reserved_hugepages": [{"cell": c, "size_kib": s, "count": n}
                               for (c, s), n in sorted(rpages.items())],
        "cpu_allocation_ratio": cpu_ratio,
        "ram_allocation_ratio": ram_ratio,
    }
    from hostagent.resctrl_cbm import cache_ways

    return {
        "schema": 1,
        "host": "test",
        "epoch": "e",
        "seq": 1,
        "time": 0.0,
        "topology": topology_to_dict(topo),
        "config": cfg,
        "usage": {"cells": ucells, "threads": threads, "caches": cache_ways(topo),
                  "guests": [], "conflicts": [],
                  "floating": {"vcpus": floating_vcpus, "memory_kib": floating_memory_kib,
                               "hugepages": []},
                  "pci": [{"address": a, "guest": "other"} for a in pci_used]},
    }


def flavor(vcpus: int, memory_mb: int, **specs: Any) -> dict[str, Any]:
    """``flavor(4, 2048, cpu_policy="dedicated")`` -> request with ``hw:cpu_policy``.

    Keyword names map ``_`` to ``hw:`` keys; ``numa_cpus_0`` becomes ``hw:numa_cpus.0``.
    """
    extra = {}
    for k, v in specs.items():
        if k.startswith(("numa_cpus_", "numa_mem_")):
            base, idx = k.rsplit("_", 1)
            k = f"{base}.{idx}"
        extra[f"hw:{k}"] = str(v)
    return {"vcpus": vcpus, "memory_mb": memory_mb, "extra_specs": extra}
