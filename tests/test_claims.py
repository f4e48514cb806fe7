"""Claims, the pure parts (hostagent/claims.py): what a claim holds is counted in every
free amount of the usage, a fit on the snapshot never proposes it, a second claim can
never take it, release and expiry free exactly what was held, a guest booted from the
claim consumes it (a different pinning is a ``claim_mismatch``), the claims file, and
every bad field of a claim request refused with its name."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import pytest
from fit_hosts import flavor, make_topology

from hostagent import claims
from hostagent.claims import ClaimRecord, ClaimTracker
from hostagent.config import config_from_dict, resolve_resources
from hostagent.errors import RequestError
from hostagent.fit import fit
from hostagent.guests.source import record_from_xml
from hostagent.guests.xml import DomainXMLError, parse_domain
from hostagent.model import HostTopology, topology_to_dict
from hostagent.snapshot import assemble_snapshot
from hostagent.tracker import UsageTracker

PCI = [("0000:af:00.0", 0, "8086", "1572"), ("0000:af:00.1", 0, "8086", "1572"),
       ("0000:d8:00.0", 1, "8086", "1572")]
# 2 cells x 4 cores x 2 threads; cell 0: cores (0,8) (1,9) (2,10) (3,11) dedicated;
# cell 1: (4,12) (5,13) dedicated, (6,14) (7,15) shared; 11 L3 ways, the default group
# holding the lower 5
TOPO = make_topology(2, 4, 2, hugepages={2048: 512, 1048576: 2}, pci=PCI, resctrl_ways=11)
DEDICATED = "0-3,8-11,4-5,12-13"
PINNED_2M = flavor(2, 1024, cpu_policy="dedicated", mem_page_size="2MB")
NOW = 1_000_000.0


def new_tracker(topo: HostTopology = TOPO, dedicated: str = DEDICATED) -> ClaimTracker:
    res = resolve_resources(
        config_from_dict({"resources": {"dedicated_cpus": dedicated}}).resources, topo)
    return ClaimTracker(topo, res)


def snapshot(tr: UsageTracker) -> dict[str, Any]:
    return assemble_snapshot(topology_to_dict(tr.ctx.topo), tr.ctx.resources, tr.usage(),
                             host="h", epoch="e", seq=1, now=NOW)


def ask(request: dict[str, Any], **fields: Any) -> claims.ClaimAsk:
    return claims.parse_claim_op({"op": "claim", "request": request, **fields},
                                 default_ttl=60.0, default_strategy="spread")


def claim(tr: ClaimTracker, request: dict[str, Any], *, now: float = NOW, **fields: Any
          ) -> tuple[ClaimRecord | None, list[dict[str, Any]]]:
    """What the agent's desk does for one claim request, without the threads."""
    p = claims.prepare_claim(tr.ctx, snapshot(tr), ask(request, **fields),
                             claim_id=claims.new_claim_id(), now=now, search_steps=5000)
    if p.record is None:
        return None, p.answer["reasons"]
    assert p.contribution is not None
    reasons = claims.judge(tr, p.contribution)
    if reasons:
        return None, reasons
    tr.grant(p.record, p.contribution)
    return p.record, []


def domain_from(record: ClaimRecord, name: str, uuid: str, *, replace: tuple[str, str] = ("", "")
                ) -> str:
    """The domain a scheduler boots from the claim (running: with a domain id)."""
    xml = claims.claim_domain_xml(record, name=name)
    xml = xml.replace("<uuid>", "<uuid>X", 1)
    start = xml.index("<uuid>X") + len("<uuid>")
    end = xml.index("</uuid>")
    xml = xml[:start] + uuid + xml[end:]
    return xml.replace(*replace, 1) if replace[0] else xml


def claimed_threads(usage: dict[str, Any]) -> dict[int, str]:
    return {t["cpu"]: t["claim"] for t in usage["threads"] if t["claim"]}


# --------------------------------------------------------------------------- accounting


def test_a_claim_is_counted_in_every_free_amount_and_fit_never_proposes_it() -> None:
    tr = new_tracker()
    before = copy.deepcopy(tr.usage())
    record, reasons = claim(tr, PINNED_2M, claimant="sched-a")
    assert record is not None and reasons == []
    usage = tr.usage()
    held = record.placement["cells"][0]
    cell, cpus = held["host_cell"], sorted(held["pinning"].values())
    assert claimed_threads(usage) == {c: record.id for c in cpus}
    b, a = before["cells"][cell], usage["cells"][cell]
    assert a["free_pcpus"] == b["free_pcpus"] - 2
    assert not set(cpus) & set(a["free_cpus"])
    assert a["free_cores"] == b["free_cores"] - 1  # 2 vCPUs on the 2 threads of one core
    assert a["pinned_cpus"] == b["pinned_cpus"] == []  # pinned = guests'
    pages = {h["size_kib"]: h for h in a["hugepages"]}
    assert pages[2048]["used"] == 512 and pages[2048]["free"] == 0
    assert usage["conflicts"] == [] and usage["guests"] == []
    [entry] = usage["claims"]
    assert entry["id"] == record.id and entry["claimant"] == "sched-a"
    assert entry["dedicated_cpus"] == cpus and entry["expires"] == NOW + 60.0
    # a fit on the published snapshot goes elsewhere
    answer = fit(snapshot(tr), PINNED_2M)
    assert answer["fits"]
    assert answer["placement"]["cells"][0]["host_cell"] != cell


def fill_with_guests(request: dict[str, Any]) -> int:
    """How many guests of ``request`` fit one by one, each booted before the next fit."""
    tr = new_tracker()
    n = 0
    while True:
        answer = fit(snapshot(tr), request)
        if not answer["fits"]:
            return n
        x = answer["libvirt_xml"]
        parts = "".join(x[k] for k in ("vcpu", "cputune", "numatune", "cpu", "memoryBacking",
                                       "devices", "metadata") if k in x)
        uuid = f"00000000-0000-0000-0000-{n:012d}"
        xml = (f"<domain type='kvm' id='{n + 1}'><name>g{n}</name><uuid>{uuid}</uuid>"
               f"<memory unit='MiB'>{request['memory_mb']}</memory>{parts}</domain>")
        tr.update(record_from_xml(xml, uuid=uuid, name=f"g{n}"))
        assert tr.usage()["conflicts"] == []
        n += 1


@pytest.mark.parametrize("request_", [
    PINNED_2M,
    flavor(2, 512, cpu_policy="dedicated", cpu_thread_policy="isolate"),
    flavor(3, 1024, cpu_policy="mixed", cpu_dedicated_mask="^0", numa_nodes=1),
    flavor(2, 256),
    flavor(1, 1024, cpu_policy="dedicated", pci_devices="8086:1572"),
], ids=["pinned-2M", "isolate", "mixed", "floating", "pci"])
def test_claims_until_full_take_what_fits_one_by_one_and_never_overlap(
        request_: dict[str, Any]) -> None:
    tr = new_tracker()
    granted: list[ClaimRecord] = []
    while len(granted) < 200:
        record, reasons = claim(tr, request_)
        if record is None:
            assert reasons
            break
        granted.append(record)
    usage = tr.usage()
    assert usage["conflicts"] == []
    assert len(granted) == fill_with_guests(request_) > 0
    held: dict[int, str] = {}
    for entry in usage["claims"]:  # no thread, idle or not, in two claims
        for cpu in entry["dedicated_cpus"] + entry["idle_cpus"]:
            assert held.setdefault(cpu, entry["id"]) == entry["id"]
    pci = [a for e in usage["claims"] for a in e["pci"]]
    assert len(pci) == len(set(pci))


def test_release_and_expiry_free_exactly_what_was_held() -> None:
    tr = new_tracker()
    before = copy.deepcopy(tr.usage())
    short, _ = claim(tr, PINNED_2M, ttl_s=5.0)
    long_, _ = claim(tr, PINNED_2M, ttl_s=50.0)
    assert short is not None and long_ is not None
    assert tr.expire(NOW + 4.9) == []
    assert tr.next_expiry() == NOW + 5.0
    assert [r.id for r in tr.expire(NOW + 5.0)] == [short.id]
    assert [c["id"] for c in tr.usage()["claims"]] == [long_.id]
    assert tr.release(long_.id) == long_
    assert tr.release(long_.id) is None
    assert tr.usage() == before


def test_a_given_placement_is_granted_only_while_every_part_of_it_is_free() -> None:
    tr = new_tracker()
    planned = fit(snapshot(tr), PINNED_2M)["placement"]  # a scheduler's own fit
    first, reasons = claim(tr, PINNED_2M, placement=planned)
    assert first is not None and reasons == []
    again, reasons = claim(tr, PINNED_2M, placement=planned)
    assert again is None
    text = " | ".join(r["message"] for r in reasons)
    cpus = sorted(planned["cells"][0]["pinning"].values())
    cell = planned["cells"][0]["host_cell"]
    assert reasons == [  # names each taken thread and who holds it, and the pages
        *({"host_cell": cell, "guest_cell": None, "resource": "dedicated_threads",
           "message": f"dedicated CPU {cpu} is held by claim {first.id}"} for cpu in cpus),
        {"host_cell": cell, "guest_cell": None, "resource": "hugepages",
         "message": f"cell {cell}: needs 512 pages of 2048 KiB, 0 free"}], text
    assert len(tr.claim_records) == 1


def test_a_guest_on_a_claimed_thread_is_a_conflict_naming_the_claim() -> None:
    tr = new_tracker()
    record, _ = claim(tr, PINNED_2M)
    assert record is not None
    cpu = record.placement["cells"][0]["pinning"]["0"]
    uuid = "11111111-2222-3333-4444-555555555555"
    xml = (f"<domain type='kvm' id='7'><name>intruder</name><uuid>{uuid}</uuid>"
           f"<memory>1024</memory><vcpu>1</vcpu><cputune><vcpupin vcpu='0' "
           f"cpuset='{cpu}'/></cputune></domain>")
    tr.update(record_from_xml(xml, uuid=uuid, name="intruder"))
    usage = tr.usage()
    # and a claim of that thread now names the guest running there
    again, reasons = claim(tr, PINNED_2M, placement=record.placement)
    assert again is None
    assert reasons[0]["message"] == f"dedicated CPU {cpu} is held by guest intruder (vCPU 0)"
    [c] = [c for c in usage["conflicts"] if c["kind"] == "dedicated_overlap"]
    assert c["guests"] == [uuid] and c["claims"] == [record.id]
    thread = next(t for t in usage["threads"] if t["cpu"] == cpu)
    assert thread["guest"] == uuid and thread["claim"] == record.id


def test_claimed_pci_functions_and_cache_ways_are_taken() -> None:
    request = flavor(2, 1024, cpu_policy="dedicated", pci_devices="8086:1572",
                     cache_reservation="vcpus=0-1:type=both,size=2mb")
    tr = new_tracker()
    free_before = {(c["resource"], c["id"]): c["free_ways"] for c in tr.usage()["caches"]}
    first, reasons = claim(tr, request)
    assert first is not None, reasons
    usage = tr.usage()
    [dev] = first.placement["pci"]
    assert {"address": dev["address"], "guest": None, "claim": first.id} in usage["pci"]
    [way] = first.placement["cache"]
    cache = next(c for c in usage["caches"] if (c["resource"], c["id"]) ==
                 (way["resource"], way["id"]))
    assert cache["free_ways"] == free_before[(way["resource"], way["id"])] - way["ways"]
    alloc = [a for a in cache["allocations"] if a.get("claim") == first.id]
    assert alloc == [{"group": way["group"], "guest": None, "claim": first.id, "mode": "claim",
                      "mask": way["mask"], "ways": way["ways"], "bytes": way["bytes"]}]
    second, reasons = claim(tr, request)
    assert second is not None, reasons
    assert second.placement["pci"][0]["address"] != dev["address"]
    w2 = second.placement["cache"][0]
    if (w2["resource"], w2["id"]) == (way["resource"], way["id"]):
        assert int(w2["mask"], 16) & int(way["mask"], 16) == 0
    # the first claim's ways, given again, are refused as taken
    taken = copy.deepcopy(first.placement)
    taken["pci"] = []
    taken["cells"][0]["pinning"] = second.placement["cells"][0]["pinning"]
    taken["emulator_cpus"] = second.placement["emulator_cpus"]
    tr.release(second.id)
    again, reasons = claim(tr, flavor(2, 1024, cpu_policy="dedicated",
                                      cache_reservation="vcpus=0-1:type=both,size=2mb"),
                           placement=taken)
    assert again is None
    assert [r["resource"] for r in reasons] == ["cache"], reasons
    assert "are taken" in reasons[0]["message"]


# --------------------------------------------------------------------------- hand-off


def test_a_guest_booted_from_the_claim_consumes_it_and_holds_the_same() -> None:
    tr = new_tracker()
    record, _ = claim(tr, flavor(2, 512, cpu_policy="dedicated", cpu_thread_policy="isolate"))
    assert record is not None
    held = copy.deepcopy(tr.usage())
    events: list[claims.ClaimEvent] = []
    tr.on_event = events.append
    uuid = "aaaaaaaa-0000-0000-0000-000000000001"
    xml = domain_from(record, "vm1", uuid)
    assert parse_domain(xml).claim_id == record.id
    tr.update(record_from_xml(xml, uuid=uuid, name="vm1"))
    usage = tr.usage()
    assert usage["claims"] == [] and tr.claim_records == {}
    assert usage["conflicts"] == []
    assert [(e.kind, e.record.id, e.guest, e.mismatch) for e in events] == [
        ("consumed", record.id, uuid, None)]
    for a, b in zip(usage["cells"], held["cells"], strict=True):
        assert (a["free_cpus"], a["free_cores"], a["hugepages"], a["memory_used_kib"]) == (
            b["free_cpus"], b["free_cores"], b["hugepages"], b["memory_used_kib"])
    # later events about the same guest change nothing
    tr.update(record_from_xml(xml, uuid=uuid, name="vm1"))
    assert tr.usage()["conflicts"] == [] and len(events) == 1


def test_a_guest_booted_with_other_pins_is_a_claim_mismatch_naming_both() -> None:
    tr = new_tracker()
    record, _ = claim(tr, PINNED_2M)
    assert record is not None
    pins = record.placement["cells"][0]["pinning"]
    other = next(c for c in (0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 12, 13)
                 if c not in pins.values())
    uuid = "aaaaaaaa-0000-0000-0000-000000000002"
    xml = domain_from(record, "vm2", uuid,
                      replace=(f"vcpu=\"0\" cpuset=\"{pins['0']}\"",
                               f"vcpu=\"0\" cpuset=\"{other}\""))
    events: list[claims.ClaimEvent] = []
    tr.on_event = events.append
    tr.update(record_from_xml(xml, uuid=uuid, name="vm2"))
    usage = tr.usage()
    assert usage["claims"] == []  # consumed all the same: the guest holds what it holds
    [c] = usage["conflicts"]
    assert c["kind"] == "claim_mismatch"
    assert c["guests"] == [uuid] and c["claims"] == [record.id]
    assert f"vm2 was booted from {record.id}" in c["detail"]
    assert str(other) in c["detail"] and "dedicated threads" in c["detail"]
    assert events[0].kind == "consumed" and events[0].mismatch
    tr.update(record_from_xml(xml, uuid=uuid, name="vm2"))  # still reported
    assert [k["kind"] for k in tr.usage()["conflicts"]] == ["claim_mismatch"]
    tr.remove(uuid)
    assert tr.usage()["conflicts"] == [] and tr.consumed == {}


def test_a_reprobe_that_removes_a_claimed_cpu_drops_the_claim() -> None:
    tr = new_tracker()
    record, _ = claim(tr, PINNED_2M)
    assert record is not None
    events: list[claims.ClaimEvent] = []
    tr.on_event = events.append
    gone = set(record.placement["cells"][0]["pinning"].values())
    small = HostTopology(cells=TOPO.cells, cpus=tuple(c for c in TOPO.cpus if c.id not in gone),
                         caches=TOPO.caches, resctrl=TOPO.resctrl, pci=TOPO.pci)
    tr.set_host(small, tr.ctx.resources)
    assert tr.claim_records == {} and tr.usage()["claims"] == []
    assert [e.kind for e in events] == ["dropped"]
    assert "not CPUs of this host" in (events[0].why or "")


def test_claim_ids_in_domain_metadata() -> None:
    ns = "https://hostagent.dev/xmlns/fit/1"
    base = ("<domain><name>g</name><uuid>aaaaaaaa-0000-0000-0000-000000000009</uuid>"
            "<memory>1024</memory><vcpu>1</vcpu><metadata><h:fit xmlns:h='" + ns + "'>{}"
            "</h:fit></metadata></domain>")
    assert parse_domain(base.format("<h:claim id='claim-1'/>")).claim_id == "claim-1"
    assert parse_domain(base.format("")).claim_id is None
    with pytest.raises(DomainXMLError, match=r"claim\[1\]/@id: not a claim id"):
        parse_domain(base.format("<h:claim id='no spaces'/>"))
    with pytest.raises(DomainXMLError, match="several claim ids"):
        parse_domain(base.format("<h:claim id='a'/><h:claim id='b'/>"))
    with pytest.raises(DomainXMLError, match="missing attribute"):
        parse_domain(base.format("<h:claim/>"))


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(("fields", "message"), [
    ({"request": [1]}, "op claim: request=[1]: must be a map"),
    ({"request": PINNED_2M, "strategy": "best"}, "strategy='best': must be one of spread, pack"),
    ({"request": PINNED_2M, "strategy": 1}, "strategy=1: must be one of"),
    ({"request": PINNED_2M, "ttl_s": -1}, "ttl_s=-1: must be between 1 and 3600 seconds"),
    ({"request": PINNED_2M, "ttl_s": 0}, "ttl_s=0: must be between"),
    ({"request": PINNED_2M, "ttl_s": 10**30}, "must be between 1 and 3600"),
    ({"request": PINNED_2M, "ttl_s": float("nan")}, "ttl_s=nan: must be between"),
    ({"request": PINNED_2M, "ttl_s": float("inf")}, "ttl_s=inf: must be between"),
    ({"request": PINNED_2M, "ttl_s": True}, "ttl_s=True: must be a number of seconds"),
    ({"request": PINNED_2M, "ttl_s": "60"}, "ttl_s='60': must be a number of seconds"),
    ({"request": PINNED_2M, "claimant": 5}, "claimant=5: must be a string"),
    ({"request": PINNED_2M, "claimant": "x" * 129}, "at most 128 characters"),
    ({"request": PINNED_2M, "claimant": "a\nb"}, "must be printable text"),
    ({"request": PINNED_2M, "placement": "0-3"}, "placement='0-3': must be a map"),
    ({"request": PINNED_2M, "pin": 1}, "op claim: unknown fields ['pin']"),
])
def test_bad_claim_fields_are_refused_by_name(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(RequestError, match=message.replace("[", r"\[").replace("(", r"\(")
                       .replace(")", r"\)")):
        claims.parse_claim_op({"op": "claim", **fields}, default_ttl=60.0,
                              default_strategy="spread")


@pytest.mark.parametrize(("value", "message"), [
    (None, "id=None: must be a claim id"),
    (7, "id=7: must be a claim id"),
    ("", "id='': must be a claim id"),
    ("a" * 65, "must be a claim id"),
    ("../x", "must be a claim id"),
])
def test_bad_release_ids_are_refused(value: Any, message: str) -> None:
    with pytest.raises(RequestError, match=message):
        claims.parse_release_op({"op": "release", "id": value})
    with pytest.raises(RequestError, match=r"unknown fields \['x'\]"):
        claims.parse_release_op({"op": "release", "id": "claim-1", "x": 1})


def _planned() -> dict[str, Any]:
    return fit(snapshot(new_tracker()), PINNED_2M)["placement"]


def _set(path: str, value: Any) -> Any:
    def change(p: dict[str, Any]) -> None:
        keys = path.split("/")
        target: Any = p
        for k in keys[:-1]:
            target = target[int(k)] if isinstance(target, list) else target[k]
        last = keys[-1]
        if value is _DELETE:
            del target[last]
        elif isinstance(target, list):
            target[int(last)] = value
        else:
            target[last] = value
    return change


_DELETE = object()


@pytest.mark.parametrize(("change", "message"), [
    (_set("cells/0/pinning/0", 999), r"pinning\[0\]=\[999\]: CPU\(s\) 999 are not CPUs of "
                                     "this host"),
    (_set("cells/0/pinning/0", "2"), r"pinning\[0\]\[0\]='2': must be an integer"),
    (_set("cells/0/pinning/0", -1), "must be an integer 0..8191"),
    (_set("cells/0/pinning", [1, 2]), "pinning=.*must be a map"),
    (_set("cells/0/pinning/7", 3), "a key must be one of the cell's vCPUs"),
    (_set("cells/0/host_cell", 5), "host_cell=5: not a NUMA cell of this host"),
    (_set("cells/0/host_cell", True), "host_cell=True: must be an integer"),
    (_set("cells/0/page_size_kib", 16), "has no pool of 16 KiB pages"),
    (_set("cells/0/memory_mib", 0), "memory_mib=0: must be an integer 1.."),
    (_set("cells/0/memory_mib", 2048), "the cells' memory_mib add up to 2048, the request's "
                                       "memory_mb is 1024"),
    (_set("cells/0/vcpus", [0, 1, 2]), "every vCPU of the cell must be either pinned or"),
    (_set("cells/0/reserved_cpus", [70000]), "must be an integer 0..8191"),
    (_set("cells/0/shared_cpus", "0-3"), "must be a list of integers"),
    (_set("cells/0/extra", 1), r"unknown keys \(known: guest_cell"),
    (_set("cells", {}), "cells=.*must be a list"),
    (_set("cells", []), "a floating placement has no cells"),
    (_set("emulator_cpus", [4096]), "4096 are not CPUs of this host"),
    (_set("topology/cores", 3), "sockets x cores x threads must be 2"),
    (_set("topology", None), "topology=None: must be a map"),
    (_set("pci", [{"address": "0000:00:1f.6"}]), "address='0000:00:1f.6': not a PCI "
                                                  "function of this host"),
    (_set("pci", [7]), r"pci\[0\]=7: must be a map"),
    (_set("cache", [{"vcpus": [0], "group": "g", "resource": "L2", "level": 2, "id": 0,
                     "type": "both", "mask": "1", "ways": 1, "bytes": 1}]),
     "resource='L2': not a cache resource of this host"),
    (_set("cache", [{"vcpus": [0], "group": "g", "resource": "L3", "level": 3, "id": 0,
                     "type": "both", "mask": "fff", "ways": 12, "bytes": 1}]),
     "mask='fff': must be a hex mask of ways within 7ff"),
    (_set("cache", [{"vcpus": [0], "group": "g", "resource": "L3", "level": 3, "id": 9,
                     "type": "both", "mask": "1", "ways": 1, "bytes": 1}]),
     "id=9: not a L3 cache id of this host"),
    (_set("realtime_vcpus", [5]), "must be an integer 0..1"),
    (_set("floating", "no"), "floating='no': must be true or false"),
    (_set("surprise", 1), "unknown keys"),
    (_set("cells/0/guest_cell", _DELETE), "guest_cell=None: must be an integer"),
])
def test_bad_placements_are_refused_by_field(change: Any, message: str) -> None:
    tr = new_tracker()
    planned = _planned()
    change(planned)
    with pytest.raises(RequestError, match=message):
        claims.prepare_claim(tr.ctx, snapshot(tr), ask(PINNED_2M, placement=planned),
                             claim_id="claim-x", now=NOW, search_steps=5000)
    assert tr.claim_records == {}


def test_a_placement_for_another_vcpu_count_is_refused() -> None:
    tr = new_tracker()
    with pytest.raises(RequestError, match=r"the vCPUs placed must be 0..3 \(the request's "
                                           r"vcpus=4\); placed: 0-1"):
        claims.prepare_claim(tr.ctx, snapshot(tr), ask(flavor(4, 1024, cpu_policy="dedicated",
                                                              mem_page_size="2MB"),
                                                       placement=_planned()),
                             claim_id="claim-x", now=NOW, search_steps=5000)


# --------------------------------------------------------------------------- claims file


def test_the_claims_file_round_trips_and_restores_the_same_holdings(tmp_path: Path) -> None:
    tr = new_tracker()
    a, _ = claim(tr, PINNED_2M, claimant="a")
    b, _ = claim(tr, flavor(2, 512, cpu_policy="dedicated", cpu_thread_policy="isolate"),
                 ttl_s=3600)
    assert a is not None and b is not None
    path = claims.claims_path(tmp_path / "run")
    claims.save_claims(path, claims.render_claims(tr.claim_records.values()))
    assert oct(path.parent.stat().st_mode & 0o777) == "0o750"
    assert [p.name for p in path.parent.iterdir()] == ["claims.json"]  # no temporary left
    loaded = claims.load_claims(path, NOW + 100)  # a (ttl 60) has expired by then
    assert loaded.problems == () and loaded.expired == (a.id,)
    assert [r.id for r in loaded.records] == [b.id]
    fresh = new_tracker()
    fresh.restore(loaded.records[0])
    tr.release(a.id)
    assert fresh.usage() == tr.usage()


@pytest.mark.parametrize(("content", "problem"), [
    (b"{not json", "not a claims file: not JSON"),
    (b'{"version": 2, "claims": []}', "not a claims file: expected"),
    (b"[]", "not a claims file: expected"),
    (b"\xff\xfe", "not JSON"),
])
def test_a_corrupt_claims_file_is_reported_and_ignored(tmp_path: Path, content: bytes,
                                                       problem: str) -> None:
    path = tmp_path / "claims.json"
    path.write_bytes(content)
    loaded = claims.load_claims(path, NOW)
    assert loaded.records == ()
    [message] = loaded.problems
    assert message.startswith(f"{path}: ") and problem in message


def test_bad_records_are_skipped_and_the_others_kept(tmp_path: Path) -> None:
    tr = new_tracker()
    good, _ = claim(tr, PINNED_2M)
    assert good is not None
    docs = [json.loads(claims.record_json(good)), {"id": "x y"},
            {**json.loads(claims.record_json(good)), "id": "claim-2", "expires": "soon"}, 5]
    path = tmp_path / "claims.json"
    path.write_text(json.dumps({"version": 1, "claims": docs}))
    loaded = claims.load_claims(path, NOW)
    assert [r.id for r in loaded.records] == [good.id]
    assert [m.split(": ", 2)[1] for m in loaded.problems] == [
        "claims[1]", "claims[2]", "claims[3]"]
    assert "must be a claim id" in loaded.problems[0]
    assert "expires='soon': must be a number" in loaded.problems[1]


def test_claims_files_that_are_too_big_or_not_files_are_refused(tmp_path: Path) -> None:
    big = tmp_path / "big.json"
    with open(big, "wb") as fh:
        fh.truncate(claims.MAX_CLAIMS_FILE_BYTES + 1)
    assert "over the limit of" in claims.load_claims(big, NOW).problems[0]
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    assert claims.load_claims(fifo, NOW).problems == (f"{fifo}: not a regular file",)
    link = tmp_path / "link.json"
    link.symlink_to(big)
    assert "cannot read" in claims.load_claims(link, NOW).problems[0]
    assert claims.load_claims(tmp_path / "none.json", NOW) == claims.LoadedClaims(())


def test_a_restored_claim_whose_placement_is_gone_is_refused() -> None:
    tr = new_tracker()
    record, _ = claim(tr, PINNED_2M)
    assert record is not None
    other = new_tracker(make_topology(1, 2, 1, hugepages={2048: 512}), dedicated="0-1")
    with pytest.raises(RequestError, match="not CPUs of this host|not a NUMA cell"):
        other.restore(claims.record_from_doc(json.loads(claims.record_json(record))))
    assert other.claim_records == {}


def test_a_snapshot_with_claims_passes_the_subscribers_shape_check() -> None:
    from hostagent import wire

    tr = new_tracker()
    record, _ = claim(tr, PINNED_2M)
    assert record is not None
    snap = snapshot(tr)
    body = wire.make_body("snapshot", "h", "e", 1, 1.0, snap)
    wire.check_snapshot(snap, body)
    for bad, message in (("x", "data.usage.claims is a str, not a list"),
                         ([{"id": "c"}, 4], r"data.usage.claims\[1\] is a int, not a map")):
        broken = {**snap, "usage": {**snap["usage"], "claims": bad}}
        with pytest.raises(wire.WireError, match=message):
            wire.check_snapshot(broken, body)


@pytest.mark.parametrize(("value", "message"), [
    (0, "claims.default_ttl_seconds = 0: must be between 1 and 3600 seconds"),
    (3601, "claims.default_ttl_seconds = 3601: must be between 1 and 3600 seconds"),
    (float("nan"), "claims.default_ttl_seconds = nan: must be between"),
    ("60", "claims.default_ttl_seconds = '60': must be a number"),
    (True, "claims.default_ttl_seconds = True: must be a number"),
])
def test_bad_default_ttls_are_config_errors(value: Any, message: str) -> None:
    from hostagent.errors import ConfigError

    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        config_from_dict({"claims": {"default_ttl_seconds": value}}, "f.toml")
    with pytest.raises(ConfigError, match=r"curve.claimants_dir = 5: must be a string"):
        config_from_dict({"curve": {"claimants_dir": 5}}, "f.toml")
    cfg = config_from_dict({"claims": {"default_ttl_seconds": 30}})
    assert cfg.claims.default_ttl_seconds == 30.0 and cfg.curve.claimants_dir == ""


def test_claimed_hugepages_do_not_hide_pages_the_kernel_says_someone_else_uses() -> None:
    """The kernel's free counter does not know claims yet: ``hugepages_untracked`` is
    judged on the guests' pages alone, so a claim does not mask pages in use elsewhere."""
    from hostagent.model import replace

    cells = tuple(replace(c, hugepages=tuple(
        replace(p, free=p.total - 128) if p.size_kib == 2048 else p
        for p in c.hugepages)) for c in TOPO.cells)  # 128 pages per cell used elsewhere
    tr = new_tracker(replace(TOPO, cells=cells))
    before = [c for c in tr.usage()["conflicts"] if c["kind"] == "hugepages_untracked"]
    assert [(c["cell"], c["untracked"]) for c in before] == [(0, 128), (1, 128)]
    record, _ = claim(tr, PINNED_2M)  # 512 pages of one cell, more than the 128
    assert record is not None
    after = [c for c in tr.usage()["conflicts"] if c["kind"] == "hugepages_untracked"]
    assert after == before
