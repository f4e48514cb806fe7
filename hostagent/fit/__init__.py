"""The fitter: does a guest fit this host, and exactly where (pure; docs/fit.md).

``fit(snapshot, request, strategy=...)`` answers from a schema-v1 snapshot dict and a Nova
flavor-style request dict, never changing either. ``parse_request`` validates a request on
its own; ``prepare(snapshot)`` reads a snapshot once for many fits (the agent keeps one per
snapshot), and ``fit`` takes it in place of the snapshot. Modules: ``request`` (parsing),
``host`` (the snapshot as free resources per cell), ``cellfit`` (one guest cell on one host
cell), ``place`` (the search), ``pci``, ``cache`` (reservations through
``hostagent.resctrl``), ``vcpu_topology``, ``libvirt_xml`` (domain XML fragments),
``explain`` (reasons as text).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hostagent.errors import RequestError
from hostagent.fit.cellfit import CellFit, Reason
from hostagent.fit.host import HostView, host_view
from hostagent.fit.libvirt_xml import fragments
from hostagent.fit.place import STEP_BUDGET, STRATEGIES, Outcome, place, place_floating
from hostagent.fit.request import FitRequest, parse_request
from hostagent.fit.vcpu_topology import VcpuTopology, best_topology, require_topology

__all__ = ["STEP_BUDGET", "FitRequest", "HostView", "RequestError", "STRATEGIES", "fit",
           "parse_request", "prepare"]


def prepare(snapshot: Mapping[str, Any]) -> HostView:
    """The snapshot as the fit reads it (free threads, memory, pages, devices per cell),
    to pass to ``fit`` in place of the snapshot for many requests: it is never changed by
    a fit, and what a fit works out of it (the cores of a cell) is kept for the next.
    Raises ``RequestError`` for a malformed snapshot."""
    return host_view(snapshot)


def fit(
    snapshot: Mapping[str, Any] | HostView,
    request: Mapping[str, Any] | FitRequest,
    *,
    strategy: str = "spread",
    search_steps: int = STEP_BUDGET,
    libvirt_xml: bool = True,
) -> dict[str, Any]:
    """The fit answer: ``{fits, strategy, placement, reasons, libvirt_xml}``
    (``libvirt_xml`` None when not asked for: a claim makes its own, with its id).

    ``snapshot`` is a schema-v1 snapshot dict or what ``prepare`` made of one.
    The placement search takes at most ``search_steps`` steps (``hostagent.fit.place``);
    beyond them the answer is "does not fit" with a ``search`` reason. Raises
    ``RequestError`` for an invalid request, strategy, step budget or snapshot.
    """
    if strategy not in STRATEGIES:
        raise RequestError(f"strategy={strategy!r}: must be one of {', '.join(STRATEGIES)}")
    if isinstance(search_steps, bool) or not isinstance(search_steps, int) or search_steps < 1:
        raise RequestError(f"search_steps={search_steps!r}: must be an integer >= 1")
    req = request if isinstance(request, FitRequest) else parse_request(request)
    view = snapshot if isinstance(snapshot, HostView) else host_view(snapshot)

    forced = 1 if req.thread_policy == "isolate" else None
    # require: the thread count follows the placement (``require_topology``, below)
    topo = best_topology(req.vcpus, req.topology, threads=forced)
    if topo is None:
        why = ("isolate gives every vCPU its own core, so the guest has 1 thread per core; "
               if forced == 1 else "")
        return _no(strategy, [Reason(
            None, None, "topology",
            f"{why}no sockets x cores x threads = {req.vcpus} within the limits "
            f"{req.topology.max_sockets}:{req.topology.max_cores}:{req.topology.max_threads}")])

    if not req.numa:
        out = place_floating(view, req)
    else:
        out = place(view, req, strategy, search_steps=search_steps)
    if not out.fits:
        return _no(strategy, out.reasons)

    if req.thread_policy == "require":
        topo = _require_topology(view, req, out.cells) or topo
    placement = _placement(view, req, out, topo.as_dict())
    xml = fragments(vcpus=req.vcpus, placement=placement, realtime=req.realtime,
                    floating_cpus=view.shared_cpus) if libvirt_xml else None
    return {"fits": True, "strategy": strategy, "placement": placement, "reasons": [],
            "libvirt_xml": xml}


def _require_topology(
    view: HostView, req: FitRequest, cells: list[CellFit]
) -> VcpuTopology | None:
    """The guest topology of a placed ``require`` guest (``require_topology``)."""
    core_of: dict[int, int] = {}
    threads = 1
    for cf in cells:
        host = view.cell(cf.host_cell)
        threads = max(threads, host.threads_per_core)
        first = {t: core[0] for core in host.cores for t in core}
        core_of.update((v, first[cpu]) for v, cpu in cf.pinning)
    return require_topology(req.vcpus, req.topology, threads, core_of)


def _no(strategy: str, reasons: list[Reason]) -> dict[str, Any]:
    return {"fits": False, "strategy": strategy, "placement": None,
            "reasons": [r.as_dict() for r in reasons], "libvirt_xml": None}


def _emulator_cpus(view: HostView, req: FitRequest, cells: list[CellFit]) -> list[int]:
    if not cells:
        return []
    shared_here = sorted({t for c in cells for t in view.cell(c.host_cell).shared})
    rt = set(req.realtime)
    non_rt = sorted({cpu for c in cells for v, cpu in c.pinning if v not in rt})
    if req.emulator_policy == "isolate":
        return [cells[0].emulator_cpu] if cells[0].emulator_cpu is not None else []
    if req.emulator_policy == "share":
        return shared_here or list(view.shared_cpus) or non_rt
    if req.pinned:
        return sorted(set(non_rt) | {t for c in cells for t in c.shared_cpus})
    return shared_here


def _placement(
    view: HostView, req: FitRequest, out: Outcome, topology: dict[str, int]
) -> dict[str, Any]:
    cells = []
    by_index = {g.index: g for g in req.cells}
    for cf in sorted(out.cells, key=lambda c: c.guest_cell):
        g = by_index[cf.guest_cell]
        cells.append({
            "guest_cell": cf.guest_cell,
            "host_cell": cf.host_cell,
            "vcpus": list(g.vcpus),
            "pinning": {str(v): cpu for v, cpu in cf.pinning},
            "shared_vcpus": list(cf.shared_vcpus),
            "shared_cpus": list(cf.shared_cpus),
            "memory_mib": g.memory_mib,
            "page_size_kib": cf.page_size_kib,
            "reserved_cpus": list(cf.reserved),
        })
    return {
        "floating": not req.numa,
        "cells": cells,
        "shared_vcpus": list(range(req.vcpus)) if not req.numa else [],
        "emulator_cpus": _emulator_cpus(view, req, sorted(out.cells, key=lambda c: c.guest_cell)),
        "realtime_vcpus": list(req.realtime),
        "cache": out.cache,
        "pci": [{"address": d.address, "vendor": d.vendor, "device": d.device,
                 "numa_node": d.numa_node} for d in out.pci],
        "topology": topology,
    }
