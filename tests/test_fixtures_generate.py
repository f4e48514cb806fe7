"""Tests for fixtures/generate.py: committed trees match the generator, read like the
kernel's files, and hwloc (an independent reader) sees the shape each host describes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fixtures.generate import (  # noqa: E402
    HOSTS,
    SYSFS_DIR,
    check,
    cpulist,
    cpumask,
    expected_counts,
    generate_tree,
    hwloc_counts,
    read_tree,
    render_tree,
    scaled_host,
    variant,
)

LSTOPO = shutil.which("lstopo-no-graphics")
needs_hwloc = pytest.mark.skipif(LSTOPO is None, reason="hwloc (lstopo-no-graphics) not installed")


def sysdir(name: str) -> Path:
    return SYSFS_DIR / name / "sys"


def read(path: Path) -> str:
    return path.read_text()


# ---- the generator and the committed trees agree -------------------------------------------


@pytest.mark.parametrize("name", list(HOSTS))
def test_committed_tree_matches_generator(name: str) -> None:
    assert check([name]) == []


def test_cli_check_passes_and_rejects_unknown_names() -> None:
    script = ROOT / "fixtures" / "generate.py"
    ok = subprocess.run(
        [sys.executable, str(script), "--check", "vm-1s-nosmt", "no-node-dir"],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.strip().endswith("ok")
    bad = subprocess.run(
        [sys.executable, str(script), "--check", "no-such-host"], capture_output=True, text=True
    )
    assert bad.returncode == 2
    assert "no-such-host" in bad.stderr


def test_check_reports_edited_extra_and_missing_files(tmp_path: Path) -> None:
    generate_tree(HOSTS["vm-1s-nosmt"], tmp_path / "vm-1s-nosmt")
    assert check(["vm-1s-nosmt"], tmp_path) == []
    cpu = tmp_path / "vm-1s-nosmt/sys/devices/system/cpu"
    (cpu / "online").write_text("0-7\n")
    (cpu / "cpu1/online").unlink()
    (cpu / "stray").write_text("x\n")
    problems = check(["vm-1s-nosmt"], tmp_path)
    assert "vm-1s-nosmt: differs: sys/devices/system/cpu/online" in problems
    assert "vm-1s-nosmt: missing: sys/devices/system/cpu/cpu1/online" in problems
    assert "vm-1s-nosmt: not generated: sys/devices/system/cpu/stray" in problems


def test_generation_is_deterministic_and_matches_disk(tmp_path: Path) -> None:
    assert render_tree(HOSTS["epyc-amd"]) == render_tree(HOSTS["epyc-amd"])
    # on disk: a small host with every kind of entry (files, node and PCI links, resctrl
    # with empty mon_groups); the committed trees are compared by the test above
    spec = variant("vm-1s-nosmt", name="vm-rdt", resctrl=scaled_host(1).resctrl)
    generate_tree(spec, tmp_path / "t")
    assert read_tree(tmp_path / "t") == render_tree(spec)
    assert (tmp_path / "t/sys/fs/resctrl/schemata").is_file()


def test_generate_refuses_a_non_empty_destination(tmp_path: Path) -> None:
    (tmp_path / "keep").write_text("mine\n")
    with pytest.raises(FileExistsError):
        generate_tree(HOSTS["vm-1s-nosmt"], tmp_path)
    assert read(tmp_path / "keep") == "mine\n"


def test_bad_spec_is_refused_with_the_host_name() -> None:
    with pytest.raises(ValueError, match="odd-host: cores_per_socket"):
        render_tree(variant("vm-1s-nosmt", name="odd-host", cells_per_socket=3))
    with pytest.raises(ValueError, match="cpu0"):
        render_tree(variant("vm-1s-nosmt", offline_cpus=(0,)))


# ---- kernel formats --------------------------------------------------------------------------


def test_cpulist_and_cpumask_use_the_kernel_forms() -> None:
    assert cpulist([0, 1, 2, 3, 8, 10, 11]) == "0-3,8,10-11"
    assert cpulist([]) == ""
    assert cpumask([0, 1], 2) == "3"
    assert cpumask([0], 48) == "0000,00000001"
    assert cpumask([47, 0], 48) == "8000,00000001"
    assert cpumask([], 64) == "00000000,00000000"
    wide = cpumask([447], 448)
    assert wide.count(",") == 13 and wide.startswith("80000000,")


def test_numa_files_read_like_the_kernel() -> None:
    node = sysdir("xeon-2s-cat") / "devices/system/node"
    assert read(node / "online") == "0-1\n"
    assert read(node / "node1/cpulist") == "12-23,36-47\n"
    assert read(node / "node1/cpumap") == "fff0,00fff000\n"
    assert read(node / "node0/distance") == "10 21\n"
    meminfo = read(node / "node1/meminfo").splitlines()
    assert meminfo[0] == "Node 1 MemTotal:       198155608 kB"
    assert meminfo[1].startswith("Node 1 MemFree:  ")
    assert "Node 1 HugePages_Total:  2048" in meminfo
    pool = node / "node1/hugepages/hugepages-1048576kB"
    assert [read(pool / f) for f in ("nr_hugepages", "free_hugepages", "surplus_hugepages")] == [
        "32\n",
        "20\n",
        "0\n",
    ]
    assert os.readlink(node / "node1/cpu12") == "../../cpu/cpu12"
    assert os.readlink(sysdir("xeon-2s-cat") / "devices/system/cpu/cpu12/node1") == (
        "../../node/node1"
    )


def test_cpu_topology_and_caches_read_like_the_kernel() -> None:
    cpu = sysdir("xeon-2s-cat") / "devices/system/cpu"
    assert not (cpu / "cpu0/online").exists()
    assert read(cpu / "cpu1/online") == "1\n"
    topo = cpu / "cpu30/topology"  # socket 0, 7th core (core_id 8), thread 1
    assert read(topo / "physical_package_id") == "0\n"
    assert read(topo / "core_id") == "8\n"
    assert read(topo / "thread_siblings_list") == "6,30\n"
    assert read(topo / "package_cpus_list") == "0-11,24-35\n"
    l3 = cpu / "cpu30/cache/index3"
    assert [read(l3 / f) for f in ("level", "type", "id", "size", "ways_of_associativity")] == [
        "3\n",
        "Unified\n",
        "0\n",
        "25344K\n",
        "11\n",
    ]
    l2 = cpu / "cpu42/cache/index2"  # socket 1, core_id 8 -> id 32 + 8
    assert read(l2 / "id") == "40\n"
    assert read(l2 / "shared_cpu_list") == "18,42\n"


def test_offline_cpus_have_no_topology_and_no_cell() -> None:
    sys_ = sysdir("large-8cell")
    cpu = sys_ / "devices/system/cpu"
    assert read(cpu / "online") == "0-62,64-123\n"
    assert read(cpu / "offline") == "63,124-255\n"
    assert read(cpu / "present") == "0-127\n"
    assert read(cpu / "cpu124/online") == "0\n"
    assert not (cpu / "cpu124/topology").exists()
    assert not (cpu / "cpu124/cache").exists()
    assert read(sys_ / "devices/system/node/node3/cpulist") == "48-62,112-123\n"
    # the sibling of an offline thread lists only itself
    assert read(cpu / "cpu60/topology/thread_siblings_list") == "60\n"


def test_memory_only_cells_and_node_masks() -> None:
    node = sysdir("large-8cell") / "devices/system/node"
    assert read(node / "possible") == "0-15\n"
    assert read(node / "has_cpu") == "0-3\n"
    assert read(node / "has_memory") == "0-7\n"
    assert read(node / "node5/cpulist") == "\n"
    assert read(node / "node5/cpumap") == ",".join(["00000000"] * 8) + "\n"
    assert (node / "node5/hugepages/hugepages-1048576kB/nr_hugepages").read_text() == "24\n"
    assert sorted(os.listdir(node / "node6/access0/initiators")) == ["node2", "node3"]


def test_kernel_without_numa_has_no_node_dir() -> None:
    sys_ = sysdir("no-node-dir")
    assert not (sys_ / "devices/system/node").exists()
    assert not list((sys_ / "devices/system/cpu/cpu0").glob("node*"))
    nic = sys_ / "bus/pci/devices/0000:00:1f.6"
    assert nic.is_dir() and not (nic / "numa_node").exists()


def test_pci_devices_are_symlinks_into_devices() -> None:
    pci = sysdir("xeon-2s-cat") / "bus/pci/devices"
    pf = pci / "0000:af:00.0"
    assert os.readlink(pf) == "../../../devices/pci0000:ae/0000:ae:00.0/0000:af:00.0"
    assert [read(pf / f) for f in ("class", "vendor", "device", "numa_node", "sriov_totalvfs")] == [
        "0x020000\n",
        "0x8086\n",
        "0x1592\n",
        "1\n",
        "128\n",
    ]
    vf = pci / "0000:af:01.3"
    assert read(vf / "device") == "0x1889\n" and not (vf / "sriov_totalvfs").exists()
    assert (vf / "physfn").resolve() == pf.resolve()
    vm = sysdir("vm-1s-nosmt") / "bus/pci/devices/0000:00:03.0"
    assert read(vm / "numa_node") == "-1\n"


# ---- resctrl ---------------------------------------------------------------------------------


def parse_schemata(text: str) -> dict[str, dict[int, str]]:
    out: dict[str, dict[int, str]] = {}
    for line in text.splitlines():
        name, _, rest = line.strip().partition(":")
        out[name] = {int(k): v.strip() for k, v in (p.split("=") for p in rest.split(";"))}
    return out


def bit_usage_from_groups(rc: Path, res: str) -> str:
    """Recompute info/<res>/bit_usage from the groups' schemata and modes on disk."""
    bits = len(bin(int(read(rc / f"info/{res}/cbm_mask"), 16))) - 2
    hw = int(read(rc / f"info/{res}/shareable_bits"), 16)
    groups = [rc] + [d for d in sorted(rc.iterdir()) if d.is_dir() and d.name not in (
        "info", "mon_groups", "mon_data")]
    ids = list(parse_schemata(read(rc / "schemata"))[res])
    parts = []
    for i in ids:
        sw = excl = 0
        for g in groups:
            mask = int(parse_schemata(read(g / "schemata"))[res][i], 16)
            if read(g / "mode").strip() == "exclusive":
                excl |= mask
            else:
                sw |= mask
        chars = ""
        for b in range(bits - 1, -1, -1):
            h, s, e = hw >> b & 1, sw >> b & 1, excl >> b & 1
            chars += "X" if h and s else "H" if h else "S" if s else "E" if e else "0"
        parts.append(f"{i}={chars}")
    return ";".join(parts) + "\n"


@pytest.mark.parametrize(
    ("name", "resources"),
    [
        ("xeon-2s-cat", ["L3"]),
        ("xeon-2s-cdp", ["L3CODE", "L3DATA"]),
        ("epyc-amd", ["L3"]),
        ("big-448", ["L3"]),
    ],
)
def test_bit_usage_is_consistent_with_the_groups(name: str, resources: list[str]) -> None:
    rc = sysdir(name) / "fs/resctrl"
    for res in resources:
        assert read(rc / f"info/{res}/bit_usage") == bit_usage_from_groups(rc, res)


def test_xeon_cat_resctrl_shape() -> None:
    rc = sysdir("xeon-2s-cat") / "fs/resctrl"
    assert read(rc / "info/last_cmd_status") == "ok\n"
    assert read(rc / "info/L3/cbm_mask") == "7ff\n"
    assert not (rc / "info/L3/sparse_masks").exists()  # kernel < 6.8
    assert read(rc / "info/MB/bandwidth_gran") == "10\n"
    assert read(rc / "info/MB/min_bandwidth") == "10\n"
    assert read(rc / "schemata") == "    L3:0=7c0;1=7c0\n    MB:0=100;1=100\n"
    assert read(rc / "batch/schemata") == "    L3:0=600;1=020\n    MB:0= 30;1= 30\n"
    assert read(rc / "qemu-1-rt1-vcpus_2-3/schemata").startswith("    L3:0=003;1=7c0\n")
    assert read(rc / "nfv-excl/mode") == "exclusive\n"
    assert read(rc / "info/L3/bit_usage") == "0=XXSSS00EESS;1=XXSSSS000EE\n"
    assert read(rc / "qemu-1-rt1-vcpus_2-3/tasks") == "4101\n4102\n"
    assert read(rc / "cpus_list") == "0-7,10-31,34-47\n"  # nfv-excl holds 8-9,32-33
    assert read(rc / "batch/mon_groups/job1/tasks") == "6001\n6002\n"
    assert not (rc / "batch/mon_groups/job1/schemata").exists()
    assert (rc / "mon_data/mon_L3_01/llc_occupancy").is_file()


def test_xeon_cdp_has_code_and_data_only() -> None:
    rc = sysdir("xeon-2s-cdp") / "fs/resctrl"
    assert sorted(os.listdir(rc / "info")) == ["L3CODE", "L3DATA", "L3_MON", "MB",
                                               "last_cmd_status"]
    assert read(rc / "info/L3CODE/num_closids") == "8\n"
    lines = read(rc / "schemata").splitlines()
    assert lines == ["L3DATA:0=7c0;1=7c0", "L3CODE:0=7c0;1=7c0", "    MB:0=100;1=100"]


def test_epyc_resctrl_shape() -> None:
    rc = sysdir("epyc-amd") / "fs/resctrl"
    ids = list(range(0, 16, 2))
    lines = read(rc / "schemata").splitlines()
    assert [ln[:7] for ln in lines] == ["  SMBA:", "    MB:", "    L3:"]
    assert list(parse_schemata(read(rc / "schemata"))["L3"]) == ids
    assert read(rc / "info/L3/min_cbm_bits") == "0\n"
    assert read(rc / "info/L3/sparse_masks") == "1\n"
    assert read(rc / "info/MB/bandwidth_gran") == "1\n"
    assert read(rc / "info/MB/min_bandwidth") == "0\n"
    assert not (rc / "info/MB/thread_throttle_mode").exists()
    assert parse_schemata(read(rc / "sparse/schemata"))["L3"][2] == "f0f"
    assert parse_schemata(read(rc / "scavenger/schemata"))["L3"][4] == "0"
    assert (rc / "mon_data/mon_L3_14/mbm_total_bytes").is_file()
    l3ids = {
        read(p).strip()
        for p in (sysdir("epyc-amd") / "devices/system/cpu").glob("cpu*/cache/index3/id")
    }
    assert sorted(map(int, l3ids)) == ids


# ---- hwloc, an independent reader, sees what each host describes ------------------------------


@needs_hwloc
@pytest.mark.parametrize("name", list(HOSTS))
def test_hwloc_sees_the_described_shape(name: str) -> None:
    assert hwloc_counts(SYSFS_DIR / name) == expected_counts(HOSTS[name])


@needs_hwloc
@pytest.mark.parametrize("cells", [1, 2, 16])  # the benchmarks' smallest and largest (4 and
def test_scaled_hosts_for_benchmarks(tmp_path: Path, cells: int) -> None:  # 8: like 16)
    spec = scaled_host(cells, cores_per_cell=2)
    generate_tree(spec, tmp_path / "h")
    got = hwloc_counts(tmp_path / "h")
    assert got == expected_counts(spec)
    assert got["NUMANode"] == cells and got["PU"] == cells * 4
    assert (tmp_path / "h/sys/fs/resctrl/schemata").is_file()


@needs_hwloc
def test_variant_with_offline_cpu(tmp_path: Path) -> None:
    spec = variant("vm-1s-nosmt", name="vm-offline", offline_cpus=(3,))
    generate_tree(spec, tmp_path / "v")
    assert hwloc_counts(tmp_path / "v")["PU"] == 3
    assert read(tmp_path / "v/sys/devices/system/cpu/offline") == "3\n"


def test_overrides_make_quirks_and_bad_input(tmp_path: Path) -> None:
    spec = variant(
        "vm-1s-nosmt",
        name="vm-bad",
        overrides={
            "sys/devices/system/node/node0/cpulist": "0-\n",
            "sys/devices/system/cpu/cpu*/cache/index3/id": None,
        },
    )
    generate_tree(spec, tmp_path / "t")
    cpu = tmp_path / "t/sys/devices/system/cpu"
    assert read(tmp_path / "t/sys/devices/system/node/node0/cpulist") == "0-\n"
    assert not list(cpu.glob("cpu*/cache/index3/id"))
    assert len(list(cpu.glob("cpu*/cache/index3/size"))) == 4
    with pytest.raises(ValueError, match="matches no file"):
        render_tree(variant("vm-1s-nosmt", overrides={"sys/nothing/*": None}))
    with pytest.raises(ValueError, match="not generated"):
        render_tree(variant("vm-1s-nosmt", overrides={"sys/nothing": None}))


@needs_hwloc
def test_variant_with_node_id_gap(tmp_path: Path) -> None:
    # two cells in one socket (like epyc-amd's NPS2), numbered 0 and 2
    spec = variant(scaled_host(2, cores_per_cell=2, cells_per_socket=2), name="gap",
                   cell_ids=(0, 2))
    generate_tree(spec, tmp_path / "g")
    node = tmp_path / "g/sys/devices/system/node"
    assert read(node / "online") == "0,2\n"
    assert read(node / "node2/cpulist") == "2-3,6-7\n"
    assert read(node / "node2/distance") == "11 10\n"
    assert hwloc_counts(tmp_path / "g") == expected_counts(spec)
