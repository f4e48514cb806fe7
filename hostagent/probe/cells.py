"""NUMA cells: ``devices/system/node/nodeN/{cpulist,meminfo,distance,hugepages/}``.

Node ids come from the ``nodeN`` directory names and may have gaps. Per node:

- ``cpulist`` (missing or empty: a memory-only node such as CXL or HBM);
- ``meminfo``: the ``MemTotal`` and ``MemFree`` lines (``Node 0 MemTotal:  4942028 kB``);
  a missing file means 0 kB; a file without a ``MemTotal`` line is an error;
- ``distance``: one value per node, in ascending node-id order (the kernel's order);
  missing → no distances; a count that does not match the nodes is an error;
- node ids, memory figures and distances beyond ``hostagent.probe.limits`` are errors;
- ``hugepages/``: see ``hugepages.py``.

A kernel without ``node/`` (built without NUMA) is one cell 0 holding every online CPU.
Its memory comes from sysfs only: the number of ``devices/system/memory/memoryN`` blocks
times ``block_size_bytes`` (0 when that directory is missing too). sysfs has no free-memory
figure for it, so ``memory_free_kib`` is 0 (unknown). Its hugepages come from
``kernel/mm/hugepages`` and its distances are ``{0: 10}``.
"""

from __future__ import annotations

from hostagent.errors import ProbeError
from hostagent.model import Cell
from hostagent.probe.hugepages import read_pools
from hostagent.probe.limits import MAX_C_INT, MAX_MEMORY_KIB, MAX_NODES
from hostagent.probe.reader import FileReader, numbered, to_count, to_cpus, to_hex

IS_NODE = numbered("node")
IS_MEMORY_BLOCK = numbered("memory")


def parse_meminfo(path: str, text: str) -> tuple[int, int]:
    """(MemTotal, MemFree) in kB from a node's ``meminfo``."""
    found: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        # "Node 0 MemTotal: 4942028 kB"; tolerate the lines without the "Node N" prefix
        for i, word in enumerate(parts[:3]):
            if word in ("MemTotal:", "MemFree:"):
                if i + 1 >= len(parts):
                    raise ProbeError(path, f"no value for {word[:-1]}", line)
                value = parts[i + 1]
                if not (value.isdigit() and value.isascii()):
                    raise ProbeError(path, f"bad {word[:-1]} value", line.strip())
                kib = int(value) if len(value) < 20 else MAX_MEMORY_KIB + 1
                if kib > MAX_MEMORY_KIB:
                    raise ProbeError(path, f"{word[:-1]} out of range 0..{MAX_MEMORY_KIB} kB",
                                     line.strip())
                found[word[:-1]] = kib
                break
    if "MemTotal" not in found:
        raise ProbeError(path, "no MemTotal line", text.strip()[:80])
    return found["MemTotal"], found.get("MemFree", 0)


def _single_cell(reader: FileReader, sysfs_root: str, online: set[int]) -> Cell:
    mem_dir = f"{sysfs_root}/devices/system/memory"
    memory_kib = 0
    blocks = reader.listdir(mem_dir, IS_MEMORY_BLOCK)
    if blocks:
        path = f"{mem_dir}/block_size_bytes"
        text = reader.read(path)
        if text is not None:
            block = to_hex(path, text, MAX_MEMORY_KIB * 1024)
            memory_kib = len(blocks) * block // 1024
            if memory_kib > MAX_MEMORY_KIB:
                raise ProbeError(mem_dir, f"{len(blocks)} blocks of {block} bytes: memory out "
                                 f"of range 0..{MAX_MEMORY_KIB} kB")
    return Cell(
        id=0,
        cpus=tuple(sorted(online)),
        memory_kib=memory_kib,
        memory_free_kib=0,
        distances={0: 10},
        hugepages=read_pools(reader, f"{sysfs_root}/kernel/mm/hugepages"),
    )


def read_cells(reader: FileReader, sysfs_root: str, online: set[int]) -> tuple[Cell, ...]:
    """Every NUMA cell, sorted by id (see the module docstring)."""
    base = f"{sysfs_root}/devices/system/node"
    names = reader.listdir(base, IS_NODE)
    if not names:
        return (_single_cell(reader, sysfs_root, online),)
    ids = sorted(int(n[4:]) for n in names)
    if ids[-1] >= MAX_NODES:
        raise ProbeError(f"{base}/node{ids[-1]}", f"node id out of range 0..{MAX_NODES - 1}")
    cells = []
    for nid in ids:
        d = f"{base}/node{nid}/"
        text = reader.read(d + "cpulist")
        cpus = to_cpus(d + "cpulist", text) if text is not None else ()
        text = reader.read(d + "meminfo")
        total, free = parse_meminfo(d + "meminfo", text) if text is not None else (0, 0)
        distances: dict[int, int] = {}
        text = reader.read(d + "distance")
        if text is not None:
            values = text.split()
            if len(values) != len(ids):
                raise ProbeError(
                    d + "distance", f"{len(values)} values for {len(ids)} nodes", text.strip()
                )
            distances = {
                other: to_count(d + "distance", v, MAX_C_INT)
                for other, v in zip(ids, values, strict=True)
            }
        cells.append(
            Cell(
                id=nid,
                cpus=cpus,
                memory_kib=total,
                memory_free_kib=free,
                distances=distances,
                hugepages=read_pools(reader, d + "hugepages"),
            )
        )
    return tuple(cells)

