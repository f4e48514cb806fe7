"""The probe on the fixture trees: cells, CPUs, caches, hugepages and PCI."""

import json
from pathlib import Path

import pytest
from fixture_trees import copy_of, need_fixture

from hostagent.model import topology_from_dict, topology_to_dict
from hostagent.probe.host import FileReader, probe_host, probe_json, probe_json_text
from hostagent.resctrl_cbm import cache_ways

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "sysfs"
NAMES = ["vm-1s-nosmt", "xeon-2s-cat", "xeon-2s-cdp", "epyc-amd", "large-8cell", "big-448",
         "no-node-dir"]


def probe(name, reader=None):
    root = need_fixture(name)
    return probe_host(root, root / "fs" / "resctrl", reader=reader)


def caches(topo, level, ctype="unified"):
    return [c for c in topo.caches if c.level == level and c.type == ctype]


def test_xeon_cells_memory_distances_hugepages():
    topo = probe("xeon-2s-cat")
    assert [c.id for c in topo.cells] == [0, 1]
    c0, c1 = topo.cells
    assert c0.cpus == tuple(range(0, 12)) + tuple(range(24, 36))
    assert c1.cpus == tuple(range(12, 24)) + tuple(range(36, 48))
    assert (c0.memory_kib, c1.memory_kib) == (196396712, 198155608)
    assert 0 < c0.memory_free_kib < c0.memory_kib
    assert c0.distances == {0: 10, 1: 21} and c1.distances == {0: 21, 1: 10}
    pools = {p.size_kib: p for p in c0.hugepages}
    assert sorted(pools) == [2048, 1048576]
    assert (pools[2048].total, pools[2048].free, pools[2048].surplus) == (2048, 1536, 0)
    assert (pools[1048576].total, pools[1048576].free) == (32, 28)
    assert {p.size_kib: p.free for p in c1.hugepages} == {2048: 2048, 1048576: 20}


def test_xeon_cpus_threads_and_core_id_gaps():
    topo = probe("xeon-2s-cat")
    assert len(topo.cpus) == 48 and all(c.online for c in topo.cpus)
    cpu0, cpu6, cpu12, cpu24 = (topo.cpu(i) for i in (0, 6, 12, 24))
    assert (cpu0.socket, cpu0.core, cpu0.siblings, cpu0.cell) == (0, 0, (0, 24), 0)
    assert cpu24.siblings == (0, 24) and cpu24.core == 0 and cpu24.socket == 0
    assert cpu6.core == 8  # Skylake-SP core ids skip fused-off cores
    assert (cpu12.socket, cpu12.cell, cpu12.siblings) == (1, 1, (12, 36))
    assert [c.id for c in topo.cpus if c.isolated] == [
        c for r in ((2, 12), (14, 24), (26, 36), (38, 48)) for c in range(*r)
    ]
    assert not topo.cpu(0).isolated and topo.cpu(2).isolated


def test_xeon_caches_once_per_instance():
    topo = probe("xeon-2s-cat")
    l3 = caches(topo, 3)
    assert [(c.id, c.size_bytes, c.ways, c.line_bytes) for c in l3] == [
        (0, 25344 * 1024, 11, 64),
        (1, 25344 * 1024, 11, 64),
    ]
    assert l3[0].cpus == topo.cells[0].cpus
    l2 = caches(topo, 2)
    assert len(l2) == 24 and all(len(c.cpus) == 2 for c in l2)
    # per-core cache ids are APIC-derived (socket * 32 + core_id): gaps
    assert [c.id for c in l2][:7] == [0, 1, 2, 3, 4, 5, 8]
    assert [c.id for c in l2][12] == 32
    assert len(caches(topo, 1, "data")) == 24 and len(caches(topo, 1, "instruction")) == 24
    keys = [(c.level, c.type, c.id) for c in topo.caches]
    assert len(keys) == len(set(keys))


def test_each_cache_read_once_not_per_cpu():
    reader = FileReader()
    probe("xeon-2s-cat", reader)
    sizes = [p for p in reader.files if p.endswith("/size") and "/cache/" in p]
    # 24 cores x (L1d, L1i, L2) + 2 L3: each read through its lowest CPU only
    assert len(sizes) == 24 * 3 + 2
    assert not any("/cpu24/" in p for p in reader.files)  # a second thread reads nothing


def test_vm_without_smt_and_without_cluster():
    topo = probe("vm-1s-nosmt")
    assert [c.siblings for c in topo.cpus] == [(0,), (1,), (2,), (3,)]
    assert {c.cluster for c in topo.cpus} == {-1}  # cluster_id 65535 = no cluster
    assert {c.socket for c in topo.cpus} == {0} and {c.die for c in topo.cpus} == {0}
    assert topo.resctrl is None
    assert [c.cpus for c in caches(topo, 3)] == [(0, 1, 2, 3)]
    assert [(p.address, p.numa_node, p.sriov_totalvfs) for p in topo.pci] == [
        ("0000:00:03.0", -1, 0),
        ("0000:00:04.0", -1, 0),
    ]


def test_large_memoryless_cells_offline_cpus_gaps():
    topo = probe("large-8cell")
    assert [c.id for c in topo.cells] == list(range(8))
    assert all(not topo.cell(i).cpus for i in range(4, 8))  # HBM nodes: memory, no CPUs
    assert topo.cell(4).memory_kib == 33554432
    assert {p.size_kib for p in topo.cell(5).hugepages} == {2048, 1048576}
    assert topo.cell(5).distances[5] == 10 and len(topo.cell(5).distances) == 8
    offline = [c for c in topo.cpus if not c.online]
    assert [c.id for c in offline] == [63, 124, 125, 126, 127]
    for c in offline:
        assert (c.socket, c.die, c.cluster, c.core, c.siblings) == (-1, -1, -1, -1, ())
    assert topo.cpu(60).siblings == (60,)  # its sibling 124 is offline
    assert not any(63 in c.cpus or 127 in c.cpus for c in topo.caches)
    assert len(topo.cpus) == 128


def test_epyc_several_l3_per_cell_with_id_gaps():
    topo = probe("epyc-amd")
    l3 = caches(topo, 3)
    assert [c.id for c in l3] == [0, 2, 4, 6, 8, 10, 12, 14]
    assert l3[0].cpus == (0, 1, 2, 3, 32, 33, 34, 35)
    assert {c.size_bytes for c in l3} == {16 * 1024 * 1024}
    assert topo.cells[0].hugepages[0].surplus == 0 and topo.cells[1].hugepages[0].surplus == 16


def test_no_node_dir_is_one_cell_with_every_cpu():
    topo = probe("no-node-dir")
    assert len(topo.cells) == 1
    cell = topo.cells[0]
    assert cell.id == 0 and cell.cpus == tuple(range(12))
    assert cell.distances == {0: 10}
    assert cell.memory_kib == 0  # no memory blocks in sysfs: documented as unknown (0)
    assert {c.cell for c in topo.cpus} == {0}
    assert [p.numa_node for p in topo.pci] == [-1]  # no numa_node file


def test_big_host():
    topo = probe("big-448")
    assert len(topo.cpus) == 448 and len(topo.cells) == 8
    assert len({c.socket for c in topo.cpus}) == 4
    assert len({c.siblings for c in topo.cpus}) == 224
    assert [len(c.cpus) for c in caches(topo, 3)] == [112] * 4
    assert len(topo.pci) == 8 and all(p.sriov_totalvfs == 128 for p in topo.pci)


def test_pci_locality_and_sriov():
    topo = probe("xeon-2s-cat")
    pci = {p.address: p for p in topo.pci}
    nic = pci["0000:af:00.0"]
    assert (nic.numa_node, nic.class_, nic.vendor, nic.device) == (1, "0x020000", "0x8086",
                                                                   "0x1592")
    assert nic.sriov_totalvfs == 128
    assert pci["0000:3b:00.0"].numa_node == 0 and pci["0000:3b:00.0"].sriov_totalvfs == 0
    assert list(pci) == sorted(pci)


@pytest.mark.parametrize("name", NAMES)
def test_dict_round_trip_and_json_shape(name):
    topo = probe(name)
    d = topology_to_dict(topo)
    assert topology_from_dict(d) == topo
    doc = probe_json(topo)
    assert set(doc) == {"cells", "cpus", "caches", "resctrl", "pci", "free_cache"}
    free = doc.pop("free_cache")
    assert doc == d  # probe_json is topology_to_dict plus free_cache
    assert free == cache_ways(topo)
    assert [c["id"] for c in doc["cpus"]] == sorted(c["id"] for c in doc["cpus"])


def test_this_machine():
    if not Path("/sys/devices/system/cpu").is_dir():
        pytest.skip("no /sys here")
    reader = FileReader()
    topo = probe_host("/sys", "/sys/fs/resctrl", reader=reader)
    online = [c for c in topo.cpus if c.online]
    assert online and all(c.socket >= 0 and c.core >= 0 for c in online)
    assert sorted(x for cell in topo.cells for x in cell.cpus) == [c.id for c in online]
    assert reader.files and all(p.startswith("/sys/") for p in reader.files)


def test_reprobe_with_static_memo(tmp_path):
    import shutil

    cpu = "devices/system/cpu"
    root = copy_of("vm-1s-nosmt", tmp_path, "devices/system/node/node0/hugepages",
                   f"{cpu}/cpu0/cache/index3/size", f"{cpu}/cpu4", f"{cpu}/online")
    memo: dict = {}
    cold = FileReader(memo)
    first = probe_host(root, None, reader=cold)
    warm = FileReader(memo)
    assert probe_host(root, None, reader=warm) == first
    assert warm.opens < cold.opens / 2  # cache geometry and ids come from the memo
    assert warm.files == cold.files  # still recorded: capture works with a warm reader
    # what can change is re-read ...
    pool = root / "devices/system/node/node0/hugepages/hugepages-2048kB"
    (pool / "nr_hugepages").write_text("16\n")
    (pool / "free_hugepages").write_text("16\n")
    assert probe_host(root, None, reader=FileReader(memo)).cells[0].hugepages[0].free == 16
    # ... what cannot change is not (cache geometry is fixed while the host runs) ...
    (root / "devices/system/cpu/cpu0/cache/index3/size").write_text("8192K\n")
    l3 = [c for c in probe_host(root, None, reader=FileReader(memo)).caches if c.level == 3]
    assert l3[0].size_bytes == 16 * 1024 * 1024
    # ... until the set of CPU directories changes, which empties the memo
    shutil.copytree(root / "devices/system/cpu/cpu3", root / "devices/system/cpu/cpu4",
                    symlinks=True)
    (root / "devices/system/cpu/online").write_text("0-3\n")
    topo = probe_host(root, None, reader=FileReader(memo))
    assert [c.size_bytes for c in topo.caches if c.level == 3] == [8 * 1024 * 1024]
    assert [c.id for c in topo.cpus if not c.online] == [4]


@pytest.mark.parametrize("name", NAMES)
def test_probe_json_text_is_probe_json(name):
    """The CLI's direct encoding is the same document as ``probe_json``, compact."""
    topo = probe(name)
    text = probe_json_text(topo)
    assert json.loads(text) == probe_json(topo)
    assert text == json.dumps(probe_json(topo), separators=(",", ":"))
    assert "free_cache" not in vars(topo)  # records were handed out, not changed
    assert probe_json_text(topo) == text


class _MissingLog(FileReader):
    """A reader that also lists the files it tried that did not exist."""

    __slots__ = ("missing",)

    def __init__(self) -> None:
        super().__init__()
        self.missing: list[str] = []

    def read(self, path, dir_fd=None, name=""):
        text = super().read(path, dir_fd, name)
        if text is None:
            self.missing.append(path)
        return text

    def read_many(self, d, names, dir_fd=None, rel=""):
        texts = super().read_many(d, names, dir_fd, rel)
        self.missing += [d + n for n, t in zip(names, texts, strict=True) if t is None]
        return texts


def test_cache_index_end_tried_once_per_last_shared_cache():
    """Only the CPU that read a socket's L3 looks for an index after it; every other CPU
    of the socket shares that L3 and stops there (docs/probe.md, Caches)."""
    reader = _MissingLog()
    topo = probe("xeon-2s-cat", reader)
    tried = sorted(p.split("/devices/system/cpu/", 1)[1] for p in reader.missing
                   if "/cache/index" in p and p.endswith("/level"))
    assert tried == ["cpu0/cache/index4/level", "cpu12/cache/index4/level"]
    assert len(caches(topo, 3)) == 2 and len(caches(topo, 1, "data")) == 24


def test_cache_index_end_assumption_and_its_limit(tmp_path):
    """The documented limit: caches beyond a shared cache are assumed shared too. A CPU
    with an extra index after a cache it shares with a CPU whose list ended there is not
    read past that cache; a CPU whose last cache is its own is read to its own end."""
    import shutil

    root = copy_of("vm-1s-nosmt", tmp_path,
                   *(f"devices/system/cpu/cpu{n}/cache/index4" for n in (0, 1)))

    def add_l4(cpu):
        base = root / f"devices/system/cpu/cpu{cpu}/cache"
        last = max(int(p.name[5:]) for p in base.glob("index*"))
        extra = base / f"index{last + 1}"
        shutil.copytree(base / f"index{last}", extra)
        (extra / "level").write_text("4\n")
        (extra / "shared_cpu_list").write_text(f"{cpu}\n")
        (extra / "id").write_text(f"{cpu}\n")

    add_l4(1)  # cpu1's last cache (L3) is cpu0's, and cpu0 has no L4: not looked for
    assert [c for c in probe_host(root, None).caches if c.level == 4] == []
    add_l4(0)  # cpu0 reads its own L4, so cpu1 goes on past the shared L3 and finds its own
    l4 = [(c.id, c.cpus) for c in probe_host(root, None).caches if c.level == 4]
    assert l4 == [(0, (0,)), (1, (1,))]
