"""Per-vCPU cache reservations inside a fit, planned by ``hostagent.resctrl``.

A request's ``hw:cache_reservation`` names groups of dedicated vCPUs, each with a
reservation in the planner's syntax (``type=both,size=2mb``; docs/fit.md). For a group,
the fit reserves the requested ways on every cache (of the item's level, L3 by default)
that serves one of the group's pinned threads: one resctrl group / libvirt ``cachetune``
per vCPU group, one mask per cache ID. Groups are planned in request order, each seeing
the ways promised to the groups before it (``taken``) and counting as a pending CLOSID,
so the reservations of one placement never collide. Ways the agent's claims hold
(``HostView.claimed_ways``) are taken from the start, and their groups pending.

- ``cell_check``: the part of every group that lands in one host cell, planned alone;
  a necessary condition used while searching (exact when no cache spans two cells);
- ``core_orders``: other core orders to try in a cell with several caches of the level
  (each cache's cores first, the cache with the longest free run first);
- ``plan_all``: the whole placement's plans; any planner refusal means no fit, with the
  planner's message as the reason.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from hostagent.cpulist import format_cpulist
from hostagent.errors import RequestError
from hostagent.fit.cellfit import CellFit
from hostagent.fit.host import HostCell, HostView
from hostagent.fit.request import CacheGroup, FitRequest

GROUP_PREFIX = "hostagent-fit-vcpus_"


def group_name(group: CacheGroup) -> str:
    return GROUP_PREFIX + format_cpulist(group.vcpus)


def _levels(group: CacheGroup) -> list[int]:
    return sorted({it.level for it in group.spec.caches})


def _plan(
    view: HostView,
    group: CacheGroup,
    threads: Sequence[int],
    taken: Mapping[tuple[str, int], int],
    pending: int,
) -> Any:
    """One group's plan on the caches serving ``threads`` (raises ``RequestError``)."""
    from hostagent import resctrl

    if view.topo.resctrl is None:
        raise RequestError("resctrl is not mounted on this host: no cache reservations")
    items = []
    for it in group.spec.caches:
        ids = sorted({view.cache_of[(it.level, t)] for t in threads
                      if (it.level, t) in view.cache_of})
        if not ids:
            raise RequestError(
                f"threads {format_cpulist(threads)} are served by no L{it.level} cache")
        items.extend(dataclasses.replace(it, cache_id=cid) for cid in ids)
    spec = dataclasses.replace(group.spec, caches=tuple(items), bandwidth=())
    return resctrl.plan_reservation(view.topo, spec, group=group_name(group), taken=taken,
                                    pending_groups=pending)


def _pins(chosen: Sequence[CellFit]) -> dict[int, int]:
    return {v: cpu for cf in chosen for v, cpu in cf.pinning}


def _run(
    view: HostView, req: FitRequest, chosen: Sequence[CellFit]
) -> tuple[list[dict[str, Any]], list[str]]:
    from hostagent import resctrl

    pins = _pins(chosen)
    taken: dict[tuple[str, int], int] = dict(view.claimed_ways)  # claims' ways: not free
    entries: list[dict[str, Any]] = []
    pending = view.claimed_groups  # each claim's group will need a CLOSID
    for group in req.cache:
        here = [v for v in group.vcpus if v in pins]
        if not here:
            continue
        threads = sorted({pins[v] for v in here})
        try:
            plan = _plan(view, group, threads, taken, pending)
        except RequestError as exc:
            return [], [f"cache reservation of vCPUs {format_cpulist(here)} on threads "
                        f"{format_cpulist(threads)}: {exc}"]
        pending += 1
        taken = resctrl.merge_taken(taken, plan.taken())
        for c in plan.caches:
            entries.append({
                "vcpus": here,
                "group": plan.group,
                "resource": c.resource,
                "level": c.level,
                "id": c.cache_id,
                "type": c.type,
                "mask": c.mask_hex,
                "ways": c.ways,
                "bytes": c.bytes,
            })
    return entries, []


def cell_check(view: HostView, req: FitRequest, cf: CellFit) -> list[str]:
    """Why the cache reservations of this guest cell's vCPUs cannot be met (empty = ok)."""
    return _run(view, req, [cf])[1]


def plan_all(
    view: HostView, req: FitRequest, chosen: list[CellFit]
) -> tuple[list[dict[str, Any]], list[str]]:
    """Every group's ways for the whole placement, or the reasons it cannot be met."""
    return _run(view, req, chosen)


def core_orders(
    view: HostView, req: FitRequest, host: HostCell
) -> list[tuple[tuple[int, ...], ...]]:
    """Alternative core orders: one per cache of the cell, that cache's cores first."""
    levels = sorted({lv for g in req.cache if g.spec is not None for lv in _levels(g)})
    if not levels:
        return []
    level = levels[0]
    domain: dict[tuple[int, ...], int] = {}
    for core in host.cores:
        cid = view.cache_of.get((level, core[0]))
        if cid is not None:
            domain[core] = cid
    ids = sorted(set(domain.values()))
    if len(ids) < 2:
        return []
    run: dict[int, int] = {}
    for entry in view.snapshot_usage_caches:
        if entry.get("level") == level and entry.get("id") in ids:
            run[entry["id"]] = max(run.get(entry["id"], 0), int(entry.get("largest_free_run", 0)))
    ids.sort(key=lambda cid: (-run.get(cid, 0), cid))
    orders = []
    for cid in ids:
        first = [c for c in host.cores if domain.get(c) == cid]
        rest = [c for c in host.cores if domain.get(c) != cid]
        orders.append(tuple(first + rest))
    return orders
