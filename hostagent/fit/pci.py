"""PCI devices for a fit: which free functions match a request, by NUMA affinity policy.

Policies (``hw:pci_numa_affinity_policy``, Nova's meanings, docs/fit.md):

- ``required``: only devices on the guest's host cells;
- ``legacy`` (default): devices on the guest's host cells, or with no NUMA node (-1);
- ``socket``: devices on the guest's host cells, else on a cell of the same socket(s);
  nothing more when a chosen cell spans sockets;
- ``preferred``: any device, local ones first.

Within what a policy allows, local devices come first, then by PCI address.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from hostagent.fit.host import HostView, PciDev
from hostagent.fit.request import PciRequest


def matching(view: HostView, item: PciRequest) -> list[PciDev]:
    return [d for d in view.pci if d.free and d.assignable
            and d.vendor == item.vendor and d.device == item.device]


def per_cell_counts(view: HostView, item: PciRequest) -> dict[int, int]:
    out: dict[int, int] = {c.id: 0 for c in view.cells}
    for d in matching(view, item):
        if d.numa_node in out:
            out[d.numa_node] += 1
    return out


def assignable_per_cell(view: HostView) -> dict[int, int]:
    out: dict[int, int] = {c.id: 0 for c in view.cells}
    for d in view.pci:
        if d.free and d.assignable and d.numa_node in out:
            out[d.numa_node] += 1
    return out


def candidates(
    view: HostView, item: PciRequest, policy: str, chosen: Iterable[int] | None
) -> list[PciDev]:
    """Devices the policy allows for a guest on ``chosen`` cells (None = floating guest)."""
    devs = matching(view, item)
    if chosen is None:
        return devs
    cells = set(chosen)
    local = [d for d in devs if d.numa_node in cells]
    if policy == "required":
        return local
    if policy == "legacy":
        return local + [d for d in devs if d.numa_node < 0]
    if policy == "socket":
        if len(local) >= item.count:
            return local
        sockets = {view.cell(c).socket for c in cells}
        if None in sockets:
            return local
        socket_of = {c.id: c.socket for c in view.cells}
        near = [d for d in devs if d.numa_node not in cells
                and socket_of.get(d.numa_node) in sockets]
        return local + near
    return local + [d for d in devs if d.numa_node not in cells]


def select(
    view: HostView, items: Sequence[PciRequest], policy: str, chosen: Iterable[int] | None
) -> tuple[list[PciDev], list[str]]:
    """The devices chosen for every request, or ([], messages) when some cannot be met."""
    chosen_list = list(chosen) if chosen is not None else None
    out: list[PciDev] = []
    problems: list[str] = []
    for item in items:
        cands = candidates(view, item, policy, chosen_list)
        if len(cands) < item.count:
            total = len(matching(view, item))
            where = ("" if chosen_list is None else
                     f" for host cells {sorted(chosen_list)} under policy {policy}")
            problems.append(
                f"needs {item.count} free {item.vendor}:{item.device} devices{where}: "
                f"{len(cands)} usable, {total} free on the host")
        else:
            out.extend(cands[: item.count])
    return (out, []) if not problems else ([], problems)
