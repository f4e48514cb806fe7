"""CPU caches: ``devices/system/cpu/cpuN/cache/indexK/``, one ``Cache`` per (level, type, id).

Each cache is read once, not once per CPU sharing it. CPUs are visited in ascending order
and, for each, ``index0``, ``index1``, ... until an index has no ``level`` file:

- if an already-read ``indexK`` of a lower CPU listed this CPU in its ``shared_cpu_list``,
  this CPU's ``indexK`` is the same cache and nothing of it is read;
- otherwise its seven files are read in one ``read_many`` call: ``level``,
  ``shared_cpu_list``, ``type``, ``id``, ``size``, ``ways_of_associativity`` and
  ``coherency_line_size``. If the lowest CPU of that list already had its ``indexK`` read
  (only if two CPUs of one cache ever printed different lists: otherwise the rule above
  has applied), the cache is known and the texts are dropped. A re-probe with a static
  memo reads only ``shared_cpu_list`` (the rest cannot change while the host runs).

A cache's CPUs are its ``shared_cpu_list`` restricted to online CPUs (the kernel already
drops offline CPUs; a stale list is trimmed). Fallbacks: ``shared_cpu_list`` missing → the
CPU alone; ``type`` missing → unified;
``id`` missing → the lowest CPU in ``shared_cpu_list`` (stable across boots, unique per
level and type because a CPU has one cache of each level and type); ``size``,
``ways_of_associativity``, ``coherency_line_size`` missing → 0 (unknown). Each value is an
``unsigned int`` in the kernel (``struct cacheinfo``): a larger one, size in bytes included,
is an error (``hostagent.probe.limits.MAX_U32``). An index with none of ``type``, ``size``
and ``id`` (only ``level``, perhaps ``shared_cpu_list``) names no cache and is skipped,
as libvirt skips an index it cannot describe; the walk goes on with the next index.
A second cache with the same (level, type, id) as one already read is dropped. The result
is sorted by level, then type (data, instruction, unified), then id.
"""

from __future__ import annotations

import os

from hostagent.errors import ProbeError
from hostagent.model import Cache
from hostagent.probe.limits import MAX_U32
from hostagent.probe.reader import FileReader, first_cpu, to_count, to_cpus, to_size

TYPE_CHECKING = False  # typing is not imported at run time: `hostagent probe` starts faster
if TYPE_CHECKING:
    from collections.abc import Iterable
    from typing import Any

TYPES = {"data": "data", "instruction": "instruction", "unified": "unified"}
# the kernel's exact file texts ("Data\n"), parsed without strip() and lower()
_TYPE_TEXTS = {f"{t.capitalize()}\n": t for t in TYPES}
_TYPE_ORDER = {"data": 0, "instruction": 1, "unified": 2}
_ABSENT = ()  # memo value: this indexK directory does not exist


_ATTRS = ("type", "id", "size", "ways_of_associativity", "coherency_line_size")
_FILES = ("level", "shared_cpu_list", *_ATTRS)  # one read_many per index directory


def _count(path: str, text: str | None) -> int | None:
    """``to_count`` (up to ``MAX_U32``) with the common case inlined: a plain decimal."""
    if text is None:
        return None
    if text[:1].isdigit():
        try:
            value = int(text)
        except ValueError:
            pass
        else:
            if value <= MAX_U32:
                return value
    return to_count(path, text, MAX_U32)


_KIB_SUFFIX = "K\n"
_MAX_KIB_DIGITS = len(str(MAX_U32 >> 10))  # "<n>K" sizes of this many digits, parsed inline


def _geometry(d: str, texts: list[str | None], keep: bool) -> tuple[Any, ...]:
    """(level, type, id or None, size, ways, line, {path: text} or None) of one ``indexK/``.

    The type is ``None`` when the directory names no cache: it has none of ``type``,
    ``size`` and ``id`` (the caller skips it, see ``names_no_cache``).

    The texts are kept (``keep``) only for a static memo, which replays them into later
    readers' ``files``. The common texts (decimal counts, ``"<n>K"`` sizes, the kernel's
    ``"Data"``/``"Instruction"``/``"Unified"``) are parsed inline; anything else goes
    through the checking parsers, which name the file in their errors.
    """
    level_text, _, ttype, tid, tsize, tways, tline = texts
    if ttype is None and tsize is None and tid is None:
        level = _count(d + "level", level_text)  # still checked: a bad one is an error
        return level, None, None, 0, 0, 0, _kept(d, texts) if keep else None
    try:
        level = int(level_text)
        cid = None if tid is None else int(tid)
        ways = 0 if tways is None else int(tways)
        line = 0 if tline is None else int(tline)
        if not (0 <= level <= MAX_U32 and 0 <= ways <= MAX_U32 and 0 <= line <= MAX_U32
                and (cid is None or 0 <= cid <= MAX_U32)):
            raise ValueError  # the checking parsers say which file and why
    except ValueError:
        level = _count(d + "level", level_text)
        cid = _count(d + "id", tid)
        ways = _count(d + "ways_of_associativity", tways) or 0
        line = _count(d + "coherency_line_size", tline) or 0
    ctype = "unified" if ttype is None else _TYPE_TEXTS.get(ttype)
    if ctype is None:
        ctype = TYPES.get(ttype.strip().lower(), "")  # type: ignore[union-attr]
        if not ctype:
            raise ProbeError(d + "type", "unknown cache type", ttype.strip())  # type: ignore[union-attr]
    if (tsize is not None and tsize.endswith(_KIB_SUFFIX) and tsize[:-2].isdigit()
            and len(tsize) - 2 < _MAX_KIB_DIGITS and tsize.isascii()):
        size = int(tsize[:-2]) << 10  # fewer digits than MAX_U32 >> 10 has: in range
    else:
        size = 0 if tsize is None else to_size(d + "size", tsize, MAX_U32)
    return level, ctype, cid, size, ways, line, _kept(d, texts) if keep else None


def _kept(d: str, texts: list[str | None]) -> dict[str, str]:
    """``{path: text}`` of one ``indexK/`` for a static memo: not ``shared_cpu_list``,
    which can change (CPU hotplug) and is read again every time."""
    return {d + n: t for n, t in zip(_FILES, texts, strict=True)
            if t is not None and n != "shared_cpu_list"}


def _sharing(d: str, text: str | None, cpu: int, online: set[int]) -> tuple[int, tuple[int, ...]]:
    """(lowest CPU of ``shared_cpu_list``, offline ones too; its online CPUs) of a cache."""
    if text is None:
        return cpu, (cpu,)
    path = d + "shared_cpu_list"
    shared = to_cpus(path, text)
    lowest = shared[0] if shared else first_cpu(path, text)  # empty: raises, naming it
    if not online.issuperset(shared):
        shared = tuple(c for c in shared if c in online)
    return lowest, shared or (cpu,)


def read_caches(reader: FileReader, sysfs_root: str, online: Iterable[int]) -> tuple[Cache, ...]:
    """Every cache of the online CPUs (see the module docstring).

    With a ``reader.static`` memo, each ``indexK/``'s geometry (everything but
    ``shared_cpu_list``) is parsed once and reused by later probes.
    """
    cpu_base = f"{sysfs_root}/devices/system/cpu"
    base = cpu_base + "/cpu"
    memo = reader.static
    # index K -> {CPU whose indexK is already known: the CPU that read that cache}
    covered: dict[int, dict[int, int]] = {}
    read_first: set[tuple[int, int]] = set()  # (K, lowest sharing CPU) already read
    ends: dict[int, int] = {}  # CPU that read caches -> its number of indexes
    found: dict[tuple[int, str, int], Cache] = {}
    online = set(online)
    cpu_fd = reader.open_dir(cpu_base) if online else None
    try:
        for cpu in sorted(online):
            rel = f"cpu{cpu}/cache/index"
            prefix = f"{base}{cpu}/cache/index"
            k = 0
            last_reader = -1  # who read this CPU's index k-1 when it was covered, else -1
            while True:
                cov = covered.get(k)
                if cov is not None:
                    owner = cov.get(cpu)
                    if owner is not None:
                        last_reader = owner
                        k += 1
                        continue
                if last_reader >= 0 and ends.get(last_reader) == k:
                    # this CPU shares its index k-1 with a CPU that has no index k: caches
                    # beyond a shared cache are shared too, so this CPU has none either
                    break
                last_reader = -1
                d = f"{prefix}{k}/"
                geo = memo.get(d) if memo is not None else None
                if geo is _ABSENT:
                    break
                if geo is None:
                    texts = reader.read_many(d, _FILES, cpu_fd, f"{rel}{k}/")
                    level_text, text = texts[0], texts[1]
                    if level_text is None:
                        if memo is not None:
                            memo[d] = _ABSENT
                        break
                    lowest, shared = _sharing(d, text, cpu, online)
                    if (k, lowest) in read_first:
                        k += 1
                        continue
                    geo = _geometry(d, texts, memo is not None)
                    if memo is not None:
                        memo[d] = geo
                else:
                    text = reader.read(
                        d + "shared_cpu_list", cpu_fd, f"{rel}{k}/shared_cpu_list"
                    )
                    lowest, shared = _sharing(d, text, cpu, online)
                    if (k, lowest) in read_first:
                        k += 1
                        continue
                    reader.files.update(geo[6])
                read_first.add((k, lowest))
                if cov is None:
                    covered[k] = cov = {}
                for c in shared:
                    cov.setdefault(c, cpu)
                level, ctype, cid, size, ways, line, _ = geo
                if ctype is None:  # names no cache: skipped (the module docstring)
                    k += 1
                    continue
                if cid is None:
                    cid = shared[0]
                key = (level, ctype, cid)
                if key not in found:
                    found[key] = Cache(
                        level=level,
                        id=cid,
                        type=ctype,
                        size_bytes=size,
                        ways=ways,
                        line_bytes=line,
                        cpus=shared,
                    )
                k += 1
            ends[cpu] = k
    finally:
        if cpu_fd is not None:
            os.close(cpu_fd)
    return tuple(
        found[key] for key in sorted(found, key=lambda t: (t[0], _TYPE_ORDER[t[1]], t[2]))
    )
