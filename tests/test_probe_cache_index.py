"""A cache ``indexK/`` that names no cache (no ``type``, ``size`` or ``id``) is skipped.

Such a directory (only ``level``, perhaps ``shared_cpu_list``) used to come out as a
0-byte unified cache with an id made up from its lowest CPU. It is skipped, as libvirt
skips an index it cannot describe, and the walk goes on to the next index. One missing
file keeps its fallback (docs/probe.md, "Caches"). On copies of fixtures.
"""

import json
from pathlib import Path

import pytest
from fixture_trees import copy_of

from hostagent.cli import main
from hostagent.probe.host import FileReader, probe_host

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "sysfs"
CPU = "devices/system/cpu"
NAMING_FILES = ("type", "size", "id")


@pytest.fixture
def vm(tmp_path):
    """vm-1s-nosmt where the L2 and L3 index directories of every CPU are the test's."""
    return copy_of("vm-1s-nosmt", tmp_path,
                   *(f"{CPU}/cpu{n}/cache/index{k}" for n in range(4) for k in (2, 3)))


def strip_index(root: Path, index: int, keep: tuple[str, ...] = ("level",)) -> None:
    """Leave only ``keep`` in ``cpuN/cache/index<index>/`` of every CPU."""
    for d in sorted((root / CPU).glob(f"cpu[0-9]*/cache/index{index}")):
        for f in d.iterdir():
            if f.name not in keep:
                f.unlink()


def caches(topo) -> list[tuple]:
    return [(c.level, c.type, c.id, c.size_bytes, c.cpus) for c in topo.caches]


def test_an_index_with_only_level_is_skipped(vm):
    before = caches(probe_host(vm, None))
    assert [c for c in before if c[0] == 3] == [(3, "unified", 0, 16 << 20, (0, 1, 2, 3))]
    strip_index(vm, 3)
    after = caches(probe_host(vm, None))
    assert after == [c for c in before if c[0] != 3]


def test_an_index_with_level_and_shared_cpu_list_only_is_skipped(vm):
    strip_index(vm, 3, keep=("level", "shared_cpu_list", "ways_of_associativity"))
    assert not [c for c in probe_host(vm, None).caches if c.level == 3]


def test_the_walk_goes_on_past_a_skipped_index(vm):
    before = caches(probe_host(vm, None))
    strip_index(vm, 2)
    after = caches(probe_host(vm, None))
    assert after == [c for c in before if c[0] != 2]
    assert [c[0] for c in after].count(3) == 1


@pytest.mark.parametrize("kept", NAMING_FILES)
def test_one_naming_file_keeps_the_index_with_the_fallbacks(vm, kept):
    strip_index(vm, 3, keep=("level", "shared_cpu_list", kept))
    [l3] = [c for c in probe_host(vm, None).caches if c.level == 3]
    assert l3.cpus == (0, 1, 2, 3) and l3.id == 0
    assert l3.type == "unified" and l3.size_bytes == (16 << 20 if kept == "size" else 0)


def test_a_reprobe_with_a_static_memo_skips_it_too(vm):
    strip_index(vm, 3)
    memo: dict = {}
    first = caches(probe_host(vm, None, reader=FileReader(static=memo)))
    second = caches(probe_host(vm, None, reader=FileReader(static=memo)))
    assert first == second and not [c for c in first if c[0] == 3]


def test_probe_json_has_no_invented_cache(vm, capsys):
    strip_index(vm, 3)
    assert main(["probe", "--sysfs-root", str(vm), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert sorted({c["level"] for c in doc["caches"]}) == [1, 2]
    assert all(c["size_bytes"] > 0 for c in doc["caches"])


def test_no_fixture_has_an_index_without_a_naming_file():
    """The rule changes nothing on the fixtures: every index there names its cache."""
    dirs = sorted(FIXTURES.glob(f"*/sys/{CPU}/cpu[0-9]*/cache/index[0-9]*"))
    assert dirs
    bare = [d for d in dirs if not any((d / n).exists() for n in NAMING_FILES)]
    assert bare == []
