"""Test helpers for claims against real agents (tests/test_claims_daemon.py, bench/claims.py).

- ``snapshot(d)`` / ``wait_snapshot(d, pred)``: the agent's latest snapshot through the
  ``snapshot`` op, polled (bounded) until ``pred`` holds.
- ``race(d, request, claimers, tmp)``: that many separate claimer processes
  (``tests/claim_racer.py``, raw DEALER sockets) claim ``request`` together until refused.
- ``fits_one_by_one(snap, request)``: how many guests of ``request`` fit on ``snap``'s host
  when each is booted (tracked as a guest) before the next fit.
- ``boot_xml(claim, name)``: the domain a scheduler boots from a claim's XML fragments.
- ``held(placement, dedicated)``: the threads, pages, PCI functions and cache ways a
  placement takes.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hostagent.fit import fit
from hostagent.guests.source import record_from_xml
from hostagent.model import topology_from_dict
from hostagent.snapshot import assemble_snapshot
from hostagent.tracker import UsageTracker

HERE = Path(__file__).resolve().parent
XML_ORDER = ("vcpu", "cputune", "numatune", "cpu", "memoryBacking", "devices", "metadata")


def snapshot(d: Any) -> dict[str, Any]:
    rep = d.request({"op": "snapshot"}, timeout=30)
    assert rep["ok"], rep
    return rep["data"]


def wait_snapshot(d: Any, pred: Callable[[dict[str, Any]], bool],
                  timeout: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        snap = snapshot(d)
        if pred(snap):
            return snap
        if time.monotonic() > deadline:
            raise AssertionError(f"no matching snapshot within {timeout} s; last seq "
                                 f"{snap['seq']}, claims {snap['usage'].get('claims')}, "
                                 f"conflicts {snap['usage']['conflicts']}\n{d.log_text()}")
        time.sleep(0.02)


def race(d: Any, request: dict[str, Any], claimers: int, tmp: Path, *, most: int = 500,
         timeout: float = 180.0) -> list[dict[str, Any]]:
    """Start ``claimers`` processes, let them go together, return their results."""
    go = tmp / "go"
    procs = []
    for i in range(claimers):
        out = tmp / f"racer{i}.json"
        procs.append((out, subprocess.Popen(
            [sys.executable, str(HERE / "claim_racer.py"), d.req, json.dumps(request),
             str(out), str(go), f"racer{i}", str(most)])))
    time.sleep(0.2)  # let them connect; they wait for the go file
    go.write_text("go")
    results = []
    deadline = time.monotonic() + timeout
    for out, proc in procs:
        try:
            proc.wait(max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for _, p in procs:
                p.kill()
            raise AssertionError(f"a claimer did not finish; agent log:\n{d.log_text()}") \
                from None
        assert proc.returncode == 0
        results.append(json.loads(out.read_text()))
    return results


def _guest_xml(answer: dict[str, Any], n: int, memory_mb: int) -> tuple[str, str]:
    x = answer["libvirt_xml"]
    parts = "".join(x[k] for k in XML_ORDER if k in x)
    uuid = f"00000000-0000-0000-0000-{n:012d}"
    return uuid, (f"<domain type='kvm' id='{n + 1}'><name>g{n}</name><uuid>{uuid}</uuid>"
                  f"<memory unit='MiB'>{memory_mb}</memory>{parts}</domain>")


def fits_one_by_one(snap: dict[str, Any], request: dict[str, Any], most: int = 500) -> int:
    """Guests of ``request`` that fit on the host of ``snap`` (with its guests), one by
    one: fit, boot the guest (the tracker reads its XML), fit again."""
    topo = topology_from_dict(snap["topology"])
    tr = UsageTracker(topo, snap["config"])
    n = 0
    while n < most:
        s = assemble_snapshot(snap["topology"], snap["config"], tr.usage(), host="h",
                              epoch="e", seq=1, now=0.0)
        answer = fit(s, request)
        if not answer["fits"]:
            return n
        uuid, xml = _guest_xml(answer, n, request["memory_mb"])
        tr.update(record_from_xml(xml, uuid=uuid, name=f"g{n}"))
        n += 1
    return n


def boot_xml(claim: dict[str, Any], name: str, memory_mb: int, *,
             replace: tuple[str, str] | None = None) -> str:
    """A test-driver domain from the claim's XML fragments (as a scheduler would boot
    it); ``replace`` changes one piece of text (another pin)."""
    x = claim["libvirt_xml"]
    parts = "".join(x[k] for k in XML_ORDER if k in x)
    if replace is not None:
        assert replace[0] in parts, (replace, parts)
        parts = parts.replace(*replace, 1)
    return (f"<domain type='test'><name>{name}</name>"
            f"<memory unit='MiB'>{memory_mb}</memory>{parts}"
            "<os><type>hvm</type></os></domain>")


def held(placement: dict[str, Any], dedicated: set[int]) -> dict[str, Any]:
    """What a placement takes: dedicated threads (vCPUs, emulator, idle siblings), pages
    per (cell, size), PCI functions, cache ways per (resource, id)."""
    threads: set[int] = set()
    pages: dict[tuple[int, int], int] = {}
    for c in placement["cells"]:
        threads.update(c["pinning"].values())
        threads.update(c["reserved_cpus"])
        if c["page_size_kib"] != 4:
            key = (c["host_cell"], c["page_size_kib"])
            pages[key] = pages.get(key, 0) + c["memory_mib"] * 1024 // c["page_size_kib"]
    threads.update(t for t in placement["emulator_cpus"] if t in dedicated)
    ways: dict[tuple[str, int], int] = {}
    for e in placement["cache"]:
        key = (e["resource"], e["id"])
        ways[key] = ways.get(key, 0) | int(e["mask"], 16)
    return {"threads": threads, "pages": pages,
            "pci": {d["address"] for d in placement["pci"]}, "ways": ways}
