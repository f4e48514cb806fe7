"""Capacity bitmasks (CBMs) and who holds which cache ways.

The model (kernel ``Documentation/filesystems/resctrl.rst``, libvirt ``virresctrl.c``):
a cache resource such as ``L3`` has a valid mask ``cbm_mask`` (all ways); each resctrl
group holds, per cache ID, a mask of ways its tasks may fill. Masks are written as
lowercase hex zero-padded to the width of ``cbm_mask``.

A way is *free* when no group holds it, the default group included. That is libvirt's
rule (``virResctrlAllocGetUnused``): start from the full ``cbm_mask`` for every cache ID
that exists, subtract the default group's mask and every other group's mask. It is what
libvirt (and ``hostagent resctrl reserve``) can hand out without overlapping anybody.
After a fresh mount the default group holds every way, so nothing is free until an
operator shrinks it (``hostagent resctrl carve``).

``shareable_bits`` (ways that I/O such as DDIO also fills) are not removed from the free
mask; they are reported so that a planner can prefer other ways.
"""

from __future__ import annotations

from hostagent.model import HostTopology, Resctrl, ResctrlResource

TYPE_CHECKING = False  # typing is not imported at run time: `hostagent probe` starts faster
if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from typing import Any


def parse_mask(text: str) -> int:
    """A hex mask as the kernel prints it (no ``0x``; a leading ``0x`` is tolerated)."""
    t = text.strip().lower()
    if t.startswith("0x"):
        t = t[2:]
    if not t or any(ch not in "0123456789abcdef" for ch in t):
        raise ValueError(f"not a hex mask: {text!r}")
    return int(t, 16)


def mask_width(cbm_mask: int) -> int:
    """Number of bits a mask of this resource spans (``cbm_mask`` always starts at bit 0)."""
    return cbm_mask.bit_length()


def format_mask(value: int, width_bits: int) -> str:
    """Lowercase hex zero-padded to ``ceil(width_bits / 4)`` digits, as libvirt writes it."""
    digits = max(1, (width_bits + 3) // 4)
    return format(value, f"0{digits}x")


def popcount(value: int) -> int:
    return bin(value).count("1")


def runs(value: int) -> list[tuple[int, int]]:
    """Contiguous runs of set bits as ``(lowest_bit, length)``, lowest first."""
    out: list[tuple[int, int]] = []
    bit = 0
    while value >> bit:
        if (value >> bit) & 1:
            start = bit
            while (value >> bit) & 1:
                bit += 1
            out.append((start, bit - start))
        else:
            bit += 1
    return out


def largest_run(value: int) -> int:
    return max((length for _, length in runs(value)), default=0)


def is_contiguous(value: int) -> bool:
    return len(runs(value)) <= 1


def run_mask(start: int, length: int) -> int:
    return ((1 << length) - 1) << start


RESCTRL_TYPE_SUFFIX = {"both": "", "code": "CODE", "data": "DATA"}


def resource_cache_ids(topo: HostTopology, res: ResctrlResource) -> list[int]:
    """Cache IDs of the level a resource controls: from sysfs caches, else from schemata."""
    ids = sorted({c.id for c in topo.caches if c.level == res.level and c.type != "instruction"})
    if ids or topo.resctrl is None:
        return ids
    default = topo.resctrl.group("")
    return sorted(default.schemata.get(res.name, {})) if default else []


def cache_size(topo: HostTopology, level: int, cache_id: int) -> int:
    for c in topo.caches:
        if c.level == level and c.id == cache_id and c.type != "instruction":
            return c.size_bytes
    return 0


def cache_ways(
    topo: HostTopology, owners: Mapping[str, str | None] | None = None,
    claimed: Sequence[tuple[str, str, int, int, str]] = (),
) -> list[dict[str, Any]]:
    """Per resource and cache ID: free ways and every group's allocation (``usage.caches``).

    ``owners`` maps a group name to the guest uuid holding it (the tracker fills it);
    groups not in it are listed with ``guest: None``. ``claimed`` are ways the agent's
    claims hold before any group exists, ``(claim id, resource, cache id, mask, group)``:
    they are not free, and each is listed as an allocation with ``claim`` set (``mode``
    ``"claim"``, ``guest`` None).
    """
    rc: Resctrl | None = topo.resctrl
    if rc is None:
        return []
    owners = owners or {}
    by_cache: dict[tuple[str, int], list[tuple[str, int, str]]] = {}
    for claim_id, res_name, cache_id, mask, group in claimed:
        by_cache.setdefault((res_name, cache_id), []).append((claim_id, mask, group))
    out: list[dict[str, Any]] = []
    for res in rc.resources:
        full = parse_mask(res.cbm_mask)
        width = mask_width(full)
        shareable = parse_mask(res.shareable_bits) if res.shareable_bits else 0
        for cid in resource_cache_ids(topo, res):
            gran = res.granularity_bytes
            used = 0
            allocations = []
            for grp in rc.groups:
                text = grp.schemata.get(res.name, {}).get(cid)
                if text is None:
                    continue
                mask = parse_mask(text) & full
                used |= mask
                allocations.append(
                    {
                        "group": grp.name,
                        "guest": owners.get(grp.name),
                        "mode": grp.mode,
                        "mask": format_mask(mask, width),
                        "ways": popcount(mask),
                        "bytes": popcount(mask) * gran,
                    }
                )
            for claim_id, mask, group in by_cache.get((res.name, cid), ()):
                mask &= full
                used |= mask
                allocations.append({"group": group, "guest": None, "claim": claim_id,
                                    "mode": "claim", "mask": format_mask(mask, width),
                                    "ways": popcount(mask), "bytes": popcount(mask) * gran})
            free = full & ~used
            out.append(
                {
                    "resource": res.name,
                    "level": res.level,
                    "id": cid,
                    "type": res.type,
                    "cbm_mask": format_mask(full, width),
                    "shareable_mask": format_mask(shareable & full, width),
                    "free_mask": format_mask(free, width),
                    "free_ways": popcount(free),
                    "largest_free_run": largest_run(free),
                    "free_bytes": popcount(free) * gran,
                    "largest_free_bytes": largest_run(free) * gran,
                    "allocations": allocations,
                }
            )
    return out
