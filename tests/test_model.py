"""The model records: immutable, compared and hashed by value, copied with ``replace``."""

import pytest
from fixture_trees import need_fixture

from hostagent.model import (
    Cell,
    FrozenError,
    HostTopology,
    HugepagePool,
    PciDevice,
    replace,
    topology_to_dict,
)


def _cell(cell_id: int = 0) -> Cell:
    return Cell(id=cell_id, cpus=(0, 1), memory_kib=1024, memory_free_kib=512,
                distances={0: 10}, hugepages=(HugepagePool(2048, 4, 3, 0),))


def test_fields_are_the_annotations_in_order():
    assert Cell._fields == ("id", "cpus", "memory_kib", "memory_free_kib", "distances",
                            "hugepages")
    assert HostTopology._fields[-1] == "pci"
    assert Cell._keys == Cell._fields  # schema keys: the field names ...
    assert PciDevice._keys[PciDevice._fields.index("class_")] == "class"  # ... but keywords


def test_records_refuse_changes():
    cell = _cell()
    with pytest.raises(FrozenError, match="cannot assign to field 'cpus' of Cell"):
        cell.cpus = (5,)
    with pytest.raises(FrozenError, match="cannot delete field 'id'"):
        del cell.id
    with pytest.raises(AttributeError):  # FrozenError is an AttributeError
        cell.extra = 1
    assert cell.cpus == (0, 1)


def test_equality_hash_and_repr_by_value():
    pool = HugepagePool(2048, 4, 3, 0)
    assert pool == HugepagePool(size_kib=2048, total=4, free=3, surplus=0)
    assert pool != HugepagePool(2048, 4, 2, 0)
    assert hash(pool) == hash(HugepagePool(2048, 4, 3, 0))
    assert repr(pool) == "HugepagePool(size_kib=2048, total=4, free=3, surplus=0)"
    assert pool.__eq__("not a pool") is NotImplemented


def test_replace_copies_with_changes_and_names_unknown_fields():
    cell = _cell()
    moved = replace(cell, id=3, cpus=(4,))
    assert (moved.id, moved.cpus, moved.hugepages) == (3, (4,), cell.hugepages)
    assert cell.id == 0  # the original is untouched
    with pytest.raises(TypeError, match="Cell has no field 'cpu'"):
        replace(cell, cpu=(1,))


def test_defaults_and_dict_form_use_schema_names():
    topo = HostTopology(cells=(_cell(),), cpus=(), caches=(), resctrl=None)
    assert topo.pci == ()
    dev = PciDevice("0000:3b:00.0", 0, "0x020000", "0x8086", "0x1572", 64)
    d = topology_to_dict(replace(topo, pci=(dev,)))
    assert d["pci"][0]["class"] == "0x020000" and "class_" not in d["pci"][0]
    assert d["cells"][0]["distances"] == {"0": 10}


def _records(value):
    if hasattr(value.__class__, "_fields"):
        yield value
        for name in value._fields:
            yield from _records(getattr(value, name))
    elif isinstance(value, tuple):
        for item in value:
            yield from _records(item)


@pytest.mark.parametrize("name", ["xeon-2s-cdp", "epyc-amd", "large-8cell"])
def test_instance_dict_holds_exactly_the_fields_in_order(name):
    """``probe --json`` writes a record's ``__dict__`` as is (``hostagent.probe.host``)."""
    from hostagent.probe.host import probe_host

    root = need_fixture(name)
    kinds = set()
    for rec in _records(probe_host(root, root / "fs" / "resctrl")):
        assert tuple(vars(rec)) == rec._fields, rec.__class__.__name__
        kinds.add(rec.__class__.__name__)
    assert {"Cell", "Cpu", "Cache", "HugepagePool"} <= kinds
