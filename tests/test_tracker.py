"""The tracker's usage rules on real fixture topologies (pure: no libvirt here)."""

from __future__ import annotations

import json

import msgpack
import pytest
from libvirt_helpers import domain_xml, pools_free, probe_fixture, uuid_for

from hostagent.config import Config, config_from_dict, resolve_resources
from hostagent.guests.source import GuestRecord, record_from_xml
from hostagent.model import HostTopology
from hostagent.snapshot import build_snapshot
from hostagent.tracker import (
    UsageTracker,
    compute_usage,
    default_hugepage_kib,
    machine_name,
)

# xeon-2s-cat: cell 0 = 0-11,24-35, cell 1 = 12-23,36-47, siblings (n, n+24);
# 2M pools of 2048 pages and 1G pools of 32 pages per cell; resctrl L3 with
# qemu-1-rt1-vcpus_2-3 (0=003), nfv-excl, batch; the default group holds 7c0.
# The pools are wholly free in the kernel's count (``pools_free``): pages in use by no
# guest are test_output_untracked_pages.py's subject, not these tests'.
DEDICATED = "2-11,14-23,26-35,38-47"
SHARED = "0-1,12-13,24-25,36-37"


@pytest.fixture(scope="module")
def xeon() -> HostTopology:
    return pools_free(probe_fixture("xeon-2s-cat"))


@pytest.fixture(scope="module")
def large() -> HostTopology:
    return pools_free(probe_fixture("large-8cell"))


def resources(topo: HostTopology, **extra) -> dict:
    doc = {"dedicated_cpus": DEDICATED, "shared_cpus": SHARED, **extra}
    return resolve_resources(config_from_dict({"resources": doc}).resources, topo)


def rec(name: str, state: str = "running", active: bool = True, domain_id: int | None = None,
        **kw) -> GuestRecord:
    xml = domain_xml(name, **kw)
    if domain_id is not None:
        xml = xml.replace("<domain type='test'", f"<domain type='test' id='{domain_id}'", 1)
    return record_from_xml(xml, uuid=uuid_for(name), name=name, state=state, active=active)


def cell(usage: dict, cid: int) -> dict:
    return next(c for c in usage["cells"] if c["id"] == cid)


def thread(usage: dict, cpu: int) -> dict:
    return next(t for t in usage["threads"] if t["cpu"] == cpu)


def kinds(usage: dict) -> list[str]:
    return [c["kind"] for c in usage["conflicts"]]


def pages(usage: dict, cid: int, size: int) -> dict:
    return next(h for h in cell(usage, cid)["hugepages"] if h["size_kib"] == size)


# --------------------------------------------------------------------------- threads


def test_empty_host(xeon):
    u = compute_usage(xeon, resources(xeon), [])
    c0 = cell(u, 0)
    assert (c0["free_pcpus"], c0["free_cores"], c0["pinned_cpus"]) == (20, 10, [])
    assert c0["free_cpus"] == [2, 3, 4, 5, 6, 7, 8, 9, 10, 11] + list(range(26, 36))
    assert len(u["threads"]) == 48 and u["guests"] == [] and u["conflicts"] == []
    assert thread(u, 0)["role"] == "shared" and thread(u, 2)["role"] == "dedicated"


def test_pinned_vcpus_and_emulator_own_dedicated_threads(xeon):
    g = rec("rt", vcpus=2, vcpupin={0: "2", 1: "26"}, emulatorpin="3")
    u = compute_usage(xeon, resources(xeon), [g])
    t2, t26, t3 = thread(u, 2), thread(u, 26), thread(u, 3)
    assert (t2["guest"], t2["vcpu"], t2["emulator"]) == (g.uuid, 0, False)
    assert (t26["guest"], t26["vcpu"]) == (g.uuid, 1)
    assert (t3["guest"], t3["vcpu"], t3["emulator"]) == (g.uuid, None, True)
    c0 = cell(u, 0)
    assert c0["pinned_cpus"] == [2, 3, 26]
    assert c0["free_pcpus"] == 17
    # core (2,26) fully taken, core (3,27) half taken: both are no longer free cores
    assert c0["free_cores"] == 8
    (entry,) = u["guests"]
    assert entry["pinning"] == {"0": 2, "1": 26} and entry["emulator_cpus"] == [3]
    assert entry["dedicated_cpus"] == [2, 3, 26]
    assert u["conflicts"] == []


def test_emulator_on_own_vcpu_threads_takes_nothing_more(xeon):
    g = rec("rt", vcpus=2, vcpupin={0: "2", 1: "26"}, emulatorpin="2,26")
    u = compute_usage(xeon, resources(xeon), [g])
    assert cell(u, 0)["pinned_cpus"] == [2, 26]
    assert thread(u, 2)["emulator"] is False and u["conflicts"] == []


def test_iothread_on_dedicated_thread_is_owned(xeon):
    g = rec("io", vcpus=1, vcpupin={0: "2"}, emulatorpin="0-1", iothreads=1,
            iothreadpin={1: "4"})
    u = compute_usage(xeon, resources(xeon), [g])
    assert (thread(u, 4)["guest"], thread(u, 4)["iothread"]) == (g.uuid, 1)
    assert g.uuid in thread(u, 0)["shared_guests"]  # emulator on the shared threads


def test_shared_vcpus_count_in_their_cell(xeon):
    g = rec("web", vcpus=4, cpuset="0-1,24-25", emulatorpin="0-1")
    u = compute_usage(xeon, resources(xeon), [g])
    assert cell(u, 0)["shared_vcpus"] == 4 and cell(u, 1)["shared_vcpus"] == 0
    assert cell(u, 0)["shared_vcpus_limit"] == 16  # 4 shared threads x ratio 4.0
    assert thread(u, 24)["shared_guests"] == [g.uuid]
    assert thread(u, 12)["shared_guests"] == []
    assert u["guests"][0]["shared_vcpus"] == 4 and u["conflicts"] == []


def test_multi_cell_vcpus_count_where_memory_is_bound_else_floating(xeon):
    bound = rec("bound", vcpus=2, cpuset=SHARED, emulatorpin=SHARED,
                numa_memory=("strict", "1"))
    free = rec("free", vcpus=3, cpuset=SHARED, emulatorpin=SHARED)
    u = compute_usage(xeon, resources(xeon), [bound, free])
    assert cell(u, 1)["shared_vcpus"] == 2 and cell(u, 0)["shared_vcpus"] == 0
    assert u["floating_vcpus"] == 3
    assert u["floating_memory_kib"] == 1048576  # "free" has no numatune
    assert cell(u, 1)["memory_used_kib"] == 1048576
    lst = thread(u, 0)["shared_guests"]
    assert lst == sorted([bound.uuid, free.uuid])


def test_unpinned_guest_on_host_with_dedicated_cpus_is_a_conflict(xeon):
    g = rec("loose", vcpus=2)
    u = compute_usage(xeon, resources(xeon), [g])
    (c,) = u["conflicts"]
    assert c["kind"] == "floating_on_dedicated" and c["guests"] == [g.uuid]
    assert "vCPUs 0-1 (no pin)" in c["detail"] and "emulator (no pin)" in c["detail"]
    assert u["floating_vcpus"] == 2
    # without dedicated CPUs (the default config) the same guest is fine
    u2 = compute_usage(xeon, resolve_resources(Config().resources, xeon), [g])
    assert u2["conflicts"] == []


# --------------------------------------------------------------------------- memory


def test_memory_per_cell_from_memnode_and_interleave(xeon):
    g = rec("numa", vcpus=4, vcpupin={0: "2", 1: "3", 2: "14", 3: "15"}, emulatorpin="0",
            cells=[("0-1", 1048576), ("2-3", 2097152)], memnodes={0: "0", 1: "1"})
    il = rec("il", vcpus=1, cpuset="0-1", emulatorpin="0", memory_kib=1000001,
             numa_memory=("interleave", "0-1"))
    u = compute_usage(xeon, resources(xeon), [g, il])
    assert cell(u, 0)["memory_used_kib"] == 1048576 + 500001
    assert cell(u, 1)["memory_used_kib"] == 2097152 + 500000
    entry = next(e for e in u["guests"] if e["name"] == "numa")
    assert [(c["guest_cell"], c["host_cell"], c["vcpus"], c["memory_kib"])
            for c in entry["cells"]] == [(0, 0, 2, 1048576), (1, 1, 2, 2097152)]
    il_entry = next(e for e in u["guests"] if e["name"] == "il")
    assert il_entry["cells"][0]["host_cell"] is None
    assert il_entry["cells"][0]["host_cells"] == [0, 1]


def test_reserved_memory_and_pools_reduce_free_memory(xeon):
    res = resources(xeon, reserved_memory_kib={"0": 4194304})
    g = rec("m", vcpus=1, cpuset="0-1", emulatorpin="0", memory_kib=1048576,
            numa_memory=("strict", "0"))
    u = compute_usage(xeon, res, [g])
    c0 = xeon.cell(0)
    pool = sum(p.total * p.size_kib for p in c0.hugepages)
    limit = c0.memory_kib - pool - 4194304
    assert cell(u, 0)["memory_limit_kib"] == limit
    assert cell(u, 0)["memory_free_kib"] == limit - 1048576
    assert cell(u, 0)["reserved_memory_kib"] == 4194304


def test_memory_beyond_the_cell_is_a_conflict(xeon):
    big = xeon.cell(0).memory_kib
    g = rec("huge", vcpus=1, cpuset="0-1", emulatorpin="0", memory_kib=big,
            numa_memory=("strict", "0"))
    u = compute_usage(xeon, resources(xeon), [g])
    assert kinds(u) == ["memory_exhausted"] and cell(u, 0)["memory_free_kib"] == 0


# --------------------------------------------------------------------------- hugepages


def test_default_hugepage_size_rule(xeon, large):
    from hostagent.model import replace

    assert default_hugepage_kib(xeon) == 2048
    assert default_hugepage_kib(probe_fixture("no-node-dir")) is None
    # without a 2048 KiB pool: the smallest pool there is
    no2m = replace(xeon, cells=tuple(
        replace(c, hugepages=tuple(p for p in c.hugepages if p.size_kib != 2048))
        for c in xeon.cells))
    assert default_hugepage_kib(no2m) == 1048576
    g = rec("d", vcpus=1, cpuset="0-1", emulatorpin="0-1", memory_kib=2097152,
            numa_memory=("strict", "0"), hugepages=[])
    u = compute_usage(no2m, resources(no2m), [g])
    assert pages(u, 0, 1048576)["used"] == 2 and u["guests"][0]["page_size_kib"] == 1048576


def test_hugepages_counted_in_pages_per_pool(xeon):
    g1 = rec("g1", vcpus=2, vcpupin={0: "2", 1: "14"}, emulatorpin="0",
             cells=[("0", 2097152), ("1", 1048576)], memnodes={0: "0", 1: "1"},
             hugepages=[(1048576, "0"), (2048, "1")])
    g2 = rec("g2", vcpus=1, cpuset="0-1", emulatorpin="0", memory_kib=65536,
             numa_memory=("strict", "0"), hugepages=[])  # default size = 2M
    res = resources(xeon, reserved_hugepages=[{"cell": 0, "size_kib": 1048576, "count": 4}])
    u = compute_usage(xeon, res, [g1, g2])
    assert pages(u, 0, 1048576) == {"size_kib": 1048576, "total": 32, "reserved": 4,
                                    "used": 2, "free": 26}
    assert pages(u, 1, 2048)["used"] == 512
    assert pages(u, 0, 2048)["used"] == 32
    # hugepage-backed memory is not ordinary memory
    assert cell(u, 0)["memory_used_kib"] == 0
    e1 = next(e for e in u["guests"] if e["name"] == "g1")
    assert e1["page_size_kib"] == 1048576
    assert [c["page_size_kib"] for c in e1["cells"]] == [1048576, 2048]
    assert u["conflicts"] == []


def test_hugepages_beyond_a_pool_and_missing_sizes_are_conflicts(xeon):
    a = rec("a", vcpus=1, cpuset="0-1", emulatorpin="0", memory_kib=20 * 1048576,
            numa_memory=("strict", "1"), hugepages=[(1048576, None)])
    b = rec("b", vcpus=1, cpuset="0-1", emulatorpin="0", memory_kib=20 * 1048576,
            numa_memory=("strict", "1"), hugepages=[(1048576, None)])
    c = rec("c", vcpus=1, cpuset="0-1", emulatorpin="0", memory_kib=65536,
            numa_memory=("strict", "0"), hugepages=[(16384, None)])
    u = compute_usage(xeon, resources(xeon), [a, b, c])
    by_kind = {x["kind"]: x for x in u["conflicts"]}
    ex = by_kind["hugepages_exhausted"]
    assert ex["guests"] == sorted([a.uuid, b.uuid]) and (ex["cell"], ex["size_kib"]) == (
        1, 1048576)
    assert pages(u, 1, 1048576) == {"size_kib": 1048576, "total": 32, "reserved": 0,
                                    "used": 40, "free": 0}
    miss = by_kind["hugepage_size_missing"]
    assert miss["guests"] == [c.uuid] and "16384 KiB" in miss["detail"]
    assert pages(u, 0, 16384)["total"] == 0 and pages(u, 0, 16384)["used"] == 4


# --------------------------------------------------------------------------- conflicts


def test_two_guests_on_one_dedicated_thread(xeon):
    a = rec("a", vcpus=1, vcpupin={0: "5"}, emulatorpin="0")
    b = rec("b", vcpus=2, vcpupin={0: "6", 1: "5"}, emulatorpin="0")
    u = compute_usage(xeon, resources(xeon), [a, b])
    (c,) = u["conflicts"]
    assert c["kind"] == "dedicated_overlap" and c["cpus"] == [5]
    assert c["guests"] == sorted([a.uuid, b.uuid])
    assert "a (vCPU 0)" in c["detail"] and "b (vCPU 1)" in c["detail"]
    # one owner is still reported (the first by uuid), the other guest keeps its thread 6
    assert thread(u, 5)["guest"] in (a.uuid, b.uuid)
    assert thread(u, 6)["guest"] == b.uuid


def test_one_guest_two_vcpus_on_one_thread(xeon):
    g = rec("self", vcpus=2, vcpupin={0: "5", 1: "5"}, emulatorpin="0")
    u = compute_usage(xeon, resources(xeon), [g])
    assert kinds(u) == ["dedicated_overlap"] and u["conflicts"][0]["guests"] == [g.uuid]


def test_pin_to_non_dedicated_thread(xeon):
    g = rec("odd", vcpus=1, vcpupin={0: "0"}, emulatorpin="0")
    u = compute_usage(xeon, resources(xeon), [g])
    assert kinds(u) == ["pin_not_dedicated"]
    assert thread(u, 0)["guest"] is None and thread(u, 0)["shared_guests"] == [g.uuid]
    assert cell(u, 0)["shared_vcpus"] == 1


def test_pin_to_offline_and_unknown_threads(large):
    res = resolve_resources(
        config_from_dict({"resources": {"dedicated_cpus": "4-63"}}).resources, large)
    g = rec("off", vcpus=2, vcpupin={0: "63", 1: "500"}, emulatorpin="0")
    u = compute_usage(large, res, [g])
    texts = [c["detail"] for c in u["conflicts"] if c["kind"] == "pin_offline"]
    assert any("vCPU 0" in t and "offline CPU(s) 63" in t for t in texts)
    assert any("vCPU 1" in t and "500 that do not exist" in t for t in texts)
    # the offline dedicated thread stays claimed so nobody else gets it when it returns
    assert thread(u, 63)["guest"] == g.uuid and thread(u, 63)["role"] == "offline"


def test_bound_to_a_cell_that_does_not_exist(xeon):
    g = rec("far", vcpus=1, cpuset="0-1", emulatorpin="0", numa_memory=("strict", "5"))
    u = compute_usage(xeon, resources(xeon), [g])
    (c,) = u["conflicts"]
    assert c["kind"] == "cell_missing" and c["cells"] == [5]
    assert u["floating_memory_kib"] == 1048576


def test_unparsable_guest_is_listed_and_others_tracked(xeon):
    bad = record_from_xml("<domain><name>bad</name", uuid=uuid_for("bad"), name="bad")
    good = rec("good", vcpus=1, vcpupin={0: "2"}, emulatorpin="0")
    u = compute_usage(xeon, resources(xeon), [bad, good])
    (c,) = u["conflicts"]
    assert c["kind"] == "xml_error" and c["guests"] == [bad.uuid]
    assert "not well-formed" in c["detail"]
    entry = next(e for e in u["guests"] if e["name"] == "bad")
    assert "not well-formed" in entry["error"] and entry["vcpus"] == 0
    assert thread(u, 2)["guest"] == good.uuid


def test_inactive_guests_hold_nothing(xeon):
    g = rec("off", state="shutoff", active=False, vcpus=1, vcpupin={0: "2"})
    u = compute_usage(xeon, resources(xeon), [g])
    assert u["guests"] == [] and thread(u, 2)["guest"] is None and cell(u, 0)["free_pcpus"] == 20


# --------------------------------------------------------------------------- cache


def test_machine_name_follows_libvirt():
    assert machine_name(1, "rt1") == "qemu-1-rt1"
    assert machine_name(3, "my_vm..x--y.") == "qemu-3-myvm.x-y"
    assert machine_name(2, "-.lead") == "qemu-2-lead"
    long = machine_name(12, "a" * 100)
    assert len(long) == 64 and long.startswith("qemu-12-aaa")


def test_cachetune_matches_libvirt_group_and_unclaimed_groups_are_null(xeon):
    g = rec("rt1", domain_id=1, vcpus=4, vcpupin={0: "2", 1: "3", 2: "4", 3: "5"},
            emulatorpin="0", cachetunes=[("2-3", [(0, 3, "both", 2304)])])
    u = compute_usage(xeon, resources(xeon), [g])
    l3_0 = next(c for c in u["caches"] if c["id"] == 0 and c["resource"] == "L3")
    owners = {a["group"]: a["guest"] for a in l3_0["allocations"]}
    assert owners["qemu-1-rt1-vcpus_2-3"] == g.uuid
    assert owners["nfv-excl"] is None and owners["batch"] is None and owners[""] is None
    (entry,) = u["guests"][0]["cache"]
    assert entry == {"vcpus": [2, 3], "level": 3, "id": 0, "type": "both",
                     "bytes": 2304 * 1024, "mask": "003", "ways": 2,
                     "group": "qemu-1-rt1-vcpus_2-3"}
    assert u["conflicts"] == []


def test_cachetune_with_explicit_id_and_cdp_masks():
    cdp = probe_fixture("xeon-2s-cdp")
    xml = domain_xml("rt1", vcpus=4, emulatorpin="0",
                     cachetunes=[("2-3", [(0, 3, "code", 2304), (0, 3, "data", 2304)])])
    xml = xml.replace("<domain type='test'", "<domain type='test' id='1'", 1)
    xml = xml.replace("<cachetune vcpus='2-3'>", "<cachetune vcpus='2-3' id='vcpus_2-3'>")
    g = record_from_xml(xml, uuid=uuid_for("rt1"), name="rt1")
    u = compute_usage(cdp, resolve_resources(Config().resources, cdp), [g])
    masks = {(c["type"], c["mask"]) for c in u["guests"][0]["cache"]}
    assert masks == {("code", "001"), ("data", "002")}
    claimed = {(c["resource"], a["guest"]) for c in u["caches"] for a in c["allocations"]
               if a["group"] == "qemu-1-rt1-vcpus_2-3"}
    assert ("L3CODE", g.uuid) in claimed and ("L3DATA", g.uuid) in claimed


def test_cachetune_without_group_is_a_conflict(xeon, large):
    g = rec("rt9", domain_id=9, vcpus=2, emulatorpin="0", cpuset="0-1",
            cachetunes=[("0-1", [(0, 3, "both", 2304)])])
    u = compute_usage(xeon, resources(xeon), [g])
    (c,) = u["conflicts"]
    assert c["kind"] == "cache_group_missing" and c["group"] == "qemu-9-rt9-vcpus_0-1"
    assert u["guests"][0]["cache"][0]["mask"] is None
    u2 = compute_usage(large, resolve_resources(Config().resources, large), [g])
    assert "resctrl is not mounted" in u2["conflicts"][0]["detail"]


def test_unprivileged_group_names_match_by_pattern(xeon):
    from hostagent.model import replace

    rc = xeon.resctrl
    assert rc is not None
    groups = tuple(replace(gr, name="qemu-alice-1-rt1-vcpus_2-3")
                   if gr.name == "qemu-1-rt1-vcpus_2-3" else gr for gr in rc.groups)
    topo = replace(xeon, resctrl=replace(rc, groups=groups))
    g = rec("rt1", domain_id=1, vcpus=4, emulatorpin="0", cpuset="0-1",
            cachetunes=[("2-3", [(0, 3, "both", 2304)])])
    u = compute_usage(topo, resources(topo), [g])
    assert u["guests"][0]["cache"][0]["group"] == "qemu-alice-1-rt1-vcpus_2-3"


# --------------------------------------------------------------------------- incremental


def test_incremental_tracker_equals_full_recompute(xeon):
    res = resources(xeon)
    guests = [
        rec("a", vcpus=2, vcpupin={0: "2", 1: "26"}, emulatorpin="0"),
        rec("b", vcpus=2, cpuset=SHARED, emulatorpin=SHARED, numa_memory=("strict", "1")),
        rec("rt1", domain_id=1, vcpus=4, vcpupin={0: "3", 1: "4", 2: "5", 3: "6"},
            emulatorpin="0", cachetunes=[("2-3", [(0, 3, "both", 2304)])],
            hugepages=[(1048576, None)], numa_memory=("strict", "0")),
        rec("c", vcpus=1, vcpupin={0: "2"}, emulatorpin="0"),  # overlaps a
    ]
    t = UsageTracker(xeon, res)
    t.replace_all(guests[:2])
    assert t.usage() == compute_usage(xeon, res, guests[:2])
    for g in guests[2:]:
        t.update(g)
    assert t.usage() == compute_usage(xeon, res, guests)
    t.remove(guests[0].uuid)
    assert t.usage() == compute_usage(xeon, res, guests[1:])
    stopped = rec("b", state="shutoff", active=False)
    t.update(stopped)
    assert t.usage() == compute_usage(xeon, res, [guests[2], guests[3]])
    t.set_host(xeon, resolve_resources(Config().resources, xeon))
    assert t.usage() == compute_usage(xeon, resolve_resources(Config().resources, xeon),
                                      [guests[2], guests[3]])


def test_snapshot_is_json_and_msgpack_safe(xeon):
    g = rec("rt1", domain_id=1, vcpus=4, vcpupin={0: "2", 1: "3", 2: "4", 3: "5"},
            emulatorpin="0", cachetunes=[("2-3", [(0, 3, "both", 2304)])])
    cfg = config_from_dict({"resources": {"dedicated_cpus": DEDICATED, "shared_cpus": SHARED}})
    snap = build_snapshot(xeon, cfg, [g], host="h1", epoch="e1", seq=3, now=12.5)
    assert (snap["schema"], snap["host"], snap["epoch"], snap["seq"], snap["time"]) == (
        1, "h1", "e1", 3, 12.5)
    assert set(snap) == {"schema", "host", "epoch", "seq", "time", "topology", "config",
                         "usage"}
    assert set(snap["usage"]) >= {"cells", "threads", "caches", "guests", "conflicts"}
    assert snap["config"]["dedicated_cpus"][:3] == [2, 3, 4]
    assert json.loads(json.dumps(snap)) == snap
    packed = msgpack.packb(snap, use_bin_type=True)
    assert msgpack.unpackb(packed, raw=False, strict_map_key=True) == snap


def _with_hostdev(xml: str, addr: str) -> str:
    dom, bus, rest = addr.split(":")
    slot, fn = rest.split(".")
    dev = (f"<devices><hostdev mode='subsystem' type='pci'><source><address domain='0x{dom}' "
           f"bus='0x{bus}' slot='0x{slot}' function='0x{fn}'/></source></hostdev></devices>")
    return xml.replace("</domain>", dev + "</domain>")


def test_pci_devices_held_shared_and_missing(xeon):
    def guest(name, addr):
        xml = _with_hostdev(domain_xml(name, vcpus=1, cpuset="0-1", emulatorpin="0-1"), addr)
        return record_from_xml(xml, uuid=uuid_for(name), name=name)

    a, b, c = guest("a", "0000:af:01.0"), guest("b", "0000:af:01.0"), guest("c", "0000:99:00.0")
    u = compute_usage(xeon, resources(xeon), [a, b, c])
    held = {p["address"]: p["guest"] for p in u["pci"]}
    assert held["0000:af:01.0"] in (a.uuid, b.uuid) and held["0000:99:00.0"] == c.uuid
    by_kind = {x["kind"]: x for x in u["conflicts"]}
    assert by_kind["pci_overlap"]["guests"] == sorted([a.uuid, b.uuid])
    assert by_kind["pci_missing"]["pci"] == ["0000:99:00.0"]
    assert next(g for g in u["guests"] if g["name"] == "a")["pci"] == ["0000:af:01.0"]


def test_shared_pins_onto_dedicated_threads_make_them_not_free(xeon):
    g = rec("spill", vcpus=2, cpuset="0-1,2", emulatorpin="0-1")
    u = compute_usage(xeon, resources(xeon), [g])
    (c,) = u["conflicts"]
    assert c["kind"] == "floating_on_dedicated" and "vCPUs pinned to 0-2" in c["detail"]
    assert thread(u, 2)["guest"] is None and thread(u, 2)["shared_guests"] == [g.uuid]
    assert 2 not in cell(u, 0)["free_cpus"] and cell(u, 0)["free_pcpus"] == 19
    assert cell(u, 0)["free_cores"] == 9  # core (2, 26) is no longer whole


# --------------------------------------------------------------------------- idle threads

FIT_NS = "https://hostagent.dev/xmlns/fit/1"


def rec_idle(name: str, idle: str, **kw) -> GuestRecord:
    """A guest whose metadata says it keeps ``idle`` threads idle (what the fit writes for
    an isolate guest)."""
    meta = (f"<metadata><hostagent:fit xmlns:hostagent='{FIT_NS}'>"
            f"<hostagent:idle cpus='{idle}'/></hostagent:fit></metadata>")
    xml = domain_xml(name, **kw).replace("</domain>", meta + "</domain>")
    return record_from_xml(xml, uuid=uuid_for(name), name=name)


def test_idle_siblings_are_held_and_not_free(xeon):
    # isolate guest: vCPUs on 2 and 3, their siblings 26 and 27 kept idle
    g = rec_idle("iso", "26-27", vcpus=2, vcpupin={0: "2", 1: "3"}, emulatorpin="2-3")
    u = compute_usage(xeon, resources(xeon), [g])
    assert all("held_by" in t for t in u["threads"])
    assert [t["cpu"] for t in u["threads"] if t["held_by"]] == [26, 27]
    t26 = thread(u, 26)
    assert (t26["held_by"], t26["guest"], t26["vcpu"]) == (g.uuid, None, None)
    assert thread(u, 2)["held_by"] is None and thread(u, 2)["guest"] == g.uuid
    c0 = cell(u, 0)
    assert c0["pinned_cpus"] == [2, 3]  # owned threads only; idle ones are held_by
    assert c0["free_pcpus"] == 16 and not {2, 3, 26, 27} & set(c0["free_cpus"])
    assert c0["free_cores"] == 8
    (entry,) = u["guests"]
    assert entry["idle_cpus"] == [26, 27] and entry["dedicated_cpus"] == [2, 3]
    assert u["conflicts"] == []
    # without the metadata, the same guest leaves 26 and 27 free (what used to happen)
    plain = rec("iso", vcpus=2, vcpupin={0: "2", 1: "3"}, emulatorpin="2-3")
    u2 = compute_usage(xeon, resources(xeon), [plain])
    assert {26, 27} <= set(cell(u2, 0)["free_cpus"]) and cell(u2, 0)["free_pcpus"] == 18


def test_idle_thread_another_guest_runs_on_is_a_conflict(xeon):
    iso = rec_idle("iso", "26-27", vcpus=2, vcpupin={0: "2", 1: "3"}, emulatorpin="2-3")
    pin = rec("pin", vcpus=1, vcpupin={0: "26"}, emulatorpin="26")
    spill = rec("spill", vcpus=1, cpuset="0-1,27", emulatorpin="0-1")
    u = compute_usage(xeon, resources(xeon), [iso, pin, spill])
    taken = [c for c in u["conflicts"] if c["kind"] == "idle_thread_taken"]
    by_cpu = {tuple(c["cpus"]): c for c in taken}
    assert set(by_cpu) == {(26,), (27,)}
    assert by_cpu[(26,)]["guests"] == sorted([iso.uuid, pin.uuid])
    assert by_cpu[(26,)]["detail"] == "iso keeps CPU(s) 26 idle, but pin run(s) there"
    assert by_cpu[(27,)]["guests"] == sorted([iso.uuid, spill.uuid])
    # the thread shows both: who runs there and who wants it idle
    assert (thread(u, 26)["guest"], thread(u, 26)["held_by"]) == (pin.uuid, iso.uuid)
    assert kinds(u) == ["floating_on_dedicated", "idle_thread_taken", "idle_thread_taken"]
    # the guest's own vCPUs or emulator on its idle threads are not a conflict
    own = rec_idle("own", "26", vcpus=1, vcpupin={0: "2"}, emulatorpin="2,26")
    u2 = compute_usage(xeon, resources(xeon), [own])
    assert u2["conflicts"] == [] and thread(u2, 26)["held_by"] == own.uuid
    assert thread(u2, 26)["guest"] == own.uuid  # owned by its emulator, too


def test_two_guests_keeping_one_thread_idle_agree(xeon):
    a = rec_idle("a", "26", vcpus=1, vcpupin={0: "2"}, emulatorpin="2")
    b = rec_idle("b", "26", vcpus=1, vcpupin={0: "4"}, emulatorpin="4")
    u = compute_usage(xeon, resources(xeon), [a, b])
    assert u["conflicts"] == []
    assert thread(u, 26)["held_by"] == min(a.uuid, b.uuid)


def test_idle_threads_not_dedicated_or_offline(xeon, large):
    g = rec_idle("odd", "0,24,26", vcpus=1, vcpupin={0: "2"}, emulatorpin="2")
    u = compute_usage(xeon, resources(xeon), [g])
    (c,) = u["conflicts"]
    assert c["kind"] == "pin_not_dedicated" and c["cpus"] == [0, 24]
    assert c["detail"] == "odd: keeps CPU(s) 0,24 idle, which are not in dedicated_cpus"
    assert thread(u, 0)["held_by"] is None and thread(u, 26)["held_by"] == g.uuid
    assert cell(u, 0)["shared_cpus"] == 4  # a shared thread is not taken from the others

    res = resolve_resources(
        config_from_dict({"resources": {"dedicated_cpus": "4-63"}}).resources, large)
    off = rec_idle("off", "63,500", vcpus=1, vcpupin={0: "4"}, emulatorpin="4")
    u2 = compute_usage(large, res, [off])
    (c2,) = u2["conflicts"]
    assert c2["kind"] == "pin_offline" and c2["cpus"] == [63, 500]
    assert c2["detail"] == (
        "off: the threads it keeps idle include offline CPU(s) 63 and CPU(s) 500 that do "
        "not exist")
    # an offline dedicated thread stays held, so nobody is placed there when it returns
    assert thread(u2, 63)["held_by"] == off.uuid and thread(u2, 63)["role"] == "offline"


def test_incremental_tracker_with_idle_threads(xeon):
    res = resources(xeon)
    iso = rec_idle("iso", "26-27", vcpus=2, vcpupin={0: "2", 1: "3"}, emulatorpin="2-3")
    pin = rec("pin", vcpus=1, vcpupin={0: "26"}, emulatorpin="26")
    t = UsageTracker(xeon, res)
    t.update(iso)
    assert t.usage() == compute_usage(xeon, res, [iso])
    t.update(pin)
    assert t.usage() == compute_usage(xeon, res, [iso, pin])
    assert "idle_thread_taken" in kinds(t.usage())
    t.remove(iso.uuid)
    u = t.usage()
    assert u == compute_usage(xeon, res, [pin]) and u["conflicts"] == []
    assert all(th["held_by"] is None for th in u["threads"])


def test_unchanged_thread_entries_are_the_previous_dicts(xeon):
    """A fold hands over the same dict for a thread whose entry did not change (packers
    keep its bytes); changed threads get new, correct entries."""
    res = resources(xeon)
    a = rec("a", vcpus=2, vcpupin={0: "2", 1: "26"}, emulatorpin="0")
    b = rec("b", vcpus=1, vcpupin={0: "3"}, emulatorpin="0")
    t = UsageTracker(xeon, res)
    t.update(a)
    before = t.usage()["threads"]
    t.update(b)
    after = t.usage()
    assert after == compute_usage(xeon, res, [a, b])
    changed = {th["cpu"] for old, th in zip(before, after["threads"], strict=True)
               if old is not th}
    assert changed == {0, 3}  # b's vCPU, and thread 0 where both emulators run
    assert thread(after, 3)["guest"] == b.uuid and thread(after, 2) is before[2]
    t.remove(a.uuid)
    gone = t.usage()
    assert gone == compute_usage(xeon, res, [b])
    assert {th["cpu"] for old, th in zip(after["threads"], gone["threads"], strict=True)
            if old is not th} == {0, 2, 26}  # a's vCPUs, and thread 0 again
    # a new host (re-probe) starts from fresh entries
    t.set_host(xeon, res)
    assert all(x is not y for x, y in zip(gone["threads"], t.usage()["threads"],
                                          strict=True))


def test_one_thread_shared_set_is_not_a_stray_pin(xeon):
    """A vCPU confined to a cell's only shared thread is a shared vCPU there (what the
    fitter writes on such a host), not ``pin_not_dedicated``; with two shared threads in
    the cell, a pin to one of them still is."""
    one = resources(xeon, shared_cpus="0,12")  # cell 0: thread 0, cell 1: thread 12
    g = rec("lone", vcpus=2, cpuset="0", emulatorpin="0")
    u = compute_usage(xeon, one, [g])
    assert u["conflicts"] == []
    assert cell(u, 0)["shared_vcpus"] == 2 and thread(u, 0)["shared_guests"] == [g.uuid]
    assert thread(u, 0)["guest"] is None
    two = compute_usage(xeon, resources(xeon), [g])  # cell 0 shares 0-1,24-25
    assert kinds(two) == ["pin_not_dedicated", "pin_not_dedicated"]
