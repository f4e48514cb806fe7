"""NUMA distance: a guest's cells on close host cells, in the in-host fit and across hosts
(the ``numa`` weigher), on large-8cell (2 sockets, CPU cells 0-1 on socket 0 and 2-3 on
socket 1: distance 12 within a socket, 21 across)."""

from __future__ import annotations

import copy

from fleet_helpers import host_snapshot
from libvirt_helpers import domain_xml

from hostagent.fit import fit
from hostagent.fleet import Fleet
from hostagent.guests.source import record_from_xml
from hostagent.tracker import UsageTracker

TWO_CELLS = {"vcpus": 8, "memory_mb": 4096,
             "extra_specs": {"hw:cpu_policy": "dedicated", "hw:numa_nodes": "2"}}
SOCKET_OF = {0: 0, 1: 0, 2: 1, 3: 1}


def loaded(name: str, pins: dict[int, str]) -> dict:
    """large-8cell with one guest pinned as ``pins`` (vCPU -> CPU)."""
    from fleet_helpers import _base

    topo, tdict, resources = _base("large-8cell")
    tr = UsageTracker(topo, resources)
    xml = domain_xml("busy", vcpus=len(pins), vcpupin=pins)
    tr.update(record_from_xml(xml, uuid="00000000-0000-0000-0000-000000000001", name="busy"))
    snap = host_snapshot("large-8cell", name)
    snap["usage"] = copy.deepcopy(tr.usage())
    return snap


def cells_of(answer: dict) -> list[int]:
    return [c["host_cell"] for c in answer["placement"]["cells"]]


def test_a_two_cell_guest_gets_two_cells_of_one_socket_when_free():
    # cells 1 and 3 each lose 2 threads: by free threads the order is 0, 2, 1, 3, so
    # without the distance rule the guest took cells 0 and 2 (two sockets)
    snap = loaded("l1", {0: "16", 1: "17", 2: "48", 3: "49"})
    for strategy in ("spread", "pack"):
        answer = fit(snap, TWO_CELLS, strategy=strategy)
        assert answer["fits"]
        chosen = cells_of(answer)
        assert len({SOCKET_OF[c] for c in chosen}) == 1, (strategy, chosen)
    assert sorted(cells_of(fit(snap, TWO_CELLS, strategy="spread"))) == [0, 1]


def test_across_sockets_only_when_no_socket_has_two_free_cells():
    # socket 0's cell 1 and socket 1's cell 3 full: only cells 0 and 2 can take it
    full1 = {i: str(c) for i, c in enumerate([*range(16, 32), *range(80, 96)])}
    full3 = {32 + i: str(c) for i, c in enumerate([*range(48, 63), *range(112, 124)])}
    snap = loaded("l2", {**full1, **full3})
    answer = fit(snap, TWO_CELLS)
    assert answer["fits"] and sorted(cells_of(answer)) == [0, 2]


def test_the_numa_weigher_prefers_the_host_where_the_guest_stays_on_one_socket():
    near = loaded("near", {0: "16", 1: "17"})
    full1 = {i: str(c) for i, c in enumerate([*range(16, 32), *range(80, 96)])}
    full3 = {32 + i: str(c) for i, c in enumerate([*range(48, 63), *range(112, 124)])}
    far = loaded("far", {**full1, **full3})
    fl = Fleet()
    fl.update(near, 0.0)
    fl.update(far, 0.0)
    # "far" is fuller, so pack alone takes it, across its two sockets
    packed = fl.place(TWO_CELLS, count=2, weigher="pack", now=0.0)
    assert packed[0].host == "far"
    best = fl.place(TWO_CELLS, count=2, weigher="pack:1,numa:4", now=0.0)
    assert best[0].host == "near", [(c.host, c.score) for c in best]
    assert len({SOCKET_OF[c] for c in cells_of(best[0].answer)}) == 1
