"""The fit on real host shapes: fixture trees → probe_host → build_snapshot → fit, and a
fill loop where every placed guest goes back through the tracker (domain XML built from
the fragments, metadata included → GuestRecord → snapshot) before the next fit."""

from __future__ import annotations

from typing import Any

import pytest
from fit_hosts import flavor
from fixture_trees import FIXTURE_NAMES, need_fixture
from libvirt_helpers import pools_free
from test_fit_property import check_invariants

from hostagent.config import Config, ResourcesConfig
from hostagent.fit import fit, parse_request
from hostagent.guests.source import record_from_xml
from hostagent.snapshot import build_snapshot

NAMES = FIXTURE_NAMES  # every tree, on disk or not: need_fixture says when one is missing

_TOPOS: dict[str, Any] = {}


def topology(name: str) -> Any:
    if name not in _TOPOS:
        from hostagent.probe.host import probe_host

        base = need_fixture(name)
        # pools wholly free in the kernel's count: the placed guests are the only page
        # users (else every snapshot has a hugepages_untracked conflict from the fixture)
        _TOPOS[name] = pools_free(probe_host(base, base / "fs" / "resctrl"))
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
    parts = "".join(x[k] for k in ("vcpu", "cputune", "numatune", "cpu", "memoryBacking",
                                   "metadata") if k in x)
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


@pytest.mark.parametrize("name", NAMES)
def test_fill_loop_through_the_tracker(name):
    topo = topology(name)
    k = max(1, sum(1 for c in topo.cpus if c.online) // 64)  # bigger guests on big hosts
    cycle = [flavor(4 * k, 4096, cpu_policy="dedicated"),
             flavor(4 * k, 2048, cpu_policy="dedicated", cpu_thread_policy="require"),
             flavor(8 * k, 8192, cpu_policy="dedicated", numa_nodes=2, mem_page_size="large"),
             flavor(4 * k, 2048, cpu_policy="mixed", cpu_dedicated_mask="^0"),
             flavor(2 * k, 2048, cpu_policy="dedicated", cpu_thread_policy="isolate",
                    emulator_threads_policy="isolate"),
             flavor(2, 1024, cpu_policy="dedicated")]
    guests: list[Any] = []
    owned: list[int] = []
    idle: list[int] = []
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
        p = answer["placement"]
        used = [cpu for c in p["cells"] for cpu in c["pinning"].values()]
        if request["extra_specs"].get("hw:emulator_threads_policy") == "isolate":
            used.extend(p["emulator_cpus"])
        held_idle = {t["cpu"] for t in snap["usage"]["threads"] if t["held_by"]}
        assert set(idle) == held_idle  # every idle sibling so far came back as held_by
        assert not held_idle & set(used), "a thread another guest keeps idle was used"
        owned.extend(used)
        idle.extend(t for c in p["cells"] for t in c["reserved_cpus"])
        uuid = f"00000000-0000-4000-8000-{i:012d}"
        xml = domain(f"g{i}", uuid, answer, request["memory_mb"])
        guests.append(record_from_xml(xml, uuid=uuid, name=f"g{i}"))
        i += 1
        assert i < 500
    assert len(owned) + len(idle) == len(set(owned) | set(idle))
    held = {t["cpu"] for t in snap["usage"]["threads"] if t["guest"] is not None}
    assert set(owned) == held
    assert set(idle) == {t["cpu"] for t in snap["usage"]["threads"] if t["held_by"]}
    memory_known = any(c.memory_kib for c in topo.cells)
    assert len(guests) >= (1 if memory_known else 0)


def test_amd_ccx_reservation_pins_to_a_ccx_with_free_ways():
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


def test_isolate_idle_siblings_go_through_the_tracker():
    """Fit an isolate guest → domain XML from the fragments (metadata included) → tracker
    → the next fits leave its idle siblings alone. Without the metadata they would not."""
    topo = topology("xeon-2s-cat")
    iso = flavor(2, 1024, cpu_policy="dedicated", cpu_thread_policy="isolate")
    first = fit(snapshot(topo), iso, strategy="pack")
    assert first["fits"], first["reasons"]
    (cell,) = first["placement"]["cells"]
    pins, idle = set(cell["pinning"].values()), set(cell["reserved_cpus"])
    assert len(idle) == 2 and "hostagent:idle" in first["libvirt_xml"]["metadata"]
    uuid = "00000000-0000-4000-8000-000000000001"
    xml = domain("iso1", uuid, first, 1024)
    record = record_from_xml(xml, uuid=uuid, name="iso1")
    assert record.spec is not None and set(record.spec.idle_cpus) == idle
    snap = snapshot(topo, [record], seq=1)
    assert snap["usage"]["conflicts"] == []
    assert {t["cpu"] for t in snap["usage"]["threads"] if t["held_by"] == uuid} == idle
    ucell = next(c for c in snap["usage"]["cells"] if c["id"] == cell["host_cell"])
    assert not idle & set(ucell["free_cpus"])

    # the identical request again: other whole cores, nothing of the first guest's cores
    second = fit(snap, iso, strategy="pack")
    assert second["fits"], second["reasons"]
    (cell2,) = second["placement"]["cells"]
    assert second["placement"]["cells"][0]["host_cell"] == cell["host_cell"]
    assert not (set(cell2["pinning"].values()) | set(cell2["reserved_cpus"])) & (pins | idle)

    # a 1-vCPU prefer guest best-fits a core with one free thread: with the siblings
    # tracked it must not take one; with the metadata stripped (the old behaviour) it does
    prefer = flavor(1, 1024, cpu_policy="dedicated")
    got = fit(snap, prefer, strategy="pack")
    assert got["fits"] and not set(got["placement"]["cells"][0]["pinning"].values()) & idle
    bare = record_from_xml(xml.replace(first["libvirt_xml"]["metadata"], ""), uuid=uuid,
                           name="iso1")
    old = fit(snapshot(topo, [bare], seq=2), prefer, strategy="pack")
    assert set(old["placement"]["cells"][0]["pinning"].values()) <= idle


def test_floating_usage_from_the_tracker_reaches_the_fit():
    """The tracker reports floating usage at the top of ``usage``; the fit counts it."""
    from hostagent.fit.host import host_view

    topo = topology("xeon-2s-cat")
    floating = flavor(3, 1024)
    answer = fit(snapshot(topo), floating)
    assert answer["fits"] and answer["placement"]["floating"]
    uuid = "00000000-0000-4000-8000-000000000002"
    record = record_from_xml(domain("f1", uuid, answer, 1024), uuid=uuid, name="f1")
    snap = snapshot(topo, [record], seq=1)
    usage = snap["usage"]
    assert "floating" not in usage
    assert (usage["floating_vcpus"], usage["floating_memory_kib"]) == (3, 1024 * 1024)
    view = host_view(snap)
    assert (view.floating_used, view.floating_memory_kib) == (3, 1024 * 1024)
