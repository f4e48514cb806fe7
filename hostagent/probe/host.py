"""``probe_host``: the whole ``HostTopology`` of one host from its sysfs and resctrl roots.

Assembles the area readers (cpus, cells, caches, hugepages, resctrl, pci) around one
``FileReader``, which records every file read (``hostagent capture`` copies exactly those).
``probe_json`` is the ``hostagent probe --json`` document: the schema-v1 ``topology`` dict
plus ``free_cache`` (free ways per resource and cache ID, ``hostagent.resctrl_cbm.cache_ways``);
``probe_json_text`` is that document as compact JSON text, encoded straight from the model.
"""

from __future__ import annotations

import os

from hostagent.errors import ProbeError
from hostagent.model import HostTopology, topology_to_dict
from hostagent.probe.caches import read_caches
from hostagent.probe.cells import read_cells
from hostagent.probe.cpus import read_cpu_ids, read_cpus
from hostagent.probe.pci import read_pci
from hostagent.probe.reader import FileReader
from hostagent.probe.resctrl import read_resctrl
from hostagent.resctrl_cbm import cache_ways

TYPE_CHECKING = False  # typing is not imported at run time: `hostagent probe` starts faster
if TYPE_CHECKING:
    from pathlib import Path
    from typing import Any

__all__ = ["FileReader", "probe_host", "probe_json", "probe_json_text", "read_resctrl"]


def probe_host(
    sysfs_root: str | Path = "/sys",
    resctrl_root: str | Path | None = "/sys/fs/resctrl",
    *,
    reader: FileReader | None = None,
) -> HostTopology:
    """Read the host's topology from ``sysfs_root`` and ``resctrl_root`` (and nothing else).

    ``resctrl_root`` ``None``, missing or unmounted gives ``resctrl=None``. Pass a
    ``reader`` to see which files were read. Bad files raise ``ProbeError``.

    To re-probe the same host quickly, give each probe a new ``FileReader(static=memo)``
    sharing one ``memo`` dict: files that cannot change while the host runs are then read
    once. The memo is emptied by itself when the set of ``cpuN`` directories changes (a CPU
    was physically added or removed).
    """
    root = os.fspath(sysfs_root).rstrip("/") or "/"
    if root == "/":
        root = ""  # paths are built as f"{root}/devices/..."
    if not os.path.isdir(root or "/"):
        raise ProbeError(root, "not a directory (expected a sysfs tree)")
    reader = reader if reader is not None else FileReader()
    all_ids, online = read_cpu_ids(reader, root)
    memo = reader.static
    if memo is not None:
        key = f"{root}/devices/system/cpu/"
        listing = ",".join(map(str, all_ids))
        if memo.get(key) != listing:
            memo.clear()
            memo[key] = listing
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


def probe_json_text(topo: HostTopology) -> str:
    """``probe_json(topo)`` as compact JSON text (no spaces), written straight from the
    model by ``hostagent.jsontext`` (no dict tree first, and no ``json`` import: start-up
    time): the ``hostagent probe --json`` output."""
    from hostagent.jsontext import dumps

    doc = dict(vars(topo))  # the record's fields, in order (hostagent.model)
    doc["free_cache"] = cache_ways(topo)
    return dumps(doc)
