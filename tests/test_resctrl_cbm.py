"""Mask arithmetic and free ways by libvirt's rule."""

import pytest

from hostagent import resctrl_cbm
from hostagent.model import (
    Cache,
    Cell,
    Cpu,
    HostTopology,
    Resctrl,
    ResctrlGroup,
    ResctrlResource,
    topology_from_dict,
    topology_to_dict,
)


def test_runs_and_largest():
    assert resctrl_cbm.runs(0b1110011) == [(0, 2), (4, 3)]
    assert resctrl_cbm.largest_run(0b1110011) == 3
    assert resctrl_cbm.largest_run(0) == 0
    assert resctrl_cbm.is_contiguous(0b0111000)
    assert not resctrl_cbm.is_contiguous(0b101)


def test_format_pads_to_mask_width():
    assert resctrl_cbm.format_mask(0xFF, 20) == "000ff"
    assert resctrl_cbm.format_mask(0x70F, 11) == "70f"
    assert resctrl_cbm.format_mask(0, 16) == "0000"


@pytest.mark.parametrize("bad", ["", "xyz", "0xg1", "1-2"])
def test_parse_mask_rejects_garbage(bad):
    with pytest.raises(ValueError, match="not a hex mask"):
        resctrl_cbm.parse_mask(bad)


def _topo() -> HostTopology:
    res = ResctrlResource(
        name="L3", level=3, type="both", cbm_mask="fff", cbm_bits=12, min_cbm_bits=1,
        num_closids=16, shareable_bits="c00", sparse_masks=False,
        granularity_bytes=1024 * 1024, min_bytes=0,
    )
    groups = (
        ResctrlGroup("", "shareable", {"L3": {0: "00f", 1: "fff"}}, {}, (0, 1), 10),
        ResctrlGroup("rt", "exclusive", {"L3": {0: "030", 1: "000"}}, {}, (), 1),
    )
    return HostTopology(
        cells=(Cell(0, (0, 1), 1024, 512, {0: 10}, ()),),
        cpus=(
            Cpu(0, True, 0, 0, 0, 0, 0, (0,), False),
            Cpu(1, True, 0, 1, 1, 1, 1, (1,), False),
        ),
        caches=(
            Cache(3, 0, "unified", 12 << 20, 12, 64, (0,)),
            Cache(3, 1, "unified", 12 << 20, 12, 64, (1,)),
        ),
        resctrl=Resctrl({"L3": False, "L2": False}, (res,), None, groups),
    )


def test_free_ways_subtract_default_and_groups():
    ways = {w["id"]: w for w in resctrl_cbm.cache_ways(_topo(), owners={"rt": "uuid-1"})}
    assert ways[0]["free_mask"] == "fc0"
    assert ways[0]["free_ways"] == 6
    assert ways[0]["largest_free_run"] == 6
    assert ways[0]["largest_free_bytes"] == 6 << 20
    assert ways[1]["free_ways"] == 0
    rt = [a for a in ways[0]["allocations"] if a["group"] == "rt"][0]
    assert rt == {"group": "rt", "guest": "uuid-1", "mode": "exclusive", "mask": "030",
                  "ways": 2, "bytes": 2 << 20}


def test_topology_dict_round_trip():
    topo = _topo()
    d = topology_to_dict(topo)
    assert d["cells"][0]["distances"] == {"0": 10}
    assert d["resctrl"]["groups"][0]["schemata"] == {"L3": {"0": "00f", "1": "fff"}}
    assert topology_from_dict(d) == topo
