"""resctrl on the fixture trees: resources, CDP, MBA units, groups, free ways, way maps."""

import dataclasses
import shutil
import sys
from pathlib import Path

import pytest
from fixture_trees import need_fixture

from hostagent.errors import ProbeError
from hostagent.probe.host import probe_host, probe_json, read_resctrl
from hostagent.probe.report import render, way_map
from hostagent.probe.resctrl import parse_schemata

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "fixtures" / "sysfs"


def root_of(name):
    return need_fixture(name)


def probe(name):
    root = root_of(name)
    return probe_host(root, root / "fs" / "resctrl")


def test_xeon_cat_resources_and_groups():
    topo = probe("xeon-2s-cat")
    rc = topo.resctrl
    assert rc is not None and rc.cdp == {"L2": False, "L3": False}
    [l3] = rc.resources
    assert (l3.name, l3.level, l3.type, l3.cbm_mask, l3.cbm_bits) == ("L3", 3, "both", "7ff", 11)
    assert (l3.min_cbm_bits, l3.num_closids, l3.shareable_bits) == (1, 16, "600")
    assert l3.sparse_masks is False  # file absent on this (pre-6.8) kernel
    assert l3.granularity_bytes == 25344 * 1024 // 11
    assert l3.min_bytes == l3.granularity_bytes
    assert [g.name for g in rc.groups] == ["", "batch", "nfv-excl", "qemu-1-rt1-vcpus_2-3"]
    default = rc.group("")
    assert default.schemata == {"L3": {0: "7c0", 1: "7c0"}} and default.tasks == 6
    assert default.mb == {0: 100, 1: 100}
    excl = rc.group("nfv-excl")
    assert excl.mode == "exclusive" and excl.cpus == (8, 9, 32, 33) and excl.tasks == 1
    assert excl.mb == {0: 50, 1: 50}  # "MB:0= 50;1= 50": space-padded values
    assert rc.group("batch").tasks == 3 and rc.group("batch").mode == "shareable"
    assert rc.group("job1") is None  # mon_groups are not allocation groups
    mb = rc.mb
    assert (mb.bandwidth_gran, mb.min_bandwidth, mb.num_closids, mb.unit) == (10, 10, 8,
                                                                              "percent")


def test_xeon_free_ways_follow_libvirt():
    doc = probe_json(probe("xeon-2s-cat"))
    free = {(w["resource"], w["id"]): w for w in doc["free_cache"]}
    # id 0: 7ff minus default 7c0, rt1 003, nfv 00c, batch 600 -> 030
    assert free[("L3", 0)]["free_mask"] == "030" and free[("L3", 0)]["free_ways"] == 2
    # id 1: minus 7c0 (default, and rt1's copy), 003, 020 -> 01c
    assert free[("L3", 1)]["free_mask"] == "01c" and free[("L3", 1)]["largest_free_run"] == 3
    assert free[("L3", 1)]["largest_free_bytes"] == 3 * (25344 * 1024 // 11)


def test_xeon_cdp():
    rc = probe("xeon-2s-cdp").resctrl
    assert rc.cdp == {"L2": False, "L3": True}
    assert [(r.name, r.type) for r in rc.resources] == [("L3CODE", "code"), ("L3DATA", "data")]
    batch = rc.group("batch")
    assert batch.schemata == {"L3CODE": {0: "600", 1: "020"}, "L3DATA": {0: "600", 1: "030"}}
    assert rc.resource("L3DATA").num_closids == 8


def test_epyc_sparse_masks_zero_min_and_amd_units():
    rc = probe("epyc-amd").resctrl
    [l3] = rc.resources
    assert l3.sparse_masks is True and l3.min_cbm_bits == 0 and l3.min_bytes == 0
    assert l3.cbm_mask == "ffff" and l3.granularity_bytes == 1024 * 1024
    assert rc.mb.unit == "amd" and rc.mb.bandwidth_gran == 1 and rc.mb.delay_linear is False
    scav = rc.group("scavenger")
    assert scav.schemata["L3"][4] == "0000"  # "4=0" padded to the mask width
    assert scav.mb[14] == 64 and "SMBA" not in scav.schemata
    assert rc.group("sparse").schemata["L3"][2] == "0f0f"
    assert sorted(rc.group("").schemata["L3"]) == [0, 2, 4, 6, 8, 10, 12, 14]


def test_big_modern_style():
    rc = probe("big-448").resctrl
    infra = rc.group("infra")
    assert infra.schemata == {"L3": {i: "4000" for i in range(4)}}
    assert infra.mb == {i: 40 for i in range(4)} and infra.cpus == (0, 1, 224, 225)
    assert rc.resource("L3").sparse_masks is False and rc.mb.unit == "percent"
    assert len(rc.groups) == 8


def test_read_resctrl_alone_matches_probe():
    root = root_of("xeon-2s-cat")
    topo = probe("xeon-2s-cat")
    assert read_resctrl(root / "fs" / "resctrl", topo.caches) == topo.resctrl
    assert read_resctrl(str(root / "fs" / "resctrl"), topo.caches) == topo.resctrl


def test_absent_or_unmounted_resctrl_is_none(tmp_path):
    assert read_resctrl(None, ()) is None
    assert read_resctrl(tmp_path / "nope", ()) is None
    (tmp_path / "resctrl").mkdir()  # an empty mount point: resctrl not mounted
    assert read_resctrl(tmp_path / "resctrl", ()) is None
    root = root_of("vm-1s-nosmt")
    assert probe_host(root, None).resctrl is None


def _copy(name, tmp_path):
    """(the fixture's sysfs root, a copy of its resctrl tree in tmp_path)."""
    root = root_of(name)
    dst = tmp_path / name / "resctrl"
    shutil.copytree(root / "fs" / "resctrl", dst, symlinks=True)
    return root, dst


def test_mb_unit_mbps_from_values_and_from_event_file(tmp_path):
    root, rc_dir = _copy("xeon-2s-cat", tmp_path)
    (rc_dir / "batch" / "schemata").write_text("    L3:0=600;1=020\n    MB:0=3000;1=3000\n")
    topo = probe_host(root, rc_dir)
    assert topo.resctrl.mb.unit == "MBps" and topo.resctrl.group("batch").mb == {0: 3000,
                                                                                  1: 3000}
    (rc_dir / "batch" / "schemata").write_text("    L3:0=600;1=020\n    MB:0=30;1=30\n")
    assert probe_host(root, rc_dir).resctrl.mb.unit == "percent"
    (rc_dir / "mba_MBps_event").write_text("mbm_local_bytes\n")
    assert probe_host(root, rc_dir).resctrl.mb.unit == "MBps"


def test_mb_unit_mbps_from_generated_tree(tmp_path):
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    generate = pytest.importorskip("fixtures.generate")
    spec = generate.HOSTS["xeon-2s-cat"]
    spec = dataclasses.replace(spec, resctrl=dataclasses.replace(spec.resctrl,
                                                                  mba_unit="MBps"))
    # only the resctrl part is written: the sysfs side is the committed xeon-2s-cat's
    prefix = "sys/fs/resctrl/"
    rc_dir = tmp_path / "resctrl"
    for rel, (kind, value) in generate.render_tree(spec).items():
        if rel.startswith(prefix):
            path = rc_dir / rel[len(prefix):]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.symlink_to(value) if kind == "link" else path.write_text(value)
    rc = probe_host(root_of("xeon-2s-cat"), rc_dir).resctrl
    assert rc.mb.unit == "MBps"


def test_group_without_schemata_is_not_a_group(tmp_path):
    root, rc_dir = _copy("xeon-2s-cat", tmp_path)
    (rc_dir / "stray").mkdir()
    assert probe_host(root, rc_dir).resctrl.group("stray") is None


def test_parse_schemata_tolerates_alignment_and_padding():
    text = "  SMBA:0=2048\n    L3:0=0ff;1=7F0;\n    MB:0= 20;1=  30\n\n"
    caches, mb = parse_schemata("x/schemata", text, {"L3": 11})
    assert caches == {"L3": {0: "0ff", 1: "7f0"}} and mb == {0: 20, 1: 30}
    with pytest.raises(ProbeError, match=r"x/schemata: bad L3 mask for cache id 1.*'1=zz'"):
        parse_schemata("x/schemata", "L3:0=ff;1=zz\n", {"L3": 8})
    with pytest.raises(ProbeError, match=r"bad MB value for domain 0"):
        parse_schemata("x/schemata", "MB:0=abc\n", {})
    with pytest.raises(ProbeError, match=r"not a schemata line"):
        parse_schemata("x/schemata", "garbage\n", {})


def test_way_map_draws_most_significant_first():
    # 8 ways; default holds the low 4, group A way 4, ways 6-7 free but I/O-shared
    assert way_map(0xFF, 0xC0, [("D", 0x0F), ("A", 0x10)]) == "--.ADDDD"
    assert way_map(0xF, 0, [("D", 0x3), ("A", 0x2)]) == "..*D"


def test_report_shows_maps_and_legend():
    text = render(probe("xeon-2s-cat"))
    # group letters come from the names (group_letters); "1 task", not "1 tasks"
    assert "L3:0 = **DDD..ggzz  free 2" in text
    assert "L3:1 = *****s...gg  free 3" in text
    assert "group g nfv-excl: exclusive, 1 task, cpus 8-9,32-33" in text
    assert "MB (percent" in text
    assert "resctrl: not mounted" in render(probe("vm-1s-nosmt"))
