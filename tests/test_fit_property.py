"""Property tests: placement invariants on random small hosts, and agreement with a
brute-force search (the fitter finds a placement whenever one exists, and only then).

The brute force below is written independently of the fitter: it tries every injective
map of guest cells to host cells and every assignment of vCPUs to threads, and checks the
documented rules (docs/fit.md) directly on the snapshot's numbers.
"""

from __future__ import annotations

import itertools
import os
from typing import Any

from fit_hosts import make_snapshot, make_topology
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from hostagent.errors import RequestError
from hostagent.fit import fit, parse_request
from hostagent.model import topology_from_dict

SETTINGS = settings(max_examples=int(os.environ.get('FIT_EXAMPLES', 120)), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


@st.composite
def hosts(draw: Any) -> dict[str, Any]:
    cells = draw(st.integers(1, 3))
    cores = draw(st.integers(1, 4))
    threads = draw(st.integers(1, 2))
    huge = draw(st.sampled_from([{}, {2048: 64}, {2048: 128, 1048576: 1}]))
    pci = []
    for i in range(draw(st.integers(0, 2))):
        pci.append((f"0000:{i + 1:02x}:00.0", draw(st.integers(-1, cells - 1)), "8086", "154d"))
    topo = make_topology(cells, cores, threads, memory_mib=4096, hugepages=huge,
                         cells_per_socket=draw(st.integers(1, 2)), pci=pci)
    cpus = [c.id for c in topo.cpus]
    mode = draw(st.sampled_from(["all", "none", "half", "random"]))
    if mode == "half":
        dedicated = [c.id for c in topo.cpus if c.core < (cores + 1) // 2]
    else:
        dedicated = [c for c in cpus if mode == "all" or (mode == "random" and draw(st.booleans()))]
    taken = {c: "g" for c in dedicated if draw(st.integers(0, 4)) == 0}
    mem_used = {c: draw(st.sampled_from([0, 512, 2048, 3072])) * 1024 for c in range(cells)}
    shared_used = {c: draw(st.integers(0, 2)) for c in range(cells)}
    pages_used = {(c, s): draw(st.integers(0, n)) for c in range(cells) for s, n in huge.items()}
    return make_snapshot(
        topo, dedicated=dedicated, taken=taken, memory_used_kib=mem_used,
        shared_used=shared_used, pages_used=pages_used,
        cpu_ratio=draw(st.sampled_from([1.0, 2.0])),
        ram_ratio=draw(st.sampled_from([1.0, 1.5])),
    )


@st.composite
def requests(draw: Any) -> dict[str, Any]:
    nodes = draw(st.sampled_from([None, None, 1, 2, 3]))
    vcpus = draw(st.integers(1, 3)) * (nodes or 1)
    specs: dict[str, str] = {}
    policy = draw(st.sampled_from([None, "shared", "dedicated", "mixed"]))
    if policy:
        specs["hw:cpu_policy"] = policy
    if policy in ("dedicated", "mixed"):
        tp = draw(st.sampled_from([None, "prefer", "isolate", "require"]))
        if tp:
            specs["hw:cpu_thread_policy"] = tp
        if draw(st.integers(0, 3)) == 0:
            specs["hw:emulator_threads_policy"] = draw(st.sampled_from(["share", "isolate"]))
    if policy == "mixed":
        specs["hw:cpu_dedicated_mask"] = draw(st.sampled_from(["0", "^0", "1", "0-1"][: vcpus + 1]))
    if nodes:
        specs["hw:numa_nodes"] = str(nodes)
    page = draw(st.sampled_from([None, None, None, "small", "large", "any", "2048", "1GB"]))
    if page:
        specs["hw:mem_page_size"] = page
    if draw(st.integers(0, 4)) == 0:
        specs["hw:pci_devices"] = f"8086:154d:{draw(st.integers(1, 2))}"
        specs["hw:pci_numa_affinity_policy"] = draw(
            st.sampled_from(["required", "legacy", "preferred", "socket"]))
    memory = draw(st.sampled_from([16, 128, 256, 1024, 2048])) * (nodes or 1)
    return {"vcpus": vcpus, "memory_mb": memory, "extra_specs": specs}


def _parse(request: dict[str, Any]):
    try:
        return parse_request(request)
    except RequestError:
        assume(False)
        raise


# ----------------------------------------------------------------------------- brute force


class Brute:
    """Existence of a placement, straight from the rules (no search heuristics)."""

    def __init__(self, snap: dict[str, Any], req: Any) -> None:
        self.req = req
        self.topo = topology_from_dict(snap["topology"])
        cfg, usage = snap["config"], snap["usage"]
        self.ded = set(cfg["dedicated_cpus"])
        self.shared = set(cfg["shared_cpus"])
        self.cpu_ratio = cfg["cpu_allocation_ratio"]
        self.ram_ratio = cfg["ram_allocation_ratio"]
        taken = {t["cpu"] for t in usage["threads"] if t["guest"] is not None}
        self.free = self.ded - taken
        self.ucell = {c["id"]: c for c in usage["cells"]}
        self.res_mem = {int(k): v for k, v in cfg["reserved_memory_kib"].items()}
        self.pci = [(p.address, p.numa_node) for p in self.topo.pci]
        self.pci_used = {p["address"] for p in usage.get("pci", [])}

    def core(self, cpu: int) -> tuple[int, ...]:
        return tuple(sorted(self.topo.cpu(cpu).siblings))

    def cell_threads(self, cell: int) -> list[int]:
        return sorted(self.topo.cell(cell).cpus)

    def small(self, cell: int) -> tuple[int, int]:
        c = self.topo.cell(cell)
        total = c.memory_kib - sum(p.size_kib * p.total for p in c.hugepages) - \
            self.res_mem.get(cell, 0)
        return total, self.ucell[cell]["memory_used_kib"]

    def memory_ok(self, g: Any, cell: int) -> bool:
        mem = g.memory_kib
        total, used = self.small(cell)
        pages = {h["size_kib"]: h["free"] for h in self.ucell[cell]["hugepages"]}
        ps = self.req.page_size

        def huge_ok(s: int) -> bool:
            return s in pages and mem % s == 0 and mem // s <= pages[s]

        if ps is None and not self.req.pinned:
            return mem <= total and used + mem <= int(total * self.ram_ratio)
        if ps in (None, "small", 4):
            return mem <= total - used
        if ps == "large":
            return any(huge_ok(s) for s in pages)
        if ps == "any":
            return any(huge_ok(s) for s in pages) or mem <= total - used
        return huge_ok(ps)

    def shared_ok(self, g: Any, cell: int) -> bool:
        ns = len(g.shared)
        if not ns:
            return True
        cap = len(self.shared & set(self.cell_threads(cell)))
        return cap > 0 and ns <= cap and \
            self.ucell[cell]["shared_vcpus"] + ns <= int(cap * self.cpu_ratio)

    def threads_ok(self, g: Any, cell: int, emulator: bool) -> bool:
        n = len(g.dedicated)
        if not n and not emulator:
            return True
        free = [t for t in self.cell_threads(cell) if t in self.free]
        policy = self.req.thread_policy
        mine = set(self.cell_threads(cell))
        tpc = max((len(set(self.core(t)) & mine) for t in mine if t in self.ded), default=1)
        for combo in itertools.permutations(free, n):
            rest = [t for t in free if t not in combo]
            if policy == "isolate":
                cores = [self.core(t) for t in combo]
                if len(set(cores)) != n or not all(set(c) <= self.free for c in cores):
                    continue
                blocked = {x for c in cores for x in c}
                rest = [t for t in rest if t not in blocked]
            if policy == "require":
                # docs/fit.md, Threads: the cell's dedicated vCPUs in runs of T (the last
                # one shorter when their count is no multiple of T), each run on one core
                # whose T threads are all free
                if tpc <= 1:
                    return False
                runs = [combo[i:i + tpc] for i in range(0, n, tpc)]
                if any(len({self.core(t) for t in run}) != 1
                       or len(self.core(run[0])) != tpc
                       or not set(self.core(run[0])) <= self.free for run in runs):
                    continue
            if emulator and not rest:
                continue
            return True
        return False

    def pci_ok(self, chosen: list[int] | None) -> bool:
        for item in self.req.pci:
            devs = [(a, n) for a, n in self.pci if a not in self.pci_used]
            if chosen is None or self.req.pci_policy == "preferred":
                allowed = devs
            else:
                local = [d for d in devs if d[1] in chosen]
                allowed = list(local)
                if self.req.pci_policy == "legacy":
                    allowed += [d for d in devs if d[1] < 0]
                if self.req.pci_policy == "socket":
                    sockets = {self.topo.cpu(self.cell_threads(c)[0]).socket for c in chosen}
                    allowed += [d for d in devs if d[1] >= 0 and d[1] not in chosen and
                                self.topo.cpu(self.cell_threads(d[1])[0]).socket in sockets]
            if len(allowed) < item.count:
                return False
        return True

    def exists(self) -> bool:
        req = self.req
        if not req.numa:
            cap = len(self.shared)
            used = sum(c["shared_vcpus"] for c in self.ucell.values())
            total = sum(self.small(c)[0] for c in self.ucell)
            mused = sum(self.small(c)[1] for c in self.ucell)
            mem = req.memory_mib * 1024
            return (cap > 0 and req.vcpus <= cap and used + req.vcpus <= int(cap * self.cpu_ratio)
                    and mem <= total and mused + mem <= int(total * self.ram_ratio)
                    and self.pci_ok(None))
        cells = [c.id for c in self.topo.cells]
        ok: dict[tuple[int, int], bool] = {}
        for gi, g in enumerate(req.cells):
            for c in cells:
                emu = gi == 0 and req.emulator_policy == "isolate"
                ok[(gi, c)] = (self.memory_ok(g, c) and self.shared_ok(g, c)
                               and self.threads_ok(g, c, emu))
        for perm in itertools.permutations(cells, len(req.cells)):
            if all(ok[(gi, c)] for gi, c in enumerate(perm)) and self.pci_ok(list(perm)):
                return True
        return False


# ----------------------------------------------------------------------------- properties


def check_invariants(snap: dict[str, Any], req: Any, answer: dict[str, Any]) -> None:
    topo = topology_from_dict(snap["topology"])
    cfg = snap["config"]
    taken = {t["cpu"] for t in snap["usage"]["threads"] if t["guest"] is not None}
    free = set(cfg["dedicated_cpus"]) - taken
    p = answer["placement"]
    cells = p["cells"]
    assert len({c["host_cell"] for c in cells}) == len(cells)
    used: list[int] = []
    seen_vcpus: list[int] = []
    for c in cells:
        host_cpus = set(topo.cell(c["host_cell"]).cpus)
        for v, cpu in c["pinning"].items():
            assert cpu in free and cpu in host_cpus
            used.append(cpu)
            seen_vcpus.append(int(v))
        for r in c["reserved_cpus"]:
            assert r in free and r in host_cpus
        used.extend(c["reserved_cpus"])
        seen_vcpus.extend(c["shared_vcpus"])
        assert set(c["shared_cpus"]) <= set(cfg["shared_cpus"]) & host_cpus
        g = req.cells[c["guest_cell"]]
        assert sorted(int(v) for v in c["pinning"]) == list(g.dedicated)
        uc = next(u for u in snap["usage"]["cells"] if u["id"] == c["host_cell"])
        mem = c["memory_mib"] * 1024
        if c["page_size_kib"] == 4:
            assert mem <= uc["memory_free_kib"] or (not req.pinned and req.page_size is None)
        else:
            pool = next(h for h in uc["hugepages"] if h["size_kib"] == c["page_size_kib"])
            assert mem % c["page_size_kib"] == 0 and mem // c["page_size_kib"] <= pool["free"]
        core_of = {cpu: tuple(sorted(topo.cpu(cpu).siblings)) for cpu in host_cpus}
        if req.thread_policy == "isolate":
            pinned = list(c["pinning"].values())
            assert len({core_of[x] for x in pinned}) == len(pinned)
            for x in pinned:
                assert set(core_of[x]) <= set(pinned) | set(c["reserved_cpus"])
        if req.thread_policy == "require":
            t = p["topology"]["threads"]
            for v, cpu in c["pinning"].items():
                mate = int(v) - int(v) % t
                assert core_of[cpu] == core_of[c["pinning"][str(mate)]]
    if req.emulator_policy == "isolate":
        (emu,) = p["emulator_cpus"]
        assert emu in free and emu not in used
        assert emu in topo.cell(cells[0]["host_cell"]).cpus
        used.append(emu)
    assert len(used) == len(set(used)), "a thread used twice"
    if req.numa:
        assert sorted(seen_vcpus) == list(range(req.vcpus))
    topo_d = p["topology"]
    assert topo_d["sockets"] * topo_d["cores"] * topo_d["threads"] == req.vcpus
    used_pci = {u["address"] for u in snap["usage"].get("pci", []) if u.get("guest")}
    host_cells = {c["host_cell"] for c in cells}
    by_addr = {d.address: d for d in topo.pci}
    want = {(i.vendor, i.device): i.count for i in req.pci}
    got: dict[tuple[str, str], int] = {}
    for d in p["pci"]:
        dev = by_addr[d["address"]]
        assert d["address"] not in used_pci
        key = (dev.vendor.removeprefix("0x"), dev.device.removeprefix("0x"))
        got[key] = got.get(key, 0) + 1
        if req.numa and req.pci_policy == "required":
            assert dev.numa_node in host_cells
        if req.numa and req.pci_policy == "legacy":
            assert dev.numa_node in host_cells or dev.numa_node < 0
    assert got == want
    assert len({d["address"] for d in p["pci"]}) == len(p["pci"])


@SETTINGS
@given(hosts(), requests(), st.sampled_from(["spread", "pack"]))
def test_invariants_and_brute_force(snap, request, strategy):
    req = _parse(request)
    answer = fit(snap, request, strategy=strategy)
    expected = Brute(snap, req).exists()
    assert answer["fits"] == expected, answer["reasons"]
    event(f"fits={expected} numa={req.numa} policy={req.thread_policy}")
    if answer["fits"]:
        check_invariants(snap, req, answer)
    else:
        assert answer["reasons"] and answer["placement"] is None


@settings(max_examples=40, deadline=None)
@given(hosts(), requests())
def test_fit_is_deterministic_and_pure(snap, request):
    import copy
    import json

    _parse(request)
    before = copy.deepcopy(snap)
    a = json.dumps(fit(snap, request), sort_keys=True)
    b = json.dumps(fit(snap, request), sort_keys=True)
    assert a == b and snap == before


@st.composite
def cat_hosts(draw: Any) -> dict[str, Any]:
    cells = draw(st.integers(1, 2))
    l3 = draw(st.sampled_from([(1, 1), (2, 1), (1, 2)]))  # (per cell, cells per L3)
    if l3[1] > cells:
        l3 = (1, 1)
    ways = draw(st.sampled_from([8, 12]))
    n_l3 = cells * l3[0] // l3[1]
    masks = {i: draw(st.integers(1, (1 << ways) - 1)) for i in range(n_l3)}
    # default group masks are contiguous runs from bit 0 (as after a carve)
    masks = {i: (1 << (m.bit_length() % ways or 1)) - 1 for i, m in masks.items()}
    topo = make_topology(cells, 4, draw(st.integers(1, 2)), l3_per_cell=l3[0],
                         l3_cells=l3[1], resctrl_ways=ways, default_mask=masks)
    taken = {c.id: "g" for c in topo.cpus if draw(st.integers(0, 4)) == 0}
    return make_snapshot(topo, taken=taken)


@st.composite
def cat_requests(draw: Any) -> dict[str, Any]:
    nodes = draw(st.sampled_from([1, 2]))
    vcpus = nodes * draw(st.integers(1, 3))
    groups = []
    start = 0
    while start < vcpus and draw(st.booleans()):
        end = draw(st.integers(start, vcpus - 1))
        groups.append(f"vcpus={start}-{end}:type=both,size={draw(st.integers(1, 4))}mb")
        start = end + 1
    if not groups:
        groups = [f"vcpus=0:type=both,size={draw(st.integers(1, 3))}mb"]
    return {"vcpus": vcpus, "memory_mb": 256 * nodes, "extra_specs": {
        "hw:cpu_policy": "dedicated", "hw:numa_nodes": str(nodes),
        "hw:cache_reservation": ";".join(groups)}}


@settings(max_examples=int(os.environ.get("FIT_CACHE_EXAMPLES", 60)), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(cat_hosts(), cat_requests())
def test_cache_reservations_never_collide(snap, request):
    from hostagent.resctrl_cbm import is_contiguous, parse_mask

    req = _parse(request)
    answer = fit(snap, request)
    event(f"fits={answer['fits']}")
    if not answer["fits"]:
        assert any(r["resource"] in ("cache_ways", "dedicated_threads", "cells")
                   for r in answer["reasons"])
        return
    check_invariants(snap, req, answer)
    topo = topology_from_dict(snap["topology"])
    free = {(w["resource"], w["id"]): parse_mask(w["free_mask"]) for w in snap["usage"]["caches"]}
    pins = {int(v): c for cell in answer["placement"]["cells"] for v, c in cell["pinning"].items()}
    seen: dict[tuple[str, int], int] = {}
    for e in answer["placement"]["cache"]:
        mask = parse_mask(e["mask"])
        key = (e["resource"], e["id"])
        assert mask and is_contiguous(mask) and mask & ~free[key] == 0
        assert not seen.get(key, 0) & mask, "two groups share a way"
        seen[key] = seen.get(key, 0) | mask
        serving = {c.id for c in topo.caches if c.level == 3 for t in e["vcpus"]
                   if pins[t] in c.cpus}
        assert e["id"] in serving
    for g in req.cache:  # every group got a mask on every cache serving its threads
        ids = {c.id for c in topo.caches if c.level == 3 for v in g.vcpus
               if pins[v] in c.cpus}
        assert {e["id"] for e in answer["placement"]["cache"]
                if tuple(e["vcpus"]) == g.vcpus} == ids
