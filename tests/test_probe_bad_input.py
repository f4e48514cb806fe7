"""Bad and missing files, on copies of fixtures: one error naming path and value, or a default.

Every error case is checked twice: ``probe_host`` raises ``ProbeError`` whose message names
the file and the bad text, and ``hostagent probe`` prints ``hostagent: <that message>`` on
stderr and exits 2.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from fixture_trees import copy_of, need_fixture

from hostagent.cli import main
from hostagent.errors import ProbeError
from hostagent.probe.host import probe_host

CPU = "devices/system/cpu"
NODE0 = "devices/system/node/node0"


@pytest.fixture
def vm(tmp_path):
    """A whole copy of vm-1s-nosmt; a test that can name what it changes copies only that:
    ``copy_of("vm-1s-nosmt", tmp_path, *changed)``."""
    return copy_of("vm-1s-nosmt", tmp_path)


@pytest.fixture
def xeon_resctrl(tmp_path):
    """xeon-2s-cat's sysfs (read only) and a copy of its resctrl tree."""
    src = need_fixture("xeon-2s-cat")
    dst = tmp_path / "resctrl"
    shutil.copytree(src / "fs" / "resctrl", dst, symlinks=True)
    return src, dst


def expect_error(capsys, root, path, value, resctrl=None):
    """Both the API and the CLI reject the tree, naming ``path`` and ``value``."""
    resctrl = resctrl if resctrl is not None else Path(root) / "fs" / "resctrl"
    with pytest.raises(ProbeError) as info:
        probe_host(root, resctrl)
    msg = str(info.value)
    assert str(path) in msg, msg
    if value is not None:
        assert repr(value) in msg, msg
    capsys.readouterr()
    rc = main(["probe", "--sysfs-root", str(root), "--resctrl-root", str(resctrl)])
    err = capsys.readouterr().err
    assert rc == 2
    assert err == f"hostagent: {msg}\n"
    return msg


def test_cpulist_with_open_range(tmp_path, capsys):
    vm = copy_of("vm-1s-nosmt", tmp_path, f"{NODE0}/cpulist")
    path = vm / NODE0 / "cpulist"
    path.write_text("0-\n")
    msg = expect_error(capsys, vm, path, "0-")
    assert "not a CPU list" in msg


def test_thread_siblings_garbage(tmp_path, capsys):
    vm = copy_of("vm-1s-nosmt", tmp_path, f"{CPU}/cpu0/topology/thread_siblings_list")
    path = vm / CPU / "cpu0/topology/thread_siblings_list"
    path.write_text("zero\n")
    expect_error(capsys, vm, path, "zero")


def test_negative_cache_size(tmp_path, capsys):
    vm = copy_of("vm-1s-nosmt", tmp_path, f"{CPU}/cpu0/cache/index2/size")
    path = vm / CPU / "cpu0/cache/index2/size"
    path.write_text("-4096K\n")
    msg = expect_error(capsys, vm, path, "-4096K")
    assert "negative size" in msg


def test_cache_size_garbage(tmp_path, capsys):
    vm = copy_of("vm-1s-nosmt", tmp_path, f"{CPU}/cpu1/cache/index3/size",
                 f"{CPU}/cpu0/cache/index3/size")
    path = vm / CPU / "cpu1/cache/index3/size"  # not read: cpu0's L3 covers cpu1
    path.write_text("lots\n")
    probe_host(vm, None)
    path = vm / CPU / "cpu0/cache/index3/size"
    path.write_text("16X\n")
    expect_error(capsys, vm, path, "16X")


def test_unknown_cache_type(tmp_path, capsys):
    vm = copy_of("vm-1s-nosmt", tmp_path, f"{CPU}/cpu0/cache/index0/type")
    path = vm / CPU / "cpu0/cache/index0/type"
    path.write_text("Trace\n")
    expect_error(capsys, vm, path, "Trace")


def test_non_integer_core_id(tmp_path, capsys):
    vm = copy_of("vm-1s-nosmt", tmp_path, f"{CPU}/cpu2/topology/core_id")
    path = vm / CPU / "cpu2/topology/core_id"
    path.write_text("2a\n")
    expect_error(capsys, vm, path, "2a")


def test_garbage_meminfo(tmp_path, capsys):
    vm = copy_of("vm-1s-nosmt", tmp_path, f"{NODE0}/meminfo")
    path = vm / NODE0 / "meminfo"
    path.write_text("this is not meminfo\n")
    msg = expect_error(capsys, vm, path, "this is not meminfo")
    assert "no MemTotal line" in msg


def test_meminfo_bad_value(tmp_path, capsys):
    vm = copy_of("vm-1s-nosmt", tmp_path, f"{NODE0}/meminfo")
    path = vm / NODE0 / "meminfo"
    path.write_text("Node 0 MemTotal:       lots kB\nNode 0 MemFree:  12 kB\n")
    expect_error(capsys, vm, path, "Node 0 MemTotal:       lots kB")


def test_distance_count_mismatch(tmp_path, capsys):
    vm = copy_of("vm-1s-nosmt", tmp_path, f"{NODE0}/distance")
    path = vm / NODE0 / "distance"
    path.write_text("10 21\n")
    msg = expect_error(capsys, vm, path, "10 21")
    assert "2 values for 1 nodes" in msg


def test_bad_hugepage_count(tmp_path, capsys):
    vm = copy_of("vm-1s-nosmt", tmp_path, f"{NODE0}/hugepages/hugepages-2048kB/free_hugepages")
    path = vm / NODE0 / "hugepages/hugepages-2048kB/free_hugepages"
    path.write_text("-3\n")
    expect_error(capsys, vm, path, "-3")


def test_pci_numa_node_garbage(tmp_path, capsys):
    vm = copy_of("vm-1s-nosmt", tmp_path, "bus/pci/devices/0000:00:03.0/numa_node")
    path = vm / "bus/pci/devices/0000:00:03.0/numa_node"
    path.write_text("near\n")
    expect_error(capsys, vm, path, "near")


def test_directory_where_a_file_is_expected(tmp_path, capsys):
    vm = copy_of("vm-1s-nosmt", tmp_path, f"{CPU}/cpu0/topology/core_id")
    path = vm / CPU / "cpu0/topology/core_id"
    path.unlink()
    path.mkdir()
    msg = expect_error(capsys, vm, path, None)
    assert "is a directory" in msg


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file(tmp_path, capsys):
    vm = copy_of("vm-1s-nosmt", tmp_path, f"{NODE0}/meminfo")
    path = vm / NODE0 / "meminfo"
    path.chmod(0)
    try:
        msg = expect_error(capsys, vm, path, None)
    finally:
        path.chmod(0o644)
    assert "Permission denied" in msg


def test_not_a_sysfs_tree(tmp_path, capsys):
    expect_error(capsys, tmp_path / "missing", tmp_path / "missing", None)
    (tmp_path / "empty").mkdir()
    msg = expect_error(capsys, tmp_path / "empty", tmp_path / "empty" / CPU, None)
    assert "missing" in msg


def test_non_hex_cbm_mask(xeon_resctrl, capsys):
    root, rc = xeon_resctrl
    path = rc / "info/L3/cbm_mask"
    path.write_text("7fg\n")
    msg = expect_error(capsys, root, path, "7fg", resctrl=rc)
    assert "not a hex value" in msg


def test_missing_required_resctrl_file(xeon_resctrl, capsys):
    root, rc = xeon_resctrl
    (rc / "info/L3/min_cbm_bits").unlink()
    msg = expect_error(capsys, root, rc / "info/L3/min_cbm_bits", None, resctrl=rc)
    assert "missing" in msg


def test_bad_group_schemata(xeon_resctrl, capsys):
    root, rc = xeon_resctrl
    path = rc / "batch/schemata"
    path.write_text("    L3:0=6x0;1=020\n")
    expect_error(capsys, root, path, "0=6x0", resctrl=rc)


def test_bad_group_cpus_list(xeon_resctrl, capsys):
    root, rc = xeon_resctrl
    path = rc / "nfv-excl/cpus_list"
    path.write_text("8-9,32-\n")
    expect_error(capsys, root, path, "8-9,32-", resctrl=rc)


def test_cli_entry_point_exits_2(tmp_path):
    vm = copy_of("vm-1s-nosmt", tmp_path, f"{NODE0}/cpulist")
    (vm / NODE0 / "cpulist").write_text("0-\n")
    proc = subprocess.run(
        [sys.executable, "-m", "hostagent.cli", "probe", "--sysfs-root", str(vm)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("hostagent: ") and "'0-'" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


# ----------------------------------------------------------- missing optional files


def test_missing_optional_topology_files_get_defaults(tmp_path):
    vm = copy_of("vm-1s-nosmt", tmp_path, f"{CPU}/cpu1/topology")
    topo_dir = vm / CPU / "cpu1/topology"
    for name in ("die_id", "die_cpus_list", "cluster_id", "core_id"):
        (topo_dir / name).unlink()
    cpu1 = probe_host(vm, None).cpu(1)
    assert (cpu1.die, cpu1.cluster, cpu1.core) == (0, -1, 1)  # core: lowest sibling


def test_negative_package_and_core_ids_fall_back(tmp_path):
    vm = copy_of("vm-1s-nosmt", tmp_path, *(f"{CPU}/cpu{n}/topology" for n in range(4)))
    for cpu in range(4):
        (vm / CPU / f"cpu{cpu}/topology/physical_package_id").write_text("-1\n")
        (vm / CPU / f"cpu{cpu}/topology/core_id").write_text("-1\n")
    topo = probe_host(vm, None)
    assert {c.socket for c in topo.cpus} == {0}  # the package's ordinal
    assert [c.core for c in topo.cpus] == [0, 1, 2, 3]


def test_cache_without_id_file_gets_lowest_cpu(tmp_path):
    vm = copy_of("vm-1s-nosmt", tmp_path, *(f"{CPU}/cpu{n}/cache/index2/id" for n in range(4)))
    for cpu in range(4):
        (vm / CPU / f"cpu{cpu}/cache/index2/id").unlink()
    topo = probe_host(vm, None)
    l2 = [c for c in topo.caches if c.level == 2]
    assert [(c.id, c.cpus) for c in l2] == [(0, (0,)), (1, (1,)), (2, (2,)), (3, (3,))]


def test_missing_online_isolated_and_optional_cache_files(tmp_path):
    vm = copy_of("vm-1s-nosmt", tmp_path, f"{CPU}/online", f"{CPU}/isolated",
                 f"{CPU}/cpu0/cache/index3")
    (vm / CPU / "online").unlink()
    (vm / CPU / "isolated").unlink()
    (vm / CPU / "cpu0/cache/index3/ways_of_associativity").unlink()
    (vm / CPU / "cpu0/cache/index3/type").unlink()
    topo = probe_host(vm, None)
    assert all(c.online for c in topo.cpus) and not any(c.isolated for c in topo.cpus)
    [l3] = [c for c in topo.caches if c.level == 3]
    assert (l3.ways, l3.type, l3.size_bytes) == (0, "unified", 16 * 1024 * 1024)


def test_missing_meminfo_distance_and_cpulist(tmp_path):
    vm = copy_of("vm-1s-nosmt", tmp_path, NODE0)
    for name in ("meminfo", "distance", "cpulist"):
        (vm / NODE0 / name).unlink()
    cell = probe_host(vm, None).cells[0]
    assert (cell.memory_kib, cell.memory_free_kib, cell.distances, cell.cpus) == (0, 0, {}, ())


def test_offline_cpu_from_online_file(tmp_path):
    vm = copy_of("vm-1s-nosmt", tmp_path, f"{CPU}/online", f"{NODE0}/cpulist")
    (vm / CPU / "online").write_text("0-2\n")
    (vm / NODE0 / "cpulist").write_text("0-2\n")
    topo = probe_host(vm, None)
    cpu3 = topo.cpu(3)
    assert (cpu3.online, cpu3.socket, cpu3.core, cpu3.siblings, cpu3.cell) == (
        False, -1, -1, (), -1)
    assert not any(3 in c.cpus for c in topo.caches)


def test_file_that_cannot_be_opened(tmp_path, capsys, monkeypatch):
    """Works as root too: a socket where a file is expected fails to open (ENXIO), and
    the error says what it is."""
    vm = copy_of("vm-1s-nosmt", tmp_path, f"{NODE0}/meminfo")
    import socket

    path = vm / NODE0 / "meminfo"
    path.unlink()
    monkeypatch.chdir(path.parent)  # AF_UNIX paths are limited to 108 bytes
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind("meminfo")
        msg = expect_error(capsys, vm, path, None)
    finally:
        sock.close()
    assert "not a regular file (a socket)" in msg


@pytest.mark.parametrize("name", ["level", "shared_cpu_list", "type", "size"])
def test_cache_file_that_is_a_directory(tmp_path, capsys, name):
    """Cache files are read several per call (``FileReader.read_many``): errors still
    name the one file."""
    vm = copy_of("vm-1s-nosmt", tmp_path, f"{CPU}/cpu0/cache/index1/{name}")
    path = vm / CPU / f"cpu0/cache/index1/{name}"
    path.unlink()
    path.mkdir()
    assert "is a directory" in expect_error(capsys, vm, path, None)


def test_cache_file_that_cannot_be_opened(tmp_path, capsys, monkeypatch):
    vm = copy_of("vm-1s-nosmt", tmp_path, f"{CPU}/cpu0/cache/index2/ways_of_associativity")
    import socket

    path = vm / CPU / "cpu0/cache/index2/ways_of_associativity"
    path.unlink()
    monkeypatch.chdir(path.parent)
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(path.name)
        assert "not a regular file (a socket)" in expect_error(capsys, vm, path, None)
    finally:
        sock.close()


def test_cache_file_that_is_not_text(tmp_path, capsys):
    vm = copy_of("vm-1s-nosmt", tmp_path, f"{CPU}/cpu0/cache/index0/coherency_line_size")
    path = vm / CPU / "cpu0/cache/index0/coherency_line_size"
    path.write_bytes(b"\xff\xfe64\n")
    assert "is not text" in expect_error(capsys, vm, path, b"\xff\xfe64\n")
