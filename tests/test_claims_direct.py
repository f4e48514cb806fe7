"""A claim's holdings built from its placement equal the XML round trip (issue 13).

``claims.claim_spec`` builds the guest a claim accounts straight from the normalised
placement; ``claims.parsed_claim_spec`` makes the claim's domain XML and parses it back,
as the tracker reads the guest booted from it. Over seeded random claims (fitted and
given placements, moved onto other free threads) on hosts with hugepages, PCI functions,
cache ways, and with shared, mixed, isolate, require, realtime, emulator and floating
guests, both give the same ``GuestSpec`` and so the same contribution.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any

import pytest
from fit_hosts import flavor, make_topology
from test_claims_overlay import repinned

from hostagent import claims
from hostagent.claims import ClaimTracker
from hostagent.config import config_from_dict, resolve_resources
from hostagent.errors import RequestError
from hostagent.guests.xml import GuestRecord
from hostagent.tracker import guest_contribution

PCI = [("0000:af:00.0", 0, "8086", "1572"), ("0000:af:00.1", 0, "8086", "1572"),
       ("0000:d8:00.0", 1, "8086", "1572"), ("0000:3b:02.3", 1, "15b3", "1018")]
HOSTS = {
    "2x4x2-cat": (make_topology(2, 4, 2, memory_mib=16384, hugepages={2048: 2048, 1048576: 4},
                                pci=PCI, resctrl_ways=11), "0-3,8-11,4-5,12-13"),
    "4x3x2-ccx": (make_topology(4, 3, 2, memory_mib=8192, hugepages={2048: 1024},
                                l3_per_cell=1, pci=PCI[:2], resctrl_ways=16),
                  "0-4,6-10,12-16,18-22"),
    "1x6x1": (make_topology(1, 6, 1, memory_mib=8192), "0-3"),
}
REQUESTS = [
    flavor(1, 256, cpu_policy="dedicated"),
    flavor(2, 1024, cpu_policy="dedicated", mem_page_size="2MB"),
    flavor(2, 512, cpu_policy="dedicated", cpu_thread_policy="isolate"),
    flavor(2, 512, cpu_policy="dedicated", cpu_thread_policy="require"),
    flavor(3, 1024, cpu_policy="mixed", cpu_dedicated_mask="^0", numa_nodes=1),
    flavor(3, 768, cpu_policy="dedicated", cpu_realtime="yes", cpu_realtime_mask="^0"),
    flavor(2, 256),
    flavor(3, 512, numa_nodes=1),
    flavor(4, 2048, numa_nodes=2),
    flavor(4, 2048, cpu_policy="dedicated", numa_nodes=2, numa_cpus_0="0", numa_cpus_1="1-3",
           numa_mem_0="512", numa_mem_1="1536"),
    flavor(1, 1024, cpu_policy="dedicated", mem_page_size="1GB"),
    flavor(1, 512, cpu_policy="dedicated", pci_devices="8086:1572"),
    flavor(2, 512, cpu_policy="dedicated", pci_devices="8086:1572,15b3:1018"),
    flavor(2, 1024, cpu_policy="dedicated", cache_reservation="vcpus=0-1:type=both,size=2mb"),
    flavor(2, 256, cpu_policy="dedicated", emulator_threads_policy="isolate"),
    flavor(2, 256, cpu_policy="dedicated", emulator_threads_policy="share"),
    flavor(4, 4096, cpu_policy="dedicated", numa_nodes=2, mem_page_size="large"),
]
SEEDS = range(4)
STEPS = 60


def new_tracker(name: str) -> ClaimTracker:
    topo, dedicated = HOSTS[name]
    res = resolve_resources(config_from_dict({"resources": {
        "dedicated_cpus": dedicated, "cpu_allocation_ratio": 4.0}}).resources, topo)
    return ClaimTracker(topo, res)


def check_direct(tr: ClaimTracker, record: claims.ClaimRecord) -> None:
    """The direct spec and contribution equal the XML round trip's."""
    direct = claims.claim_spec(record)
    parsed = claims.parsed_claim_spec(record)
    assert direct == parsed, (record.placement, record.libvirt_xml)
    assert claims.claim_contribution(tr.ctx, record) == _parsed_contribution(tr, record)


def _parsed_contribution(tr: ClaimTracker, record: claims.ClaimRecord) -> Any:
    """``claim_contribution`` as it was made before: through the XML round trip."""
    saved = claims.claim_spec
    claims.claim_spec = claims.parsed_claim_spec
    try:
        return claims.claim_contribution(tr.ctx, record)
    finally:
        claims.claim_spec = saved


@pytest.mark.parametrize("host", sorted(HOSTS))
@pytest.mark.parametrize("seed", SEEDS)
def test_the_direct_accounting_equals_the_round_trip(host: str, seed: int) -> None:
    rng = random.Random(seed)
    tr = new_tracker(host)
    fitted: list[tuple[dict[str, Any], dict[str, Any]]] = []
    seen: dict[str, int] = {"fitted": 0, "given": 0}
    shapes: set[str] = set()
    for n in range(STEPS):
        request = REQUESTS[n] if n < len(REQUESTS) else rng.choice(REQUESTS)  # each once
        if n < len(REQUESTS):  # each request once on the empty host
            for claim_id in sorted(tr.claim_records):
                tr.release(claim_id)
        elif tr.claim_records and rng.random() < 0.3:  # room for the next ones
            tr.release(rng.choice(sorted(tr.claim_records)))
        if n >= len(REQUESTS) and fitted and rng.random() < 0.35:  # given, moved
            request, placement = rng.choice(fitted)
            placement = repinned(placement, tr.usage(), rng)
            ask = claims.parse_claim_op({"request": request, "placement": placement},
                                        default_ttl=60, default_strategy="spread")
            kind = "given"
        else:
            ask = claims.parse_claim_op({"request": request,
                                         "strategy": rng.choice(("spread", "pack"))},
                                        default_ttl=60, default_strategy="spread")
            kind = "fitted"
        try:
            p = claims.prepare_claim(tr.ctx, tr.fit_view(), ask, claim_id=f"claim-{n}",
                                     now=1000.0 + n, search_steps=5000)
        except RequestError:
            continue  # a repinned placement check_placement refuses
        if p.record is None:
            continue
        check_direct(tr, p.record)
        seen[kind] += 1
        shapes.update(_shape(p.record.placement))
        if kind == "fitted":
            fitted.append((request, p.record.placement))
        if not claims.judge(tr, p.contribution):
            tr.grant(p.record, p.contribution)
    assert seen["fitted"] >= 10, seen
    if host == "2x4x2-cat":
        assert {"pci", "cache", "hugepages", "shared", "idle", "emulator", "realtime",
                "floating", "cells>1"} <= shapes, shapes


def _shape(p: dict[str, Any]) -> set[str]:
    cells = p["cells"]
    out = {"pci"} if p["pci"] else set()
    out |= {"cache"} if p["cache"] else set()
    out |= {"hugepages"} if any(c["page_size_kib"] != 4 for c in cells) else set()
    out |= {"shared"} if any(c["shared_vcpus"] for c in cells) else set()
    out |= {"idle"} if any(c["reserved_cpus"] for c in cells) else set()
    out |= {"emulator"} if p["emulator_cpus"] else set()
    out |= {"realtime"} if p["realtime_vcpus"] else set()
    out |= {"floating"} if p["floating"] else set()
    out |= {"cells>1"} if len(cells) > 1 else set()
    return out


def test_a_restored_and_a_consumed_claim_are_accounted_as_their_guest() -> None:
    """Through the tracker: a claim restored from its file record, and the guest booted
    from its XML, hold the same as the claim made directly (no ``claim_mismatch``)."""
    tr = new_tracker("2x4x2-cat")
    ask = claims.parse_claim_op({"request": REQUESTS[12]}, default_ttl=60,
                                default_strategy="spread")
    p = claims.prepare_claim(tr.ctx, tr.fit_view(), ask, claim_id="claim-r", now=1000.0,
                             search_steps=5000)
    assert p.record is not None and p.contribution is not None
    restored = new_tracker("2x4x2-cat")
    back = restored.restore(claims.record_from_doc(p.record.doc()))
    assert restored.claims["claim-r"] == p.contribution
    spec = claims.parsed_claim_spec(back)
    guest = guest_contribution(restored.ctx, GuestRecord("u-1", "g1", "running", True,
                                                         dataclasses.replace(spec)))
    assert claims.holdings_differ(p.contribution, guest) is None


def test_shared_vcpus_without_shared_threads_still_name_the_xml_error() -> None:
    """The one shape whose XML does not parse goes the round trip, and fails as before."""
    tr = new_tracker("1x6x1")
    ask = claims.parse_claim_op({"request": flavor(2, 256, numa_nodes=1)}, default_ttl=60,
                                default_strategy="spread")
    p = claims.prepare_claim(tr.ctx, tr.fit_view(), ask, claim_id="claim-s", now=1000.0,
                             search_steps=5000)
    assert p.record is not None
    cell = p.record.placement["cells"][0]
    assert cell["shared_vcpus"]
    bad = claims.rebuild_record(tr.ctx, dataclasses.replace(p.record, placement={
        **p.record.placement, "cells": [{**cell, "shared_cpus": []}]}))
    with pytest.raises(Exception) as direct:
        claims.claim_spec(bad)
    with pytest.raises(Exception) as parsed:
        claims.parsed_claim_spec(bad)
    assert str(direct.value) == str(parsed.value)


def test_a_fit_without_xml_is_the_same_answer_without_it() -> None:
    """``fit(..., libvirt_xml=False)``, as a claim fits: the same placement, no XML."""
    from hostagent.fit import fit

    tr = new_tracker("2x4x2-cat")
    for request in REQUESTS:
        full = fit(tr.fit_view(), request)
        bare = fit(tr.fit_view(), request, libvirt_xml=False)
        assert bare == {**full, "libvirt_xml": None}
