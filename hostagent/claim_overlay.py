"""Claims as an overlay on the guests' usage: fast claim decisions (docs/claims.md §3.1).

A claim decision needs what is free *now*, guests and outstanding claims counted. Folding
the whole usage for that (``UsageTracker.usage``) after every grant or release, and
reading a snapshot of it into the fit's ``HostView``, is most of a decision's cost on a
big host. Instead:

- ``GuestBase``: the guests alone — their fold, its ``HostView`` and what ``judge``
  reads of it — made once per ``UsageTracker.generation`` (the host or a guest changed);
- ``ClaimSums``: what the outstanding claims hold, added up, kept up to date as claims
  are held and dropped (one claim's work each, never a pass over all claims);
- ``fit_view`` = the base view with the sums taken (``hostagent.fit.host.with_held``),
  and ``is_free`` = ``judge``'s answer "nothing is taken" read from the same numbers.

Both give exactly what the slow path gives — ``host_view`` of the snapshot of
``tracker.usage()``, and ``claims.judge`` returning no reason
(tests/test_claims_overlay.py compares them over many random guests, claims and
requests). When ``is_free`` says no, ``claims.judge`` folds the usage and names what is
taken and who holds it: that path is the rare one.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from hostagent.fit.host import Held, HostView, host_view, with_held
from hostagent.resctrl_cbm import cache_ways, parse_mask
from hostagent.tracker import Context, Contribution, fold


@dataclass(frozen=True)
class GuestBase:
    """The guests alone on one host context, as a claim decision reads them."""

    ctx: Context
    generation: int
    usage: Mapping[str, Any]  # fold of the guests, no claims
    view: HostView  # the fit's view of it
    free_threads: frozenset[int]  # union of usage.cells[].free_cpus
    cells: Mapping[int, Mapping[str, Any]]  # usage.cells by id
    pci: frozenset[str]  # PCI functions a guest holds
    ways: Mapping[tuple[str, int], tuple[int, str]]  # (resource, id) -> (free mask, cbm)
    owners: Mapping[str, str]  # resctrl group -> the guest holding it
    shared_vcpus: int  # all cells' shared vCPUs
    memory_used_kib: int  # all cells' ordinary memory held
    memory_limit_kib: int  # all cells' ordinary memory limit


def guest_base(ctx: Context, generation: int, contributions: Iterable[Contribution],
               topology_doc: Mapping[str, Any]) -> GuestBase:
    """Fold the guests' ``contributions`` alone and read the result once."""
    usage = fold(ctx, contributions)
    view = host_view({"topology": topology_doc, "config": ctx.resources, "usage": usage})
    cells = {c["id"]: c for c in usage["cells"]}
    owners = {a["group"]: a["guest"] for cache in usage["caches"]
              for a in cache["allocations"] if a.get("guest") is not None}
    return GuestBase(
        ctx=ctx, generation=generation, usage=usage, view=view,
        free_threads=frozenset(t for c in usage["cells"] for t in c["free_cpus"]),
        cells=cells,
        pci=frozenset(p["address"] for p in usage["pci"] if p["guest"]),
        ways={(e["resource"], e["id"]): (parse_mask(e["free_mask"]), e["cbm_mask"])
              for e in usage["caches"]},
        owners=owners,
        shared_vcpus=sum(c["shared_vcpus"] for c in usage["cells"]),
        memory_used_kib=sum(c["memory_used_kib"] for c in usage["cells"]),
        memory_limit_kib=sum(c["memory_limit_kib"] for c in usage["cells"]),
    )


def _threads(c: Contribution) -> set[int]:
    """The threads a claim runs on or keeps idle (what the fold marks with its id)."""
    return {cl.cpu for cl in c.claims} | set(c.idle)


class ClaimSums:
    """What the outstanding claims hold, added up (``add`` / ``remove`` one claim)."""

    def __init__(self) -> None:
        self.threads: Counter[int] = Counter()
        self.shared_vcpus: Counter[int] = Counter()
        self.memory: Counter[int] = Counter()
        self.pages: Counter[tuple[int, int]] = Counter()
        self.floating_vcpus = 0
        self.floating_memory = 0
        self.floating_pages: Counter[int] = Counter()
        self.pci: Counter[str] = Counter()
        self.with_ways = 0  # claims holding cache ways
        self._held: Held | None = None  # made when first asked after a change
        self._held_base: GuestBase | None = None  # the base its caches were made on

    def add(self, c: Contribution, sign: int = 1) -> None:
        """Count claim ``c`` in (``sign`` -1: out)."""
        for cpu in _threads(c):
            self.threads[cpu] += sign
        for cell, n in c.shared_vcpus:
            self.shared_vcpus[cell] += sign * n
        for cell, kib in c.memory:
            self.memory[cell] += sign * kib
        for cell, size, n in c.pages:
            self.pages[(cell, size)] += sign * n
        self.floating_vcpus += sign * c.floating_vcpus
        self.floating_memory += sign * c.floating_memory_kib
        for size, n in c.floating_pages:
            self.floating_pages[size] += sign * n
        for addr in c.pci:
            self.pci[addr] += sign
        if c.cache_ways:
            self.with_ways += sign
        self._held = None

    def remove(self, c: Contribution) -> None:
        self.add(c, -1)

    def held(self, base: GuestBase, claims: Iterable[Contribution]) -> Held:
        """The sums as ``with_held`` takes them; ``claims`` (oldest first, as the
        tracker folds them) are read only when some hold cache ways."""
        if self._held is not None and (self.with_ways == 0 or self._held_base is base):
            return self._held
        caches = None
        if self.with_ways:
            claimed = tuple((c.uuid, *w) for c in claims if c.entry is not None
                            for w in c.cache_ways)
            caches = tuple(cache_ways(base.ctx.topo, base.owners, claimed))
        self._held = Held(
            threads=frozenset(t for t, n in self.threads.items() if n > 0),
            shared_vcpus={k: n for k, n in self.shared_vcpus.items() if n},
            memory_kib={k: n for k, n in self.memory.items() if n},
            pages={k: n for k, n in self.pages.items() if n},
            floating_vcpus=self.floating_vcpus,
            floating_memory_kib=self.floating_memory,
            floating_pages={k: n for k, n in self.floating_pages.items() if n},
            pci=frozenset(a for a, n in self.pci.items() if n > 0),
            caches=caches)
        self._held_base = base
        return self._held

    def fit_view(self, base: GuestBase, claims: Iterable[Contribution]) -> HostView:
        """The fit's view of the guests and these claims."""
        return with_held(base.view, self.held(base, claims))

    def is_free(self, base: GuestBase, claims: Iterable[Contribution],
                c: Contribution) -> bool:
        """True when ``claims.judge`` finds no reason against ``c`` (nothing it holds is
        taken by a guest or one of these claims, no limit passed, no problem of its own);
        False when it would (then ask ``judge`` for the reasons)."""
        if c.conflicts or c.floating_pages:
            return False
        if any(cpu not in base.free_threads or self.threads[cpu] > 0 for cpu in _threads(c)):
            return False
        if any(addr in base.pci or self.pci[addr] > 0 for addr in c.pci):
            return False
        return (self._memory_free(base, c) and self._capacity_left(base, c)
                and self._ways_free(base, claims, c))

    def _memory_free(self, base: GuestBase, c: Contribution) -> bool:
        """Hugepages and ordinary memory per cell (``claims._memory_taken``)."""
        for cid, size, n in c.pages:
            cell = base.cells.get(cid)
            have = 0
            if cell is not None:
                pool = next((h for h in cell["hugepages"] if h["size_kib"] == size), None)
                have = max(0, (pool["free"] if pool else 0) - self.pages[(cid, size)])
            if n > have:
                return False
        for cid, kib in c.memory:
            cell = base.cells.get(cid)
            have = 0 if cell is None else max(
                0, cell["memory_limit_kib"] - cell["memory_used_kib"] - self.memory[cid])
            if kib > have:
                return False
        return True

    def _capacity_left(self, base: GuestBase, c: Contribution) -> bool:
        """Shared vCPUs per cell and host-wide, floating memory (``claims._capacity``)."""
        for cid, n in c.shared_vcpus:
            cell = base.cells.get(cid)
            if cell is not None and (cell["shared_vcpus"] + self.shared_vcpus[cid] + n
                                     > cell["shared_vcpus_limit"]):
                return False
        ctx, usage = base.ctx, base.usage
        if c.floating_vcpus:
            cap = int(len(ctx.shared & ctx.online) * ctx.cpu_ratio)
            used = (base.shared_vcpus + sum(self.shared_vcpus.values())
                    + usage["floating_vcpus"] + self.floating_vcpus)
            if used + c.floating_vcpus > cap:
                return False
        if c.floating_memory_kib:
            used = (base.memory_used_kib + sum(self.memory.values())
                    + usage["floating_memory_kib"] + self.floating_memory)
            if used + c.floating_memory_kib > base.memory_limit_kib:
                return False
        return True

    def _ways_free(self, base: GuestBase, claims: Iterable[Contribution],
                   c: Contribution) -> bool:
        """Cache ways (``claims._cache_taken``)."""
        if not c.cache_ways:
            return True
        held = self.held(base, claims)
        ways = base.ways if held.caches is None else {
            (e["resource"], e["id"]): (parse_mask(e["free_mask"]), e["cbm_mask"])
            for e in held.caches}
        return not any(mask & ~ways.get((res, cid), (0, ""))[0]
                       for res, cid, mask, _group in c.cache_ways)
