"""``hostagent fit`` as text (issue "Output a person reads", items 14 and 15): a reason
that holds for every host cell is printed once, not once per cell; sizes and counts in
one style. The JSON answer is unchanged (one reason per host cell)."""

from __future__ import annotations

import json

from fit_hosts import flavor, make_snapshot, make_topology

from hostagent.cli import main
from hostagent.fit import fit
from hostagent.fit.explain import explain, reason_lines


def run_fit(capsys, tmp_path, snap, request, *extra):
    (tmp_path / "s.json").write_text(json.dumps(snap))
    (tmp_path / "r.json").write_text(json.dumps(request))
    capsys.readouterr()
    code = main(["fit", "--snapshot", str(tmp_path / "s.json"), "--request",
                 str(tmp_path / "r.json"), *extra])
    return code, capsys.readouterr().out


def test_a_reason_every_host_cell_gives_is_printed_once(capsys, tmp_path):
    snap = make_snapshot(make_topology(4, 4, 1))  # four cells, no SMT
    req = flavor(2, 512, cpu_policy="dedicated", cpu_thread_policy="require")
    code, out = run_fit(capsys, tmp_path, snap, req)
    assert code == 1
    assert out.splitlines() == [
        "does not fit (strategy spread):",
        "  every host cell: guest cell 0: sibling_threads: require needs SMT; the cell's "
        "cores have 1 thread",
    ]
    code, out = run_fit(capsys, tmp_path, snap, req, "--json")
    assert code == 1 and [r["host_cell"] for r in json.loads(out)["reasons"]] == [0, 1, 2, 3]


def test_guest_cells_with_the_same_reason_share_a_line(capsys, tmp_path):
    taken = {cpu: "other" for cpu in range(16)}  # every thread of every cell is held
    snap = make_snapshot(make_topology(2, 4, 2), taken=taken)
    code, out = run_fit(capsys, tmp_path, snap,
                        flavor(4, 1024, cpu_policy="dedicated", numa_nodes=2))
    assert code == 1
    assert out.splitlines()[1:] == [
        "  every host cell: guest cells 0-1: dedicated_threads: needs 2 free dedicated "
        "threads, the cell has 0"]


def test_reasons_that_differ_stay_apart_and_some_cells_are_named():
    reasons = [
        {"host_cell": 0, "guest_cell": 0, "resource": "memory", "message": "m"},
        {"host_cell": 1, "guest_cell": 0, "resource": "memory", "message": "other"},
        {"host_cell": 2, "guest_cell": 0, "resource": "memory", "message": "m"},
        {"host_cell": None, "guest_cell": None, "resource": "pci_devices", "message": "p"},
    ]
    assert reason_lines(reasons, [0, 1, 2]) == [
        "  host cells 0,2: guest cell 0: memory: m",
        "  host cell 1: guest cell 0: memory: other",
        "  host: pci_devices: p",
    ]
    # without the host's cells, "every" is not claimed
    same = [{**r, "message": "m"} for r in reasons[:3]]
    assert reason_lines(same) == ["  host cells 0-2: guest cell 0: memory: m"]
    assert reason_lines(same, [0, 1, 2]) == ["  every host cell: guest cell 0: memory: m"]


def test_placement_text_uses_iec_sizes_and_plurals():
    snap = make_snapshot(make_topology(1, 4, 1, hugepages={2048: 4096}, resctrl_ways=12))
    req = flavor(2, 4096, cpu_policy="dedicated", mem_page_size="2MB",
                 cache_reservation="vcpus=0-1:type=both,size=2mb")
    answer = fit(snap, req)
    assert answer["fits"], answer["reasons"]
    text = explain(answer, [0])
    assert "4 GiB on 2 MiB pages" in text
    assert "  topology: 2 sockets x 1 core x 1 thread" in text
    assert "mask 0c0 (2 ways, 2 MiB)" in text
