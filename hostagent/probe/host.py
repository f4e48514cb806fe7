"""``probe_host``: the whole ``HostTopology`` of one host from its sysfs and resctrl roots.

Assembles the area readers (cpus, cells, caches, hugepages, resctrl, pci) around one
``FileReader``, which records every file read (``hostagent capture`` copies exactly those).
``probe_json`` is the ``hostagent probe --json`` document: the schema-v1 ``topology`` dict
plus ``free_cache`` (free ways per resource and cache ID, ``hostagent.cbm.cache_ways``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from hostagent.cbm import cache_ways
from hostagent.errors import ProbeError
from hostagent.model import HostTopology, topology_to_dict
from hostagent.probe.caches import read_caches
from hostagent.probe.cells import read_cells
from hostagent.probe.cpus import read_cpu_ids, read_cpus
from hostagent.probe.pci import read_pci
from hostagent.probe.reader import FileReader
from hostagent.probe.resctrl import read_resctrl

__all__ = ["FileReader", "probe_host", "probe_json", "read_resctrl"]


def probe_host(
    sysfs_root: str | Path = "/sys",
    resctrl_root: str | Path | None = "/sys/fs/resctrl",
    *,
    reader: FileReader | None = None,
) -> HostTopology:
    """Read the host's topology from ``sysfs_root`` and ``resctrl_root`` (and nothing else).

    ``resctrl_root`` ``None``, missing or unmounted gives ``resctrl=None``. Pass a
    ``reader`` to see which files were read. Bad files raise ``ProbeError``.
    """
    root = os.fspath(sysfs_root).rstrip("/") or "/"
    if root == "/":
        root = ""  # paths are built as f"{root}/devices/..."
    if not os.path.isdir(root or "/"):
        raise ProbeError(root, "not a directory (expected a sysfs tree)")
    reader = reader if reader is not None else FileReader()
    all_ids, online = read_cpu_ids(reader, root)
    cells = read_cells(reader, root, online)
    cell_of = {cpu: cell.id for cell in cells for cpu in cell.cpus}
    cpus = read_cpus(reader, root, all_ids, online, cell_of)
    caches = read_caches(reader, root, online)
    resctrl = read_resctrl(resctrl_root, caches, reader=reader)
    pci = read_pci(reader, root)
    return HostTopology(cells=cells, cpus=cpus, caches=caches, resctrl=resctrl, pci=pci)


def probe_json(topo: HostTopology) -> dict[str, Any]:
    """The ``probe --json`` document: ``topology_to_dict(topo)`` plus ``free_cache``."""
    out = topology_to_dict(topo)
    out["free_cache"] = cache_ways(topo)
    return out
