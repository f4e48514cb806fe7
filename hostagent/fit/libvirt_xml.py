"""libvirt domain XML fragments for a placement: what to paste into ``<domain>``.

Keys of the returned dict (only those that apply are present):

- ``vcpu``: ``<vcpu placement='static'>N</vcpu>`` (``cpuset`` = shared threads when floating);
- ``cputune``: ``vcpupin`` for every vCPU (a dedicated vCPU to its thread, a shared vCPU
  of a NUMA guest to its host cell's shared threads), ``emulatorpin``, ``vcpusched``
  (SCHED_FIFO priority 1) for realtime vCPUs, ``cachetune`` per cache reservation;
- ``numatune``: ``memory`` (strict, all host cells) and one ``memnode`` per guest cell;
- ``cpu``: ``topology`` and the guest ``numa`` cells (memory in MiB);
- ``memoryBacking``: one hugepage ``page`` per page size with the guest cells using it;
- ``devices``: ``hostdev`` elements for the PCI devices;
- ``metadata``: ``<hostagent:fit>`` listing the sibling threads an ``isolate`` guest keeps
  idle, so that the tracker can count them as held, and the id of the agent's claim the
  placement was granted as (``claim_id``; the agent consumes the claim when the domain runs).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from hostagent.cpulist import format_cpulist

METADATA_NS = "https://hostagent.dev/xmlns/fit/1"
SMALL_PAGE_KIB = 4


def _q(value: object) -> str:
    text = str(value)
    if "&" in text or "<" in text or '"' in text:
        text = text.replace("&", "&amp;").replace("<", "&lt;").replace('"', "&quot;")
    return text


def _el(tag: str, attrs: Mapping[str, object] | None = None, body: str | None = None) -> str:
    """One element as text; ``body`` None makes it empty (``<tag ... />``)."""
    a = "".join([f' {k}="{_q(v)}"' for k, v in attrs.items()]) if attrs else ""
    return f"<{tag}{a} />" if body is None else f"<{tag}{a}>{body}</{tag}>"


def fragments(
    *,
    vcpus: int,
    placement: Mapping[str, Any],
    realtime: Sequence[int] = (),
    floating_cpus: Sequence[int] = (),
    claim_id: str | None = None,
) -> dict[str, str]:
    """Build the fragments from a placement dict (the ``placement`` part of a fit answer)."""
    out: dict[str, str] = {}
    cells = placement["cells"]
    vattrs: dict[str, object] = {"placement": "static"}
    if placement.get("floating") and floating_cpus:
        vattrs["cpuset"] = format_cpulist(floating_cpus)
    out["vcpu"] = _el("vcpu", vattrs, str(vcpus))

    tune: list[str] = []
    pins: dict[int, str] = {}
    for cell in cells:
        for v, cpu in cell["pinning"].items():
            pins[int(v)] = str(cpu)
        if cell["shared_vcpus"]:
            cpus = format_cpulist(cell["shared_cpus"])
            for v in cell["shared_vcpus"]:
                pins[int(v)] = cpus
    tune.extend([f'<vcpupin vcpu="{v}" cpuset="{_q(pins[v])}" />' for v in sorted(pins)])
    if placement.get("emulator_cpus"):
        tune.append(_el("emulatorpin", {"cpuset": format_cpulist(placement["emulator_cpus"])}))
    if realtime:
        tune.append(_el("vcpusched", {"vcpus": format_cpulist(realtime), "scheduler": "fifo",
                                      "priority": 1}))
    groups: dict[tuple[int, ...], list[Mapping[str, Any]]] = {}
    for entry in placement.get("cache") or []:
        groups.setdefault(tuple(entry["vcpus"]), []).append(entry)
    for group_vcpus, entries in groups.items():
        caches = []
        for e in sorted(entries, key=lambda e: (e["level"], e["id"], e["type"])):
            size, unit = (e["bytes"] // 1024, "KiB") if e["bytes"] % 1024 == 0 else (
                e["bytes"], "B")
            caches.append(_el("cache", {"id": e["id"], "level": e["level"], "type": e["type"],
                                        "size": size, "unit": unit}))
        tune.append(_el("cachetune", {"vcpus": format_cpulist(group_vcpus)}, "".join(caches)))
    if tune:
        out["cputune"] = _el("cputune", None, "".join(tune))

    if cells:
        hosts = sorted({c["host_cell"] for c in cells})
        body = _el("memory", {"mode": "strict", "nodeset": format_cpulist(hosts)})
        body += "".join(_el("memnode", {"cellid": c["guest_cell"], "mode": "strict",
                                        "nodeset": c["host_cell"]}) for c in cells)
        out["numatune"] = _el("numatune", None, body)

    topo = placement["topology"]
    body = _el("topology", {"sockets": topo["sockets"], "dies": 1, "cores": topo["cores"],
                            "threads": topo["threads"]})
    if cells:
        body += _el("numa", None, "".join(
            _el("cell", {"id": c["guest_cell"], "cpus": format_cpulist(c["vcpus"]),
                         "memory": c["memory_mib"], "unit": "MiB"}) for c in cells))
    out["cpu"] = _el("cpu", None, body)

    by_size: dict[int, list[int]] = {}
    for c in cells:
        if c["page_size_kib"] != SMALL_PAGE_KIB:
            by_size.setdefault(c["page_size_kib"], []).append(c["guest_cell"])
    if by_size:
        pages = "".join(_el("page", {"size": size, "unit": "KiB",
                                     "nodeset": format_cpulist(by_size[size])})
                        for size in sorted(by_size))
        out["memoryBacking"] = _el("memoryBacking", None, _el("hugepages", None, pages))

    devs = placement.get("pci") or []
    if devs:
        body = ""
        for d in devs:
            dom, bus, rest = d["address"].split(":")
            slot, func = rest.split(".")
            addr = _el("address", {"domain": f"0x{dom}", "bus": f"0x{bus}",
                                   "slot": f"0x{slot}", "function": f"0x{func}"})
            body += _el("hostdev", {"mode": "subsystem", "type": "pci", "managed": "yes"},
                        _el("source", None, addr))
        out["devices"] = _el("devices", None, body)

    reserved = sorted({t for c in cells for t in c.get("reserved_cpus", [])})
    meta = ""
    if reserved:
        meta += _el("hostagent:idle", {"cpus": format_cpulist(reserved)})
    if claim_id is not None:
        meta += _el("hostagent:claim", {"id": claim_id})
    if meta:
        out["metadata"] = _el("metadata", None, _el(
            "hostagent:fit", {"xmlns:hostagent": METADATA_NS}, meta))
    return out
