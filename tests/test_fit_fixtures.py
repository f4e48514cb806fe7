"""The fit on real host shapes: fixture trees → probe_host → build_snapshot → fit, and a
fill loop where every placed guest goes back through the tracker (domain XML built from
the fragments → GuestRecord → snapshot) before the next fit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fit_hosts import flavor
from test_fit_property import check_invariants

from hostagent.config import Config, ResourcesConfig
from hostagent.fit import fit, parse_request
from hostagent.guests.source import record_from_xml
from hostagent.snapshot import build_snapshot

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "sysfs"
NAMES = sorted(p.name for p in FIXTURES.iterdir() if (p / "sys").is_dir()) \
    if FIXTURES.is_dir() else []

_TOPOS: dict[str, Any] = {}


def topology(name: str) -> Any:
    if name not in _TOPOS:
        from hostagent.probe.host import probe_host

        base = FIXTURES / name / "sys"
        _TOPOS[name] = probe_host(base, base / "fs" / "resctrl")
    return _TOPOS[name]


def config_for(topo: Any) -> Config:
    """Cores 0-1 of every socket shared (host and floating guests), the rest dedicated."""
    dedicated = tuple(c.id for c in topo.cpus if c.online and c.core >= 2)
    return Config(resources=ResourcesConfig(dedicated_cpus=dedicated, shared_cpus=None,
                                            reserved_memory_kib=512 * 1024))


def snapshot(topo: Any, guests: list[Any] = (), seq: int = 0) -> dict[str, Any]:
    return build_snapshot(topo, config_for(topo), guests, host="fixture", epoch="e", seq=seq,
                          now=0.0)


def domain(name: str, uuid: str, answer: dict[str, Any], memory_mb: int) -> str:
    x = answer["libvirt_xml"]
    parts = "".join(x[k] for k in ("vcpu", "cputune", "numatune", "cpu", "memoryBacking")
                    if k in x)
    return (f"<domain type='kvm'><name>{name}</name><uuid>{uuid}</uuid>"
            f"<memory unit='MiB'>{memory_mb}</memory>"
            f"{parts}<os><type>hvm</type></os></domain>")


TYPICAL = [
    flavor(4, 4096, cpu_policy="dedicated"),
    flavor(8, 8192, cpu_policy="dedicated", numa_nodes=2, mem_page_size="large"),
    flavor(4, 2048, cpu_policy="dedicated", cpu_thread_policy="isolate",
           emulator_threads_policy="isolate"),
    flavor(4, 2048, cpu_policy="dedicated", cpu_thread_policy="require"),
    flavor(4, 2048, cpu_policy="mixed", cpu_dedicated_mask="^0", cpu_realtime="no"),
    flavor(2, 1024, numa_nodes=1),
    flavor(2, 1024),
]


@pytest.mark.skipif(not NAMES, reason="no fixture trees")
@pytest.mark.parametrize("name", NAMES)
def test_typical_requests_on_fixture(name):
    topo = topology(name)
    snap = snapshot(topo)
    fits = 0
    for request in TYPICAL:
        req = parse_request(request)
        answer = fit(snap, request)
        if answer["fits"]:
            fits += 1
            check_invariants(snap, req, answer)
        else:
            assert answer["reasons"]
    if all(c.memory_kib == 0 for c in topo.cells):  # no node/ directory: memory unknown
        assert fits == 0
    else:
        assert fits >= 2, name


@pytest.mark.skipif(not NAMES, reason="no fixture trees")
@pytest.mark.parametrize("name", NAMES)
def test_fill_loop_through_the_tracker(name):
    topo = topology(name)
    k = max(1, sum(1 for c in topo.cpus if c.online) // 64)  # bigger guests on big hosts
    cycle = [flavor(4 * k, 4096, cpu_policy="dedicated"),
             flavor(4 * k, 2048, cpu_policy="dedicated", cpu_thread_policy="require"),
             flavor(8 * k, 8192, cpu_policy="dedicated", numa_nodes=2, mem_page_size="large"),
             flavor(4 * k, 2048, cpu_policy="mixed", cpu_dedicated_mask="^0"),
             flavor(2, 1024, cpu_policy="dedicated")]
    guests: list[Any] = []
    owned: list[int] = []
    i = 0
    while cycle:  # place guests round-robin; drop a request once it no longer fits
        snap = snapshot(topo, guests, seq=i)
        assert not snap["usage"]["conflicts"], snap["usage"]["conflicts"]
        request = cycle[i % len(cycle)]
        answer = fit(snap, request)
        if not answer["fits"]:
            cycle.remove(request)
            continue
        check_invariants(snap, parse_request(request), answer)
        owned.extend(cpu for c in answer["placement"]["cells"] for cpu in c["pinning"].values())
        uuid = f"00000000-0000-4000-8000-{i:012d}"
        xml = domain(f"g{i}", uuid, answer, request["memory_mb"])
        guests.append(record_from_xml(xml, uuid=uuid, name=f"g{i}"))
        i += 1
        assert i < 500
    assert len(owned) == len(set(owned))
    held = {t["cpu"] for t in snap["usage"]["threads"] if t["guest"] is not None}
    assert set(owned) == held
    memory_known = any(c.memory_kib for c in topo.cells)
    assert len(guests) >= (1 if memory_known else 0)


def test_amd_ccx_reservation_pins_to_a_ccx_with_free_ways():
    if "epyc-amd" not in NAMES:
        pytest.skip("no epyc-amd fixture")
    topo = topology("epyc-amd")
    snap = snapshot(topo)
    free = {w["id"]: w["free_ways"] for w in snap["usage"]["caches"] if w["resource"] == "L3"}
    request = flavor(2, 1024, cpu_policy="dedicated",
                     cache_reservation="vcpus=0-1:type=both,size=2mb")
    answer = fit(snap, request)
    assert answer["fits"], answer["reasons"]
    (entry,) = answer["placement"]["cache"]
    assert free[entry["id"]] >= 2
    l3 = {cpu: c.id for c in topo.caches if c.level == 3 for cpu in c.cpus}
    pins = answer["placement"]["cells"][0]["pinning"].values()
    assert {l3[cpu] for cpu in pins} == {entry["id"]}


def test_cdp_reservation_on_fixture():
    if "xeon-2s-cdp" not in NAMES:
        pytest.skip("no xeon-2s-cdp fixture")
    snap = snapshot(topology("xeon-2s-cdp"))
    ok = fit(snap, flavor(2, 1024, cpu_policy="dedicated",
                          cache_reservation="vcpus=0-1:type=code,size=1mb;type=data,size=1mb"))
    assert ok["fits"] or ok["reasons"]
    both = fit(snap, flavor(2, 1024, cpu_policy="dedicated",
                            cache_reservation="vcpus=0-1:type=both,size=1mb"))
    assert not both["fits"]
    assert any("CDP" in r["message"] for r in both["reasons"])
    if ok["fits"]:
        assert {e["type"] for e in ok["placement"]["cache"]} == {"code", "data"}


def test_pci_device_held_by_a_placed_guest_is_not_offered_again():
    from fit_hosts import make_topology

    topo = make_topology(2, 4, 2, pci=[("0000:3b:00.0", 1, "8086", "154d"),
                                       ("0000:3b:00.1", 1, "8086", "154d")])
    config = Config(resources=ResourcesConfig(dedicated_cpus=tuple(c.id for c in topo.cpus)))
    request = flavor(2, 512, cpu_policy="dedicated", pci_devices="8086:154d",
                     pci_numa_affinity_policy="required")
    guests: list[Any] = []
    got: list[str] = []
    for i in range(3):
        snap = build_snapshot(topo, config, guests, host="h", epoch="e", seq=i, now=0.0)
        answer = fit(snap, request)
        if not answer["fits"]:
            break
        got.extend(d["address"] for d in answer["placement"]["pci"])
        uuid = f"00000000-0000-4000-8000-{i:012d}"
        xml = domain(f"p{i}", uuid, answer, 512).replace(
            "</domain>", answer["libvirt_xml"]["devices"] + "</domain>")
        guests.append(record_from_xml(xml, uuid=uuid, name=f"p{i}"))
    assert got == ["0000:3b:00.0", "0000:3b:00.1"]
    assert {p["address"] for p in snap["usage"]["pci"]} == set(got)
    assert answer["reasons"][0]["message"] == "needs 1 free 8086:154d devices, the host has 0"
