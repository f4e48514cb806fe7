"""Does one guest cell fit one host cell, and on which threads and pages (pure).

``fit_cell`` checks, in order: memory (small pages or the requested hugepage size), shared
vCPU capacity, then dedicated threads with the thread policy, and returns either a
``CellFit`` (the pinning, the emulator thread, the siblings kept idle) or the reasons
why not, one per failing resource. The thread rules (docs/fit.md):

- ``prefer``: repeatedly take the core whose free threads best fit what is left (the
  smallest count that holds the rest, else the largest), all its free threads ascending;
  consecutive vCPUs thus land on sibling threads, and whole cores are kept for later.
- ``isolate``: every vCPU gets a core whose threads are all dedicated and free; it runs
  on the lowest thread, the other threads stay idle (``reserved``). Works with or
  without SMT.
- ``require``: the host's threads per core ``T`` > 1; each guest cell's dedicated vCPUs,
  ascending, are cut into runs of ``T`` (the last may be shorter, as in Nova) and each run
  takes one core whose ``T`` threads are all free; the threads a short run leaves are kept
  idle (``reserved``), unless the isolated emulator thread takes one.
- an isolated emulator thread takes one more free thread (best fit, outside idle cores).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from hostagent.fit.host import SMALL_PAGE_KIB, HostCell, split_cores
from hostagent.fit.request import FitRequest, GuestCell


@dataclass(frozen=True)
class Reason:
    host_cell: int | None
    guest_cell: int | None
    resource: str
    message: str

    def as_dict(self) -> dict[str, object]:
        return {"host_cell": self.host_cell, "guest_cell": self.guest_cell,
                "resource": self.resource, "message": self.message}


@dataclass(frozen=True)
class CellFit:
    guest_cell: int
    host_cell: int
    pinning: tuple[tuple[int, int], ...]  # (vcpu, host cpu)
    shared_vcpus: tuple[int, ...]
    shared_cpus: tuple[int, ...]
    page_size_kib: int
    emulator_cpu: int | None
    reserved: tuple[int, ...]  # siblings kept idle (isolate)


def _mib(kib: int) -> str:
    return f"{kib // 1024} MiB" if kib % 1024 == 0 else f"{kib} KiB"


def choose_page_size(
    req: FitRequest, g: GuestCell, cell: HostCell, ram_ratio: float
) -> tuple[int | None, str, str]:
    """(page size KiB or None, resource, message) for the guest cell's memory."""
    mem = g.memory_kib
    ps = req.page_size
    if ps is None and not req.pinned:
        if mem > cell.small_total_kib:
            return None, "memory", (
                f"needs {_mib(mem)}, the cell has {_mib(cell.small_total_kib)} of small-page "
                "memory in all")
        limit = int(cell.small_total_kib * ram_ratio)
        if cell.small_used_kib + mem > limit:
            return None, "memory", (
                f"needs {_mib(mem)}, {_mib(max(0, limit - cell.small_used_kib))} left under "
                f"ram_allocation_ratio {ram_ratio:g}")
        return SMALL_PAGE_KIB, "", ""
    if ps is None or ps == "small" or ps == SMALL_PAGE_KIB:
        if mem > cell.small_free_kib:
            return None, "memory", (
                f"needs {_mib(mem)} of small-page memory, {_mib(cell.small_free_kib)} free")
        return SMALL_PAGE_KIB, "", ""
    if isinstance(ps, int) and ps not in cell.pages:
        have = ", ".join(str(s) for s in sorted(cell.pages)) or "none"
        return None, "hugepages", f"no {ps} KiB pages in this cell (sizes: {have})"
    cands = _page_candidates(ps, cell)
    if not cands:
        return None, "hugepages", "no hugepage pools in this cell"
    why = []
    for size in cands:
        problem = _page_problem(size, mem, cell)
        if problem is None:
            return size, "", ""
        why.append(problem)
    return None, "hugepages", f"needs {_mib(mem)}; " + "; ".join(why)


def page_size_options(req: FitRequest, g: GuestCell, cell: HostCell) -> list[int]:
    """For a ``large`` or ``any`` request: every page size (KiB) the guest cell's memory
    fits in on this host cell, in the order ``choose_page_size`` tries them (so its answer
    first). The placement search falls back on the others when the preferred sizes of all
    its cells together do not fit (pages held by guests bound to no cell)."""
    ps = req.page_size
    if ps not in ("large", "any"):
        raise ValueError(f"page size {ps!r} is one size, not a choice of sizes")
    return [s for s in _page_candidates(ps, cell) if _page_problem(s, g.memory_kib, cell) is None]


def _page_candidates(ps: int | str, cell: HostCell) -> list[int]:
    """Hugepage sizes to try for page size ``ps`` (an int, ``large`` or ``any``), in order."""
    huge = sorted(cell.pages, reverse=True)
    if ps == "large":
        return huge
    if ps == "any":
        return huge + [SMALL_PAGE_KIB]
    return [ps]  # type: ignore[list-item]  # a size the cell has (checked by the caller)


def _page_problem(size: int, mem: int, cell: HostCell) -> str | None:
    """Why ``mem`` KiB do not fit in the cell's free pages of ``size``; ``None`` if they do."""
    if size == SMALL_PAGE_KIB:
        if mem <= cell.small_free_kib:
            return None
        return f"small pages: {_mib(cell.small_free_kib)} free"
    if mem % size:
        return f"{size} KiB pages: {_mib(mem)} is not a whole number of pages"
    need = mem // size
    if need <= cell.pages[size]:
        return None
    return f"{size} KiB pages: needs {need}, {cell.pages[size]} free"


def _best_fit(groups: Sequence[list[int]], want: int) -> int:
    """Index of the non-empty group whose size best fits ``want``: the smallest that holds
    it, else the largest (ties: the first); -1 when all are empty."""
    best, bn = -1, 0
    for i, group in enumerate(groups):
        n = len(group)
        if n == 0:
            continue
        if best < 0 or (want <= n < bn if bn >= want else n > bn):
            best, bn = i, n
    return best


def pin_prefer(
    cores: Sequence[tuple[int, ...]], free: frozenset[int], n: int
) -> list[int] | None:
    """``n`` free threads for ``prefer``, touching as few whole cores as possible.

    A core is *whole* when all its threads are free (an ``isolate``/``require`` guest can
    still take it), *broken* when only some are. When the broken cores' free threads
    hold the ``n`` vCPUs, only they are used; otherwise just enough whole cores are taken,
    all their threads (siblings for the guest), and the rest comes from broken cores.
    Cores are chosen by best fit (the smallest free count that holds what is left, else
    the largest; ties: first in order), and a core's free threads are taken ascending.
    """
    whole, broken = split_cores(cores, free)
    return _pin_prefer_split(list(whole), list(broken), n)


def _pin_prefer_split(whole: list[list[int]], broken: list[list[int]], n: int
                      ) -> list[int] | None:
    """``pin_prefer`` on the split cores (the lists of lists are changed, not the lists)."""
    spare = sum(map(len, broken))
    if spare + sum(map(len, whole)) < n:
        return None
    out: list[int] = []
    while n - len(out) > spare:  # the broken cores alone cannot hold the rest
        i = _best_fit(whole, n - len(out) - spare)
        out.extend(whole[i][: n - len(out)])
        whole[i] = []
    while len(out) < n:
        i = _best_fit(broken, n - len(out))
        take = broken[i][: n - len(out)]
        out.extend(take)
        broken[i] = broken[i][len(take):]
    return out


def pin_isolate(
    cores: Sequence[tuple[int, ...]], free: frozenset[int], n: int
) -> tuple[list[int], list[int]] | None:
    whole = [c for c in cores if all(t in free for t in c)]
    if len(whole) < n:
        return None
    chosen = whole[:n]
    return [c[0] for c in chosen], [t for c in chosen for t in c[1:]]


def require_runs(dedicated: Sequence[int], t: int) -> list[list[int]]:
    """A guest cell's dedicated vCPUs ascending, cut into runs of ``t`` (the last one may
    be shorter): each run goes onto one host core, as Nova's ``require`` packs them."""
    ordered = sorted(dedicated)
    return [ordered[i:i + t] for i in range(0, len(ordered), t)]


def pin_require(
    cores: Sequence[tuple[int, ...]], free: frozenset[int], runs: list[list[int]], t: int
) -> tuple[list[int], list[int]] | None:
    """One core with ``t`` free threads per run, its lowest threads for the run's vCPUs;
    returns (the threads in vCPU order, the threads of partly used cores kept idle)."""
    usable = [c for c in cores if len(c) == t and all(x in free for x in c)]
    if len(usable) < len(runs):
        return None
    out: list[int] = []
    idle: list[int] = []
    for run, core in zip(runs, usable, strict=False):
        out.extend(core[: len(run)])
        idle.extend(core[len(run):])
    return out, idle


def pick_emulator(
    cores: Sequence[tuple[int, ...]], free: frozenset[int], used: set[int]
) -> int | None:
    """A free thread for the isolated emulator thread, by best fit (a broken core first)."""
    avail = [[t for t in core if t in free and t not in used] for core in cores]
    i = _best_fit(avail, 1)
    return avail[i][0] if i >= 0 else None


def fit_cell(
    req: FitRequest,
    g: GuestCell,
    cell: HostCell,
    *,
    emulator: bool,
    cpu_ratio: float,
    ram_ratio: float,
    cores: Sequence[tuple[int, ...]] | None = None,
) -> CellFit | list[Reason]:
    """Fit guest cell ``g`` onto host cell ``cell``; ``cores`` overrides the core order."""
    reasons: list[Reason] = []

    def no(resource: str, message: str) -> None:
        reasons.append(Reason(cell.id, g.index, resource, message))

    page, res, msg = choose_page_size(req, g, cell, ram_ratio)
    if page is None:
        no(res, msg)

    ns = len(g.shared)
    if ns:
        cap = len(cell.shared)
        if cap == 0:
            no("shared_threads", f"{ns} shared vCPUs need shared threads; the cell has none")
        elif ns > cap:
            no("shared_threads", f"{ns} shared vCPUs exceed the cell's {cap} shared threads")
        else:
            limit = int(cap * cpu_ratio)
            if cell.shared_used + ns > limit:
                no("shared_threads",
                   f"{ns} shared vCPUs, {max(0, limit - cell.shared_used)} left of {limit} "
                   f"(cpu_allocation_ratio {cpu_ratio:g})")

    order = tuple(cores) if cores is not None else cell.cores
    nd = len(g.dedicated)
    extra = 1 if emulator else 0
    emu_note = " (+1 for the isolated emulator thread)" if extra else ""
    pins: list[int] | None = []
    reserved: list[int] = []
    emu_cpu: int | None = None
    policy = req.thread_policy
    if nd or extra:
        if policy == "isolate":
            got = pin_isolate(order, cell.free, nd)
            if got is None:
                whole = len(cell.whole_free_cores())
                no("whole_cores", f"isolate needs {nd} whole free cores (every thread "
                                  f"dedicated and free), the cell has {whole}")
                pins = None
            else:
                pins, reserved = got
        elif policy == "require":
            t = cell.threads_per_core
            if t <= 1:
                no("sibling_threads", "require needs SMT; the cell's cores have 1 thread")
                pins = None
            else:
                runs = require_runs(g.dedicated, t)
                got = pin_require(order, cell.free, runs, t)
                if got is None:
                    usable = sum(1 for c in order if len(c) == t and set(c) <= cell.free)
                    no("sibling_threads", f"require needs {len(runs)} cores with {t} free "
                                          f"sibling threads, the cell has {usable}")
                    pins = None
                else:
                    pins, reserved = got
        else:
            whole, broken = split_cores(order, cell.free) if cores is not None else \
                cell.free_split
            pins = _pin_prefer_split(list(whole), list(broken), nd)
            if pins is None:
                no("dedicated_threads", f"needs {nd + extra} free dedicated threads{emu_note}, "
                                        f"the cell has {len(cell.free)}")
        if pins is not None and extra and policy == "require" and reserved:
            emu_cpu = reserved.pop(0)  # an idle thread of the guest's own half-used core
        elif pins is not None and extra:
            emu_cpu = pick_emulator(order, cell.free, set(pins) | set(reserved))
            if emu_cpu is None:
                no("dedicated_threads",
                   f"no free dedicated thread left for the isolated emulator thread after "
                   f"{nd} vCPUs")
    if reasons:
        return reasons
    assert pins is not None and page is not None
    return CellFit(
        guest_cell=g.index,
        host_cell=cell.id,
        pinning=tuple(zip(g.dedicated, pins, strict=True)),
        shared_vcpus=g.shared,
        shared_cpus=cell.shared if g.shared else (),
        page_size_kib=page,
        emulator_cpu=emu_cpu,
        reserved=tuple(sorted(reserved)),
    )
