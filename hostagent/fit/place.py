"""The placement search: guest cells onto distinct host cells (pure, deterministic).

1. Every (guest cell, host cell) pair is checked at most once by ``fit_cell`` (plus the
   cache pre-check); the result is memoized for this call only, keyed on the guest cell's
   *index* and the host cell's *id*, neither of which the search ever changes (Nova keyed
   its cache on an id the fit overwrote, which made it wrong on 3+ cells). Pairs are
   checked as the search first descends (``first_descent``, ``run_one_cell``); only when
   that path does not end in a placement are all of them checked for the matching.
2. Host cells are ordered by the strategy: devices first (cells with the requested PCI
   devices first; for guests without PCI requests, cells with fewer assignable devices
   first), then free CPU (dedicated threads for pinned guests, shared headroom for shared
   ones), then free memory — most first for ``spread``, least first for ``pack`` — then
   cell id.
3. Depth-first search over guest cells in index order, host cells in that order. After
   every step the remaining guest cells must still have a perfect matching onto unused
   feasible host cells (augmenting paths), so the search never walks into a dead end that
   per-cell feasibility can see; the 16-cell host / 8-cell guest no-fit case is answered
   by one matching. Checks that depend on the whole choice (PCI affinity, cache ways on a
   cache shared by several cells) run at the leaf, with a bound on PCI devices pruning
   early. A step budget (``STEP_BUDGET``, ``[fit] search_steps``) bounds the work after
   the per-pair checks: one step per guest cell tried on a host cell, 1 + one per PCI
   request + one per cache reservation group for each complete placement checked, one
   per page size tried when mixing page sizes. It counts work, not time, so the answer
   never depends on the machine's speed; when it runs out the answer is "does not fit"
   with a ``search`` reason naming the budget.
4. NUMA distance: guest cell 0 tries the host cells in that order; every later guest
   cell tries the unused host cells nearest to the cells already chosen first (the sum
   of the kernel's distances, ``topology.cells[].distances``), the order above breaking
   ties — so a 2-cell guest on a 2-socket host of 4 cells gets two cells of one socket
   when one socket can take it.
5. The first complete placement in that order is the answer: spread/pack and ties are
   decided by the order alone, so the same snapshot and request always give the same answer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from hostagent.fit import cache as cache_mod
from hostagent.fit import pci as pci_mod
from hostagent.fit.cellfit import CellFit, Reason, fit_cell, page_size_options
from hostagent.fit.host import HostCell, HostView, PciDev
from hostagent.fit.request import FitRequest
from hostagent.fit_limits import STEP_BUDGET

STRATEGIES = ("spread", "pack")


@dataclass
class Outcome:
    fits: bool
    cells: list[CellFit] = field(default_factory=list)
    pci: list[PciDev] = field(default_factory=list)
    cache: list[dict[str, Any]] = field(default_factory=list)
    reasons: list[Reason] = field(default_factory=list)


def order_cells(view: HostView, req: FitRequest, strategy: str) -> list[HostCell]:
    """Host cells in the order the search tries them (documented in the module doc)."""
    sign = -1 if strategy == "spread" else 1
    if req.pci:
        counts = [pci_mod.per_cell_counts(view, item) for item in req.pci]
        pci_key = {c.id: -sum(cnt[c.id] for cnt in counts) for c in view.cells}
    else:
        assignable = pci_mod.assignable_per_cell(view)
        pci_key = {c.id: assignable[c.id] for c in view.cells}

    def cpu(c: HostCell) -> float:
        if req.pinned:
            return len(c.free)
        return len(c.shared) * view.cpu_ratio - c.shared_used

    def mem(c: HostCell) -> int:
        if isinstance(req.page_size, int) and req.page_size in c.pages:
            return c.pages[req.page_size] * req.page_size
        if req.page_size in ("large", "any"):
            return sum(n * s for s, n in c.pages.items())
        return c.small_free_kib

    return sorted(view.cells, key=lambda c: (pci_key[c.id], sign * cpu(c), sign * mem(c), c.id))


class _Search:
    def __init__(self, view: HostView, req: FitRequest, order: list[HostCell],
                 budget: int = STEP_BUDGET) -> None:
        self.view, self.req, self.order = view, req, order
        self.k = len(req.cells)
        self.memo: dict[tuple[int, int], CellFit | list[Reason]] = {}
        self.budget = budget
        self.steps = 0
        self.leaf_reasons: list[Reason] = []
        self.exhausted = False

    def spend(self, steps: int = 1) -> bool:
        """Count ``steps`` of work; False (and ``exhausted``) once over the budget."""
        self.steps += steps
        if self.steps > self.budget:
            self.exhausted = True
        return not self.exhausted

    def cell(self, gi: int, host: HostCell) -> CellFit | list[Reason]:
        key = (gi, host.id)
        if key not in self.memo:
            self.memo[key] = self._fit(gi, host)
        return self.memo[key]

    def _fit(self, gi: int, host: HostCell) -> CellFit | list[Reason]:
        req, view = self.req, self.view
        g = req.cells[gi]
        emu = gi == 0 and req.emulator_policy == "isolate"
        got = fit_cell(req, g, host, emulator=emu, cpu_ratio=view.cpu_ratio,
                       ram_ratio=view.ram_ratio)
        if not isinstance(got, CellFit) or not req.cache:
            return got
        problems = cache_mod.cell_check(view, req, got)
        if not problems:
            return got
        for cores in cache_mod.core_orders(view, req, host):
            alt = fit_cell(req, g, host, emulator=emu, cpu_ratio=view.cpu_ratio,
                           ram_ratio=view.ram_ratio, cores=cores)
            if isinstance(alt, CellFit) and not cache_mod.cell_check(view, req, alt):
                return alt
        return [Reason(host.id, gi, "cache_ways", p) for p in problems]

    def near(self, hosts: Sequence[HostCell], chosen: Sequence[CellFit]) -> Sequence[HostCell]:
        """``hosts`` nearest first to the host cells of ``chosen`` (sum of distances; a
        stable sort, so the strategy order breaks ties)."""
        dist = self.view.distances
        if not chosen or not dist:
            return hosts
        ids = [c.host_cell for c in chosen]
        return sorted(hosts, key=lambda h: sum(dist.get((c, h.id), 0) for c in ids))

    def feasible(self, gi: int) -> list[HostCell]:
        return [h for h in self.order if isinstance(self.cell(gi, h), CellFit)]

    # -- matching: can guest cells ``gis`` go onto distinct unused feasible host cells?
    def matching(self, gis: Sequence[int], used: set[int]) -> tuple[bool, list[int]]:
        adj = {gi: [h.id for h in self.adj[gi] if h.id not in used] for gi in gis}
        owner: dict[int, int] = {}

        def augment(gi: int, seen: set[int]) -> bool:
            for h in adj[gi]:
                if h in seen:
                    continue
                seen.add(h)
                if h not in owner or augment(owner[h], seen):
                    owner[h] = gi
                    return True
            return False

        for gi in gis:
            if not augment(gi, set()):
                # the guest cells reachable by alternating paths from gi violate Hall
                stuck = {gi} | {owner[h] for h in self._reach(gi, adj, owner)}
                return False, sorted(stuck)
        return True, []

    @staticmethod
    def _reach(gi: int, adj: dict[int, list[int]], owner: dict[int, int]) -> set[int]:
        seen_h: set[int] = set()
        stack = [gi]
        seen_g = {gi}
        while stack:
            cur = stack.pop()
            for h in adj[cur]:
                if h in seen_h:
                    continue
                seen_h.add(h)
                nxt = owner.get(h)
                if nxt is not None and nxt not in seen_g:
                    seen_g.add(nxt)
                    stack.append(nxt)
        return seen_h

    def pci_bound_ok(self, gi_next: int, used: set[int]) -> bool:
        req, view = self.req, self.view
        if not req.pci or req.pci_policy != "required":
            return True
        remaining = range(gi_next, self.k)
        reach = {h.id for gi in remaining for h in self.adj[gi] if h.id not in used}
        for item in req.pci:
            counts = pci_mod.per_cell_counts(view, item)
            have = sum(counts[h] for h in used)
            best = sorted((counts[h] for h in reach), reverse=True)[: self.k - gi_next]
            if have + sum(best) < item.count:
                return False
        return True

    def run_one_cell(self) -> Outcome | None:
        """``run`` for a guest of one cell: host cells are checked in order only until
        one takes it (no matching needed), as the search would visit them."""
        self.stuck = []
        for h in self.order:
            cf = self.cell(0, h)
            if not isinstance(cf, CellFit):
                continue
            if not self.spend():
                break
            if self.pci_bound_ok(1, {h.id}):
                out = self.leaf([cf])
                if out is not None:
                    return out
            if self.exhausted:
                break
        self.adj = {0: self.feasible(0)}  # for the reasons
        return None

    def first_descent(self) -> Outcome | None:
        """The search's first path, found without checking every pair first: each guest
        cell on the first unused host cell (in order) that takes it. When that reaches a
        placement that passes the whole-placement checks, it is the one the full search
        returns first (every choice on the way has a completion, so no matching prunes
        it), for the same steps; otherwise ``None`` and the full search runs."""
        if self.req.pci and self.req.pci_policy == "required":
            return None  # the device bound prunes with every pair's feasibility
        used: set[int] = set()
        chosen: list[CellFit] = []
        for gi in range(self.k):
            for h in self.near(self.order, chosen):
                if h.id in used:
                    continue
                cf = self.cell(gi, h)
                if isinstance(cf, CellFit):
                    used.add(h.id)
                    chosen.append(cf)
                    break
            else:
                return None
        self.spend(self.k)
        out = self.leaf(chosen)
        if out is None:  # the full search starts again, counting from zero
            self.steps, self.exhausted, self.leaf_reasons = 0, False, []
        return out

    def run(self) -> Outcome | None:
        if self.k == 1:
            return self.run_one_cell()
        out = self.first_descent()
        if out is not None:
            self.stuck = []
            return out
        self.adj = {gi: self.feasible(gi) for gi in range(self.k)}
        ok, stuck = self.matching(range(self.k), set())
        if not ok:
            self.stuck = stuck
            return None
        self.stuck = []
        used: set[int] = set()
        chosen: list[CellFit] = []

        def rec(gi: int) -> Outcome | None:
            if gi == self.k:
                return self.leaf(chosen)
            for h in self.near(self.adj[gi], chosen):
                if h.id in used:
                    continue
                if not self.spend():
                    return None
                used.add(h.id)
                cf = self.cell(gi, h)
                assert isinstance(cf, CellFit)
                chosen.append(cf)
                if self.matching(range(gi + 1, self.k), used)[0] and \
                        self.pci_bound_ok(gi + 1, used):
                    out = rec(gi + 1)
                    if out is not None:
                        return out
                chosen.pop()
                used.discard(h.id)
                if self.exhausted:
                    return None
            return None

        return rec(0)

    def leaf(self, chosen: list[CellFit]) -> Outcome | None:
        req, view = self.req, self.view
        if not self.spend(1 + len(req.pci) + len(req.cache)):
            return None
        devs: list[PciDev] = []
        if req.pci:
            devs, problems = pci_mod.select(view, req.pci, req.pci_policy,
                                            [c.host_cell for c in chosen])
            if problems:
                self.leaf_reasons = [Reason(None, None, "pci_devices", p) for p in problems]
                return None
        cells = list(chosen)
        problems = floating_page_problems(view, _pages_taken(req, cells))
        if problems and req.page_size in ("large", "any"):
            other = other_page_sizes(view, req, cells, spend=self.spend)
            if self.exhausted:
                return None
            if other is not None:
                cells, problems = other, []
        if problems:
            self.leaf_reasons = [Reason(None, None, "hugepages", p) for p in problems]
            return None
        entries: list[dict[str, Any]] = []
        if req.cache:
            entries, problems = cache_mod.plan_all(view, req, cells)
            if problems:
                self.leaf_reasons = [Reason(None, None, "cache_ways", p) for p in problems]
                return None
        return Outcome(True, cells=cells, pci=devs, cache=entries)


def place(view: HostView, req: FitRequest, strategy: str = "spread", *,
          search_steps: int = STEP_BUDGET) -> Outcome:
    """Find the placement of a NUMA guest (``req.numa``), or the reasons why none exists,
    in at most ``search_steps`` steps of search."""
    order = order_cells(view, req, strategy)
    k = len(req.cells)
    pre = _host_wide_checks(view, req)
    if pre:
        return Outcome(False, reasons=pre)
    if k > len(view.cells):
        return Outcome(False, reasons=[Reason(
            None, None, "cells",
            f"the guest has {k} NUMA cells, the host only {len(view.cells)}")])
    search = _Search(view, req, order, search_steps)
    out = search.run()
    if out is not None:
        return out
    reasons: list[Reason] = []
    for host in sorted(view.cells, key=lambda c: c.id):
        for gi in range(k):
            got = search.cell(gi, host)
            if not isinstance(got, CellFit):
                reasons.extend(got)
    if search.stuck:
        fits_on = sorted({h.id for gi in search.stuck for h in search.adj[gi]})
        if all(search.adj[gi] for gi in search.stuck):
            reasons.append(Reason(
                None, None, "cells",
                f"guest cells {search.stuck} fit only on host cells {fits_on}: not enough "
                "distinct host cells for all of them"))
    reasons.extend(search.leaf_reasons)
    if req.pci and not search.leaf_reasons and not search.stuck and all(search.adj.values()):
        reasons.extend(_pci_summary(view, req))
    if search.exhausted:
        reasons.append(Reason(None, None, "search",
                              f"search budget exhausted: {search.budget} steps ([fit] "
                              "search_steps) without a placement"))
    if not reasons:
        reasons.append(Reason(None, None, "cells", "no combination of host cells fits"))
    return Outcome(False, reasons=reasons)


def _pci_summary(view: HostView, req: FitRequest) -> list[Reason]:
    out = []
    for item in req.pci:
        counts = pci_mod.per_cell_counts(view, item)
        unknown = sum(1 for d in pci_mod.matching(view, item) if d.numa_node < 0)
        per = ", ".join(f"cell {c}: {n}" for c, n in sorted(counts.items()))
        out.append(Reason(None, None, "pci_devices",
                          f"needs {item.count} free {item.vendor}:{item.device} devices near "
                          f"the guest's host cells (policy {req.pci_policy}); free per cell: "
                          f"{per}; no NUMA node: {unknown}"))
    return out


def floating_page_problems(view: HostView, taken: Mapping[int, int]) -> list[str]:
    """Hugepages of guests bound to no cell come from cells the snapshot cannot name, so
    per size the pages a placement takes (``taken``: size KiB -> pages) must fit in what
    all cells together have left after them (a necessary condition: the per-cell counts
    cannot see them)."""
    out = []
    for size, held in sorted(view.floating_pages.items()):
        need = taken.get(size, 0)
        left = view.pages_left.get(size, 0)
        if held and need > left:
            out.append(f"needs {need} {size} KiB pages; all cells together have {left} left "
                       f"after the {held} held by guests bound to no cell")
    return out


def _pages_taken(req: FitRequest, chosen: Sequence[CellFit]) -> dict[int, int]:
    """Hugepages per size the placement ``chosen`` takes."""
    out: dict[int, int] = {}
    for cf in chosen:
        size = cf.page_size_kib
        out[size] = out.get(size, 0) + req.cells[cf.guest_cell].memory_kib // size
    return out


def other_page_sizes(
    view: HostView, req: FitRequest, chosen: Sequence[CellFit], *,
    spend: Callable[[], bool] = lambda: True,
) -> list[CellFit] | None:
    """``chosen`` with other page sizes (a ``large`` or ``any`` request) whose pages fit
    what all cells have left after the guests bound to no cell, or ``None`` if no mix does
    (or ``spend()``, called once per size tried, returns False: the budget ran out).

    Each guest cell keeps to the sizes that fit its host cell (``page_size_options``); the
    mixes are tried in the cells' preference order with the last guest cell changing
    first, so earlier guest cells keep their preferred size longest. Pinning does not
    depend on the page size, so only ``page_size_kib`` changes.
    """
    limit = {s: view.pages_left.get(s, 0) for s, held in view.floating_pages.items() if held}
    by_id = {c.id: c for c in view.cells}
    guest = [req.cells[cf.guest_cell] for cf in chosen]
    options = [page_size_options(req, g, by_id[cf.host_cell]) for g, cf in zip(
        guest, chosen, strict=True)]
    sizes: list[int] = []
    taken = dict.fromkeys(limit, 0)
    failed: set[tuple[int, tuple[int, ...]]] = set()  # (cell index, pages taken per size)

    def choose(i: int) -> bool:
        if i == len(chosen):
            return True
        state = (i, tuple(taken.values()))
        if state in failed:
            return False
        for size in options[i]:
            if not spend():
                return False
            n = guest[i].memory_kib // size
            if size in limit and taken[size] + n > limit[size]:
                continue
            if size in limit:
                taken[size] += n
            sizes.append(size)
            if choose(i + 1):
                return True
            sizes.pop()
            if size in limit:
                taken[size] -= n
        failed.add(state)
        return False

    if not choose(0):
        return None
    return [replace(cf, page_size_kib=size) for cf, size in zip(chosen, sizes, strict=True)]


def _host_wide_checks(view: HostView, req: FitRequest) -> list[Reason]:
    out: list[Reason] = []
    size = req.page_size
    if isinstance(size, int) and view.floating_pages.get(size):
        # the whole guest takes pages of this size: check once, before any search
        need = {size: sum(g.memory_kib // size for g in req.cells)}
        out.extend(Reason(None, None, "hugepages", p)
                   for p in floating_page_problems(view, need))
    if req.emulator_policy == "share" and req.pinned and not view.shared_cpus:
        non_rt = set(req.dedicated_vcpus) - set(req.realtime)
        if not non_rt and not any(c.shared for c in req.cells):
            out.append(Reason(None, None, "shared_threads",
                              "emulator threads policy share needs shared threads (every "
                              "vCPU is realtime) and the host has none"))
    if req.pci:
        for item in req.pci:
            total = len(pci_mod.matching(view, item))
            if total < item.count:
                out.append(Reason(None, None, "pci_devices",
                                  f"needs {item.count} free {item.vendor}:{item.device} "
                                  f"devices, the host has {total}"))
    return out


def place_floating(view: HostView, req: FitRequest) -> Outcome:
    """A guest without NUMA constraints: host-wide shared threads and memory."""
    reasons: list[Reason] = []
    cap = len(view.shared_cpus)
    used = sum(c.shared_used for c in view.cells) + view.floating_used
    if cap == 0:
        reasons.append(Reason(None, None, "shared_threads", "the host has no shared threads"))
    elif req.vcpus > cap:
        reasons.append(Reason(None, None, "shared_threads",
                              f"{req.vcpus} vCPUs exceed the host's {cap} shared threads"))
    elif used + req.vcpus > int(cap * view.cpu_ratio):
        left = max(0, int(cap * view.cpu_ratio) - used)
        reasons.append(Reason(None, None, "shared_threads",
                              f"{req.vcpus} shared vCPUs, {left} left "
                              f"(cpu_allocation_ratio {view.cpu_ratio:g})"))
    total = sum(c.small_total_kib for c in view.cells)
    mem_used = sum(c.small_used_kib for c in view.cells) + view.floating_memory_kib
    mem = req.memory_mib * 1024
    if mem > total:
        reasons.append(Reason(None, None, "memory",
                              f"needs {req.memory_mib} MiB, the host has {total // 1024} MiB "
                              "of small-page memory"))
    elif mem_used + mem > int(total * view.ram_ratio):
        left = max(0, int(total * view.ram_ratio) - mem_used) // 1024
        reasons.append(Reason(None, None, "memory",
                              f"needs {req.memory_mib} MiB, {left} MiB left under "
                              f"ram_allocation_ratio {view.ram_ratio:g}"))
    devs: list[PciDev] = []
    if req.pci:
        devs, problems = pci_mod.select(view, req.pci, req.pci_policy, None)
        reasons.extend(Reason(None, None, "pci_devices", p) for p in problems)
    if reasons:
        return Outcome(False, reasons=reasons)
    return Outcome(True, pci=devs)
