"""Outstanding claims for an operator (issue 13): ``hostagent show`` lists each claim — id,
claimant, expiry in ISO-8601 UTC as the debug dump writes it, what it holds — and marks
claimed threads and cache ways; ``hostagent watch`` counts them on its line and draws the
claims new since the host's previous snapshot (and names those gone). Within 80 columns.
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path
from typing import Any

from fit_hosts import flavor
from test_claims import PINNED_2M, claim, new_tracker

from hostagent.agent.debug_dump import iso_time
from hostagent.cli import main
from hostagent.commands.show import render
from hostagent.commands.watch import _show, summary
from hostagent.model import topology_to_dict
from hostagent.snapshot import assemble_snapshot
from hostagent.subscriber import Update

NOW = 1_764_000_000.0  # 2025-11-24T16:00:00Z
CACHED_PCI = flavor(2, 1024, cpu_policy="dedicated", cpu_thread_policy="isolate",
                    pci_devices="8086:1572", cache_reservation="vcpus=0-1:type=both,size=2mb")
LONG_CLAIMANT = "scheduler-" + "x" * 100


def snapshot_with_claims(seq: int = 5) -> tuple[dict[str, Any], list[Any]]:
    """A snapshot (as JSON would carry it) with three claims, and their records."""
    tr = new_tracker()
    records = [claim(tr, PINNED_2M, now=NOW, claimant="sched-a")[0],
               claim(tr, CACHED_PCI, now=NOW, claimant=LONG_CLAIMANT, ttl_s=300)[0],
               claim(tr, flavor(2, 256), now=NOW)[0]]
    assert all(records)
    snap = assemble_snapshot(topology_to_dict(tr.ctx.topo), tr.ctx.resources, tr.usage(),
                             host="h1", epoch="e", seq=seq, now=NOW)
    return json.loads(json.dumps(snap)), records


def section(text: str, title: str) -> list[str]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(title))
    end = next((i for i in range(start + 1, len(lines)) if not lines[i]), len(lines))
    return lines[start:end]


def test_show_lists_each_claim_with_its_expiry_claimant_and_holdings(
        tmp_path: Path, capsys: Any) -> None:
    snap, (pinned, cached, floating) = snapshot_with_claims()
    path = tmp_path / "snap.json"
    path.write_text(json.dumps(snap))
    assert main(["show", "--file", str(path)]) == 0
    out = capsys.readouterr().out
    assert out == render(snap)
    claims = section(out, "claims:")
    assert all(len(line) <= 80 for line in claims), claims
    threads = {c: pinned.id for c in pinned.placement["cells"][0]["pinning"].values()}
    [cell] = pinned.placement["cells"]
    assert claims[:4] == [
        "claims: 3 outstanding",
        f"  {pinned.id}  by sched-a",
        f"    expires {iso_time(NOW + 60)}",
        f"    holds threads {','.join(map(str, sorted(threads)))}; "
        f"c{cell['host_cell']} 1 GiB in 2 MiB pages",
    ]
    assert iso_time(NOW + 60) == "2025-11-24T16:01:00.000+00:00"
    # a claimant too long for the line is cut; what the claim holds wraps
    assert claims[4].startswith(f"  {cached.id}  by scheduler-xxx") and \
        claims[4].endswith("…") and len(claims[4]) == 80
    assert claims[5] == f"    expires {iso_time(NOW + 300)}"
    held = " ".join(claims[6:-3])
    [ways] = cached.placement["cache"]
    [dev] = cached.placement["pci"]
    for phrase in ("holds threads ", "; idle ", f"L3#{ways['id']} ways {ways['mask']}",
                   f"PCI {dev['address']}"):
        assert phrase in held, held
    assert claims[-3:] == [f"  {floating.id}", f"    expires {iso_time(NOW + 60)}",
                           "    holds any cell 256 MiB; shared vCPUs 2"]
    # the thread map and the cache-way map say who holds what
    for cpu, claim_id in threads.items():
        assert f" {cpu}=claim:{claim_id[6:12]}" in out
    groups = section(out, "cache ways")
    assert any(line.endswith(f"{ways['group']}  claim {cached.id}") for line in groups), groups


def test_show_says_when_no_claim_is_outstanding(capsys: Any) -> None:
    tr = new_tracker()
    snap = assemble_snapshot(topology_to_dict(tr.ctx.topo), tr.ctx.resources, tr.usage(),
                             host="h1", epoch="e", seq=1, now=NOW)
    assert section(render(json.loads(json.dumps(snap))), "claims:") == ["claims: none"]


def test_watch_counts_claims_and_draws_those_new_and_gone() -> None:
    snap, (pinned, cached, floating) = snapshot_with_claims()
    line = summary(snap)
    assert line.endswith("  guests 0  claims 3") and len(line) <= 80
    assert summary(snap, wide=True).endswith("  guests 0  claims 3  conflicts 0")
    args = argparse.Namespace(json=False, wide=False)
    out = io.StringIO()
    seen: dict[str, set[str]] = {}
    assert _show(args, Update("snapshot", "h1", "e", 5, snap), out, {}, seen)
    lines = out.getvalue().splitlines()
    assert lines[0] == line and all(len(x) <= 80 for x in lines), lines
    heads = [x for x in lines if x.startswith("  + ")]
    assert heads == [f"  + {pinned.id}  by sched-a", lines[4], f"  + {floating.id}"]
    assert lines[4].startswith(f"  + {cached.id}  by scheduler-x") and len(lines[4]) == 80
    assert lines[2] == f"      expires {iso_time(NOW + 60)}"
    # the next snapshot: one claim gone, nothing new
    later = json.loads(json.dumps(snap))
    later["usage"]["claims"] = [c for c in later["usage"]["claims"] if c["id"] != cached.id]
    out = io.StringIO()
    assert _show(args, Update("snapshot", "h1", "e", 6, later), out, {}, seen)
    assert out.getvalue().splitlines()[1:] == [
        f"  - {cached.id} gone: released, expired or consumed"]
    # JSON output is the snapshot as it is
    out = io.StringIO()
    assert _show(argparse.Namespace(json=True, wide=False),
                 Update("snapshot", "h1", "e", 6, later), out, {}, seen)
    assert json.loads(out.getvalue())["usage"]["claims"] == later["usage"]["claims"]
