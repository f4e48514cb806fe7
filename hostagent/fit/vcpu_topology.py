"""The guest's vCPU topology (sockets, cores, threads), chosen the way Nova chooses it.

Every (s, c, t) with s·c·t = vCPUs within the limits is a candidate; candidates are ordered
fewest threads first, then most sockets (Nova's key ``(s*c, s, t)`` descending), and the
first one matching the most preferred values wins. The fit may force the thread count:
``isolate`` one thread per core; ``require`` the most threads per core whose guest cores
lie on host cores (``require_topology``).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from hostagent.fit.request import TopologyPrefs

# Answers kept for the most recent (vCPUs, preferences, threads) asked: pure functions of
# small frozen inputs, asked again for every request of the same flavor.
TOPOLOGY_CACHE_SIZE = 256


@dataclass(frozen=True)
class VcpuTopology:
    sockets: int
    cores: int
    threads: int

    def as_dict(self) -> dict[str, int]:
        return {"sockets": self.sockets, "cores": self.cores, "threads": self.threads}


def divisors(n: int) -> list[int]:
    """The divisors of ``n`` >= 1, ascending (O(sqrt n) work)."""
    low, high = [], []
    d = 1
    while d * d <= n:
        if n % d == 0:
            low.append(d)
            if d * d != n:
                high.append(n // d)
        d += 1
    return low + high[::-1]


def possible_topologies(vcpus: int, prefs: TopologyPrefs) -> list[VcpuTopology]:
    """Every topology within the limits, in Nova's order (before preference scoring).

    Only divisors are visited, so the work is about the divisor count, not ``vcpus``².
    """
    return list(_possible(vcpus, prefs))


@functools.lru_cache(maxsize=TOPOLOGY_CACHE_SIZE)
def _possible(vcpus: int, prefs: TopologyPrefs) -> tuple[VcpuTopology, ...]:
    out = []
    for s in divisors(vcpus):
        if s > prefs.max_sockets:
            break
        for c in divisors(vcpus // s):
            if c > prefs.max_cores:
                break
            t = vcpus // (s * c)
            if t <= prefs.max_threads:
                out.append(VcpuTopology(s, c, t))
    out.sort(key=lambda v: (v.sockets * v.cores, v.sockets, v.threads), reverse=True)
    return tuple(out)


def best_topology(
    vcpus: int, prefs: TopologyPrefs, *, threads: int | None = None
) -> VcpuTopology | None:
    """The chosen topology; ``threads`` forces the thread count. None when impossible."""
    return _best(vcpus, prefs, threads)


@functools.lru_cache(maxsize=TOPOLOGY_CACHE_SIZE)
def _best(vcpus: int, prefs: TopologyPrefs, threads: int | None) -> VcpuTopology | None:
    cands: Sequence[VcpuTopology] = _possible(vcpus, prefs)
    if threads is not None:
        cands = [v for v in cands if v.threads == threads]
    if not cands:
        return None

    def score(v: VcpuTopology) -> int:
        return sum(
            1
            for want, got in ((prefs.sockets, v.sockets), (prefs.cores, v.cores),
                              (prefs.threads, v.threads))
            if want and want == got
        )

    best = max(score(v) for v in cands)
    return next(v for v in cands if score(v) == best)


def require_topology(
    vcpus: int, prefs: TopologyPrefs, host_threads: int, core_of: Mapping[int, int]
) -> VcpuTopology | None:
    """The guest topology of a ``require`` guest: the most threads per core ``t`` (a
    divisor of the host's ``host_threads``) for which every guest core — vCPUs
    ``kt..kt+t-1`` — that holds a dedicated vCPU is all dedicated and on one host core
    (``core_of``: dedicated vCPU -> its host core), within the limits. So the guest sees
    the host's threads per core when the vCPU count and its cells are multiples of it,
    and never siblings that are not siblings on the host (1 thread per core for 9 vCPUs on
    2-thread cores). Only when the limits allow none of those: Nova's choice
    (``best_topology``)."""
    for t in reversed(divisors(host_threads)):
        if vcpus % t:
            continue
        if all(_on_one_core(range(k, k + t), core_of) for k in range(0, vcpus, t)):
            topo = best_topology(vcpus, prefs, threads=t)
            if topo is not None:
                return topo
    return best_topology(vcpus, prefs)


def _on_one_core(group: range, core_of: Mapping[int, int]) -> bool:
    cores = {core_of.get(v) for v in group}
    return cores == {None} or (len(cores) == 1 and None not in cores)
