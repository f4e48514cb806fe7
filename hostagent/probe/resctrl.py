"""resctrl (Intel RDT / AMD PQoS): ``info/`` and the allocation groups of a mounted resctrl.

``read_resctrl(root, caches)`` returns ``None`` when ``root`` is ``None``, does not exist or
has no ``info/`` (the empty ``/sys/fs/resctrl`` of a kernel where resctrl is not mounted).
Otherwise it reads:

- ``info/<R>/`` for every cache resource ``R`` = ``L<n>``, ``L<n>CODE``, ``L<n>DATA``
  (``L3_MON``, ``MB``, ``SMBA`` are not cache resources): ``cbm_mask`` and ``min_cbm_bits``
  (required), ``num_closids`` (missing → 0), ``shareable_bits`` (missing → 0),
  ``sparse_masks`` (missing → false). ``bit_usage`` is not read: usage is computed from
  the groups. ``granularity_bytes`` = size of the lowest-id cache of that level (not an
  instruction cache) / number of bits in ``cbm_mask``; ``min_bytes`` = ``min_cbm_bits`` ×
  granularity. CDP is on for L3 (L2) when ``L3CODE``/``L3DATA`` (``L2CODE``/``L2DATA``)
  exist.
- ``info/MB/``: ``bandwidth_gran`` (missing → no MBA, like libvirt), ``min_bandwidth`` and
  ``num_closids`` (required), ``delay_linear`` (missing → null). The unit of MB values:
  ``"MBps"`` when the default group has ``mba_MBps_event`` (kernels ≥ 6.12 mounted with
  ``-o mba_MBps``); else ``"amd"`` (AMD units: multiples of 1/8 GB/s, 2048 = unlimited) when
  ``bandwidth_gran`` is 1 and ``min_bandwidth`` is 0, which only AMD reports; else
  ``"MBps"`` when any group holds an MB value above 100 (older kernels with
  ``mba_MBps``); else ``"percent"``.
- the default group (the root, name ``""``) and every top-level directory with a
  ``schemata`` file (``info``, ``mon_groups`` and ``mon_data`` are never groups; MON groups
  below ``mon_groups/`` are not allocation groups): ``schemata`` (required for the root,
  with a mask for every cache resource and cache ID: a missing one is an error, never
  "all free"),
  ``mode`` (missing → ``shareable``), ``cpus_list`` (missing → none) and ``tasks`` (the
  number of non-empty lines; missing → 0).

Schemata lines may have right-aligned names (``    L3:0=ff``) and space-padded values
(``MB:0= 20;1=  30``). Cache masks are rewritten lowercase, zero-padded to the width of
the resource's ``cbm_mask``; lines of other resources (``SMBA``) are ignored.

Every number is a 32-bit unsigned value in the kernel (masks, CLOSIDs, minimums, domain
ids, MB values): a larger one is an error (``hostagent.probe.limits.MAX_U32``).
"""

from __future__ import annotations

import os

from hostagent.errors import ProbeError
from hostagent.model import (
    Cache,
    MemoryBandwidth,
    Resctrl,
    ResctrlGroup,
    ResctrlResource,
)
from hostagent.probe.limits import MAX_U32
from hostagent.probe.reader import FileReader, _snippet, to_count, to_cpus, to_hex, to_int
from hostagent.resctrl_cbm import format_mask, popcount

TYPE_CHECKING = False  # typing is not imported at run time: `hostagent probe` starts faster
if TYPE_CHECKING:
    from collections.abc import Iterable
    from pathlib import Path

def split_resource(name: str) -> tuple[int, str] | None:
    """``"L3CODE"`` → ``(3, "code")``, ``"L2"`` → ``(2, "both")``; other names → ``None``."""
    if not name.startswith("L"):
        return None
    rest = name[1:]
    kind = "both"
    for suffix, k in (("CODE", "code"), ("DATA", "data")):
        if rest.endswith(suffix):
            rest, kind = rest[: -len(suffix)], k
            break
    # "L<n>": the kernel has L2 and L3; n of more than nine digits is not a cache level
    ok = rest.isdigit() and rest.isascii() and len(rest) < 10
    return (int(rest), kind) if ok else None


def _u32(path: str, text: str, what: str, item: str) -> int:
    """A decimal ``text`` (ASCII digits) up to ``MAX_U32``; else an error showing ``item``."""
    if not (text.isdigit() and text.isascii()):
        raise ProbeError(path, f"bad {what}", item)
    if len(text) > 10 or int(text) > MAX_U32:
        raise ProbeError(path, f"{what} out of range 0..{MAX_U32}", item)
    return int(text)


def is_resource(name: str) -> bool:
    return split_resource(name) is not None
NOT_GROUPS = frozenset({"info", "mon_groups", "mon_data"})
_TYPE_ORDER = {"both": 0, "code": 1, "data": 2}


def _resource(reader: FileReader, info: str, name: str, caches: list[Cache]) -> ResctrlResource:
    split = split_resource(name)
    assert split is not None
    level, rtype = split
    d = f"{info}/{name}/"
    mask = to_hex(d + "cbm_mask", reader.need(d + "cbm_mask"))
    if mask == 0:
        raise ProbeError(d + "cbm_mask", "empty mask", "0")
    width = mask.bit_length()
    bits = popcount(mask)
    min_bits = to_count(d + "min_cbm_bits", reader.need(d + "min_cbm_bits"))
    text = reader.read(d + "num_closids")
    closids = 0 if text is None else to_count(d + "num_closids", text)
    text = reader.read(d + "shareable_bits")
    shareable = 0 if text is None else to_hex(d + "shareable_bits", text)
    text = reader.read(d + "sparse_masks")
    sparse = False if text is None else to_count(d + "sparse_masks", text) != 0
    size = next(
        (c.size_bytes for c in caches if c.level == level and c.type != "instruction"), 0
    )
    gran = size // bits
    return ResctrlResource(
        name=name,
        level=level,
        type=rtype,
        cbm_mask=format_mask(mask, width),
        cbm_bits=bits,
        min_cbm_bits=min_bits,
        num_closids=closids,
        shareable_bits=format_mask(shareable, width),
        sparse_masks=sparse,
        granularity_bytes=gran,
        min_bytes=min_bits * gran,
    )


def parse_schemata(
    path: str, text: str, widths: dict[str, int]
) -> tuple[dict[str, dict[int, str]], dict[int, int]]:
    """(cache masks per resource and cache id, MB value per domain) of a ``schemata`` file.

    ``widths`` maps a resource name to its ``cbm_mask`` width in bits, for padding.
    """
    caches: dict[str, dict[int, str]] = {}
    mb: dict[int, int] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        name, sep, rest = line.partition(":")
        name = name.strip()
        if not sep or not name:
            raise ProbeError(path, "not a schemata line", line)
        is_mb = name == "MB"
        if not is_mb and split_resource(name) is None:
            continue
        masks: dict[int, str] = {}
        for item in rest.split(";"):
            item = item.strip()
            if not item:
                continue
            key, eq, value = item.partition("=")
            key = key.strip()
            if not eq or not key.isdigit():
                raise ProbeError(path, f"bad {name} entry", item)
            dom = _u32(path, key, f"{name} domain id", item)
            if is_mb:
                mb[dom] = _u32(path, value.strip(), f"{name} value for domain {key}", item)
            else:
                try:
                    bits = to_hex(path, value, MAX_U32)
                except ProbeError as exc:
                    problem = f"bad {name} mask for cache id {key}"
                    if exc.problem.startswith("out of range"):
                        problem += f": {exc.problem}"
                    raise ProbeError(path, problem, item) from None
                masks[dom] = format_mask(bits, widths.get(name, 4 * len(value.strip())))
        if not is_mb:
            caches[name] = masks
    return caches, mb


def _group(
    reader: FileReader, d: str, name: str, widths: dict[str, int], required: bool
) -> ResctrlGroup | None:
    path = d + "schemata"
    text = reader.need(path) if required else reader.read(path)
    if text is None:
        return None
    schemata, mb = parse_schemata(path, text, widths)
    mode = reader.read(d + "mode")
    cpus = reader.read(d + "cpus_list")
    tasks = reader.read(d + "tasks")
    return ResctrlGroup(
        name=name,
        mode=mode.strip() if mode and mode.strip() else "shareable",
        schemata=schemata,
        mb=mb,
        cpus=to_cpus(d + "cpus_list", cpus) if cpus is not None else (),
        tasks=0 if tasks is None else sum(1 for t in tasks.split("\n") if t.strip()),
    )


def _default_schemata_problem(
    default: ResctrlGroup, resources: list[ResctrlResource], caches: list[Cache]
) -> str | None:
    """What is missing from the default group's schemata, or None.

    The kernel always prints a mask for every cache resource and cache ID. Without one,
    that cache's ways would count as held by nobody (all free), and a plan would copy
    an empty mask into a new group.
    """
    for res in resources:
        masks = default.schemata.get(res.name)
        if masks is None:
            return (f"the default group has no {res.name} line (info/{res.name} exists); "
                    "without it every way would look free")
        ids = sorted({c.id for c in caches if c.level == res.level and c.type != "instruction"})
        missing = [i for i in ids if i not in masks]
        if missing:
            which = (f"cache id {missing[0]}" if len(missing) == 1
                     else "cache ids " + ", ".join(map(str, missing)))
            return (f"the default group's {res.name} line has no mask for {which} "
                    f"(cache ids: {', '.join(map(str, ids))}); without it every way would "
                    "look free")
    return None


def _memory_bandwidth(
    reader: FileReader, root: str, groups: list[ResctrlGroup]
) -> MemoryBandwidth | None:
    d = f"{root}/info/MB/"
    text = reader.read(d + "bandwidth_gran")
    if text is None:
        return None
    gran = to_count(d + "bandwidth_gran", text)
    min_bw = to_count(d + "min_bandwidth", reader.need(d + "min_bandwidth"))
    closids = to_count(d + "num_closids", reader.need(d + "num_closids"))
    text = reader.read(d + "delay_linear")
    linear = None if text is None else to_int(d + "delay_linear", text) != 0
    if reader.read(f"{root}/mba_MBps_event") is not None:
        unit = "MBps"
    elif gran == 1 and min_bw == 0:
        unit = "amd"
    elif any(v > 100 for g in groups for v in g.mb.values()):
        unit = "MBps"
    else:
        unit = "percent"
    return MemoryBandwidth(
        bandwidth_gran=gran, min_bandwidth=min_bw, num_closids=closids, unit=unit,
        delay_linear=linear,
    )


def read_resctrl(
    resctrl_root: str | Path | None,
    caches: Iterable[Cache],
    *,
    reader: FileReader | None = None,
) -> Resctrl | None:
    """The mounted resctrl at ``resctrl_root``, or ``None`` (see the module docstring)."""
    if resctrl_root is None:
        return None
    root = os.fspath(resctrl_root).rstrip("/") or "/"
    reader = reader if reader is not None else FileReader()
    info = f"{root}/info"
    names = reader.listdir(info, is_resource)
    if names is None:
        return None
    by_level = sorted(caches, key=lambda c: (c.level, c.id))
    resources = [_resource(reader, info, n, by_level) for n in names]
    resources.sort(key=lambda r: (r.level, _TYPE_ORDER[r.type]))
    widths = {r.name: int(r.cbm_mask, 16).bit_length() for r in resources}

    default = _group(reader, root + "/", "", widths, required=True)
    assert default is not None
    problem = _default_schemata_problem(default, resources, by_level)
    if problem:  # the text is read again only here, to quote it
        text = reader.read(f"{root}/schemata") or ""
        raise ProbeError(f"{root}/schemata", problem, _snippet(text))
    groups = [default]
    subdirs = reader.listdir(root, None, dirs_only=True) or []
    for name in sorted(n for n in subdirs if n not in NOT_GROUPS):
        grp = _group(reader, f"{root}/{name}/", name, widths, required=False)
        if grp is not None:
            groups.append(grp)
    names_set = set(names)
    cdp = {
        lvl: f"{lvl}CODE" in names_set or f"{lvl}DATA" in names_set for lvl in ("L2", "L3")
    }
    return Resctrl(
        cdp=cdp,
        resources=tuple(resources),
        mb=_memory_bandwidth(reader, root, groups),
        groups=tuple(groups),
    )
