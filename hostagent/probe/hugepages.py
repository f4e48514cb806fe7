"""Hugepage pools: ``hugepages/hugepages-<size>kB/{nr,free,surplus}_hugepages``.

Read per NUMA node (``devices/system/node/nodeN/hugepages``) or, on a kernel without
``node/``, system-wide (``kernel/mm/hugepages``). Every size the kernel lists is reported,
sorted by size. ``nr_hugepages`` is required; ``free_hugepages`` and
``surplus_hugepages`` missing → 0. A page size above ``MAX_MEMORY_KIB`` (or 0), or a count
of more pages than that much memory holds, is an error (``hostagent.probe.limits``).
"""

from __future__ import annotations

from hostagent.errors import ProbeError
from hostagent.model import HugepagePool
from hostagent.probe.limits import MAX_MEMORY_KIB
from hostagent.probe.reader import FileReader, to_count


def is_pool(name: str) -> bool:
    """``hugepages-2048kB``."""
    return (name.startswith("hugepages-") and name.endswith("kB") and name[10:-2].isdigit()
            and name.isascii())


def read_pools(reader: FileReader, directory: str) -> tuple[HugepagePool, ...]:
    """The pools under ``directory`` (a missing directory has none)."""
    names = reader.listdir(directory, is_pool)
    if not names:
        return ()
    pools = []
    for size in sorted(int(n[10:-2]) for n in names):
        d = f"{directory}/hugepages-{size}kB/"
        if not 0 < size <= MAX_MEMORY_KIB:
            raise ProbeError(d[:-1], f"page size out of range 1..{MAX_MEMORY_KIB} kB")
        most = MAX_MEMORY_KIB // size  # pages: no more than the largest memory holds
        total = to_count(d + "nr_hugepages", reader.need(d + "nr_hugepages"), most)
        free = reader.read(d + "free_hugepages")
        surplus = reader.read(d + "surplus_hugepages")
        pools.append(
            HugepagePool(
                size_kib=size,
                total=total,
                free=0 if free is None else to_count(d + "free_hugepages", free, most),
                surplus=0 if surplus is None else to_count(
                    d + "surplus_hugepages", surplus, most),
            )
        )
    return tuple(pools)
