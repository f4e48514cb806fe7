"""Hugepages in use by something that is not a tracked guest (issue "Output a person
reads", item 5): the ``hugepages_untracked`` conflict, and both counts in ``show``/``watch``.

The fixtures' kernel counters are those of real hosts: big-448 has 6144 of 8192 2 MiB
pages free on every cell with no guest holding one, xeon-2s-cat 1536 of 2048 on cell 0.
"""

from __future__ import annotations

import json

from libvirt_helpers import domain_xml, probe_fixture, uuid_for

from hostagent.commands.show import render
from hostagent.commands.watch import summary
from hostagent.config import Config, config_from_dict, resolve_resources
from hostagent.guests.source import record_from_xml
from hostagent.model import replace
from hostagent.snapshot import build_snapshot
from hostagent.tracker import UsageTracker, compute_usage

DEDICATED = "2-11,14-23,26-35,38-47"
SHARED = "0-1,12-13,24-25,36-37"


def resources(topo, **extra):
    doc = {"dedicated_cpus": DEDICATED, "shared_cpus": SHARED, **extra}
    return resolve_resources(config_from_dict({"resources": doc}).resources, topo)


def untracked(usage):
    return {(c["cell"], c["size_kib"]): c for c in usage["conflicts"]
            if c["kind"] == "hugepages_untracked"}


def rec(name, **kw):
    return record_from_xml(domain_xml(name, **kw), uuid=uuid_for(name), name=name,
                           state="running", active=True)


def test_pages_no_guest_holds_are_a_conflict_per_cell_and_size():
    big = probe_fixture("big-448")
    u = compute_usage(big, resolve_resources(Config().resources, big), [])
    found = untracked(u)
    c0 = found[(0, 2048)]
    assert (c0["untracked"], c0["kernel_free"], c0["guests"]) == (2048, 6144, [])
    assert "2048 pages of 2048 KiB are in use by something other than the tracked " \
        "guests (the kernel has 6144 of 8192 free, guests hold 0, 0 reserved)" in c0["detail"]
    # one per cell and pool where the kernel counts pages the accounting does not
    assert {cell for cell, size in found if size == 2048} == {c.id for c in big.cells}
    pool = next(h for h in u["cells"][0]["hugepages"] if h["size_kib"] == 2048)
    assert pool["free"] == 8192  # the accounting itself is unchanged


def test_reserved_pages_and_guests_holding_them_cover_the_kernels_count():
    xeon = probe_fixture("xeon-2s-cat")  # cell 0: 2 MiB 1536/2048 free, 1 GiB 28/32
    assert set(untracked(compute_usage(xeon, resources(xeon), []))) == {
        (0, 2048), (0, 1048576), (1, 1048576)}
    # reserved_hugepages covering what the host itself uses: no conflict on those pools
    res = resources(xeon, reserved_hugepages=[
        {"cell": 0, "size_kib": 2048, "count": 512},
        {"cell": 0, "size_kib": 1048576, "count": 4}])
    assert set(untracked(compute_usage(xeon, res, []))) == {(1, 1048576)}
    # a guest holding 12 of cell 1's 1 GiB pages: what the kernel counts is accounted for
    g = rec("big", vcpus=1, cpuset="0-1", emulatorpin="0", memory_kib=12 * 1048576,
            numa_memory=("strict", "1"), hugepages=[(1048576, None)])
    assert untracked(compute_usage(xeon, res, [g])) == {}
    # pages a guest holds but has not touched yet (kernel free > accounting free): nothing
    h = rec("huge", vcpus=1, cpuset="0-1", emulatorpin="0", memory_kib=30 * 1048576,
            numa_memory=("strict", "1"), hugepages=[(1048576, None)])
    assert untracked(compute_usage(xeon, res, [h])) == {}


def test_incremental_tracker_and_a_hugepage_poll_agree_with_a_full_recompute():
    xeon = probe_fixture("xeon-2s-cat")
    res = resources(xeon)
    g = rec("g", vcpus=1, cpuset="0-1", emulatorpin="0", memory_kib=2 * 1048576,
            numa_memory=("strict", "0"), hugepages=[(1048576, None)])
    t = UsageTracker(xeon, res)
    t.update(g)
    assert t.usage() == compute_usage(xeon, res, [g])
    assert untracked(t.usage())[(0, 1048576)]["untracked"] == 2  # 4 in use, g holds 2
    # the poll sees the pages go back: the conflict goes with them
    cells = tuple(replace(c, hugepages=tuple(replace(p, free=p.total) for p in c.hugepages))
                  for c in xeon.cells)
    freed = replace(xeon, cells=cells)
    t.set_host(freed, res)
    assert untracked(t.usage()) == {} and t.usage() == compute_usage(freed, res, [g])


def _snapshot(name):
    topo = probe_fixture(name)
    cfg = Config()
    return json.loads(json.dumps(build_snapshot(topo, cfg, [], host="h1", epoch="e",
                                                seq=3, now=0.0)))


def test_show_puts_the_kernels_free_count_beside_the_accounting():
    out = render(_snapshot("big-448"))
    pools = out[out.index("hugepage pools"):].splitlines()
    assert pools[0] == ("hugepage pools (cell size: total, reserved, used by guests, free "
                        "by accounting / by the kernel)")
    assert "  c0  2 MiB: total 8192  reserved 0  used 0  free 8192 / kernel 6144  " \
        "(2048 pages used outside the tracked guests)" in pools
    assert "hugepages_untracked: cell 0: 2048 pages of 2048 KiB" in out


def test_watch_wide_line_shows_both_free_counts():
    line = summary(_snapshot("xeon-2s-cat"), wide=True)
    assert "hugepages free/kernel c0:2MiB=2048/1536,1GiB=32/28 c1:2MiB=2048/2048," \
        "1GiB=32/20" in line
    assert line.endswith("conflicts 3")
