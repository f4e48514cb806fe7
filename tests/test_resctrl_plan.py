"""Planning reservations and carving (hostagent.resctrl), on built topologies and fixtures.

Pure: no file is written. Hosts are built with ``host()`` below, or probed read-only
from fixtures/sysfs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from fixture_trees import need_fixture
from hypothesis import given, settings
from hypothesis import strategies as st

from hostagent.errors import RequestError
from hostagent.model import (
    Cache,
    Cell,
    Cpu,
    HostTopology,
    MemoryBandwidth,
    Resctrl,
    ResctrlGroup,
    ResctrlResource,
)
from hostagent.probe.host import probe_host
from hostagent.resctrl import (
    choose_ways,
    merge_taken,
    parse_reservation,
    plan_carve,
    plan_reservation,
    validate_mask,
)
from hostagent.resctrl_cbm import cache_ways, largest_run, parse_mask, popcount

MIB = 1 << 20
FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "sysfs"


def host(
    bits: int = 12,
    groups: list[tuple[str, str, dict[str, dict[int, int]]]] | None = None,
    *,
    cdp: bool = False,
    shareable: int = 0,
    sparse: bool = False,
    min_bits: int = 1,
    closids: int = 16,
    mb: MemoryBandwidth | None = None,
    mb_values: dict[str, dict[int, int]] | None = None,
    ids: tuple[int, ...] = (0, 1),
    gran: int = MIB,
    l2: bool = False,
) -> HostTopology:
    """A host with one L3 per cache id (id i serves CPUs 2i, 2i+1); gran bytes per way."""
    names = ["L3CODE", "L3DATA"] if cdp else ["L3"]
    width = (bits + 3) // 4
    full = (1 << bits) - 1
    resources = [
        ResctrlResource(
            name=n, level=3, type={"L3": "both", "L3CODE": "code", "L3DATA": "data"}[n],
            cbm_mask=format(full, f"0{width}x"), cbm_bits=bits, min_cbm_bits=min_bits,
            num_closids=closids, shareable_bits=format(shareable, f"0{width}x"),
            sparse_masks=sparse, granularity_bytes=gran, min_bytes=min_bits * gran,
        )
        for n in names
    ]
    if l2:
        resources.insert(0, ResctrlResource(
            name="L2", level=2, type="both", cbm_mask="ff", cbm_bits=8, min_cbm_bits=1,
            num_closids=closids, shareable_bits="00", sparse_masks=False,
            granularity_bytes=MIB // 8, min_bytes=MIB // 8,
        ))
    groups = groups if groups is not None else [("", "shareable", {n: {} for n in names})]
    mb_values = mb_values or {}
    built = []
    for name, mode, masks in groups:
        schemata = {}
        for res in resources:
            m = masks.get(res.name, {})
            w = (res.cbm_bits + 3) // 4
            top = (1 << res.cbm_bits) - 1
            dflt = top if name == "" else None
            schemata[res.name] = {
                i: format(m.get(i, dflt if dflt is not None else top), f"0{w}x")
                for i in (ids if res.level == 3 else range(2 * len(ids)))
            }
        built.append(ResctrlGroup(name, mode, schemata, mb_values.get(name, {}), (), 0))
    cpus = tuple(
        Cpu(c, True, 0, i, 0, 0, c, (c,), False)
        for i in range(len(ids))
        for c in (2 * i, 2 * i + 1)
    )
    caches = [
        Cache(3, cid, "unified", gran * bits, bits, 64, (2 * i, 2 * i + 1))
        for i, cid in enumerate(ids)
    ]
    if l2:
        caches = [Cache(2, c.id, "unified", MIB, 8, 64, (c.id,)) for c in cpus] + caches
    return HostTopology(
        cells=(Cell(0, tuple(c.id for c in cpus), 1 << 20, 1 << 19, {0: 10}, ()),),
        cpus=cpus,
        caches=tuple(caches),
        resctrl=Resctrl({"L3": cdp, "L2": False}, tuple(resources), mb, tuple(built)),
    )


def plan(topo, text, group="g", **kw):
    return plan_reservation(topo, parse_reservation(text), group=group, **kw)


def err(topo, text, group="g", **kw) -> str:
    with pytest.raises(RequestError) as exc:
        plan(topo, text, group, **kw)
    return str(exc.value)


# ----------------------------------------------------------------------------- best fit

# default holds way 3, group x way 9: free runs are ways 0-2 (3), 4-8 (5), 10-11 (2)
FRAGMENTED = [("", "shareable", {"L3": {0: 0x008, 1: 0x008}}),
              ("x", "shareable", {"L3": {0: 0x200, 1: 0x200}})]


@pytest.mark.parametrize(
    ("ways", "mask"),
    [(1, "400"), (2, "c00"), (3, "007"), (4, "0f0"), (5, "1f0")],
)
def test_best_fit_takes_the_smallest_run_that_holds_it_lowest_bits(ways, mask):
    p = plan(host(groups=FRAGMENTED), f"type=both,size={ways}m,cache-id=0")
    assert p.schemata["L3"][0] == mask
    assert p.caches[0].ways == ways and p.caches[0].bytes == ways * MIB


def test_best_fit_tie_goes_to_the_lowest_run():
    # free runs: ways 0-1 and 4-5 and 8-11
    t = host(groups=[("", "shareable", {"L3": {0: 0x00c, 1: 0x00c}}),
                     ("x", "shareable", {"L3": {0: 0x0c0, 1: 0x0c0}})])
    assert plan(t, "type=both,size=2m,cache-id=0").schemata["L3"][0] == "003"


def test_not_enough_room_names_the_largest_run_in_ways_and_bytes():
    msg = err(host(groups=FRAGMENTED), "type=both,size=6m,cache-id=1")
    assert msg == (
        "reservation item 'type=both,size=6m,cache-id=1': not enough contiguous free ways on "
        "L3 cache 1: need 6 ways (6 MiB), largest free run is 5 ways = 5 MiB (10 ways free in "
        "all); free more with 'hostagent resctrl carve' or release a group"
    )


def test_ways_outside_shareable_bits_are_preferred():
    t = host(groups=[("", "shareable", {"L3": {0: 0x00f, 1: 0x00f}})], shareable=0xC00)
    assert plan(t, "type=both,size=2m,cache-id=0").schemata["L3"][0] == "030"
    assert plan(t, "type=both,size=6m,cache-id=0").schemata["L3"][0] == "3f0"
    # 7 ways only fit in the run 4-11, the window 4-10 touches one shareable way, 5-11 two
    assert plan(t, "type=both,size=7m,cache-id=0").schemata["L3"][0] == "7f0"


def test_shareable_ways_are_used_when_nothing_else_is_free():
    t = host(groups=[("", "shareable", {"L3": {0: 0x3ff, 1: 0x3ff}})], shareable=0xC00)
    assert plan(t, "type=both,size=2m,cache-id=0").schemata["L3"][0] == "c00"


def test_choose_ways_directly():
    assert choose_ways(0b111101110, 3) == 0b1110  # run 1-3 (3) beats run 5-8 (4)
    assert choose_ways(0b111101110, 4) == 0b111100000
    assert choose_ways(0b111101110, 5) is None
    assert choose_ways(0b110011, 3, sparse=True) == 0b010011
    assert choose_ways(0b110011, 3, sparse=True, min_bits=3) is None
    assert choose_ways(0b0, 0) == 0
    assert choose_ways(0b1111, 2, shareable=0b0011) == 0b1100


# ----------------------------------------------------------------------------- sizes


def test_size_errors_in_libvirt_order():
    t = host(min_bits=2, groups=[("", "shareable", {"L3": {0: 0x003, 1: 0x003}})])
    assert err(t, "type=both,size=12m,cache-id=0") == (
        "reservation item 'type=both,size=12m,cache-id=0': size 12 MiB is the whole L3 cache 0 "
        "(12 MiB, 12 ways); the default group must keep some: at most 11 MiB (11 ways)"
    )
    assert "size 13 MiB is more than the whole L3 cache 0" in err(
        t, "type=both,size=13m,cache-id=0")
    assert err(t, "type=both,size=1536k,cache-id=0") == (
        "reservation item 'type=both,size=1536k,cache-id=0': size 1.5 MiB is not a whole number "
        "of L3 ways (one way = 1 MiB = 1048576 bytes); nearest valid sizes: 2 MiB (2 ways) and "
        "3 MiB (3 ways)"
    )
    assert "nearest valid sizes: 4 MiB (4 ways) and 5 MiB (5 ways)" in err(
        t, "type=both,size=4500k,cache-id=0")
    assert "nearest valid sizes: 10 MiB (10 ways) and 11 MiB (11 ways)" in err(
        t, "type=both,size=11.5m,cache-id=0")
    assert err(t, "type=both,size=1m,cache-id=0") == (
        "reservation item 'type=both,size=1m,cache-id=0': size 1 MiB is 1 way, below the minimum "
        "of 2 ways (min_cbm_bits) on L3; the smallest reservation is 2 MiB"
    )
    assert "size 0 B is 0 ways, below the minimum" in err(t, "type=both,size=0,cache-id=0")


def test_granularity_of_a_real_fixture():
    topo = probe_host(FIXTURES / "xeon-2s-cat/sys", FIXTURES / "xeon-2s-cat/sys/fs/resctrl")
    assert "nearest valid sizes: 2.25 MiB (1 way) and 4.5 MiB (2 ways)" in err(
        topo, "type=both,size=2mb,cache-id=0")


def test_zero_ways_allowed_where_min_cbm_bits_is_zero():
    t = host(min_bits=0, sparse=True, groups=[("", "shareable", {"L3": {0: 0xf00, 1: 0xf00}})])
    p = plan(t, "type=both,size=0,cache-id=0")
    assert p.schemata["L3"][0] == "000" and p.caches[0].ways == 0


# ----------------------------------------------------------------------------- resources


def test_level_without_cat():
    assert err(host(), "type=both,size=1m,level=2") == (
        "reservation item 'type=both,size=1m,level=2': cache level 2 has no allocation (CAT) "
        "on this host (resources: L3)"
    )


def test_both_on_a_cdp_host_and_code_data_without_cdp():
    assert err(host(cdp=True), "type=both,size=1m,cache-id=0") == (
        "reservation item 'type=both,size=1m,cache-id=0': type=both is not possible: L3 runs "
        "with CDP on this host (resources L3CODE, L3DATA); ask for type=code together with "
        "type=data"
    )
    assert err(host(), "type=data,size=1m,cache-id=0") == (
        "reservation item 'type=data,size=1m,cache-id=0': type=data needs CDP, which is off "
        "for L3 on this host (resource L3); use type=both"
    )


def test_unknown_cache_id_with_gaps():
    t = host(ids=(0, 2, 4), groups=[("", "shareable", {"L3": {0: 1, 2: 1, 4: 1}})])
    assert err(t, "type=both,size=1m,cache-id=1") == (
        "reservation item 'type=both,size=1m,cache-id=1': there is no L3 cache id 1 "
        "(cache ids: 0, 2, 4)"
    )
    assert set(plan(t, "type=both,size=1m,cache-id=4").schemata["L3"]) == {0, 2, 4}


def test_cdp_pair_gets_code_and_data_masks_on_the_same_cache():
    masks = {"L3CODE": {0: 0x00f, 1: 0x00f}, "L3DATA": {0: 0x00f, 1: 0x00f}}
    t = host(cdp=True, groups=[("", "shareable", masks)])
    p = plan(t, "type=code,size=2m,cache-id=1;type=data,size=3m,cache-id=1")
    assert p.text == "L3CODE:0=00f;1=030\nL3DATA:0=00f;1=070\n"
    assert [(c.resource, c.cache_id, c.mask_hex) for c in p.caches] == [
        ("L3CODE", 1, "030"), ("L3DATA", 1, "070")]
    # data alone: code keeps the default group's mask
    data_only = plan(t, "type=data,size=1m,cache-id=0")
    assert data_only.text == "L3CODE:0=00f;1=00f\nL3DATA:0=010;1=00f\n"
    # without cache-id and CPUs the pair lands on one cache
    p = plan(t, "type=code,size=1m;type=data,size=1m")
    assert {c.cache_id for c in p.caches} == {0}


def test_exclusive_group_on_the_cdp_peer_is_avoided():
    masks = {"L3CODE": {0: 0x00f, 1: 0x00f}, "L3DATA": {0: 0x00f, 1: 0x00f}}
    excl = {"L3CODE": {0: 0x000, 1: 0x000}, "L3DATA": {0: 0x030, 1: 0x000}}
    # "x" has an empty code mask on cache 0 (not allowed by the kernel, but shows the rule)
    t = host(cdp=True, min_bits=0, groups=[("", "shareable", masks), ("x", "exclusive", excl)])
    p = plan(t, "type=code,size=2m,cache-id=0;type=data,size=2m,cache-id=0")
    assert p.schemata["L3CODE"][0] == "0c0"  # 030 is free in L3CODE but exclusive in L3DATA
    assert p.schemata["L3DATA"][0] == "0c0"


def test_default_mask_overlapping_an_exclusive_group_is_refused():
    t = host(groups=[("", "shareable", {"L3": {0: 0x00f, 1: 0x00f}}),
                     ("x", "exclusive", {"L3": {0: 0x0f0, 1: 0x00c}})])
    assert err(t, "type=both,size=1m,cache-id=0") == (
        "the default group's L3:1 mask 00f overlaps an exclusive group; the kernel would refuse "
        "to copy it into a new group (fix the default group's schemata first)"
    )


def test_full_schemata_covers_every_resource_and_cache_id():
    t = host(l2=True, groups=[("", "shareable", {"L3": {0: 0x00f, 1: 0x0ff},
                                                 "L2": {0: 0xf, 1: 0xf, 2: 0xf, 3: 0xf}})])
    p = plan(t, "type=both,size=2m,cache-id=1")
    assert p.text == "L2:0=0f;1=0f;2=0f;3=0f\nL3:0=00f;1=300\n"
    p2 = plan(t, "type=both,size=256k,level=2,cache-id=3")
    assert "L2:0=0f;1=0f;2=0f;3=30\n" in p2.text


# ----------------------------------------------------------------------------- cache id


def test_cache_id_from_cpus_or_largest_free_run():
    t = host(groups=[("", "shareable", {"L3": {0: 0x00f, 1: 0x0ff}})])
    assert plan(t, "type=both,size=1m", cpus=[2, 3]).caches[0].cache_id == 1
    assert plan(t, "type=both,size=1m").caches[0].cache_id == 0  # 8 free ways beat 4
    msg = err(t, "type=both,size=1m", cpus=[1, 2])
    assert msg == (
        "reservation item 'type=both,size=1m': CPUs 1-2 are served by several L3 caches "
        "(ids 0, 1); give cache-id= (one reservation item per cache)"
    )
    assert err(t, "type=both,size=1m", cpus=[9]) == (
        "CPU(s) 9 are not online CPUs of this host (online: 0-3)"
    )
    # two items without cache-id resolve to the same cache: a collision
    assert "both ask for type=both on L3 cache 1" in err(
        t, "type=both,size=1m,cache-id=1;type=both,size=1m,level=3", cpus=[2])


def test_cpu_not_served_by_any_cache_of_the_level():
    t = host(l2=True, groups=[("", "shareable", {"L3": {}, "L2": {}})])
    t2 = HostTopology(t.cells, t.cpus, tuple(c for c in t.caches if c.id != 1 or c.level != 2),
                      t.resctrl)
    assert "CPUs 1 are not served by any L2 cache on this host; give cache-id=" in err(
        t2, "type=both,size=128k,level=2", cpus=[1])


# ----------------------------------------------------------------------------- closids


def test_closids_exhausted_counts_the_default_group():
    groups = [("", "shareable", {"L3": {0: 0x00f, 1: 0x00f}})] + [
        (f"g{i}", "shareable", {"L3": {0: 0x010 << i, 1: 0x010 << i}}) for i in range(3)
    ]
    mb = MemoryBandwidth(10, 10, 4, "percent")
    t = host(groups=groups, closids=16, mb=mb)
    assert err(t, "type=both,size=1m,cache-id=0", group="new") == (
        "no CLOSID left for a new group: 4 groups already use all 4 (the default group "
        "counts; num_closids: L3=16, MB=4); release a group first"
    )
    # an existing group is re-planned without a new CLOSID
    assert plan(t, "type=both,size=1m,cache-id=0", group="g0").caches[0].mask_hex == "010"
    t5 = host(groups=groups[:2], closids=4)
    assert plan(t5, "type=both,size=1m,cache-id=0", group="n").exists is False
    assert "2 groups (+2 planned) already use all 4" in err(
        t5, "type=both,size=1m,cache-id=0", group="n", pending_groups=2)


# ----------------------------------------------------------------------------- taken, re-plan


def test_taken_lets_several_plans_share_out_one_cache():
    t = host(groups=[("", "shareable", {"L3": {0: 0x00f, 1: 0x00f}})])
    a = plan(t, "type=both,size=2m,cache-id=0", group="a")
    b = plan(t, "type=both,size=2m,cache-id=0", group="b", taken=a.taken(), pending_groups=1)
    assert a.caches[0].mask & b.caches[0].mask == 0
    taken = merge_taken(a.taken(), b.taken())
    assert taken == {("L3", 0): 0x0f0}
    c = plan(t, "type=both,size=4m", group="c", taken=taken, pending_groups=2)
    assert c.caches[0].cache_id == 1  # cache 0 has only 4 contiguous ways left
    assert merge_taken(None, {("L3", 1): 1}, {("L3", 1): 2}) == {("L3", 1): 3}


def test_replanning_an_existing_group_keeps_its_ways():
    t = host(groups=[("", "shareable", {"L3": {0: 0x00f, 1: 0x00f}}),
                     ("g", "shareable", {"L3": {0: 0x300, 1: 0x00f}})])
    p = plan(t, "type=both,size=2m,cache-id=0")
    assert p.exists and p.caches[0].reused and p.schemata["L3"] == {0: "300", 1: "00f"}
    grown = plan(t, "type=both,size=3m,cache-id=0")
    assert grown.caches[0].mask_hex == "070" and not grown.caches[0].reused


# ----------------------------------------------------------------------------- bandwidth

PERCENT = MemoryBandwidth(bandwidth_gran=10, min_bandwidth=10, num_closids=8, unit="percent")


def test_mb_line_fills_other_domains_with_the_maximum():
    t = host(mb=PERCENT, mb_values={"": {0: 100, 1: 100}},
             groups=[("", "shareable", {"L3": {0: 0x00f, 1: 0x00f}})])
    p = plan(t, "type=both,size=1m,cache-id=0;mb=50,node=1")
    assert p.text.endswith("MB:0=100;1=50\n")
    assert [b.to_dict() for b in p.bandwidth] == [{"node": 1, "value": 50, "unit": "percent"}]
    assert plan(t, "mb=30", cpus=[0]).mb == {0: 30, 1: 100}


@pytest.mark.parametrize(
    ("mb", "text", "message"),
    [
        (PERCENT, "mb=55,node=0", "reservation item 'mb=55,node=0': mb=55 is not a multiple of "
         "bandwidth_gran 10 (percent); nearest valid: 50 and 60"),
        (PERCENT, "mb=5,node=0", "mb=5 is below min_bandwidth 10 (percent)"),
        (PERCENT, "mb=120,node=0", "mb=120 is above the maximum of 100 (percent in force)"),
        (PERCENT, "mb=50,node=7", "reservation item 'mb=50,node=7': there is no MB domain "
         "(node) 7 (MB domains: 0, 1)"),
        (PERCENT, "mb=50", "reservation item 'mb=50': give node= (MB domains: 0, 1) or the "
         "CPUs to reserve for"),
        (MemoryBandwidth(1, 0, 16, "amd"), "mb=4096,node=0",
         "mb=4096 is above the maximum of 2048 (AMD units of 1/8 GB/s in force)"),
        (MemoryBandwidth(10, 10, 8, "MBps"), "mb=0,node=0",
         "mb=0 MBps would stop all traffic; give 1..4294967295"),
        (MemoryBandwidth(10, 10, 8, "MBps"), "mb=4294967296,node=0",
         "above the maximum of 4294967295 (MBps in force)"),
        (None, "mb=50,node=0", "reservation item 'mb=50,node=0': memory bandwidth allocation "
         "(MBA) is not available on this host (no info/MB)"),
    ],
)
def test_mb_errors(mb, text, message):
    t = host(mb=mb, mb_values={"": {0: 100, 1: 100}})
    assert message in err(t, text)


def test_mb_values_accepted_per_unit():
    assert plan(host(mb=MemoryBandwidth(1, 0, 16, "amd")), "mb=256,node=1").mb == {0: 2048, 1: 256}
    assert plan(host(mb=MemoryBandwidth(10, 10, 8, "MBps")), "mb=1234,node=0").mb[0] == 1234


def test_existing_group_with_a_bandwidth_limit_is_reset_when_none_is_asked():
    t = host(mb=PERCENT, mb_values={"": {0: 100, 1: 100}, "g": {0: 30, 1: 100}},
             groups=[("", "shareable", {"L3": {0: 0x00f, 1: 0x00f}}),
                     ("g", "shareable", {"L3": {0: 0x030, 1: 0x00f}})])
    assert plan(t, "type=both,size=2m,cache-id=0").text == "L3:0=030;1=00f\nMB:0=100;1=100\n"
    assert plan(t, "type=both,size=2m,cache-id=0", group="new").mb == {}


def test_no_resctrl_and_default_group():
    t = host()
    bare = HostTopology(t.cells, t.cpus, t.caches, None)
    assert err(bare, "type=both,size=1m").startswith(
        "resctrl is not mounted on this host (no info/ directory)")
    assert err(t, "type=both,size=1m", group="") == (
        "the default group cannot hold a reservation; name a group")


# ----------------------------------------------------------------------------- fixtures


def probed(name: str) -> HostTopology:
    root = need_fixture(name)
    return probe_host(root, root / "fs/resctrl")


def test_xeon_cat_fixture_plan():
    t = probed("xeon-2s-cat")
    # free: cache 0 ways 4-5, cache 1 ways 2-4; default 7c0 on both
    p = plan(t, "type=both,size=2304k", cpus=[12])
    assert p.text == "L3:0=7c0;1=004\n"
    p = plan(t, "type=both,size=4608k,cache-id=0;mb=50,node=0")
    assert p.text == "L3:0=030;1=7c0\nMB:0=50;1=100\n"


def test_xeon_cdp_fixture_plan():
    t = probed("xeon-2s-cdp")
    assert "type=both is not possible" in err(t, "type=both,size=2304k,cache-id=0")
    p = plan(t, "type=code,size=2304k,cache-id=1;type=data,size=4608k,cache-id=1")
    # L3CODE:1 free 01c (ways 2-4), L3DATA:1 free 00c (ways 2-3)
    assert p.text == "L3CODE:0=7c0;1=004\nL3DATA:0=7c0;1=00c\n"


def test_epyc_fixture_sparse_and_amd_units():
    t = probed("epyc-amd")
    assert err(t, "type=both,size=1m,cache-id=1").endswith(
        "(cache ids: 0, 2, 4, 6, 8, 10, 12, 14)")
    p = plan(t, "type=both,size=4m,cache-id=0;mb=256,node=0")
    assert p.schemata["L3"][0] == "00f0"
    assert p.mb[0] == 256 and p.mb[2] == 2048
    assert "above the maximum of 2048" in err(t, "mb=4000,node=0")


# ----------------------------------------------------------------------------- property

masks12 = st.integers(min_value=0, max_value=0xFFF)


@settings(max_examples=150, deadline=None)
@given(
    default=st.integers(min_value=0, max_value=11).flatmap(
        lambda s: st.integers(min_value=1, max_value=12 - s).map(lambda n: ((1 << n) - 1) << s)),
    others=st.lists(st.tuples(masks12, st.booleans()), max_size=4),
    taken=masks12,
    ways=st.integers(min_value=0, max_value=12),
    sparse=st.booleans(),
    min_bits=st.integers(min_value=0, max_value=3),
    shareable=masks12,
)
def test_every_plan_is_valid_and_overlaps_nobody(
    default, others, taken, ways, sparse, min_bits, shareable
):
    groups = [("", "shareable", {"L3": {0: default, 1: default}})]
    groups += [(f"o{i}", "exclusive" if ex else "shareable", {"L3": {0: m, 1: 0}})
               for i, (m, ex) in enumerate(others)]
    t = host(groups=groups, sparse=sparse, min_bits=min_bits, shareable=shareable)
    held = default | taken
    for m, _ in others:
        held |= m
    free = 0xFFF & ~held
    try:
        p = plan(t, f"type=both,size={ways}m,cache-id=0", taken={("L3", 0): taken})
    except RequestError as exc:
        if ways >= 12 or ways < min_bits:
            return  # an invalid size
        if "cannot be copied" in str(exc):  # never write a mask below min_cbm_bits
            assert validate_mask(default, t.resctrl.resource("L3")) is not None
            return
        # refused for room: no contiguous run fits, and no sparse pick either
        assert "not enough contiguous free ways" in str(exc)
        assert largest_run(free) < ways
        assert not sparse or popcount(free) < ways or min_bits > 1
        return
    mask = p.caches[0].mask
    res = t.resctrl.resource("L3")
    assert validate_mask(mask, res) is None
    assert popcount(mask) == ways
    assert mask & (default | taken) == 0
    for m, _ in others:
        assert mask & m == 0
    # the copied default mask on cache 1 is the default's, and valid
    assert parse_mask(p.schemata["L3"][1]) == default
    assert validate_mask(default, res) is None


# ----------------------------------------------------------------------------- carve


def test_carve_frees_a_run_from_the_high_end_and_is_idempotent():
    t = host(groups=[("", "shareable", {"L3": {0: 0xfff, 1: 0x0ff}})])
    c = plan_carve(t, 4)
    assert c.text == "L3:0=0ff;1=0ff\n"
    assert [ch.to_dict()["freed"] for ch in c.changes] == ["f00", "000"]
    assert c.changed
    after = host(groups=[("", "shareable", {"L3": {0: 0x0ff, 1: 0x0ff}})])
    assert not plan_carve(after, 4).changed


def test_carve_keeps_shareable_ways_in_the_default_group():
    t = host(shareable=0xC00, groups=[("", "shareable", {"L3": {0: 0xfff, 1: 0xfff}})])
    c = plan_carve(t, 3, cache_id=1)
    assert c.text == "L3:0=fff;1=ff8\n"
    assert len(c.changes) == 1 and c.changes[0].cache_id == 1


def test_carve_refuses_to_cut_into_a_group_or_below_min():
    # vm shares the upper half of the default group's ways on cache 1
    t = host(groups=[("", "shareable", {"L3": {0: 0xfff, 1: 0x0ff}}),
                     ("vm", "shareable", {"L3": {0: 0x00f, 1: 0x0f0}})])
    assert not plan_carve(t, 4, cache_id=1).changed  # ways 8-11 are free already
    msg = str(pytest.raises(RequestError, plan_carve, t, 6, cache_id=1).value)
    assert msg == (
        "carve L3 cache 1: cannot free a run of 6 ways: the ways the default group would give "
        "up are also held by vm (carving would cut into that group); free now: f00 (largest "
        "run 4)"
    )
    t2 = host(min_bits=2, groups=[("", "shareable", {"L3": {0: 0xfff, 1: 0x00f}})])
    assert plan_carve(t2, 10, cache_id=1).text == "L3:0=fff;1=003\n"
    msg = str(pytest.raises(RequestError, plan_carve, t2, 11, cache_id=1).value)
    assert msg == (
        "carve L3 cache 1: cannot free a run of 11 ways: the default group (00f) must keep at "
        "least 2 ways (min_cbm_bits 2); free now: ff0 (largest run 8)"
    )


def test_carve_argument_errors():
    t = host()
    assert str(pytest.raises(RequestError, plan_carve, t, 12).value) == (
        "carve: --ways 12 is out of range: give 1 to 11 (L3 has 12 ways and the default group "
        "keeps at least one)"
    )
    zero = pytest.raises(RequestError, plan_carve, t, 0).value
    assert "carve: --ways 0 is out of range" in str(zero)
    assert str(pytest.raises(RequestError, plan_carve, t, 2, cache_id=5).value) == (
        "carve: there is no L3 cache id 5 (cache ids: 0, 1)")
    assert str(pytest.raises(RequestError, plan_carve, t, 2, level=2).value) == (
        "carve: cache level 2 has no allocation (resources: L3)")


def test_carve_cdp_changes_code_and_data():
    masks = {"L3CODE": {0: 0xfff, 1: 0xfff}, "L3DATA": {0: 0xfff, 1: 0xfff}}
    c = plan_carve(host(cdp=True, groups=[("", "shareable", masks)]), 2, cache_id=0)
    assert c.text == "L3CODE:0=3ff;1=fff\nL3DATA:0=3ff;1=fff\n"


def test_carve_on_the_xeon_fixture_takes_the_low_end_beside_batch():
    t = probed("xeon-2s-cat")
    c = plan_carve(t, 4, cache_id=0)
    assert c.changes[0].to_dict() == {
        "resource": "L3", "cache_id": 0, "before": "7c0", "after": "700", "freed": "0c0",
        "free_before": "030", "free_after": "0f0", "largest_free_run": 4,
    }
    assert "also held by qemu-1-rt1-vcpus_2-3" in str(
        pytest.raises(RequestError, plan_carve, t, 4, cache_id=1).value)


def test_plan_matches_cache_ways_free_mask():
    t = probed("xeon-2s-cat")
    free = {(w["resource"], w["id"]): w["free_mask"] for w in cache_ways(t)}
    p = plan(t, "type=both,size=4608k,cache-id=0")
    assert p.caches[0].mask_hex == free[("L3", 0)]  # both free ways, nothing else
