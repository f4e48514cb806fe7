"""Hostile sysfs trees: every id and count bounded by what a kernel can print, only regular
files read, and each bad file one error naming it (hardening issue, item 15).

The bounds are ``hostagent.probe.limits``. Cases that used to hang or to allocate without
limit run ``hostagent probe`` in a child process with an address-space limit and a
generous timeout, so that a regression fails the test instead of hanging the suite or
filling the machine's memory.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import pytest
from daemon_helpers import DaemonProc, wait_for
from fixture_trees import copy_of
from loop_helpers import run, until
from test_daemon_inprocess import CPU3_ONLINE_FILES, FakeDevice, InProc, set_cpu3_online
from test_probe_bad_input import CPU, NODE0, expect_error

from hostagent import wire
from hostagent.atomic_file import write_atomically
from hostagent.config import load_config
from hostagent.cpulist import parse_cpulist
from hostagent.errors import ProbeError
from hostagent.probe import limits
from hostagent.probe.host import FileReader, probe_host, probe_json
from hostagent.snapshot import build_snapshot

HUGE = "100000000000000000000000"  # 10**23: above every bound, and above 2**64
CHILD_MEMORY = 1 << 30  # address-space limit of the child probes (bytes)
CHILD_TIMEOUT = 120.0  # seconds; a probe of these small trees takes well under one


def probe_child(root, resctrl=None, *, memory=CHILD_MEMORY):
    """``hostagent probe`` on ``root`` in a child process limited to ``memory`` bytes of
    address space; a child still running after ``CHILD_TIMEOUT`` is killed (the test
    then fails with ``TimeoutExpired``)."""
    resctrl = resctrl if resctrl is not None else Path(root) / "fs" / "resctrl"
    code = ("import os, resource, sys; "
            f"resource.setrlimit(resource.RLIMIT_AS, ({memory}, {memory})); "
            "from hostagent.cli import main; sys.exit(main(sys.argv[1:]))")
    return subprocess.run(
        [sys.executable, "-c", code, "probe", "--sysfs-root", str(root),
         "--resctrl-root", str(resctrl)],
        capture_output=True, text=True, timeout=CHILD_TIMEOUT)


def expect_child_error(proc, path, problem):
    """The child exited 2 with one line ``hostagent: <path>: <problem>...``."""
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith(f"hostagent: {path}: {problem}"), proc.stderr


@pytest.fixture
def vm(tmp_path):
    """A whole copy of vm-1s-nosmt; a test that can name what it changes copies only that:
    ``copy_of("vm-1s-nosmt", tmp_path, *changed)``."""
    return copy_of("vm-1s-nosmt", tmp_path)


def xeon_changing(tmp_path, *changed):
    """xeon-2s-cat where only ``changed`` (paths under sys/fs/resctrl) is the test's."""
    return copy_of("xeon-2s-cat", tmp_path, *(f"fs/resctrl/{c}" for c in changed))


# ------------------------------------------------------------------------- CPU lists


def test_cpulist_parser_refuses_ids_above_nr_cpus():
    assert parse_cpulist(f"0-{limits.MAX_CPUS - 1}")[-1] == limits.MAX_CPUS - 1
    for text in (f"0-{limits.MAX_CPUS}", str(limits.MAX_CPUS), f"3,{HUGE}"):
        with pytest.raises(ValueError, match=f"out of range 0..{limits.MAX_CPUS - 1}"):
            parse_cpulist(text)


def test_cpulist_parser_refuses_a_text_longer_than_a_kernel_prints():
    text = ",".join(["0"] * (limits.MAX_CPULIST_CHARS // 2 + 1))
    with pytest.raises(ValueError, match="longer than"):
        parse_cpulist(text)


def test_huge_online_range_is_one_error_in_bounded_memory(tmp_path):
    """``0-4000000000`` used to build the whole list (11 GB in a minute): now the
    range is refused before anything is built, in a child with 1 GiB of address space."""
    vm = copy_of("vm-1s-nosmt", tmp_path, f"{CPU}/online")
    path = vm / CPU / "online"
    path.write_text("0-4000000000\n")
    proc = probe_child(vm)
    expect_child_error(proc, path, "CPU 4000000000 out of range 0..8191")
    assert "(read '0-4000000000')" in proc.stderr


@pytest.mark.parametrize("where", [
    f"{CPU}/online", f"{CPU}/isolated", f"{NODE0}/cpulist",
    f"{CPU}/cpu0/topology/thread_siblings_list", f"{CPU}/cpu0/topology/package_cpus_list",
    f"{CPU}/cpu0/topology/die_cpus_list", f"{CPU}/cpu0/cache/index0/shared_cpu_list",
])
def test_cpu_above_nr_cpus_in_any_cpu_list(tmp_path, capsys, where):
    vm = copy_of("vm-1s-nosmt", tmp_path, where)
    text = f"0-{limits.MAX_CPUS}"
    (vm / where).write_text(text + "\n")
    msg = expect_error(capsys, vm, vm / where, text)
    assert f"CPU {limits.MAX_CPUS} out of range 0..{limits.MAX_CPUS - 1}" in msg


def test_cpu_above_nr_cpus_in_a_resctrl_group(tmp_path, capsys):
    xeon = xeon_changing(tmp_path, "nfv-excl/cpus_list")
    path = xeon / "fs/resctrl/nfv-excl/cpus_list"
    path.write_text("2-3,9000\n")
    expect_error(capsys, xeon, path, "2-3,9000")


def test_cpu_directory_above_nr_cpus(tmp_path, capsys):
    vm = copy_of("vm-1s-nosmt", tmp_path, f"{CPU}/cpu{limits.MAX_CPUS}")
    path = vm / CPU / f"cpu{limits.MAX_CPUS}"
    path.mkdir()
    msg = expect_error(capsys, vm, path, None)
    assert f"CPU id out of range 0..{limits.MAX_CPUS - 1}" in msg


@pytest.mark.parametrize("text", ["", "\n", "  \n"])
def test_empty_online_is_an_error_not_zero_cpus(tmp_path, capsys, text):
    vm = copy_of("vm-1s-nosmt", tmp_path, f"{CPU}/online")
    path = vm / CPU / "online"
    path.write_text(text)
    msg = expect_error(capsys, vm, path, None)
    assert msg == f"{path}: no online CPU (an empty list)"


# --------------------------------------------------------------- ids, counts, sizes


@pytest.mark.parametrize("name", ["physical_package_id", "die_id", "core_id", "cluster_id"])
@pytest.mark.parametrize("value", [HUGE, "-" + HUGE, str(2**31)])
def test_topology_id_beyond_a_c_int(tmp_path, capsys, name, value):
    vm = copy_of("vm-1s-nosmt", tmp_path, *(f"{CPU}/cpu{n}/topology/{name}" for n in range(4)))
    for cpu in range(4):  # every core reads its own core_id and cluster_id
        (vm / CPU / f"cpu{cpu}/topology/{name}").write_text(value + "\n")
    path = vm / CPU / f"cpu0/topology/{name}"
    msg = expect_error(capsys, vm, path, value)
    assert "out of range -2147483648..2147483647" in msg


def test_node_directory_above_max_numnodes(tmp_path, capsys):
    vm = copy_of("vm-1s-nosmt", tmp_path, f"devices/system/node/node{limits.MAX_NODES}")
    path = vm / f"devices/system/node/node{limits.MAX_NODES}"
    path.mkdir()
    msg = expect_error(capsys, vm, path, None)
    assert f"node id out of range 0..{limits.MAX_NODES - 1}" in msg


@pytest.mark.parametrize("name,value", [
    ("level", str(2**32)), ("id", HUGE), ("ways_of_associativity", str(2**32)),
    ("coherency_line_size", HUGE), ("size", "4194304K"), ("size", "4G"), ("size", HUGE),
])
def test_cache_attribute_beyond_an_unsigned_int(tmp_path, capsys, name, value):
    vm = copy_of("vm-1s-nosmt", tmp_path, f"{CPU}/cpu0/cache/index3/{name}")
    path = vm / CPU / f"cpu0/cache/index3/{name}"
    path.write_text(value + "\n")
    msg = expect_error(capsys, vm, path, value)
    assert "out of range 0..4294967295" in msg


@pytest.mark.parametrize("name", ["nr_hugepages", "free_hugepages", "surplus_hugepages"])
def test_hugepage_count_beyond_the_largest_memory(tmp_path, capsys, name):
    vm = copy_of("vm-1s-nosmt", tmp_path, f"{NODE0}/hugepages/hugepages-2048kB/{name}")
    path = vm / NODE0 / f"hugepages/hugepages-2048kB/{name}"
    path.write_text(HUGE + "\n")
    msg = expect_error(capsys, vm, path, HUGE)
    assert f"out of range 0..{limits.MAX_MEMORY_KIB // 2048}" in msg


@pytest.mark.parametrize("size", ["0", str(limits.MAX_MEMORY_KIB + 1), HUGE])
def test_hugepage_size_beyond_the_largest_memory(tmp_path, capsys, size):
    vm = copy_of("vm-1s-nosmt", tmp_path, f"{NODE0}/hugepages/hugepages-{size}kB")
    pool = vm / NODE0 / f"hugepages/hugepages-{size}kB"
    pool.mkdir()
    (pool / "nr_hugepages").write_text("0\n")
    msg = expect_error(capsys, vm, pool, None)
    assert f"page size out of range 1..{limits.MAX_MEMORY_KIB} kB" in msg


@pytest.mark.parametrize("line", [f"Node 0 MemTotal: {HUGE} kB", "Node 0 MemFree: 2\u00b2 kB"])
def test_meminfo_value_beyond_the_largest_memory_or_not_ascii(tmp_path, capsys, line):
    vm = copy_of("vm-1s-nosmt", tmp_path, f"{NODE0}/meminfo")
    path = vm / NODE0 / "meminfo"
    path.write_text(f"Node 0 MemTotal: 1024 kB\n{line}\n")
    msg = expect_error(capsys, vm, path, line)
    assert f"out of range 0..{limits.MAX_MEMORY_KIB} kB" in msg or "bad MemFree value" in msg


def test_memory_blocks_beyond_the_largest_memory(tmp_path, capsys):
    """A kernel without NUMA: memory = memoryN blocks × block_size_bytes (hex)."""
    root = copy_of("no-node-dir", tmp_path, "devices/system/memory")
    mem = root / "devices/system/memory"
    for n in range(2):
        (mem / f"memory{n}").mkdir(parents=True)
    path = mem / "block_size_bytes"
    path.write_text("1000000000000000\n")  # 2**60 bytes in one block
    expect_error(capsys, root, path, "1000000000000000")
    path.write_text("100000000000000\n")  # 2**56 bytes per block, two blocks
    msg = expect_error(capsys, root, mem, None)
    assert msg == f"{mem}: 2 blocks of {2**56} bytes: memory out of range 0..{2**46} kB"


def test_distance_beyond_a_c_int(tmp_path, capsys):
    vm = copy_of("vm-1s-nosmt", tmp_path, f"{NODE0}/distance")
    path = vm / NODE0 / "distance"
    path.write_text(HUGE + "\n")
    expect_error(capsys, vm, path, HUGE)


@pytest.mark.parametrize("name,value", [("numa_node", "1024"), ("sriov_totalvfs", "65536")])
def test_pci_values_beyond_the_kernel_types(tmp_path, capsys, name, value):
    vm = copy_of("vm-1s-nosmt", tmp_path, f"bus/pci/devices/0000:00:03.0/{name}")
    path = vm / "bus/pci/devices/0000:00:03.0" / name
    path.write_text(value + "\n")
    expect_error(capsys, vm, path, value)


@pytest.mark.parametrize("where,text,value", [
    ("info/L3/cbm_mask", "1ffffffff\n", "1ffffffff"),
    ("info/L3/num_closids", f"{HUGE}\n", HUGE),
    ("info/L3/min_cbm_bits", f"{2**32}\n", str(2**32)),
    ("info/MB/min_bandwidth", f"{HUGE}\n", HUGE),
    ("batch/schemata", "L3:0=1ffffffff;1=7\n", "0=1ffffffff"),
    ("batch/schemata", f"L3:{2**32}=7\n", f"{2**32}=7"),
    ("batch/schemata", f"MB:0={HUGE}\n", f"0={HUGE}"),
])
def test_resctrl_values_beyond_32_bits(tmp_path, capsys, where, text, value):
    xeon = xeon_changing(tmp_path, where)
    path = xeon / "fs/resctrl" / where
    path.write_text(text)
    expect_error(capsys, xeon, path, value)


# ------------------------------------------------------------------ the whole surface

HOSTILE = [HUGE, "-" + HUGE, "9" * 5000, "\u00b2", f"0-{limits.MAX_CPUS}", "0x" + "f" * 40]


def _files_read(root, resctrl):
    reader = FileReader()
    probe_host(root, resctrl, reader=reader)
    return sorted(reader.files)


@pytest.mark.parametrize("fixture", ["vm-1s-nosmt", "xeon-2s-cat"])
def test_every_file_with_every_hostile_value(tmp_path, fixture):
    """Each file the probe reads, holding each hostile text: the probe either fails with
    one ``ProbeError`` naming that file, or gives a topology whose whole snapshot packs
    for the wire (every integer inside msgpack's 64 bits)."""
    # vm-1s-nosmt: any file; xeon-2s-cat: the resctrl files only (see below)
    root = copy_of(fixture, tmp_path, *(["fs/resctrl"] if fixture == "xeon-2s-cat" else []))
    resctrl = root / "fs" / "resctrl"
    cfg = load_config(None)
    paths = _files_read(root, resctrl)
    if fixture == "xeon-2s-cat":  # its sysfs side is vm-1s-nosmt's, only larger
        paths = [p for p in paths if p.startswith(str(resctrl))]
    assert paths
    for path in paths:
        good = Path(path).read_bytes()
        for text in HOSTILE:
            Path(path).write_text(text + "\n")
            try:
                topo = probe_host(root, resctrl)
            except ProbeError as exc:
                assert exc.path == path, (path, text, str(exc))
                assert "\n" not in str(exc)
            else:
                snap = build_snapshot(topo, cfg, [], host="h", epoch="e", seq=1, now=0.0)
                wire.pack(snap)
                msgpack.packb(probe_json(topo))
        Path(path).write_bytes(good)


# ------------------------------------------------------------------ only regular files


def test_fifo_in_place_of_meminfo_is_an_error_not_a_hang(tmp_path):
    vm = copy_of("vm-1s-nosmt", tmp_path, f"{NODE0}/meminfo")
    path = vm / NODE0 / "meminfo"
    path.unlink()
    os.mkfifo(path)
    expect_child_error(probe_child(vm), path, "not a regular file (a FIFO)")


def test_fifo_with_a_writer_in_a_batched_cache_file_is_refused_unread(tmp_path):
    """A FIFO whose writer has data ready is not read either (cache files are read
    several per call, on another code path than meminfo)."""
    vm = copy_of("vm-1s-nosmt", tmp_path, f"{CPU}/cpu0/cache/index2/size")
    path = vm / CPU / "cpu0/cache/index2/size"
    path.unlink()
    os.mkfifo(path)
    fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)  # a writer that never blocks
    try:
        os.write(fd, b"512K\n")
        expect_child_error(probe_child(vm), path, "not a regular file (a FIFO)")
        assert os.read(fd, 100) == b"512K\n"  # the probe took nothing out of it
    finally:
        os.close(fd)


@pytest.mark.parametrize("where", [f"{NODE0}/meminfo", f"{CPU}/cpu0/cache/index1/level"])
@pytest.mark.parametrize("device", ["/dev/zero", "/dev/null"])
def test_character_device_in_place_of_a_file(tmp_path, where, device):
    """Through a symlink, as an untrusted tree can do without privileges."""
    vm = copy_of("vm-1s-nosmt", tmp_path, where)
    path = vm / where
    path.unlink()
    path.symlink_to(device)
    expect_child_error(probe_child(vm), path, "not a regular file (a character device)")


def test_socket_in_place_of_a_file(tmp_path, capsys, monkeypatch):
    vm = copy_of("vm-1s-nosmt", tmp_path, f"{NODE0}/distance")
    path = vm / NODE0 / "distance"
    path.unlink()
    monkeypatch.chdir(path.parent)  # AF_UNIX paths are limited to 108 bytes
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(path.name)
        msg = expect_error(capsys, vm, path, None)
    finally:
        sock.close()
    assert msg == f"{path}: not a regular file (a socket)"


def test_file_larger_than_a_kernel_writes(tmp_path):
    """A sparse 1 GiB ``tasks`` file: refused after ``MAX_FILE_BYTES``, not read whole."""
    xeon = xeon_changing(tmp_path, "batch/tasks")
    path = xeon / "fs/resctrl/batch/tasks"
    with open(path, "wb") as f:
        f.truncate(1 << 30)
    proc = probe_child(xeon, memory=limits.MAX_FILE_BYTES * 6)
    expect_child_error(proc, path, f"larger than {limits.MAX_FILE_BYTES} bytes")


def test_regular_file_check_holds_on_this_machines_sysfs():
    """The assumption behind "read only regular files": sysfs attributes are regular
    files in stat terms. Every file the probe reads on this machine is checked."""
    if not os.path.isdir("/sys/devices/system/cpu"):
        pytest.skip("no /sys here")
    reader = FileReader()
    probe_host("/sys", "/sys/fs/resctrl", reader=reader)
    assert reader.files
    for path in reader.files:
        assert os.path.isfile(path), (path, oct(os.stat(path).st_mode))


# ---------------------------------------------------------------------- the daemon


def test_run_refuses_a_bad_id_at_start_with_one_line():
    package_id = f"{CPU}/cpu0/topology/physical_package_id"
    d = DaemonProc("vm-1s-nosmt", copy_tree=[package_id], dedicated=None, start=False)
    try:
        path = d.sysfs / package_id
        path.write_text(HUGE + "\n")
        d.start()
        assert d.proc.wait(30) == 2
        log = d.log_text()
        assert f"hostagent: {path}: out of range" in log, log
        assert "Traceback" not in log and "OverflowError" not in log, log
    finally:
        d.close()


def test_hugepage_poll_keeps_the_last_good_value_and_keeps_publishing():
    """``free_hugepages`` of 10**23 at run time: one logged error naming the file, the
    last good counters kept, heartbeats go on, and a later valid change is published.
    The test replaces the counter files whole (as the kernel shows them: never half
    written), so the agent's 0.2 s poll never reads an empty file in between."""
    pool = f"{NODE0}/hugepages/hugepages-2048kB"
    d = DaemonProc("vm-1s-nosmt", copy_tree=[pool], dedicated=None, heartbeat=0.2)
    try:
        d.wait_notify("READY=1")
        pool = d.sysfs / pool
        with d.subscriber() as sub:
            write_atomically(pool / "nr_hugepages", "64\n")
            write_atomically(pool / "free_hugepages", "60\n")
            good = wait_for(sub, lambda s: s["topology"]["cells"][0]["hugepages"][0]["free"]
                            == 60)
            write_atomically(pool / "free_hugepages", HUGE + "\n")
            d.wait_log(f"{pool}/free_hugepages: out of range")
            beats = sub.stats["heartbeats"]
            deadline = time.monotonic() + 20
            while sub.stats["heartbeats"] < beats + 3 and time.monotonic() < deadline:
                sub.poll(0.5)
            assert sub.stats["heartbeats"] >= beats + 3, d.log_text()
            assert sub.hosts["testhost"].heard_seq == good["seq"]  # nothing half-published
            assert sub.latest("testhost")["topology"]["cells"][0]["hugepages"][0]["free"] == 60
            write_atomically(pool / "free_hugepages", "12\n")
            wait_for(sub, lambda s: s["topology"]["cells"][0]["hugepages"][0]["free"] == 12)
        d.signal(signal.SIGUSR1)
        text = d.wait_log("debug dump written to ")
        dump = text.split("debug dump written to ")[1].split(" ")[0]
        errors = json.loads(Path(dump).read_text())["errors"]
        hp = [e for e in errors if e["where"] == "hugepages"]
        assert len(hp) == 1 and f"{pool}/free_hugepages" in hp[0]["message"], errors
        log = d.log_text()
        assert "background task failed" not in log and "Traceback" not in log, log
        assert log.count(f"{pool}/free_hugepages: out of range") == 1, log  # not per poll
        assert d.stop() == 0
    finally:
        d.close()


def test_udev_reprobe_of_a_bad_tree_keeps_the_last_topology():
    """A re-probe that meets a value no kernel prints logs it, keeps the topology it had,
    and the next good re-probe is published as usual."""
    async def main():
        p = InProc(copy=[f"{NODE0}/meminfo", *CPU3_ONLINE_FILES])
        await p.start()
        a = p.agent
        meminfo = p.sysfs / NODE0 / "meminfo"
        good = meminfo.read_text()
        before = a.topo
        meminfo.write_text(f"Node 0 MemTotal: {HUGE} kB\nNode 0 MemFree: 1 kB\n")
        p.monitor.trigger(FakeDevice("online", "memory", "memory32"))
        await until(lambda: any(e["where"] == "probe" for e in a.errors), timeout=15)
        assert a.topo is before
        [err] = [e for e in a.errors if e["where"] == "probe"]
        assert err["message"].startswith(f"{meminfo}: MemTotal out of range")
        meminfo.write_text(good)
        set_cpu3_online(p.sysfs, False)
        p.monitor.trigger(FakeDevice("offline", "cpu", "cpu3"))
        await p.snapshot_where(lambda s: not s["topology"]["cpus"][3]["online"])
        assert not [e for e in a.errors if e["where"] == "task"]
        await p.stop()
    run(main())
