"""The claims overlay (hostagent/claim_overlay.py) answers exactly as the slow path.

A claim decision reads what is free from the guests' fold plus the claims' sums
(``ClaimTracker.fit_view``, ``ClaimTracker.is_free``) instead of folding the whole usage
and reading a snapshot of it. Over seeded random sequences of claims (fitted and stale
given placements), releases, guests booted from claims or onto claimed threads, guests
stopping and host re-probes, on hosts with hugepages, PCI functions and cache ways:

- ``fit_view()`` equals ``host_view`` of the snapshot of ``usage()``, and a fit on it
  gives the very same answer as a fit on the snapshot;
- ``is_free(c)`` is True exactly when ``claims.judge`` finds no reason.
"""

from __future__ import annotations

import copy
import dataclasses
import random
from typing import Any

import pytest
from fit_hosts import flavor, make_topology

from hostagent import claims
from hostagent.claims import ClaimTracker
from hostagent.config import config_from_dict, resolve_resources
from hostagent.errors import RequestError
from hostagent.fit import fit
from hostagent.fit.host import host_view
from hostagent.guests.source import record_from_xml
from hostagent.model import topology_to_dict
from hostagent.snapshot import assemble_snapshot

PCI = [("0000:af:00.0", 0, "8086", "1572"), ("0000:af:00.1", 0, "8086", "1572"),
       ("0000:d8:00.0", 1, "8086", "1572")]
# small: 3 GiB of ordinary memory per cell and 4 shared threads (ratio 1) run out too
TOPO = make_topology(2, 4, 2, memory_mib=6144, hugepages={2048: 512, 1048576: 2}, pci=PCI,
                     resctrl_ways=11)
DEDICATED = "0-3,8-11,4-5,12-13"
NOW = 1_000_000.0
STEPS = 120  # random operations per seed
SEEDS = range(6)

REQUESTS = [
    flavor(1, 256, cpu_policy="dedicated"),
    flavor(2, 1024, cpu_policy="dedicated", mem_page_size="2MB"),
    flavor(2, 512, cpu_policy="dedicated", cpu_thread_policy="isolate"),
    flavor(3, 1024, cpu_policy="mixed", cpu_dedicated_mask="^0", numa_nodes=1),
    flavor(2, 256),
    flavor(4, 2048, numa_nodes=2),
    flavor(1, 1024, cpu_policy="dedicated", mem_page_size="1GB"),
    flavor(1, 512, cpu_policy="dedicated", pci_devices="8086:1572"),
    flavor(2, 1024, cpu_policy="dedicated", cache_reservation="vcpus=0-1:type=both,size=2mb"),
    flavor(2, 256, cpu_policy="dedicated", emulator_threads_policy="isolate"),
    flavor(4, 4096, cpu_policy="dedicated", numa_nodes=2, mem_page_size="large"),
]


def new_tracker() -> ClaimTracker:
    res = resolve_resources(
        config_from_dict({"resources": {"dedicated_cpus": DEDICATED,
                                        "cpu_allocation_ratio": 1.0}}).resources, TOPO)
    return ClaimTracker(TOPO, res)


def snapshot(tr: ClaimTracker) -> dict[str, Any]:
    return assemble_snapshot(topology_to_dict(tr.ctx.topo), tr.ctx.resources, tr.usage(),
                             host="h", epoch="e", seq=1, now=NOW)


def check_same(tr: ClaimTracker, request: dict[str, Any], strategy: str) -> dict[str, Any]:
    """The overlay's view and fit answer equal the slow path's; the answer."""
    snap = snapshot(tr)
    view = tr.fit_view()
    assert view == host_view(snap)
    slow = fit(snap, request, strategy=strategy)
    assert fit(view, request, strategy=strategy) == slow
    return slow


def check_judge(tr: ClaimTracker, c: Any) -> bool:
    reasons = claims.judge(tr, c)
    assert tr.is_free(c) == (not reasons), reasons
    assert claims.judge_quickly(tr, c) == reasons
    return not reasons


def repinned(placement: dict[str, Any], usage: dict[str, Any], rng: random.Random
             ) -> dict[str, Any]:
    """``placement`` with its pinned vCPUs moved onto threads free now (so that what
    else it holds, pages, PCI functions, cache ways, decides whether it is free)."""
    out = copy.deepcopy(placement)
    free = {c["id"]: list(c["free_cpus"]) for c in usage["cells"]}
    moved: dict[int, int] = {}
    for cell in out["cells"]:
        pool = free[cell["host_cell"]]
        rng.shuffle(pool)
        for v, cpu in cell["pinning"].items():
            if pool:
                cell["pinning"][v] = moved[cpu] = pool.pop()
        cell["reserved_cpus"] = sorted({moved.get(c, c) for c in cell["reserved_cpus"]})
    out["emulator_cpus"] = sorted({moved.get(c, c) for c in out["emulator_cpus"]})
    return out


def guest_xml(record: claims.ClaimRecord, n: int, *, with_claim: bool) -> Any:
    """A running guest booted from ``record``'s XML (naming the claim, or not)."""
    if not with_claim:
        record = dataclasses.replace(record, id=f"other-{n}")
    uuid = f"00000000-0000-0000-0000-{n:012d}"
    xml = claims.claim_domain_xml(record, name=f"g{n}")
    start, end = xml.index("<uuid>") + len("<uuid>"), xml.index("</uuid>")
    xml = xml[:start] + uuid + xml[end:]
    xml = xml.replace("<domain type='kvm'>", f"<domain type='kvm' id='{n}'>", 1)
    return record_from_xml(xml, uuid=uuid, name=f"g{n}")


@pytest.mark.parametrize("seed", SEEDS)
def test_the_overlay_gives_the_slow_paths_answers(seed: int) -> None:
    rng = random.Random(seed)
    tr = new_tracker()
    stale: list[dict[str, Any]] = []  # placements fitted earlier (maybe taken since)
    guests: list[str] = []
    made = {"granted": 0, "refused": 0, "taken": 0, "given": 0}
    n = 0
    for _step in range(STEPS):
        n += 1
        op = rng.random()
        request = rng.choice(REQUESTS)
        strategy = rng.choice(("spread", "pack"))
        if op < 0.45:  # claim a fitted placement
            answer = check_same(tr, request, strategy)
            if not answer["fits"]:
                made["refused"] += 1
                continue
            stale.append({"request": request, "placement": answer["placement"]})
            ask = claims.parse_claim_op({"request": request, "strategy": strategy},
                                        default_ttl=60, default_strategy="spread")
            p = claims.prepare_claim(tr.ctx, tr.fit_view(), ask, claim_id=f"claim-{n}",
                                     now=NOW + n, search_steps=5000)
            assert p.record is not None and p.contribution is not None
            assert check_judge(tr, p.contribution)
            tr.grant(p.record, p.contribution)
            made["granted"] += 1
        elif op < 0.6 and stale:  # a given placement, maybe taken since
            old = rng.choice(stale)
            placement = old["placement"]
            if rng.random() < 0.7:
                placement = repinned(placement, tr.usage(), rng)
            ask = claims.parse_claim_op({"request": old["request"], "placement": placement},
                                        default_ttl=60, default_strategy="spread")
            try:
                p = claims.prepare_claim(tr.ctx, tr.fit_view(), ask, claim_id=f"claim-{n}",
                                         now=NOW + n, search_steps=5000)
            except RequestError:
                continue  # repinned into a shape check_placement refuses
            assert p.contribution is not None
            if check_judge(tr, p.contribution):
                tr.grant(p.record, p.contribution)
                made["given"] += 1
            else:
                made["taken"] += 1
        elif op < 0.72 and tr.claim_records:  # release one
            tr.release(rng.choice(sorted(tr.claim_records)))
        elif op < 0.8 and tr.claim_records:  # a guest boots from a claim: consumed
            record = tr.claim_records[rng.choice(sorted(tr.claim_records))]
            tr.update(guest_xml(record, n, with_claim=True))
            guests.append(f"00000000-0000-0000-0000-{n:012d}")
        elif op < 0.88 and stale:  # a guest started outside the claims (maybe overlapping)
            old = rng.choice(stale)
            ask = claims.parse_claim_op({"request": old["request"],
                                         "placement": old["placement"]},
                                        default_ttl=60, default_strategy="spread")
            record = claims.make_record(tr.ctx, ask, old["placement"], claim_id="x", now=NOW)
            tr.update(guest_xml(record, n, with_claim=False))
            guests.append(f"00000000-0000-0000-0000-{n:012d}")
        elif op < 0.95 and guests:  # a guest stops
            tr.remove(guests.pop(rng.randrange(len(guests))))
        elif op < 0.97:  # the claims of the oldest half expire
            times = sorted(r.expires for r in tr.claim_records.values())
            if times:
                tr.expire(times[len(times) // 2])
        else:  # a re-probe (a new context, claims accounted again)
            tr.set_host(TOPO, tr.ctx.resources)
        check_same(tr, request, strategy)
    assert made["granted"] >= 5 and made["taken"] >= 5, made


@pytest.mark.parametrize(("request_", "kind"), [
    (flavor(1, 512, cpu_policy="dedicated", pci_devices="8086:1572"), "pci_devices"),
    (flavor(2, 1024, cpu_policy="dedicated", cache_reservation="vcpus=0-1:type=both,size=6mb"),
     "cache"),
    (flavor(1, 2048, cpu_policy="dedicated"), "memory"),
    (flavor(1, 2048, cpu_policy="dedicated", mem_page_size="1GB"), "hugepages"),
    (flavor(5, 256, cpu_policy="mixed", cpu_dedicated_mask="0", numa_nodes=1),
     "shared_threads"),
], ids=["pci", "cache", "memory", "hugepages", "shared"])
def test_a_placement_taken_by_one_kind_of_resource_alone_is_not_free(
        request_: dict[str, Any], kind: str) -> None:
    """A claim, then the same placement on other free threads: only ``kind`` is taken."""
    tr = new_tracker()
    ask = claims.parse_claim_op({"request": request_}, default_ttl=60,
                                default_strategy="spread")
    first = claims.prepare_claim(tr.ctx, tr.fit_view(), ask, claim_id="claim-1", now=NOW,
                                 search_steps=5000)
    assert first.record is not None and first.contribution is not None
    assert check_judge(tr, first.contribution)
    tr.grant(first.record, first.contribution)
    again = repinned(dict(first.record.placement), tr.usage(), random.Random(0))
    ask = claims.parse_claim_op({"request": request_, "placement": again}, default_ttl=60,
                                default_strategy="spread")
    second = claims.prepare_claim(tr.ctx, tr.fit_view(), ask, claim_id="claim-2", now=NOW,
                                  search_steps=5000)
    assert second.contribution is not None
    assert not check_judge(tr, second.contribution)
    assert {r["resource"] for r in claims.judge(tr, second.contribution)} == {kind}
