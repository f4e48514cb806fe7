"""The guest's vCPU topology (sockets, cores, threads), chosen the way Nova chooses it.

Every (s, c, t) with s·c·t = vCPUs within the limits is a candidate; candidates are ordered
fewest threads first, then most sockets (Nova's key ``(s*c, s, t)`` descending), and the
first one matching the most preferred values wins. The fit may force the thread count:
``require`` needs the host's threads per core, ``isolate`` one thread per core.
"""

from __future__ import annotations

from dataclasses import dataclass

from hostagent.fit.request import TopologyPrefs


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
    return out


def best_topology(
    vcpus: int, prefs: TopologyPrefs, *, threads: int | None = None
) -> VcpuTopology | None:
    """The chosen topology; ``threads`` forces the thread count. None when impossible."""
    cands = possible_topologies(vcpus, prefs)
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
