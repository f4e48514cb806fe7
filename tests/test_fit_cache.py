"""Per-vCPU cache reservations in a fit (hw:cache_reservation, via hostagent.resctrl)."""

from __future__ import annotations

from fit_hosts import flavor, make_snapshot, make_topology

from hostagent.fit import fit, parse_request
from hostagent.resctrl_cbm import parse_mask

# 12 ways of 1 MiB per L3; the default group holds the low 6 ways unless told otherwise


def dedicated(vcpus, spec, **kw):
    return flavor(vcpus, 512, cpu_policy="dedicated", cache_reservation=spec, **kw)


def cache_of(topo, cpu):
    return next(c.id for c in topo.caches if c.level == 3 and cpu in c.cpus)


def test_key_parses_groups_and_continuations():
    r = parse_request(dedicated(4, "vcpus=0-1:type=both,size=2mb;vcpus=2-3:type=both,size=1mb"))
    assert [g.vcpus for g in r.cache] == [(0, 1), (2, 3)]
    assert [g.spec.caches[0].size_bytes for g in r.cache] == [2 << 20, 1 << 20]
    r = parse_request(dedicated(2, "vcpus=0-1:type=code,size=2mb;type=data,size=1mb"))
    assert [it.type for it in r.cache[0].spec.caches] == ["code", "data"]


def test_two_groups_in_one_cache_get_disjoint_ways():
    topo = make_topology(1, 4, 2, resctrl_ways=12)
    a = fit(make_snapshot(topo), dedicated(4, "vcpus=0-1:type=both,size=2mb;"
                                              "vcpus=2-3:type=both,size=3mb"))
    assert a["fits"], a["reasons"]
    c = a["placement"]["cache"]
    assert [(e["vcpus"], e["id"], e["ways"], e["mask"]) for e in c] == [
        ([0, 1], 0, 2, "0c0"), ([2, 3], 0, 3, "700")]
    assert not parse_mask(c[0]["mask"]) & parse_mask(c[1]["mask"])
    xml = a["libvirt_xml"]["cputune"]
    assert ("<cachetune vcpus=\"0-1\"><cache id=\"0\" level=\"3\" type=\"both\" size=\"2048\" "
            "unit=\"KiB\" /></cachetune>") in xml
    assert "<cachetune vcpus=\"2-3\">" in xml


def test_group_spanning_cells_reserves_on_each_cache():
    topo = make_topology(2, 4, 2, resctrl_ways=12)
    a = fit(make_snapshot(topo), dedicated(4, "vcpus=0-3:type=both,size=2mb", numa_nodes=2))
    ids = sorted(e["id"] for e in a["placement"]["cache"])
    assert ids == [0, 1]
    assert a["libvirt_xml"]["cputune"].count("<cache id=") == 2


def test_cell_with_free_ways_is_chosen_even_under_pack():
    topo = make_topology(2, 4, 2, resctrl_ways=12, default_mask={0: 0xff8, 1: 0x03f})
    snap = make_snapshot(topo, taken={4: "x"})  # pack would prefer cell 1
    a = fit(snap, dedicated(2, "vcpus=0-1:type=both,size=4mb"), strategy="pack")
    assert a["placement"]["cells"][0]["host_cell"] == 1
    b = fit(snap, dedicated(2, "vcpus=0-1:type=both,size=4mb"), strategy="spread")
    assert b["placement"]["cells"][0]["host_cell"] == 1
    assert b["placement"]["cache"][0]["id"] == 1
    big = fit(snap, dedicated(2, "vcpus=0-1:type=both,size=7mb"))
    assert not big["fits"]
    assert {r["host_cell"] for r in big["reasons"] if r["resource"] == "cache_ways"} == {0, 1}
    assert "not enough contiguous free ways on L3 cache 1: need 7 ways" in \
        [r for r in big["reasons"] if r["host_cell"] == 1][0]["message"]


def test_pinning_moves_to_the_cache_with_room():
    # one cell, two L3s (CCX-like): cores 0-1 on L3 0 (full), cores 2-3 on L3 1 (6 free)
    topo = make_topology(1, 4, 2, l3_per_cell=2, resctrl_ways=12,
                         default_mask={0: 0xfff, 1: 0x03f})
    a = fit(make_snapshot(topo), dedicated(2, "vcpus=0-1:type=both,size=2mb"))
    assert a["fits"], a["reasons"]
    pins = a["placement"]["cells"][0]["pinning"]
    assert {cache_of(topo, cpu) for cpu in pins.values()} == {1}
    assert a["placement"]["cache"][0]["id"] == 1
    # without a reservation the lowest threads are used
    plain = fit(make_snapshot(topo), flavor(2, 512, cpu_policy="dedicated"))
    assert {cache_of(topo, cpu) for cpu in plain["placement"]["cells"][0]["pinning"].values()} \
        == {0}


def test_shared_l3_across_cells_is_planned_for_the_whole_placement():
    # sub-NUMA clustering: one L3 serves both cells, 6 free ways
    topo = make_topology(2, 4, 2, l3_cells=2, resctrl_ways=12)
    snap = make_snapshot(topo)
    ok = fit(snap, dedicated(4, "vcpus=0-1:type=both,size=3mb;vcpus=2-3:type=both,size=3mb",
                             numa_nodes=2))
    assert ok["fits"]
    masks = [parse_mask(e["mask"]) for e in ok["placement"]["cache"]]
    assert {e["id"] for e in ok["placement"]["cache"]} == {0} and not masks[0] & masks[1]
    no = fit(snap, dedicated(4, "vcpus=0-1:type=both,size=4mb;vcpus=2-3:type=both,size=4mb",
                             numa_nodes=2))
    assert not no["fits"]
    msg = [r for r in no["reasons"] if r["resource"] == "cache_ways"][0]["message"]
    assert msg.startswith("cache reservation of vCPUs 2-3 on threads ")
    assert "need 4 ways (4 MiB), largest free run is 2 ways" in msg


def test_refusals_from_the_planner_become_reasons():
    topo = make_topology(1, 4, 2, resctrl_ways=12)
    odd = fit(make_snapshot(topo), dedicated(2, "vcpus=0:type=both,size=1500kb"))
    assert not odd["fits"]
    assert "nearest valid sizes: 1 MiB (1 way) and 2 MiB (2 ways)" in odd["reasons"][0]["message"]
    cdp = fit(make_snapshot(topo), dedicated(2, "vcpus=0:type=code,size=1mb;type=data,size=1mb"))
    assert "type=code needs CDP, which is off for L3" in cdp["reasons"][0]["message"]
    none = fit(make_snapshot(make_topology(1, 4, 2)), dedicated(2, "vcpus=0:type=both,size=1mb"))
    assert none["reasons"][0]["message"].endswith(
        "resctrl is not mounted on this host: no cache reservations")


def test_unpinned_vcpus_of_group_only_in_placement_cells():
    topo = make_topology(1, 4, 2, resctrl_ways=12)
    a = fit(make_snapshot(topo), dedicated(2, "vcpus=1:type=both,size=1mb"))
    assert [e["vcpus"] for e in a["placement"]["cache"]] == [[1]]
    assert a["placement"]["cache"][0]["group"] == "hostagent-fit-vcpus_1"
