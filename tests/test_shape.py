"""The code's shape where it is a promise: the pure tracker does not import the libvirt
I/O module (``GuestRecord`` is still importable from where callers found it), ``fold``
keeps no state between calls, and every model record's ``__init__`` is its fields."""

from __future__ import annotations

import dataclasses
import inspect
import subprocess
import sys

import pytest
from libvirt_helpers import domain_xml, probe_fixture, uuid_for

from hostagent.config import config_from_dict, resolve_resources
from hostagent.guests.source import record_from_xml
from hostagent.guests.xml import GuestRecord
from hostagent.tracker import (
    Context,
    UsageTracker,
    compute_usage,
    fold,
    guest_contribution,
    make_context,
)


def test_tracker_does_not_import_the_libvirt_io_module():
    code = ("import sys, hostagent.tracker, hostagent.snapshot; "
            "print(sorted(m for m in sys.modules if m.startswith('hostagent.guests')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert out.strip() == "['hostagent.guests', 'hostagent.guests.xml']"


def test_guest_record_is_one_class_importable_from_both_modules():
    from hostagent.guests import source, xml

    assert source.GuestRecord is xml.GuestRecord
    assert xml.GuestRecord.__module__ == "hostagent.guests.xml"


# --------------------------------------------------------------------------- fold is pure

DEDICATED = "2-11,14-23,26-35,38-47"  # xeon-2s-cat, as in test_tracker
SHARED = "0-1,12-13,24-25,36-37"


@pytest.fixture(scope="module")
def xeon():
    return probe_fixture("xeon-2s-cat")


def _resources(topo, **extra):
    doc = {"dedicated_cpus": DEDICATED, "shared_cpus": SHARED, **extra}
    return resolve_resources(config_from_dict({"resources": doc}).resources, topo)


def _rec(name: str, domain_id: int | None = None, **kw) -> GuestRecord:
    xml = domain_xml(name, **kw)
    if domain_id is not None:
        xml = xml.replace("<domain type='test'", f"<domain type='test' id='{domain_id}'", 1)
    return record_from_xml(xml, uuid=uuid_for(name), name=name)


def test_context_keeps_no_state_of_past_folds(xeon):
    """The host indexes only: the memos of the last fold live in ``UsageTracker``."""
    assert all(not f.name.startswith("_") for f in dataclasses.fields(Context))
    ctx = make_context(xeon, _resources(xeon))
    with pytest.raises(dataclasses.FrozenInstanceError):
        ctx.topo = xeon  # type: ignore[misc]


def test_fold_is_pure_and_previous_only_lends_unchanged_objects(xeon):
    res = _resources(xeon)
    ctx = make_context(xeon, res)
    rt1 = _rec("rt1", domain_id=1, vcpus=4, vcpupin={0: "2", 1: "26", 2: "3", 3: "27"},
               emulatorpin="0", cachetunes=[("2-3", [(0, 3, "both", 2304)])])
    other = _rec("other", vcpus=1, vcpupin={0: "4"}, emulatorpin="0")
    one = [guest_contribution(ctx, rt1)]
    two = [*one, guest_contribution(ctx, other)]
    first = fold(ctx, one)
    again = fold(ctx, one)
    # the same inputs give the same usage, built afresh: no fold remembers another
    assert again == first and again == compute_usage(xeon, res, [rt1])
    assert all(a is not b for a, b in zip(first["threads"], again["threads"], strict=True))
    assert again["caches"] is not first["caches"]
    # with the previous usage: the same result, unchanged entries and caches lent
    lent = fold(ctx, two, previous=first)
    assert lent == fold(ctx, two) == compute_usage(xeon, res, [rt1, other])
    changed = {t["cpu"] for old, t in zip(first["threads"], lent["threads"], strict=True)
               if old is not t}
    assert changed == {0, 4}  # other's vCPU, and thread 0 where both emulators run
    assert lent["caches"] is first["caches"]  # no group changed owner
    # a group that changes owner: fresh caches, with the new owner
    gone = fold(ctx, two[1:], previous=lent)
    assert gone["caches"] is not lent["caches"] and gone == compute_usage(xeon, res, [other])
    owners = {a["group"]: a["guest"] for c in gone["caches"] for a in c["allocations"]}
    assert owners["qemu-1-rt1-vcpus_2-3"] is None


def test_tracker_hands_its_last_usage_to_the_next_fold(xeon):
    res = _resources(xeon)
    a = _rec("a", vcpus=1, vcpupin={0: "5"}, emulatorpin="0")
    t = UsageTracker(xeon, res)
    t.update(a)
    before = t.usage()
    t.update(_rec("b", vcpus=1, vcpupin={0: "6"}, emulatorpin="1"))
    after = t.usage()
    assert after["threads"][5] is before["threads"][5]
    assert after["threads"][6] is not before["threads"][6]
    t.set_host(xeon, res)  # a new context: nothing is lent across it
    fresh = t.usage()
    assert fresh == after and fresh["threads"][5] is not after["threads"][5]


def test_memory_bound_to_several_cells_without_interleave_floats(xeon):
    """docs/tracker.md §3.3: several cells in strict/preferred/restrictive mode are in no
    one cell; interleave splits over them."""
    res = _resources(xeon)
    for mode in ("strict", "preferred", "restrictive"):
        g = _rec(f"m-{mode}", vcpus=1, cpuset=SHARED, numa_memory=(mode, "0-1"))
        u = compute_usage(xeon, res, [g])
        assert u["floating_memory_kib"] == 1048576, mode
        assert [c["memory_used_kib"] for c in u["cells"]] == [0, 0]
        assert u["guests"][0]["cells"][0]["host_cells"] == []
    g = _rec("m-interleave", vcpus=1, cpuset=SHARED, numa_memory=("interleave", "0-1"))
    u = compute_usage(xeon, res, [g])
    assert u["floating_memory_kib"] == 0
    assert [c["memory_used_kib"] for c in u["cells"]] == [524288, 524288]


# --------------------------------------------------------------------------- model records


def _model_records():
    import hostagent.model as model

    return [v for v in vars(model).values()
            if isinstance(v, type) and v.__module__ == model.__name__ and hasattr(v, "_fields")]


def test_model_record_init_signature_is_its_fields():
    """Each record writes its own ``__init__`` (``hostagent.model._frozen``): its
    parameters are the fields in order, and a parameter has a default exactly when the
    field does, the same one."""
    records = _model_records()
    assert len(records) >= 10
    for cls in records:
        params = list(inspect.signature(cls.__init__).parameters.values())[1:]
        assert tuple(p.name for p in params) == cls._fields, cls.__name__
        for p in params:
            assert p.kind is p.POSITIONAL_OR_KEYWORD, (cls.__name__, p.name)
            if p.name in vars(cls):
                assert p.default == vars(cls)[p.name], (cls.__name__, p.name)
            else:
                assert p.default is p.empty, (cls.__name__, p.name)
