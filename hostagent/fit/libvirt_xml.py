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
  idle, so that the tracker can count them as held.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from typing import Any

from hostagent.cpulist import format_cpulist

METADATA_NS = "https://hostagent.dev/xmlns/fit/1"
SMALL_PAGE_KIB = 4


def _s(el: ET.Element) -> str:
    return ET.tostring(el, encoding="unicode")


def _sub(parent: ET.Element, tag: str, **attrs: Any) -> ET.Element:
    return ET.SubElement(parent, tag, {k: str(v) for k, v in attrs.items()})


def fragments(
    *,
    vcpus: int,
    placement: Mapping[str, Any],
    realtime: Sequence[int] = (),
    floating_cpus: Sequence[int] = (),
) -> dict[str, str]:
    """Build the fragments from a placement dict (the ``placement`` part of a fit answer)."""
    out: dict[str, str] = {}
    cells = placement["cells"]
    vcpu = ET.Element("vcpu", {"placement": "static"})
    if placement.get("floating") and floating_cpus:
        vcpu.set("cpuset", format_cpulist(floating_cpus))
    vcpu.text = str(vcpus)
    out["vcpu"] = _s(vcpu)

    cputune = ET.Element("cputune")
    pins: dict[int, str] = {}
    for cell in cells:
        for v, cpu in cell["pinning"].items():
            pins[int(v)] = str(cpu)
        if cell["shared_vcpus"]:
            cpus = format_cpulist(cell["shared_cpus"])
            for v in cell["shared_vcpus"]:
                pins[int(v)] = cpus
    for v in sorted(pins):
        _sub(cputune, "vcpupin", vcpu=v, cpuset=pins[v])
    if placement.get("emulator_cpus"):
        _sub(cputune, "emulatorpin", cpuset=format_cpulist(placement["emulator_cpus"]))
    if realtime:
        _sub(cputune, "vcpusched", vcpus=format_cpulist(realtime), scheduler="fifo",
             priority=1)
    groups: dict[tuple[int, ...], list[Mapping[str, Any]]] = {}
    for entry in placement.get("cache") or []:
        groups.setdefault(tuple(entry["vcpus"]), []).append(entry)
    for group_vcpus, entries in groups.items():
        tune = _sub(cputune, "cachetune", vcpus=format_cpulist(group_vcpus))
        for e in sorted(entries, key=lambda e: (e["level"], e["id"], e["type"])):
            size, unit = (e["bytes"] // 1024, "KiB") if e["bytes"] % 1024 == 0 else (
                e["bytes"], "B")
            _sub(tune, "cache", id=e["id"], level=e["level"], type=e["type"], size=size,
                 unit=unit)
    if len(cputune):
        out["cputune"] = _s(cputune)

    if cells:
        numatune = ET.Element("numatune")
        hosts = sorted({c["host_cell"] for c in cells})
        _sub(numatune, "memory", mode="strict", nodeset=format_cpulist(hosts))
        for c in cells:
            _sub(numatune, "memnode", cellid=c["guest_cell"], mode="strict",
                 nodeset=c["host_cell"])
        out["numatune"] = _s(numatune)

    cpu = ET.Element("cpu")
    topo = placement["topology"]
    _sub(cpu, "topology", sockets=topo["sockets"], dies=1, cores=topo["cores"],
         threads=topo["threads"])
    if cells:
        numa = _sub(cpu, "numa")
        for c in cells:
            _sub(numa, "cell", id=c["guest_cell"], cpus=format_cpulist(c["vcpus"]),
                 memory=c["memory_mib"], unit="MiB")
    out["cpu"] = _s(cpu)

    by_size: dict[int, list[int]] = {}
    for c in cells:
        if c["page_size_kib"] != SMALL_PAGE_KIB:
            by_size.setdefault(c["page_size_kib"], []).append(c["guest_cell"])
    if by_size:
        backing = ET.Element("memoryBacking")
        huge = _sub(backing, "hugepages")
        for size in sorted(by_size):
            _sub(huge, "page", size=size, unit="KiB", nodeset=format_cpulist(by_size[size]))
        out["memoryBacking"] = _s(backing)

    devs = placement.get("pci") or []
    if devs:
        devices = ET.Element("devices")
        for d in devs:
            dom, bus, rest = d["address"].split(":")
            slot, func = rest.split(".")
            hd = _sub(devices, "hostdev", mode="subsystem", type="pci", managed="yes")
            src = _sub(hd, "source")
            _sub(src, "address", domain=f"0x{dom}", bus=f"0x{bus}", slot=f"0x{slot}",
                 function=f"0x{func}")
        out["devices"] = _s(devices)

    reserved = sorted({t for c in cells for t in c.get("reserved_cpus", [])})
    if reserved:
        ET.register_namespace("hostagent", METADATA_NS)
        meta = ET.Element("metadata")
        fit_el = ET.SubElement(meta, f"{{{METADATA_NS}}}fit")
        ET.SubElement(fit_el, f"{{{METADATA_NS}}}idle", {"cpus": format_cpulist(reserved)})
        out["metadata"] = _s(meta)
    return out
