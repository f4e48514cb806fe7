"""CPU caches: ``devices/system/cpu/cpuN/cache/indexK/``, one ``Cache`` per (level, type, id).

Each cache is read once, not once per CPU sharing it. CPUs are visited in ascending order
and, for each, ``index0``, ``index1``, ... until an index has no ``level`` file:

- if an already-read ``indexK`` of a lower CPU listed this CPU in its ``shared_cpu_list``,
  this CPU's ``indexK`` is the same cache and nothing of it is read;
- otherwise ``level`` and ``shared_cpu_list`` are read; if the lowest CPU of that list
  already had its ``indexK`` read, the cache is known and skipped; else ``type``, ``id``,
  ``size``, ``ways_of_associativity`` and ``coherency_line_size`` are read.

A cache's CPUs are its ``shared_cpu_list`` restricted to online CPUs (the kernel already
drops offline CPUs; a stale list is trimmed). Fallbacks: ``shared_cpu_list`` missing → the
CPU alone; ``type`` missing → unified;
``id`` missing → the lowest CPU in ``shared_cpu_list`` (stable across boots, unique per
level and type because a CPU has one cache of each level and type); ``size``,
``ways_of_associativity``, ``coherency_line_size`` missing → 0 (unknown). A second cache
with the same (level, type, id) as one already read is dropped. The result is sorted by
level, then type (data, instruction, unified), then id.
"""

from __future__ import annotations

from collections.abc import Iterable

from hostagent.errors import ProbeError
from hostagent.model import Cache
from hostagent.probe.reader import FileReader, first_cpu, to_count, to_cpus, to_size

TYPES = {"data": "data", "instruction": "instruction", "unified": "unified"}
_TYPE_ORDER = {"data": 0, "instruction": 1, "unified": 2}


def _opt_count(reader: FileReader, path: str) -> int:
    text = reader.read(path)
    return 0 if text is None else to_count(path, text)


def read_caches(reader: FileReader, sysfs_root: str, online: Iterable[int]) -> tuple[Cache, ...]:
    """Every cache of the online CPUs (see the module docstring)."""
    base = f"{sysfs_root}/devices/system/cpu/cpu"
    covered: dict[int, set[int]] = {}  # index K -> CPUs whose indexK is already known
    read_first: set[tuple[int, int]] = set()  # (K, lowest sharing CPU) already read
    found: dict[tuple[int, str, int], Cache] = {}
    online = set(online)
    for cpu in sorted(online):
        prefix = f"{base}{cpu}/cache/index"
        k = 0
        while True:
            cov = covered.get(k)
            if cov is not None and cpu in cov:
                k += 1
                continue
            d = f"{prefix}{k}/"
            level_text = reader.read(d + "level")
            if level_text is None:
                break
            path = d + "shared_cpu_list"
            text = reader.read(path)
            if text is None:
                shared: tuple[int, ...] = (cpu,)
                lowest = cpu
            else:
                lowest = first_cpu(path, text)
                if (k, lowest) in read_first:
                    k += 1
                    continue
                shared = tuple(c for c in to_cpus(path, text) if c in online) or (cpu,)
            read_first.add((k, lowest))
            if cov is None:
                covered[k] = cov = set()
            cov.update(shared)
            level = to_count(d + "level", level_text)

            type_text = reader.read(d + "type")
            ctype = "unified"
            if type_text is not None:
                ctype = TYPES.get(type_text.strip().lower(), "")
                if not ctype:
                    raise ProbeError(d + "type", "unknown cache type", type_text.strip())
            id_text = reader.read(d + "id")
            cid = shared[0] if id_text is None else to_count(d + "id", id_text)
            size_text = reader.read(d + "size")
            size = 0 if size_text is None else to_size(d + "size", size_text)
            key = (level, ctype, cid)
            if key not in found:
                found[key] = Cache(
                    level=level,
                    id=cid,
                    type=ctype,
                    size_bytes=size,
                    ways=_opt_count(reader, d + "ways_of_associativity"),
                    line_bytes=_opt_count(reader, d + "coherency_line_size"),
                    cpus=shared,
                )
            k += 1
    return tuple(
        found[key] for key in sorted(found, key=lambda t: (t[0], _TYPE_ORDER[t[1]], t[2]))
    )
