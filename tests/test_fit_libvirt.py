"""The XML fragments with the real libvirt: a domain built from them is accepted by the
``test:///`` driver and reads back with the same pinning and cells; and guests placed by
one fit, started, then read back by the tracker are never overlapped by the next fit."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
from fit_hosts import flavor, make_snapshot, make_topology

from hostagent.cpulist import parse_cpulist
from hostagent.fit import fit
from hostagent.fit.libvirt_xml import METADATA_NS

libvirt = pytest.importorskip("libvirt")


def node_file(tmp: Path, cells: int, cores: int, threads: int, mem_mib: int) -> str:
    path = tmp / "node.xml"
    path.write_text(
        "<node><cpu><mhz>2400</mhz><model>x86_64</model>"
        f"<nodes>{cells}</nodes><sockets>1</sockets><cores>{cores}</cores>"
        f"<threads>{threads}</threads><active>{cells * cores * threads}</active></cpu>"
        f"<memory>{cells * mem_mib * 1024}</memory></node>")
    return f"test://{path}"


def open_conn(uri: str) -> Any:
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    return libvirt.open(uri)


def domain_xml(name: str, answer: dict[str, Any], memory_mib: int) -> str:
    x = answer["libvirt_xml"]
    parts = [x[k] for k in ("vcpu", "cputune", "numatune", "cpu", "memoryBacking", "metadata")
             if k in x]
    return (f"<domain type='test'><name>{name}</name>"
            f"<memory unit='MiB'>{memory_mib}</memory>{''.join(parts)}"
            "<os><type>hvm</type></os></domain>")


def read_back(dom: Any) -> dict[str, Any]:
    root = ET.fromstring(dom.XMLDesc(0))
    pins = {int(p.get("vcpu")): parse_cpulist(p.get("cpuset"))
            for p in root.findall("cputune/vcpupin")}
    cells = {int(c.get("id")): (parse_cpulist(c.get("cpus")), int(c.get("memory")))
             for c in root.findall("cpu/numa/cell")}
    memnodes = {int(m.get("cellid")): int(m.get("nodeset"))
                for m in root.findall("numatune/memnode")}
    emu = root.find("cputune/emulatorpin")
    topo = root.find("cpu/topology")
    pages = {int(p.get("size")): p.get("nodeset")
             for p in root.findall("memoryBacking/hugepages/page")}
    sched = {(v, s.get("scheduler")) for s in root.findall("cputune/vcpusched")
             for v in parse_cpulist(s.get("vcpus"))}
    idle = root.find(f"metadata/{{{METADATA_NS}}}fit/{{{METADATA_NS}}}idle")
    return {"pins": pins, "cells": cells, "memnodes": memnodes,
            "emulator": parse_cpulist(emu.get("cpuset")) if emu is not None else (),
            "topology": {k: int(topo.get(k)) for k in ("sockets", "cores", "threads")},
            "pages": pages, "sched": sched,
            "idle": parse_cpulist(idle.get("cpus")) if idle is not None else ()}


TOPO = make_topology(2, 4, 2, hugepages={2048: 512, 1048576: 2})
# cell 0: cores (0,8) (1,9) (2,10) (3,11) dedicated; cell 1: (4,12) (5,13) dedicated,
# (6,14) (7,15) shared
SNAP = make_snapshot(TOPO, dedicated=[0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 12, 13])

CASES = {
    "prefer-2cells-2M": flavor(4, 2048, cpu_policy="dedicated", numa_nodes=2,
                               mem_page_size="2MB"),
    "mixed-isolate-emu": flavor(4, 1024, cpu_policy="mixed", cpu_dedicated_mask="^0",
                                numa_nodes=2, cpu_thread_policy="isolate",
                                emulator_threads_policy="isolate", mem_page_size="large"),
    "require-rt": flavor(4, 2048, cpu_policy="dedicated", cpu_thread_policy="require",
                         cpu_realtime="yes", cpu_realtime_mask="^0-1", mem_page_size="1GB"),
    "shared-numa": flavor(2, 512, numa_nodes=1),
    "floating": flavor(3, 512),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_domain_from_fragments_reads_back_the_placement(tmp_path, name):
    answer = fit(SNAP, CASES[name])
    assert answer["fits"], answer["reasons"]
    p = answer["placement"]
    conn = open_conn(node_file(tmp_path, 2, 4, 2, 16384))
    try:
        dom = conn.defineXML(domain_xml(name, answer, CASES[name]["memory_mb"]))
        dom.create()
        got = read_back(dom)
    finally:
        conn.close()
    want_pins = {}
    for c in p["cells"]:
        for v, cpu in c["pinning"].items():
            want_pins[int(v)] = (cpu,)
        for v in c["shared_vcpus"]:
            want_pins[v] = tuple(c["shared_cpus"])
    assert got["pins"] == want_pins
    assert got["cells"] == {c["guest_cell"]: (tuple(c["vcpus"]), c["memory_mib"] * 1024)
                            for c in p["cells"]}
    assert got["memnodes"] == {c["guest_cell"]: c["host_cell"] for c in p["cells"]}
    assert got["emulator"] == tuple(p["emulator_cpus"])
    assert got["topology"] == p["topology"]
    huge = {c["page_size_kib"] for c in p["cells"]} - {4}
    assert set(got["pages"]) == huge
    assert got["idle"] == tuple(sorted(t for c in p["cells"] for t in c["reserved_cpus"]))
    if p["realtime_vcpus"]:
        assert got["sched"] == {(2, "fifo"), (3, "fifo")}
    if p["floating"]:
        assert got["pins"] == {} and not got["cells"]


def test_fit_start_track_fit_never_overlaps(tmp_path):
    """Fit → start on test:/// → the tracker reads the guests → the next fit, until full."""
    from hostagent.config import Config, ResourcesConfig
    from hostagent.guests.source import read_guests
    from hostagent.snapshot import build_snapshot

    topo = make_topology(2, 4, 2, hugepages={2048: 256})
    config = Config(resources=ResourcesConfig(
        dedicated_cpus=tuple(c.id for c in topo.cpus if c.core < 3), shared_cpus=None))
    conn = open_conn(node_file(tmp_path, 2, 4, 2, 16384))
    # (isolate is left out: its idle siblings are only in the domain's metadata, which
    # the tracker does not read yet; see docs/fit.md)
    requests = [
        flavor(4, 256, cpu_policy="dedicated", mem_page_size="2MB"),
        flavor(2, 128, cpu_policy="mixed", cpu_dedicated_mask="1", mem_page_size="2MB"),
        flavor(2, 64, cpu_policy="dedicated", emulator_threads_policy="isolate"),
        flavor(2, 128, cpu_policy="dedicated", cpu_thread_policy="require"),
    ]
    placed: list[dict[str, Any]] = []
    try:
        for i in range(12):
            snap = build_snapshot(topo, config, read_guests(conn), host="t", epoch="e",
                                  seq=i, now=0.0)
            assert not snap["usage"]["conflicts"], snap["usage"]["conflicts"]
            req = requests[i % len(requests)]
            answer = fit(snap, req)
            if not answer["fits"]:
                failed = answer
                break
            placed.append(answer)
            dom = conn.defineXML(domain_xml(f"g{i}", answer, req["memory_mb"]))
            dom.create()
        else:
            pytest.fail("the host never filled up")
        snap = build_snapshot(topo, config, read_guests(conn), host="t", epoch="e",
                              seq=99, now=0.0)
    finally:
        conn.close()
    assert len(placed) >= 4
    owned: list[int] = []
    for i, a in enumerate(placed):
        owned.extend(cpu for c in a["placement"]["cells"] for cpu in c["pinning"].values())
        if i % len(requests) == 2:  # the isolated emulator thread
            owned.extend(a["placement"]["emulator_cpus"])
    assert len(owned) == len(set(owned)), "a thread was given twice"
    held = {t["cpu"] for t in snap["usage"]["threads"] if t["guest"] is not None}
    assert set(owned) == held
    dedicated = set(config.resources.dedicated_cpus)
    assert held <= dedicated
    # the request that failed could not have fitted: too few free dedicated threads
    need = {0: 4, 1: 1, 2: 3, 3: 2}[len(placed) % len(requests)]
    free_per_cell = [len(cell["free_cpus"]) for cell in snap["usage"]["cells"]]
    assert max(free_per_cell) < need or failed["reasons"][0]["resource"] != "dedicated_threads"
    assert failed["reasons"]
    for cell in snap["usage"]["cells"]:
        for pool in cell["hugepages"]:
            assert pool["used"] <= pool["total"]


def test_cachetune_fragment_accepted_and_read_back(tmp_path):
    topo = make_topology(2, 4, 2, resctrl_ways=12)
    req = flavor(4, 512, cpu_policy="dedicated", numa_nodes=2,
                 cache_reservation="vcpus=0-1:type=both,size=2mb;vcpus=2-3:type=both,size=1mb")
    answer = fit(make_snapshot(topo), req)
    assert answer["fits"], answer["reasons"]
    conn = open_conn(node_file(tmp_path, 2, 4, 2, 16384))
    try:
        dom = conn.defineXML(domain_xml("cat", answer, 512))
        dom.create()
        root = ET.fromstring(dom.XMLDesc(0))
    finally:
        conn.close()
    units = {"KiB": 1 << 10, "MiB": 1 << 20, "B": 1}
    got = sorted(
        (tuple(parse_cpulist(t.get("vcpus"))), int(c.get("id")), int(c.get("level")),
         c.get("type"), int(c.get("size")) * units[c.get("unit")])
        for t in root.findall("cputune/cachetune") for c in t.findall("cache"))
    want = sorted((tuple(e["vcpus"]), e["id"], e["level"], e["type"], e["bytes"])
                  for e in answer["placement"]["cache"])
    assert got == want == [((0, 1), 0, 3, "both", 2 << 20), ((2, 3), 1, 3, "both", 1 << 20)]


def test_hostdev_fragment_accepted_and_read_back(tmp_path):
    topo = make_topology(2, 4, 2, pci=[("0000:3b:00.1", 1, "8086", "154d"),
                                       ("0000:af:00.0", 0, "8086", "154d")])
    req = flavor(2, 512, cpu_policy="dedicated", pci_devices="8086:154d",
                 pci_numa_affinity_policy="required")
    answer = fit(make_snapshot(topo, taken={4: "x"}), req)
    assert answer["fits"]
    devices = answer["libvirt_xml"]["devices"]
    xml = domain_xml("pci", answer, 512).replace("</domain>", devices + "</domain>")
    conn = open_conn(node_file(tmp_path, 2, 4, 2, 16384))
    try:
        dom = conn.defineXML(xml)
        dom.create()
        root = ET.fromstring(dom.XMLDesc(0))
    finally:
        conn.close()
    addrs = [
        "{}:{}:{}.{}".format(*(a.get(k)[2:] for k in ("domain", "bus", "slot", "function")))
        for a in root.findall("devices/hostdev/source/address")]
    host = answer["placement"]["cells"][0]["host_cell"]
    assert addrs == [d["address"] for d in answer["placement"]["pci"]]
    assert addrs == ["0000:3b:00.1" if host == 1 else "0000:af:00.0"]
