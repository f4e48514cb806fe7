"""The probe against an independent peer: hwloc's ``lstopo-no-graphics --of xml``.

hwloc reads the same sysfs tree (``HWLOC_FSROOT=<fixture>``; this machine's own ``/`` with
no FSROOT) with its own code. Packages, cores, PUs, NUMA nodes (ids, CPUs, memory) and
caches per level and type (count, size, ways, line size, CPUs) must agree with the probe.
"""

import os
import shutil
import subprocess
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import pytest
from fixture_trees import need_fixture

from hostagent.probe.host import probe_host

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "sysfs"
NAMES = ["vm-1s-nosmt", "xeon-2s-cat", "xeon-2s-cdp", "epyc-amd", "large-8cell", "big-448",
         "no-node-dir"]
LSTOPO = shutil.which("lstopo-no-graphics")
pytestmark = pytest.mark.skipif(LSTOPO is None, reason="lstopo-no-graphics (hwloc) not installed")

_CACHE_TYPE = {"0": "unified", "1": "data", "2": "instruction"}


def parse_cpuset(text: str) -> frozenset[int]:
    """hwloc's bitmap: comma-separated 32-bit words, most significant first; empty = 0."""
    value = 0
    for word in text.split(","):
        value = (value << 32) | (int(word, 16) if word else 0)
    return frozenset(i for i in range(value.bit_length()) if value >> i & 1)


def lstopo(fsroot: Path | None) -> list[dict]:
    env = dict(os.environ)
    env.pop("HWLOC_XMLFILE", None)
    if fsroot is not None:
        env["HWLOC_FSROOT"] = str(fsroot)
        env["HWLOC_COMPONENTS"] = "-x86"  # the fixture, not this machine's CPUID
    out = subprocess.run(
        [LSTOPO, "--of", "xml", "--no-io", "--disallowed", "-"],
        env=env, check=True, capture_output=True, text=True, timeout=60,
    ).stdout
    return [obj.attrib for obj in ET.fromstring(out).iter("object")]


def hwloc_view(objs: list[dict]) -> dict:
    view: dict = {"Package": Counter(), "Core": Counter(), "PU": set(), "NUMANode": {},
                  "caches": Counter()}
    for o in objs:
        kind = o.get("type")
        if kind in ("Package", "Core"):
            view[kind][parse_cpuset(o["cpuset"])] += 1
        elif kind == "PU":
            view["PU"].add(int(o["os_index"]))
        elif kind == "NUMANode":
            view["NUMANode"][int(o["os_index"])] = (
                parse_cpuset(o["cpuset"]), int(o.get("local_memory", "0")))
        elif kind and kind.endswith("Cache"):
            view["caches"][(
                int(o["depth"]), _CACHE_TYPE[o.get("cache_type", "0")], int(o["cache_size"]),
                int(o.get("cache_associativity", "0")), int(o.get("cache_linesize", "0")),
                parse_cpuset(o["cpuset"]),
            )] += 1
    return view


def probe_view(topo) -> dict:
    online = [c for c in topo.cpus if c.online]
    sockets: dict[int, set[int]] = {}
    for c in online:
        sockets.setdefault(c.socket, set()).add(c.id)
    return {
        "Package": Counter(frozenset(s) for s in sockets.values()),
        "Core": Counter(frozenset(s) for s in {c.siblings for c in online}),
        "PU": {c.id for c in online},
        "NUMANode": {cell.id: (frozenset(cell.cpus), cell.memory_kib * 1024)
                     for cell in topo.cells},
        "caches": Counter(
            (c.level, c.type, c.size_bytes, c.ways, c.line_bytes, frozenset(c.cpus))
            for c in topo.caches),
    }


def compare(topo, objs) -> None:
    mine, peer = probe_view(topo), hwloc_view(objs)
    assert mine["PU"] == peer["PU"]
    assert mine["Package"] == peer["Package"]
    assert mine["Core"] == peer["Core"]
    assert set(mine["NUMANode"]) == set(peer["NUMANode"])
    for nid, (cpus, mem) in mine["NUMANode"].items():
        peer_cpus, peer_mem = peer["NUMANode"][nid]
        if cpus:  # hwloc gives a CPU-less node the CPUs of the object it hangs from
            assert cpus == peer_cpus, f"node {nid}"
        if mem:  # 0 = unknown to sysfs (kernel without node/): hwloc reads /proc instead
            assert mem == peer_mem, f"node {nid}"
    assert mine["caches"] == peer["caches"]
    levels = Counter((k[0], k[1]) for k in mine["caches"].elements())
    assert levels == Counter((k[0], k[1]) for k in peer["caches"].elements())


@pytest.mark.parametrize("name", NAMES)
def test_fixture_agrees_with_hwloc(name):
    tree = need_fixture(name).parent
    topo = probe_host(tree / "sys", tree / "sys" / "fs" / "resctrl")
    compare(topo, lstopo(tree))


def test_this_machine_agrees_with_hwloc():
    if not Path("/sys/devices/system/cpu").is_dir():
        pytest.skip("no /sys here")
    compare(probe_host("/sys", "/sys/fs/resctrl"), lstopo(None))


def test_parse_cpuset():
    assert parse_cpuset("0x0000ffff,,0x0000ffff") == frozenset(range(16)) | frozenset(
        range(64, 80))
    assert parse_cpuset("0x00000003") == frozenset({0, 1})


def test_comparison_can_fail():
    small, other = need_fixture("vm-1s-nosmt").parent, need_fixture("xeon-2s-cat").parent
    with pytest.raises(AssertionError):
        compare(probe_host(small / "sys", None), lstopo(other))
