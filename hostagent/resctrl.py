"""Cache (CAT/CDP) and memory-bandwidth (MBA) reservations: parse, check and plan. Pure.

This module turns an operator's reservation text into the exact schemata a new resctrl
group needs, using only a ``HostTopology`` (what the probe read). It never touches a
file; ``hostagent.resctrl_fs`` applies plans under the resctrl lock, and the fitter calls
``plan_reservation`` for per-vCPU reservations inside a placement.

Where the rest of resctrl lives: ``hostagent.resctrl_fs`` (the file-system side: lock,
mkdir, write, attach, release, carve), ``hostagent.resctrl_cbm`` (capacity bitmasks: parse,
format, popcount, runs, and ``cache_ways``, who holds which ways), ``hostagent.probe.resctrl``
(reading the mount into the ``HostTopology``), ``hostagent.commands.resctrl`` (the
``hostagent resctrl`` sub-command).

The model
=========

Resources and masks. The kernel exposes each allocatable cache as a *resource*:
``L3`` (or ``L2``) on a host without CDP, the pair ``L3CODE``/``L3DATA`` when the
filesystem is mounted with code/data prioritization. A resource has one *domain* per
cache instance, named by the cache ID (``/sys/devices/system/cpu/cpuN/cache/indexM/id``;
IDs may have gaps, e.g. 0, 2, 4 on AMD). Per domain, every group holds a capacity
bitmask (CBM): bit *i* set means "may fill way *i*". ``info/<res>/cbm_mask`` is the
all-ways mask; one bit (a *way* here) is worth ``cache size / popcount(cbm_mask)``
bytes (the resource's ``granularity_bytes``).

Groups. The root directory is the default group; every top-level directory with a
``schemata`` file is another group (CLOSID). The number of groups, the default group
included, may not exceed the smallest ``num_closids`` of any allocation resource (cache
or MB): the kernel gives every group one CLOSID valid in all of them.

Free ways. A way of a domain is free when no group holds it, the default group
included: start from ``cbm_mask`` and subtract every group's mask (libvirt's rule;
``hostagent.resctrl_cbm.cache_ways`` reports the same numbers). So after a fresh mount nothing
is free until the default group is shrunk (``plan_carve``). ``taken`` lets a caller add
ways it has already promised elsewhere (several plans in one go, nothing written).

A request. ``parse_reservation`` reads items separated by ``;``, each ``key=value``
pairs separated by ``,``:

* cache: ``type=both|code|data,size=<bytes>[,cache-id=<id>][,level=<n>]``;
* bandwidth: ``mb=<value>[,node=<id>]`` (``node`` is the MB domain: the L3 cache ID).

Turning a cache item into ways (``plan_reservation``), in this order:

1. the resource: level ``L<level>``; ``both`` only without CDP at that level,
   ``code``/``data`` only with it; ``code`` must come with ``data`` for the same cache;
2. the cache ID: as given; else the cache that serves the given CPUs; else the one
   with the largest free run (lowest ID on a tie);
3. bytes to ways: the whole cache (or more) is refused, then a size that is not a whole
   number of ways (the error names the two nearest valid sizes), then fewer ways than
   ``min_cbm_bits``;
4. the ways: free ways minus ``taken`` minus anything an exclusive (or pseudo-locked)
   group holds on this resource *or on its CDP peer* (code and data masks index the same
   physical ways; the kernel refuses overlap with an exclusive group across the pair).
   Among the remaining ways, best fit: the smallest contiguous run that holds the
   request, its lowest bits (lowest run on a tie). Ways in ``shareable_bits`` (also
   filled by I/O such as DDIO) are avoided when a run outside them fits; otherwise the
   window inside the chosen run that overlaps them least is taken. On a resource with
   ``sparse_masks`` we still prefer one contiguous run (valid on every CPU, and the
   neighbours of a reservation stay predictable); only when no run fits do we take the
   lowest free ways, non-contiguous, as long as the kernel's rule for sparse masks
   (the first run has at least ``min_cbm_bits`` ways) holds.

The plan is the group's full schemata: every cache resource, every cache ID. Requested
domains get their new mask; all others get the default group's mask (they share with
the default group, as libvirt does). An ``MB`` line is written when bandwidth is
requested (unrequested domains at the maximum: 100 %, 2048 AMD units, or 2^32-1 MBps)
or when the group already exists with a limit that must be reset. Re-planning an
existing group keeps its current ways for an item when they still have the requested
number of ways and overlap nobody, so re-applying the same reservation changes nothing.

Every mask of a plan is checked with the kernel's own rules (``validate_mask``: within
``cbm_mask``, contiguous unless ``sparse_masks``, at least ``min_cbm_bits`` ways, not
empty unless ``min_cbm_bits`` is 0) before it is returned, so a plan never holds a
mask the kernel would refuse. Bad requests raise ``RequestError`` with a message that
quotes the item and says what would be valid.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from hostagent.cpulist import format_cpulist
from hostagent.errors import RequestError
from hostagent.model import HostTopology, Resctrl, ResctrlGroup, ResctrlResource
from hostagent.resctrl_cbm import (
    RESCTRL_TYPE_SUFFIX,
    format_mask,
    largest_run,
    mask_width,
    parse_mask,
    popcount,
    resource_cache_ids,
    run_mask,
    runs,
)
from hostagent.units import format_size, plural

__all__ = [
    "BandwidthChoice",
    "BandwidthItem",
    "CacheChoice",
    "CacheItem",
    "CarveChange",
    "CarvePlan",
    "GroupPlan",
    "MB_MAX",
    "ReservationSpec",
    "choose_ways",
    "merge_taken",
    "parse_reservation",
    "parse_size",
    "plan_carve",
    "plan_reservation",
    "validate_mask",
]

TYPES = ("both", "code", "data")
_TYPE_ORDER = {t: i for i, t in enumerate(TYPES)}
LOCKED_MODES = frozenset({"exclusive", "pseudo-locksetup", "pseudo-locked"})

#: The largest MB value per unit in force (``MemoryBandwidth.unit``).
MB_MAX = {"percent": 100, "amd": 2048, "MBps": 2**32 - 1}
_MB_UNIT_WORDS = {"percent": "percent", "amd": "AMD units of 1/8 GB/s", "MBps": "MBps"}

_UNITS = {
    "": 1, "b": 1,
    "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10,
    "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
    "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30,
}
_SIZE_RE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*")
_CACHE_KEYS = ("type", "size", "cache-id", "cacheid", "level")
_MB_KEYS = ("mb", "node")


# ----------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class CacheItem:
    """One cache item of a request. ``cache_id`` None: chosen by the planner."""

    type: str
    size_bytes: int
    level: int
    cache_id: int | None
    text: str

    @property
    def resource(self) -> str:
        return f"L{self.level}{RESCTRL_TYPE_SUFFIX[self.type]}"


@dataclass(frozen=True)
class BandwidthItem:
    """One memory-bandwidth item. ``node`` is the MB domain id (= L3 cache id) or None."""

    value: int
    node: int | None
    text: str


@dataclass(frozen=True)
class ReservationSpec:
    """A parsed request: its cache items and its bandwidth items, in the order given."""

    caches: tuple[CacheItem, ...]
    bandwidth: tuple[BandwidthItem, ...]
    text: str


def parse_size(text: str) -> int:
    """``10mb`` → 10485760. Units b, k/kb/kib, m/mb/mib, g/gb/gib (any case, binary);
    no unit means bytes; a decimal must come to a whole number of bytes."""
    m = _SIZE_RE.fullmatch(text)
    if not m:
        raise ValueError(f"size {text!r} is not a number with an optional unit (e.g. 10mb)")
    number, unit = m.group(1), m.group(2).lower()
    if unit not in _UNITS:
        raise ValueError(
            f"size {text!r} has an unknown unit {m.group(2)!r} "
            "(valid: b, k, kb, kib, m, mb, mib, g, gb, gib)"
        )
    value = Fraction(number) * _UNITS[unit]
    if value.denominator != 1:
        raise ValueError(f"size {text!r} is not a whole number of bytes")
    return int(value)


def _nonneg_int(key: str, value: str, what: str) -> int:
    v = value.strip()
    if not v.isdigit():
        raise ValueError(f"{key} {value!r} is not {what}")
    return int(v)


def _parse_item(n: int, item: str, default_level: int) -> CacheItem | BandwidthItem:
    where = f"reservation item {n} {item!r}"
    pairs: dict[str, str] = {}
    for part in item.split(","):
        part = part.strip()
        if not part:
            continue
        key, eq, value = part.partition("=")
        key = key.strip().lower()
        if not eq or not key:
            raise RequestError(f"{where}: {part!r} is not key=value")
        if key == "cacheid":
            key = "cache-id"
        if key in pairs:
            raise RequestError(f"{where}: {key} is given twice")
        pairs[key] = value.strip()
    try:
        if "mb" in pairs:
            bad = sorted(k for k in pairs if k not in _MB_KEYS)
            if bad:
                raise ValueError(
                    f"{bad[0]!r} does not belong in a bandwidth item (valid: mb, node)"
                )
            value = _nonneg_int("mb", pairs["mb"], "a whole number")
            node = pairs.get("node")
            return BandwidthItem(
                value=value,
                node=None if node is None else _nonneg_int("node", node, "an MB domain id"),
                text=item.strip(),
            )
        bad = sorted(k for k in pairs if k not in _CACHE_KEYS)
        if bad:
            raise ValueError(
                f"unknown key {bad[0]!r} (valid: type, size, cache-id, level; "
                "or mb, node for bandwidth)"
            )
        if "type" not in pairs:
            raise ValueError("type= is missing (one of both, code, data)")
        ctype = pairs["type"].lower()
        if ctype not in TYPES:
            raise ValueError(f"type {pairs['type']!r} is not one of both, code, data")
        if "size" not in pairs:
            raise ValueError("size= is missing (e.g. size=2mb)")
        size = parse_size(pairs["size"])
        level = default_level
        if "level" in pairs:
            level = _nonneg_int("level", pairs["level"], "a cache level such as 2 or 3")
            if level < 1:
                raise ValueError(f"level {pairs['level']!r} is not a cache level such as 2 or 3")
        cid = pairs.get("cache-id")
        return CacheItem(
            type=ctype,
            size_bytes=size,
            level=level,
            cache_id=None if cid is None else _nonneg_int("cache-id", cid, "a cache id"),
            text=item.strip(),
        )
    except ValueError as exc:
        raise RequestError(f"{where}: {exc}") from None


def _where(level: int, cid: int | None) -> str:
    return f"L{level} (no cache-id)" if cid is None else f"L{level} cache {cid}"


def parse_reservation(text: str, *, default_level: int = 3) -> ReservationSpec:
    """Parse ``type=both,size=10mb,cache-id=2;type=code,...;mb=50,node=0``.

    Raises ``RequestError`` quoting the offending item and what would be valid. Checks
    what can be checked without the host: keys, values, units, duplicates, a ``both``
    item next to ``code``/``data`` for the same cache, ``code`` without ``data``.
    """
    if not text or not text.strip():
        raise RequestError(
            "empty reservation: give items such as 'type=both,size=2mb,cache-id=0' "
            "or 'mb=50,node=0', separated by ';'"
        )
    caches: list[CacheItem] = []
    bandwidth: list[BandwidthItem] = []
    n = 0
    for raw in text.split(";"):
        if not raw.strip():
            continue
        n += 1
        item = _parse_item(n, raw, default_level)
        if isinstance(item, CacheItem):
            caches.append(item)
        else:
            bandwidth.append(item)
    if not caches and not bandwidth:
        raise RequestError(f"empty reservation {text!r}: give at least one item")
    _check_collisions(caches)
    seen: dict[int | None, BandwidthItem] = {}
    for b in bandwidth:
        if b.node in seen:
            what = "with no node" if b.node is None else f"for node {b.node}"
            raise RequestError(
                f"reservation items {seen[b.node].text!r} and {b.text!r}: two bandwidth "
                f"values {what}"
            )
        seen[b.node] = b
    return ReservationSpec(caches=tuple(caches), bandwidth=tuple(bandwidth), text=text.strip())


def _check_collisions(caches: Sequence[CacheItem], resolved: bool = False) -> None:
    by_key: dict[tuple[int, int | None, str], CacheItem] = {}
    for it in caches:
        key = (it.level, it.cache_id, it.type)
        if key in by_key:
            raise RequestError(
                f"reservation items {by_key[key].text!r} and {it.text!r} both ask for "
                f"type={it.type} on {_where(it.level, it.cache_id)}"
                + ("" if not resolved else " (the cache chosen for both)")
            )
        by_key[key] = it
    for (level, cid, ctype), it in by_key.items():
        if ctype == "both":
            for other in ("code", "data"):
                if (level, cid, other) in by_key:
                    raise RequestError(
                        f"reservation items {it.text!r} and {by_key[(level, cid, other)].text!r}"
                        f" collide: type=both cannot be combined with type={other} on "
                        f"{_where(level, cid)}"
                    )
        if ctype == "code" and (level, cid, "data") not in by_key:
            raise RequestError(
                f"reservation item {it.text!r}: type=code must be paired with type=data "
                f"for the same cache ({_where(level, cid)}), e.g. "
                f"'{it.text};type=data,size=...'"
            )


# ----------------------------------------------------------------------------- masks


def validate_mask(mask: int, res: ResctrlResource) -> str | None:
    """What the kernel would say about writing ``mask`` for ``res``, or None if valid.

    Mirrors the kernel's CBM check: the value must lie within ``cbm_mask`` (and not be 0
    when ``min_cbm_bits`` > 0); without ``sparse_masks`` the set bits must be one run; the
    first run must have at least ``min_cbm_bits`` bits.
    """
    full = parse_mask(res.cbm_mask)
    if mask & ~full or (mask == 0 and res.min_cbm_bits > 0):
        return f"mask {mask:x} out of range (cbm_mask {res.cbm_mask})"
    if mask == 0:
        return None
    rs = runs(mask)
    if len(rs) > 1 and not res.sparse_masks:
        return f"mask {mask:x} has non-consecutive 1-bits"
    if rs[0][1] < res.min_cbm_bits:
        return f"mask {mask:x}: need at least {res.min_cbm_bits} consecutive bits"
    return None


def _lowest_bits(pool: int, n: int) -> int:
    out = 0
    bit = 0
    while n and pool >> bit:
        if pool >> bit & 1:
            out |= 1 << bit
            n -= 1
        bit += 1
    return out if n == 0 else -1


def choose_ways(
    free: int, need: int, *, shareable: int = 0, sparse: bool = False, min_bits: int = 1
) -> int | None:
    """The mask of ``need`` ways to take from ``free`` (see the module docstring), or None.

    Best fit over contiguous runs: the smallest run that holds ``need``, its lowest bits;
    runs outside ``shareable`` first. With ``sparse`` the lowest free ways are taken only
    when no run fits (and the first run of the result is at least ``min_bits`` long).
    """
    if need <= 0:
        return 0
    preferred = free & ~shareable
    fits = [(length, start) for start, length in runs(preferred) if length >= need]
    if fits:
        _, start = min(fits)
        return run_mask(start, need)
    fits = [(length, start) for start, length in runs(free) if length >= need]
    if fits:
        length, start = min(fits)
        best = min(
            range(start, start + length - need + 1),
            key=lambda s: (popcount(run_mask(s, need) & shareable), s),
        )
        return run_mask(best, need)
    if sparse and popcount(free) >= need:
        n_pref = popcount(preferred)
        if n_pref >= need:
            got = _lowest_bits(preferred, need)
        else:  # not enough outside shareable: top up with the lowest shareable ways
            got = preferred | _lowest_bits(free & ~preferred, need - n_pref)
        if runs(got)[0][1] >= min_bits:
            return got
    return None


# ----------------------------------------------------------------------------- plans


@dataclass(frozen=True)
class CacheChoice:
    """The ways chosen for one cache item."""

    resource: str
    level: int
    type: str
    cache_id: int
    ways: int
    bytes: int
    mask: int
    width: int
    reused: bool = False  # the group already held exactly these ways

    @property
    def mask_hex(self) -> str:
        return format_mask(self.mask, self.width)

    def to_dict(self) -> dict[str, Any]:
        return {
            "resource": self.resource,
            "level": self.level,
            "type": self.type,
            "cache_id": self.cache_id,
            "ways": self.ways,
            "bytes": self.bytes,
            "mask": self.mask_hex,
            "reused": self.reused,
        }


@dataclass(frozen=True)
class BandwidthChoice:
    """The MB value for one domain, in ``unit`` (``MemoryBandwidth.unit``)."""

    node: int
    value: int
    unit: str

    def to_dict(self) -> dict[str, Any]:
        return {"node": self.node, "value": self.value, "unit": self.unit}


def _order(name: str) -> tuple[int, int]:
    m = re.fullmatch(r"L([0-9]+)(CODE|DATA)?", name)
    if not m:
        return (1 << 30, 0)
    return (int(m.group(1)), {None: 0, "CODE": 1, "DATA": 2}[m.group(2)])


def schemata_text(
    schemata: Mapping[str, Mapping[int, str]], mb: Mapping[int, int] | None = None
) -> str:
    """``L3:0=00f;1=7c0\\nMB:0=50;1=100\\n``: resources by level, then both/code/data."""
    lines = [
        f"{name}:" + ";".join(f"{cid}={mask}" for cid, mask in sorted(ids.items()))
        for name, ids in sorted(schemata.items(), key=lambda kv: _order(kv[0]))
    ]
    if mb:
        lines.append("MB:" + ";".join(f"{d}={v}" for d, v in sorted(mb.items())))
    return "".join(line + "\n" for line in lines)


@dataclass(frozen=True)
class GroupPlan:
    """Everything to write for one group. ``schemata``: every cache resource and ID;
    ``mb``: the MB line (empty: none written)."""

    group: str
    schemata: Mapping[str, Mapping[int, str]]
    mb: Mapping[int, int]
    caches: tuple[CacheChoice, ...]
    bandwidth: tuple[BandwidthChoice, ...]
    exists: bool = False  # the group was already there when planned
    spec: str = ""

    @property
    def text(self) -> str:
        """The schemata file text to write (one write; the kernel applies it whole)."""
        return schemata_text(self.schemata, self.mb)

    def taken(self) -> dict[tuple[str, int], int]:
        """The ways this plan reserves, as ``taken`` for the next ``plan_reservation``."""
        out: dict[tuple[str, int], int] = {}
        for c in self.caches:
            out[(c.resource, c.cache_id)] = out.get((c.resource, c.cache_id), 0) | c.mask
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "group": self.group,
            "spec": self.spec,
            "exists": self.exists,
            "schemata_text": self.text,
            "schemata": {
                r: {str(k): v for k, v in sorted(ids.items())} for r, ids in self.schemata.items()
            },
            "mb": {str(k): v for k, v in sorted(self.mb.items())},
            "caches": [c.to_dict() for c in self.caches],
            "bandwidth": [b.to_dict() for b in self.bandwidth],
        }


def merge_taken(
    *takens: Mapping[tuple[str, int], int] | None,
) -> dict[tuple[str, int], int]:
    """Union of several ``taken`` maps (e.g. ``merge_taken(taken, plan.taken())``)."""
    out: dict[tuple[str, int], int] = {}
    for t in takens:
        for key, mask in (t or {}).items():
            out[key] = out.get(key, 0) | mask
    return out


def _no_resctrl() -> RequestError:
    return RequestError(
        "resctrl is not mounted on this host (no info/ directory): cache and bandwidth "
        "reservations are not possible (mount -t resctrl resctrl /sys/fs/resctrl)"
    )


def _peer(name: str) -> str | None:
    if name.endswith("CODE"):
        return name[:-4] + "DATA"
    if name.endswith("DATA"):
        return name[:-4] + "CODE"
    return None


def _mask_of(grp: ResctrlGroup, res: str, cid: int, full: int) -> int:
    text = grp.schemata.get(res, {}).get(cid)
    return 0 if text is None else parse_mask(text) & full


def _check_default_masks(topo: HostTopology, rc: Resctrl) -> None:
    """The default group must hold a mask for every cache resource and cache ID: a
    missing one would make every way of that cache look free (``RequestError``)."""
    default = rc.group("")
    if default is None:  # no default group at all: it is taken to hold every way
        return
    for res in rc.resources:
        masks = default.schemata.get(res.name, {})
        for cid in resource_cache_ids(topo, res):
            if cid not in masks:
                raise RequestError(
                    f"the default group's schemata has no {res.name} mask for cache id "
                    f"{cid}; without it every way would look free (read the default "
                    "group's schemata again)"
                )


@dataclass
class _Domain:
    """One (resource, cache id) as the planner sees it."""

    res: ResctrlResource
    cid: int
    full: int
    others: int  # ways held by groups other than the planned one (default included)
    locked: int  # ways held by exclusive/pseudo-locked groups, on this resource or its peer
    taken: int

    @property
    def free(self) -> int:
        return self.full & ~self.others & ~self.locked & ~self.taken


def _domain(
    rc: Resctrl, res: ResctrlResource, cid: int, group: str, taken: Mapping[tuple[str, int], int]
) -> _Domain:
    full = parse_mask(res.cbm_mask)
    peer = _peer(res.name)
    others = 0
    locked = 0
    for g in rc.groups:
        if g.name == group and g.name:
            continue
        m = _mask_of(g, res.name, cid, full)
        others |= m
        if g.mode in LOCKED_MODES:
            locked |= m
            if peer:
                locked |= _mask_of(g, peer, cid, full)
    return _Domain(res, cid, full, others, locked, taken.get((res.name, cid), 0) & full)


def _closid_check(rc: Resctrl, pending_groups: int) -> None:
    limits = {r.name: r.num_closids for r in rc.resources if r.num_closids > 0}
    if rc.mb is not None and rc.mb.num_closids > 0:
        limits["MB"] = rc.mb.num_closids
    if not limits:
        return
    limit = min(limits.values())
    used = len(rc.groups) + pending_groups
    if used >= limit:
        detail = ", ".join(f"{k}={v}" for k, v in limits.items())
        pend = f" (+{pending_groups} planned)" if pending_groups else ""
        raise RequestError(
            f"no CLOSID left for a new group: {len(rc.groups)} groups{pend} already use all "
            f"{limit} (the default group counts; num_closids: {detail}); release a group first"
        )


def _resolve_resource(rc: Resctrl, it: CacheItem) -> ResctrlResource:
    res = rc.resource(it.resource)
    if res is not None:
        return res
    at_level = [r for r in rc.resources if r.level == it.level]
    names = ", ".join(r.name for r in rc.resources) or "none"
    if not at_level:
        raise RequestError(
            f"reservation item {it.text!r}: cache level {it.level} has no allocation "
            f"(CAT) on this host (resources: {names})"
        )
    if it.type == "both":
        raise RequestError(
            f"reservation item {it.text!r}: type=both is not possible: L{it.level} runs "
            f"with CDP on this host (resources {', '.join(r.name for r in at_level)}); "
            "ask for type=code together with type=data"
        )
    raise RequestError(
        f"reservation item {it.text!r}: type={it.type} needs CDP, which is off for "
        f"L{it.level} on this host (resource L{it.level}); use type=both"
    )


def _caches_serving(topo: HostTopology, level: int, cpus: Sequence[int]) -> list[int]:
    want = set(cpus)
    return sorted(
        {
            c.id
            for c in topo.caches
            if c.level == level and c.type != "instruction" and want & set(c.cpus)
        }
    )


def _pick_id_by_cpus(
    topo: HostTopology, level: int, cpus: Sequence[int], items: Sequence[Any], what: str
) -> int:
    ids = _caches_serving(topo, level, cpus)
    texts = " and ".join(repr(i.text) for i in items)
    if not ids:
        raise RequestError(
            f"reservation item {texts}: CPUs {format_cpulist(cpus)} are not served by any "
            f"L{level} cache on this host; give {what}"
        )
    if len(ids) > 1:
        raise RequestError(
            f"reservation item {texts}: CPUs {format_cpulist(cpus)} are served by several "
            f"L{level} caches (ids {', '.join(map(str, ids))}); give {what} "
            "(one reservation item per cache)"
        )
    return ids[0]


def _nearest_sizes(size: int, gran: int, lo: int, hi: int) -> list[int]:
    ways = sorted(range(lo, hi + 1), key=lambda w: (abs(w * gran - size), w))[:2]
    return sorted(w * gran for w in ways)


def _ways_needed(it: CacheItem, res: ResctrlResource, cid: int) -> int:
    gran = res.granularity_bytes
    where = f"reservation item {it.text!r}"
    if gran <= 0:
        raise RequestError(
            f"{where}: the size of L{res.level} cache {cid} is unknown (no sysfs cache entry), "
            "so bytes cannot be turned into ways"
        )
    total = gran * res.cbm_bits
    size = it.size_bytes
    lo = max(res.min_cbm_bits, 1)
    hi = res.cbm_bits - 1
    if size >= total:
        word = "is the whole" if size == total else "is more than the whole"
        raise RequestError(
            f"{where}: size {format_size(size)} {word} L{res.level} cache {cid} "
            f"({format_size(total)}, {res.cbm_bits} ways); the default group must keep some: "
            f"at most {format_size(hi * gran)} ({plural(hi, 'way')})"
        )
    if size % gran:
        near = " and ".join(f"{format_size(s)} ({plural(s // gran, 'way')})"
                            for s in _nearest_sizes(size, gran, lo, hi))
        raise RequestError(
            f"{where}: size {format_size(size)} is not a whole number of {res.name} ways "
            f"(one way = {format_size(gran)} = {gran} bytes); nearest valid sizes: {near}"
        )
    need = size // gran
    if need < res.min_cbm_bits:
        raise RequestError(
            f"{where}: size {format_size(size)} is {plural(need, 'way')}, below the minimum of "
            f"{plural(res.min_cbm_bits, 'way')} (min_cbm_bits) on {res.name}; the smallest "
            f"reservation is {format_size(res.min_cbm_bits * gran)}"
        )
    return need


def _pick_free_id(
    topo: HostTopology, rc: Resctrl, resources: Sequence[ResctrlResource], group: str,
    taken: Mapping[tuple[str, int], int],
) -> int | None:
    ids = set(resource_cache_ids(topo, resources[0]))
    for r in resources[1:]:
        ids &= set(resource_cache_ids(topo, r))
    best: tuple[int, int] | None = None
    for cid in sorted(ids):
        score = min(largest_run(_domain(rc, r, cid, group, taken).free) for r in resources)
        if best is None or score > best[0]:
            best = (score, cid)
    return None if best is None else best[1]


def _mb_domains(topo: HostTopology, rc: Resctrl) -> list[int]:
    default = rc.group("")
    if default is not None and default.mb:
        return sorted(default.mb)
    top = _mb_level(topo)
    return sorted({c.id for c in topo.caches if c.level == top and c.type != "instruction"})


def _check_mb_value(b: BandwidthItem, rc: Resctrl) -> None:
    mb = rc.mb
    assert mb is not None
    unit = mb.unit
    words = _MB_UNIT_WORDS.get(unit, unit)
    where = f"reservation item {b.text!r}"
    if unit not in MB_MAX:
        raise RequestError(f"{where}: MB values in unit {unit!r} are not supported")
    top = MB_MAX[unit]
    if b.value > top:
        raise RequestError(
            f"{where}: mb={b.value} is above the maximum of {top} ({words} in force)"
        )
    if unit == "MBps":
        # the software controller takes any MBps value; granularity and minimum apply to
        # the percentage it programs, not to the value written
        if b.value < 1:
            raise RequestError(f"{where}: mb=0 MBps would stop all traffic; give 1..{top}")
        return
    if b.value < mb.min_bandwidth:
        raise RequestError(
            f"{where}: mb={b.value} is below min_bandwidth {mb.min_bandwidth} ({words})"
        )
    gran = mb.bandwidth_gran
    if gran > 1 and b.value % gran:
        low = b.value - b.value % gran
        near = [v for v in (low, low + gran) if mb.min_bandwidth <= v <= top]
        raise RequestError(
            f"{where}: mb={b.value} is not a multiple of bandwidth_gran {gran} ({words}); "
            f"nearest valid: {' and '.join(map(str, near))}"
        )


def plan_reservation(
    topo: HostTopology,
    spec: ReservationSpec,
    *,
    group: str,
    cpus: Sequence[int] = (),
    taken: Mapping[tuple[str, int], int] | None = None,
    pending_groups: int = 0,
) -> GroupPlan:
    """The full schemata for ``group`` holding ``spec`` (see the module docstring).

    ``group`` is the resctrl directory name; when it already exists, its own ways count
    as free and are kept where they still fit. ``cpus`` picks the cache (and MB domain)
    for items without ``cache-id`` (``node``). ``taken`` maps ``(resource, cache id)`` to
    ways already promised elsewhere; ``pending_groups`` counts groups already planned
    but not created (each needs a CLOSID). Raises ``RequestError``.
    """
    rc = topo.resctrl
    if rc is None:
        raise _no_resctrl()
    if not group:
        raise RequestError("the default group cannot hold a reservation; name a group")
    _check_default_masks(topo, rc)
    taken = taken or {}
    existing = rc.group(group)
    if existing is None:
        _closid_check(rc, pending_groups)
    online = {c.id for c in topo.cpus if c.online}
    bad = [c for c in cpus if c not in online]
    if bad:
        raise RequestError(
            f"CPU(s) {format_cpulist(bad)} are not online CPUs of this host (online: "
            f"{format_cpulist(online)})"
        )

    # 1. resources and cache ids
    resolved: list[tuple[CacheItem, ResctrlResource]] = [
        (it, _resolve_resource(rc, it)) for it in spec.caches
    ]
    chosen_ids: dict[int, int] = {}
    by_level: dict[int, list[tuple[CacheItem, ResctrlResource]]] = {}
    for it, res in resolved:
        if it.cache_id is None:
            by_level.setdefault(it.level, []).append((it, res))
    for level, pairs in by_level.items():
        if cpus:
            chosen_ids[level] = _pick_id_by_cpus(
                topo, level, cpus, [p[0] for p in pairs], "cache-id="
            )
        else:
            cid = _pick_free_id(topo, rc, [p[1] for p in pairs], group, taken)
            if cid is None:
                raise RequestError(
                    f"reservation item {pairs[0][0].text!r}: no L{level} cache ids found"
                )
            chosen_ids[level] = cid
    items: list[tuple[CacheItem, ResctrlResource, int]] = []
    for it, res in resolved:
        cid = it.cache_id if it.cache_id is not None else chosen_ids[it.level]
        ids = resource_cache_ids(topo, res)
        if cid not in ids:
            raise RequestError(
                f"reservation item {it.text!r}: there is no {res.name} cache id {cid} "
                f"(cache ids: {', '.join(map(str, ids)) or 'none'})"
            )
        items.append((it, res, cid))
    _check_collisions(
        [CacheItem(it.type, it.size_bytes, it.level, cid, it.text) for it, _, cid in items],
        resolved=True,
    )

    # 2. ways
    default = rc.group("")
    schemata: dict[str, dict[int, str]] = {}
    for res in rc.resources:
        full = parse_mask(res.cbm_mask)
        width = mask_width(full)
        schemata[res.name] = {
            cid: format_mask(
                _mask_of(default, res.name, cid, full) if default else full, width
            )
            for cid in resource_cache_ids(topo, res)
        }
    promised = dict(taken)
    choices: list[CacheChoice] = []
    for it, res, cid in items:
        need = _ways_needed(it, res, cid)
        dom = _domain(rc, res, cid, group, promised)
        shareable = parse_mask(res.shareable_bits) if res.shareable_bits else 0
        mask: int | None = None
        reused = False
        if existing is not None:
            cur = _mask_of(existing, res.name, cid, dom.full)
            if (
                popcount(cur) == need
                and cur & ~dom.free == 0
                and validate_mask(cur, res) is None
            ):
                mask, reused = cur, True
        if mask is None:
            mask = choose_ways(
                dom.free, need, shareable=shareable, sparse=res.sparse_masks,
                min_bits=res.min_cbm_bits,
            )
        if mask is None:
            free = dom.free
            run = largest_run(free)
            gran = res.granularity_bytes
            raise RequestError(
                f"reservation item {it.text!r}: not enough contiguous free ways on {res.name} "
                f"cache {cid}: need {plural(need, 'way')} ({format_size(need * gran)}), "
                f"largest free run is {plural(run, 'way')} = {format_size(run * gran)} "
                f"({plural(popcount(free), 'way')} free in all); free more with "
                "'hostagent resctrl carve' or release a group"
            )
        problem = validate_mask(mask, res)
        if problem:  # a bug if it happens: never hand out a mask the kernel refuses
            raise RequestError(f"internal: planned {res.name}:{cid} {problem}")
        width = mask_width(dom.full)
        schemata[res.name][cid] = format_mask(mask, width)
        promised[(res.name, cid)] = promised.get((res.name, cid), 0) | mask
        choices.append(
            CacheChoice(
                resource=res.name, level=res.level, type=res.type, cache_id=cid,
                ways=popcount(mask), bytes=popcount(mask) * res.granularity_bytes,
                mask=mask, width=width, reused=reused,
            )
        )
    requested = {(c.resource, c.cache_id) for c in choices}
    for res in rc.resources:
        for cid, text in schemata[res.name].items():
            if (res.name, cid) in requested:
                continue
            problem = validate_mask(parse_mask(text), res)
            if problem:  # never write a mask the kernel refuses (e.g. 0 ways)
                raise RequestError(
                    f"the default group's {res.name}:{cid} mask {text} cannot be copied into "
                    f"group {group}: {problem} (min_cbm_bits {res.min_cbm_bits}); fix the "
                    "default group's schemata first"
                )
            dom = _domain(rc, res, cid, group, {})
            if parse_mask(text) & dom.locked:
                raise RequestError(
                    f"the default group's {res.name}:{cid} mask {text} overlaps an exclusive "
                    "group; the kernel would refuse to copy it into a new group (fix the "
                    "default group's schemata first)"
                )

    # 3. bandwidth
    bw: list[BandwidthChoice] = []
    mb_line: dict[int, int] = {}
    if spec.bandwidth:
        if rc.mb is None:
            raise RequestError(
                f"reservation item {spec.bandwidth[0].text!r}: memory bandwidth allocation "
                "(MBA) is not available on this host (no info/MB)"
            )
        domains = _mb_domains(topo, rc)
        top = MB_MAX.get(rc.mb.unit, 100)
        mb_line = {d: top for d in domains}
        for b in spec.bandwidth:
            node = b.node
            if node is None:
                if not cpus:
                    raise RequestError(
                        f"reservation item {b.text!r}: give node= (MB domains: "
                        f"{', '.join(map(str, domains))}) or the CPUs to reserve for"
                    )
                node = _pick_id_by_cpus(topo, _mb_level(topo), cpus, [b], "node=")
            if node not in domains:
                raise RequestError(
                    f"reservation item {b.text!r}: there is no MB domain (node) {node} "
                    f"(MB domains: {', '.join(map(str, domains))})"
                )
            if node in {c.node for c in bw}:
                raise RequestError(
                    f"reservation item {b.text!r}: a second bandwidth value for node {node}"
                )
            _check_mb_value(b, rc)
            mb_line[node] = b.value
            bw.append(BandwidthChoice(node=node, value=b.value, unit=rc.mb.unit))
    elif existing is not None and rc.mb is not None and existing.mb:
        top = MB_MAX.get(rc.mb.unit, 100)
        if any(v != top for v in existing.mb.values()):
            mb_line = {d: top for d in _mb_domains(topo, rc)}
    return GroupPlan(
        group=group,
        schemata=schemata,
        mb=mb_line,
        caches=tuple(choices),
        bandwidth=tuple(bw),
        exists=existing is not None,
        spec=spec.text,
    )


def _mb_level(topo: HostTopology) -> int:
    """MB domains are the last-level caches (libvirt and the kernel agree)."""
    return max((c.level for c in topo.caches if c.type != "instruction"), default=3)


# ----------------------------------------------------------------------------- carve


@dataclass(frozen=True)
class CarveChange:
    """The default group's mask on one domain, before and after carving."""

    resource: str
    cache_id: int
    before: int
    after: int
    width: int
    free_before: int
    free_after: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "resource": self.resource,
            "cache_id": self.cache_id,
            "before": format_mask(self.before, self.width),
            "after": format_mask(self.after, self.width),
            "freed": format_mask(self.before & ~self.after, self.width),
            "free_before": format_mask(self.free_before, self.width),
            "free_after": format_mask(self.free_after, self.width),
            "largest_free_run": largest_run(self.free_after),
        }


@dataclass(frozen=True)
class CarvePlan:
    """New masks for the default group. ``schemata`` holds the full lines of every
    resource that changes; ``changes`` one entry per domain looked at."""

    ways: int
    schemata: Mapping[str, Mapping[int, str]]
    changes: tuple[CarveChange, ...]

    @property
    def changed(self) -> bool:
        return any(c.before != c.after for c in self.changes)

    @property
    def text(self) -> str:
        return schemata_text(self.schemata)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ways": self.ways,
            "changed": self.changed,
            "schemata_text": self.text,
            "changes": [c.to_dict() for c in self.changes],
        }


def _end_bits(mask: int, k: int, high: bool) -> int:
    bits = [b for b in range(mask.bit_length()) if mask >> b & 1]
    pick = bits[-k:] if high else bits[:k]
    return sum(1 << b for b in pick)


def _carve_one(
    rc: Resctrl, res: ResctrlResource, cid: int, ways: int
) -> CarveChange:
    full = parse_mask(res.cbm_mask)
    width = mask_width(full)
    default = rc.group("")
    dmask = _mask_of(default, res.name, cid, full) if default else full
    others = 0
    holders: dict[str, int] = {}
    for g in rc.groups:
        if g.name:
            m = _mask_of(g, res.name, cid, full)
            others |= m
            holders[g.name] = m
    free = full & ~dmask & ~others
    if largest_run(free) >= ways:
        return CarveChange(res.name, cid, dmask, dmask, width, free, free)
    shareable = parse_mask(res.shareable_bits) if res.shareable_bits else 0
    keep = max(res.min_cbm_bits, 1)
    best: tuple[tuple[int, int, int], int] | None = None
    blocked: set[str] = set()
    exhausted = False
    for high in (True, False):
        for k in range(1, popcount(dmask) - keep + 1):
            cut = _end_bits(dmask, k, high)
            if cut & others:
                blocked.update(n for n, m in holders.items() if m & cut)
                break
            after = dmask & ~cut
            if validate_mask(after, res) is not None:
                continue
            if largest_run(free | cut) >= ways:
                key = (k, popcount(cut & shareable), 0 if high else 1)
                if best is None or key < best[0]:
                    best = (key, after)
                break
        else:
            exhausted = True
    where = f"carve {res.name} cache {cid}"
    if best is None:
        reasons = []
        if blocked:
            reasons.append(
                "the ways the default group would give up are also held by "
                f"{', '.join(sorted(blocked))} (carving would cut into that group)"
            )
        if exhausted or not blocked:
            reasons.append(
                f"the default group ({format_mask(dmask, width)}) must keep at least "
                f"{plural(keep, 'way')} (min_cbm_bits {res.min_cbm_bits})"
            )
        raise RequestError(
            f"{where}: cannot free a run of {plural(ways, 'way')}: {'; '.join(reasons)}; "
            f"free now: {format_mask(free, width)} (largest run {largest_run(free)})"
        )
    after = best[1]
    return CarveChange(res.name, cid, dmask, after, width, free, free | (dmask & ~after))


def plan_carve(
    topo: HostTopology, ways: int, *, cache_id: int | None = None, level: int = 3
) -> CarvePlan:
    """Shrink the default group so that each cache ID (or just ``cache_id``) of every
    resource at ``level`` has a contiguous free run of at least ``ways`` ways.

    Domains that already have such a run are left alone (carving twice changes nothing).
    Ways are taken from one end of the default group's mask (the fewest, then the fewest
    in ``shareable_bits``, then the high end). Refused (``RequestError``) when the default
    group would keep fewer than ``max(min_cbm_bits, 1)`` ways or when the ways it gives
    up are also held by another group (they would not become free).
    """
    rc = topo.resctrl
    if rc is None:
        raise _no_resctrl()
    _check_default_masks(topo, rc)
    resources = [r for r in rc.resources if r.level == level]
    if not resources:
        names = ", ".join(r.name for r in rc.resources) or "none"
        raise RequestError(f"carve: cache level {level} has no allocation (resources: {names})")
    bits = min(r.cbm_bits for r in resources)
    if ways < 1 or ways >= bits:
        raise RequestError(
            f"carve: --ways {ways} is out of range: give 1 to {bits - 1} "
            f"({resources[0].name} has {bits} ways and the default group keeps at least one)"
        )
    changes: list[CarveChange] = []
    schemata: dict[str, dict[int, str]] = {}
    for res in resources:
        ids = resource_cache_ids(topo, res)
        if cache_id is not None and cache_id not in ids:
            raise RequestError(
                f"carve: there is no {res.name} cache id {cache_id} "
                f"(cache ids: {', '.join(map(str, ids))})"
            )
        line: dict[int, str] = {}
        for cid in ids:
            full = parse_mask(res.cbm_mask)
            default = rc.group("")
            current = _mask_of(default, res.name, cid, full) if default else full
            if cache_id is None or cid == cache_id:
                ch = _carve_one(rc, res, cid, ways)
                changes.append(ch)
                current = ch.after
            line[cid] = format_mask(current, mask_width(full))
        schemata[res.name] = line
    return CarvePlan(ways=ways, schemata=schemata, changes=tuple(changes))


def describe_items(items: Iterable[CacheChoice]) -> list[str]:
    """One readable line per chosen cache item (for the CLI)."""
    return [
        f"{c.resource}:{c.cache_id}={c.mask_hex}  {plural(c.ways, 'way')} = {format_size(c.bytes)}"
        + (" (kept)" if c.reused else "")
        for c in items
    ]
