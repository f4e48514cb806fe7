"""The fleet index's ingest cost (issue 15 item 6): ``Fleet.update`` keeps the usage it
is handed as it is (no packing again), and nothing the index does with it afterwards
(summaries, exact fits, ``snapshot``) changes the shared map."""

from __future__ import annotations

import copy

import pytest
from fleet_helpers import PINNED2, SHARED1, host_snapshot

from hostagent import wire
from hostagent.fleet import Fleet


@pytest.fixture(scope="module")
def loaded():
    """A 48-thread host with 6 guests and an empty one (built once)."""
    return (host_snapshot("xeon-2s-cat", "a", guests=6),
            host_snapshot("xeon-2s-cat", "b"))


def test_update_of_a_known_host_packs_nothing(loaded, monkeypatch):
    """The usage is not packed again: an update of a known host of a known shape calls
    no msgpack packer at all, and the index holds the very map it was handed."""
    fl = Fleet()
    a, b = loaded
    fl.update(a, 0.0)
    packed = []
    real_pack = wire.pack
    monkeypatch.setattr(wire, "pack", lambda obj: packed.append(obj) or real_pack(obj))
    newer = dict(a, seq=2, usage=copy.deepcopy(a["usage"]))
    fl.update(newer, 1.0)
    assert packed == []
    assert fl.entry("a").usage is newer["usage"]
    assert fl.snapshot("a")["usage"] is newer["usage"]
    assert fl.entry("a").seq == 2


def test_placing_leaves_the_shared_usage_unchanged(loaded):
    """Exact fits run on views of the held usage: after placements of several kinds on
    both hosts, the usage maps handed over are what they were (bit for bit)."""
    a, b = loaded
    before = [wire.pack(s["usage"]) for s in (a, b)]
    fl = Fleet()
    fl.update(a, 0.0)
    fl.update(b, 0.0)
    for request in (PINNED2, SHARED1):
        for weigher in ("pack", "spread"):
            assert fl.place(request, count=2, weigher=weigher, now=0.0)
    fl.why_not({"vcpus": 64, "memory_mb": 1024,
                "extra_specs": {"hw:cpu_policy": "dedicated"}}, now=0.0)
    assert [wire.pack(s["usage"]) for s in (a, b)] == before
    assert fl.entry("a").usage is a["usage"]
