"""Claims: a scheduler reserves a placement at the host, decided one at a time (docs/claims.md).

A claim holds a guest's placement (threads, threads kept idle, memory and hugepages per
cell, shared vCPUs, PCI functions, cache ways) until the guest booted from it appears,
it is released, or it expires. Everything here is pure but the claims file functions;
``hostagent.agent.claim_desk`` serves the request ops on the agent's loop.

- ``parse_claim_op`` / ``parse_release_op``: the request fields, each bounded, every
  error a ``RequestError`` naming the field, the value and the limit.
- ``check_placement``: a placement (the ``placement`` of a fit answer) against the host:
  its shape, and that every CPU, cell, page size, PCI function and cache it names is the
  host's. The result is the normalised placement a claim keeps.
- ``claim_contribution``: what a claim holds, in the tracker's own terms: the guest
  the claim's libvirt XML describes (``claim_spec``, built from the placement; equal to
  the XML made and parsed back, ``parsed_claim_spec``) accounted exactly as the guest
  booted from it will be (``hostagent.tracker.guest_contribution``), so the snapshot's
  free counts subtract claims with no second accounting; the cache ways come from the
  placement (the resctrl group exists only once the guest runs).
- ``judge``: may this contribution be held now? Everything it holds is compared with
  what the tracker's usage of that moment (every guest and outstanding claim counted)
  has free: a thread that is not free, more pages or memory than a cell has free, a
  PCI function or cache way somebody holds, shared vCPUs over the overcommit limit, or a
  problem of its own (a thread that is not dedicated) refuses it, naming what is taken
  and who holds it. ``judge_quickly`` gives the same answer from the claims overlay
  (``hostagent.claim_overlay``: no fold of the usage) and asks ``judge`` only for the
  reasons of a refusal.
- ``ClaimTracker``: the daemon's ``UsageTracker`` with claims: grant, release, expire,
  and the hand-off: a guest record whose XML carries a claim id consumes that claim; a
  guest holding other threads, pages or devices than its claim gets a ``claim_mismatch``
  conflict naming both. ``fit_view`` / ``is_free``: what a decision reads, from the
  guests' fold (once per ``generation``) and the claims' sums.
- ``save_claims`` / ``load_claims``: the claims file (JSON, written atomically).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import secrets
import stat
import uuid as _uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hostagent.atomic_file import write_atomically
from hostagent.claim_limits import (
    MAX_CLAIM_RECORD_BYTES,
    MAX_CLAIMANT_CHARS,
    MAX_CLAIMS,
    MAX_CLAIMS_FILE_BYTES,
    MAX_TTL_SECONDS,
    MIN_TTL_SECONDS,
)
from hostagent.claim_overlay import ClaimSums, GuestBase, guest_base
from hostagent.cpulist import format_cpulist
from hostagent.errors import RequestError
from hostagent.fit.host import HostView
from hostagent.fit.request import FitRequest
from hostagent.fit_limits import MAX_GUEST_CELLS, MAX_MEMORY_MB, MAX_PAGE_SIZE_KIB, MAX_VCPUS
from hostagent.guests.xml import (
    CLAIM_ID_PATTERN,
    CpuTopology,
    GuestCell,
    GuestRecord,
    GuestSpec,
    HugePage,
    MemNode,
    NumaTune,
    VcpuSched,
    parse_cpuset,
    parse_domain,
)
from hostagent.model import HostTopology
from hostagent.resctrl_cbm import parse_mask, popcount, resource_cache_ids
from hostagent.tracker import Context, Contribution, UsageTracker, guest_contribution

#: The claims file under ``[agent] runtime_dir``.
CLAIMS_FILE_NAME = "claims.json"
CLAIMS_FILE_VERSION = 1

STRATEGIES = ("spread", "pack")
CLAIM_FIELDS = ("request", "strategy", "ttl_s", "claimant", "placement")
SMALL_PAGE_KIB = 4
_NAMESPACE = _uuid.UUID("5d0c1a3e-8f3b-4c55-9a43-2b1f7c6e0d11")  # claim id → domain uuid


def new_claim_id() -> str:
    """A fresh claim id: ``claim-`` and 96 random bits (unique across restarts)."""
    return "claim-" + secrets.token_hex(12)


def _shown(value: Any) -> str:
    from hostagent.fit.request import short_repr

    return short_repr(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# --------------------------------------------------------------------------- request ops


@dataclass(frozen=True)
class ClaimAsk:
    """A validated ``{op: "claim"}`` request."""

    request: Mapping[str, Any]
    strategy: str
    ttl_s: float
    claimant: str
    placement: Mapping[str, Any] | None  # None = the agent fits the request


def check_fields(op: str, req: Mapping[str, Any], known: Sequence[str]) -> None:
    """``RequestError`` naming the fields of request ``req`` that ``op`` does not know."""
    extra = set(req) - {"op", *known}
    if extra:
        names = sorted(k if isinstance(k, str) else repr(k) for k in extra)
        shown = [n if len(n) <= 64 else n[:48] + "…" for n in names[:8]]
        raise RequestError(f"op {op}: unknown fields {shown} (known: {', '.join(known)})")


def parse_ttl(value: Any, where: str = "ttl_s") -> float:
    """A TTL in seconds: a finite number within ``MIN_TTL_SECONDS``..``MAX_TTL_SECONDS``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RequestError(f"{where}={_shown(value)}: must be a number of seconds")
    if not math.isfinite(value) or not MIN_TTL_SECONDS <= value <= MAX_TTL_SECONDS:
        raise RequestError(f"{where}={_shown(value)}: must be between {MIN_TTL_SECONDS:g} and "
                           f"{MAX_TTL_SECONDS:g} seconds")
    return float(value)


def parse_claimant(value: Any) -> str:
    """Who claims (free text for people): printable, at most ``MAX_CLAIMANT_CHARS``."""
    if not isinstance(value, str):
        raise RequestError(f"op claim: claimant={_shown(value)}: must be a string")
    if len(value) > MAX_CLAIMANT_CHARS or not value.isprintable():
        raise RequestError(f"op claim: claimant={_shown(value)}: must be printable text of "
                           f"at most {MAX_CLAIMANT_CHARS} characters")
    return value


def parse_claim_op(req: Mapping[str, Any], *, default_ttl: float, default_strategy: str,
                   default_claimant: str = "") -> ClaimAsk:
    """The fields of ``{op: "claim", request, strategy?, ttl_s?, claimant?, placement?}``."""
    check_fields("claim", req, CLAIM_FIELDS)
    request = req.get("request")
    if not isinstance(request, dict):
        raise RequestError(f"op claim: request={_shown(request)}: must be a map (a fit "
                           "request)")
    strategy = req.get("strategy", default_strategy)
    if not isinstance(strategy, str) or strategy not in STRATEGIES:
        raise RequestError(f"op claim: strategy={_shown(strategy)}: must be one of "
                           f"{', '.join(STRATEGIES)}")
    ttl = parse_ttl(req.get("ttl_s", default_ttl), "op claim: ttl_s")
    claimant = parse_claimant(req.get("claimant", default_claimant))
    placement = req.get("placement")
    if placement is not None and not isinstance(placement, dict):
        raise RequestError(f"op claim: placement={_shown(placement)}: must be a map (the "
                           "placement of a fit answer)")
    return ClaimAsk(request, strategy, ttl, claimant, placement)


def parse_claim_id(value: Any, op: str = "release") -> str:
    if not isinstance(value, str) or not CLAIM_ID_PATTERN.fullmatch(value):
        raise RequestError(f"op {op}: id={_shown(value)}: must be a claim id (1-64 letters, "
                           "digits, '.', '_', '-')")
    return value


def parse_release_op(req: Mapping[str, Any]) -> str:
    """The claim id of ``{op: "release", id}``."""
    check_fields("release", req, ("id",))
    return parse_claim_id(req.get("id"))


# --------------------------------------------------------------------------- placements


_WHOLE = object()  # _PlacementCheck.fail: the rule is about the field as a whole


class _PlacementCheck:
    """Checks one placement against the host (``ctx``), field by field; ``result()`` is
    the normalised placement. Every problem is a ``RequestError`` naming the field."""

    def __init__(self, ctx: Context, raw: Mapping[str, Any]) -> None:
        self.ctx = ctx
        self.raw = raw
        self.vcpus: set[int] = set()

    def fail(self, where: str, value: Any, why: str) -> RequestError:
        """The error for field ``where`` (its value shown, unless ``value`` is ``_WHOLE``:
        a rule about several fields)."""
        shown = "" if value is _WHOLE else f"={_shown(value)}"
        return RequestError(f"placement.{where}{shown}: {why}")

    def integer(self, where: str, value: Any, low: int, high: int) -> int:
        if not _is_int(value) or not low <= value <= high:
            raise self.fail(where, value, f"must be an integer {low}..{high}")
        return int(value)

    def int_list(self, where: str, value: Any, high: int) -> list[int]:
        if not isinstance(value, list):
            raise self.fail(where, value, "must be a list of integers")
        out = [self.integer(f"{where}[{i}]", v, 0, high) for i, v in enumerate(value)]
        if len(set(out)) != len(out):
            raise self.fail(where, value, "lists an entry twice")
        return sorted(out)

    def cpus(self, where: str, value: Any) -> list[int]:
        """Host CPU ids that this host has (offline ones too: the tracker refuses those)."""
        out = self.int_list(where, value, MAX_VCPUS - 1)
        missing = [c for c in out if c not in self.ctx.known]
        if missing:
            raise self.fail(where, value, f"CPU(s) {format_cpulist(missing)} are not CPUs of "
                            "this host")
        return out

    def guest_vcpus(self, where: str, value: Any) -> list[int]:
        out = self.int_list(where, value, MAX_VCPUS - 1)
        again = self.vcpus.intersection(out)
        if again:
            raise self.fail(where, value, f"vCPU(s) {format_cpulist(again)} are placed twice")
        self.vcpus.update(out)
        return out

    def map_of(self, where: str, value: Any) -> Mapping[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(where, value, "must be a map")
        return value

    def cell(self, i: int, raw: Any) -> dict[str, Any]:
        w = f"cells[{i}]"
        c = self.map_of(w, raw)
        _known_keys(self, w, c, ("guest_cell", "host_cell", "vcpus", "pinning", "shared_vcpus",
                                 "shared_cpus", "memory_mib", "page_size_kib",
                                 "reserved_cpus"))
        host_cell = self.integer(f"{w}.host_cell", c.get("host_cell"), 0, 1 << 20)
        if host_cell not in self.ctx.cell_set:
            raise self.fail(f"{w}.host_cell", host_cell, "not a NUMA cell of this host")
        vcpus = self.guest_vcpus(f"{w}.vcpus", c.get("vcpus"))
        pins = self.pinning(f"{w}.pinning", c.get("pinning", {}), vcpus)
        shared = self.int_list(f"{w}.shared_vcpus", c.get("shared_vcpus", []), MAX_VCPUS - 1)
        if set(shared) | {int(v) for v in pins} != set(vcpus) or set(shared) & {
                int(v) for v in pins}:
            raise self.fail(w, _WHOLE, "every vCPU of the cell must be either pinned or shared")
        page = self.integer(f"{w}.page_size_kib", c.get("page_size_kib", SMALL_PAGE_KIB),
                            SMALL_PAGE_KIB, MAX_PAGE_SIZE_KIB)
        sizes = {s for (cell, s) in self.ctx.pools if cell == host_cell}
        if page != SMALL_PAGE_KIB and page not in sizes:
            raise self.fail(f"{w}.page_size_kib", page, f"host cell {host_cell} has no pool "
                            f"of {page} KiB pages")
        return {
            "guest_cell": self.integer(f"{w}.guest_cell", c.get("guest_cell"), 0,
                                       MAX_GUEST_CELLS - 1),
            "host_cell": host_cell,
            "vcpus": vcpus,
            "pinning": pins,
            "shared_vcpus": shared,
            "shared_cpus": self.cpus(f"{w}.shared_cpus", c.get("shared_cpus", [])),
            "memory_mib": self.integer(f"{w}.memory_mib", c.get("memory_mib"), 1,
                                       MAX_MEMORY_MB),
            "page_size_kib": page,
            "reserved_cpus": self.cpus(f"{w}.reserved_cpus", c.get("reserved_cpus", [])),
        }

    def pinning(self, where: str, value: Any, vcpus: list[int]) -> dict[str, int]:
        pins = self.map_of(where, value)
        out: dict[str, int] = {}
        for key, cpu in pins.items():
            if not isinstance(key, str) or not key.isdigit() or int(key) not in vcpus:
                raise self.fail(where, key, "a key must be one of the cell's vCPUs, as text")
            out[str(int(key))] = self.cpus(f"{where}[{key}]", [cpu])[0]
        return dict(sorted(out.items(), key=lambda kv: int(kv[0])))

    def cache(self, i: int, raw: Any, nvcpus: int) -> dict[str, Any]:
        w = f"cache[{i}]"
        e = self.map_of(w, raw)
        _known_keys(self, w, e, ("vcpus", "group", "resource", "level", "id", "type", "mask",
                                 "ways", "bytes"))
        rc = self.ctx.topo.resctrl
        name = e.get("resource")
        res = rc.resource(name) if rc is not None and isinstance(name, str) else None
        if res is None:
            known = ", ".join(r.name for r in rc.resources) if rc else "resctrl not mounted"
            raise self.fail(f"{w}.resource", name, f"not a cache resource of this host "
                            f"({known})")
        cid = self.integer(f"{w}.id", e.get("id"), 0, 1 << 20)
        if cid not in resource_cache_ids(self.ctx.topo, res):
            raise self.fail(f"{w}.id", cid, f"not a {res.name} cache id of this host")
        mask_text = e.get("mask")
        try:
            mask = parse_mask(mask_text) if isinstance(mask_text, str) else -1
        except ValueError:
            mask = -1
        full = parse_mask(res.cbm_mask)
        if mask <= 0 or mask & ~full:
            raise self.fail(f"{w}.mask", mask_text, f"must be a hex mask of ways within "
                            f"{res.cbm_mask}")
        vcpus = self.int_list(f"{w}.vcpus", e.get("vcpus"), nvcpus - 1)
        group = e.get("group")
        if not isinstance(group, str) or not CLAIM_ID_PATTERN.fullmatch(group):
            raise self.fail(f"{w}.group", group, "must be a group name (1-64 letters, digits, "
                            "'.', '_', '-')")
        ways = popcount(mask)
        return {"vcpus": vcpus, "group": group, "resource": res.name, "level": res.level,
                "id": cid, "type": res.type, "mask": mask_text.lower(), "ways": ways,
                "bytes": ways * res.granularity_bytes}

    def pci(self, i: int, raw: Any) -> dict[str, Any]:
        w = f"pci[{i}]"
        e = self.map_of(w, raw)
        addr = e.get("address")
        dev = next((p for p in self.ctx.topo.pci if p.address == addr), None)
        if dev is None:
            raise self.fail(f"{w}.address", addr, "not a PCI function of this host")
        return {"address": dev.address, "vendor": _hex4(dev.vendor),
                "device": _hex4(dev.device), "numa_node": dev.numa_node}

    def result(self, request_vcpus: int, request_memory_mib: int) -> dict[str, Any]:
        raw = self.raw
        _known_keys(self, "", raw, ("floating", "cells", "shared_vcpus", "emulator_cpus",
                                    "realtime_vcpus", "cache", "pci", "topology"))
        floating = raw.get("floating", False)
        if not isinstance(floating, bool):
            raise self.fail("floating", floating, "must be true or false")
        cells_raw = raw.get("cells", [])
        if not isinstance(cells_raw, list) or len(cells_raw) > MAX_GUEST_CELLS:
            raise self.fail("cells", cells_raw, f"must be a list of at most {MAX_GUEST_CELLS} "
                            "guest cells")
        if floating != (not cells_raw):
            raise self.fail("floating", floating, "a floating placement has no cells, and a "
                            "placement without cells is floating")
        cells = [self.cell(i, c) for i, c in enumerate(cells_raw)]
        if len({c["guest_cell"] for c in cells}) != len(cells):
            raise self.fail("cells", _WHOLE, "a guest cell is placed twice")
        top_shared = self.guest_vcpus("shared_vcpus", raw.get("shared_vcpus", []))
        if floating and not top_shared:
            raise self.fail("shared_vcpus", top_shared, "a floating placement lists its vCPUs")
        n = len(self.vcpus)
        if self.vcpus != set(range(n)) or n != request_vcpus:
            raise self.fail("cells", _WHOLE, f"the vCPUs placed must be 0..{request_vcpus - 1} "
                            f"(the request's vcpus={request_vcpus}); placed: "
                            f"{format_cpulist(self.vcpus) or 'none'}")
        memory = sum(c["memory_mib"] for c in cells)
        if cells and memory != request_memory_mib:
            raise self.fail("cells", _WHOLE, f"the cells' memory_mib add up to {memory}, the "
                            f"request's memory_mb is {request_memory_mib}")
        cache_raw = raw.get("cache") or []
        pci_raw = raw.get("pci") or []
        for key, value in (("cache", cache_raw), ("pci", pci_raw)):
            if not isinstance(value, list):
                raise self.fail(key, value, "must be a list")
        pci = [self.pci(i, d) for i, d in enumerate(pci_raw)]
        if len({d["address"] for d in pci}) != len(pci):
            raise self.fail("pci", _WHOLE, "a PCI function is listed twice")
        return {
            "floating": floating,
            "cells": cells,
            "shared_vcpus": top_shared,
            "emulator_cpus": self.cpus("emulator_cpus", raw.get("emulator_cpus", [])),
            "realtime_vcpus": self.int_list("realtime_vcpus", raw.get("realtime_vcpus", []),
                                            n - 1),
            "cache": [self.cache(i, e, n) for i, e in enumerate(cache_raw)],
            "pci": pci,
            "topology": self.topology(raw.get("topology"), n),
        }

    def topology(self, value: Any, n: int) -> dict[str, int]:
        t = self.map_of("topology", value)
        out = {k: self.integer(f"topology.{k}", t.get(k), 1, MAX_VCPUS)
               for k in ("sockets", "cores", "threads")}
        if out["sockets"] * out["cores"] * out["threads"] != n:
            raise self.fail("topology", t, f"sockets x cores x threads must be {n} (the vCPUs)")
        return out


def _known_keys(chk: _PlacementCheck, where: str, value: Mapping[str, Any],
                known: Sequence[str]) -> None:
    extra = [k for k in value if k not in known]
    if extra:
        shown = [k if isinstance(k, str) and len(k) <= 64 else _shown(k) for k in extra[:8]]
        raise chk.fail(where.rstrip(".") or "keys", shown, f"unknown keys (known: "
                       f"{', '.join(known)})")


def _hex4(text: str) -> str:
    t = str(text).strip().lower()
    t = t[2:] if t.startswith("0x") else t
    return t.rjust(4, "0")[-4:]


def check_placement(ctx: Context, placement: Mapping[str, Any], *, vcpus: int,
                    memory_mib: int) -> dict[str, Any]:
    """The normalised placement, checked against the host of ``ctx`` and the request's
    ``vcpus`` and ``memory_mib``; ``RequestError`` names the first field found wrong.

    Whether what it names is *free* is not checked here (``judge`` does that)."""
    return _PlacementCheck(ctx, placement).result(vcpus, memory_mib)


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class ClaimRecord:
    """One claim as granted: who, until when, for what request, the placement held and
    the libvirt XML fragments to boot it with (their metadata carries ``id``)."""

    id: str
    claimant: str
    created: float
    expires: float
    request: Mapping[str, Any]
    strategy: str
    placement: Mapping[str, Any]
    libvirt_xml: Mapping[str, str]
    memory_kib: int

    def doc(self) -> dict[str, Any]:
        """The claim as the ``claim`` and ``claims`` ops return it (and as it is saved)."""
        return {"id": self.id, "claimant": self.claimant, "created": self.created,
                "expires": self.expires, "request": self.request, "strategy": self.strategy,
                "placement": self.placement, "libvirt_xml": self.libvirt_xml}


def make_record(ctx: Context, ask: ClaimAsk, placement: Mapping[str, Any], *, claim_id: str,
                now: float, parsed: FitRequest | None = None) -> ClaimRecord:
    """A claim of ``placement`` (checked here: ``RequestError``) for ``ask`` (``parsed``:
    its request as ``parse_request`` read it, if already read)."""
    return _made(ctx, ask, placement, claim_id=claim_id, now=now, parsed=parsed)[0]


def _made(ctx: Context, ask: ClaimAsk, placement: Mapping[str, Any], *, claim_id: str,
          now: float, parsed: FitRequest | None) -> tuple[ClaimRecord, str]:
    """``make_record``, and the record's line in the claims file (``record_json``)."""
    record = rebuild_record(ctx, ClaimRecord(
        id=claim_id, claimant=ask.claimant, created=now, expires=now + ask.ttl_s,
        request=ask.request, strategy=ask.strategy, placement=placement, libvirt_xml={},
        memory_kib=0), parsed)
    text = record_json(record)
    if len(text) > MAX_CLAIM_RECORD_BYTES:
        raise RequestError(f"op claim: the claim would take {len(text)} bytes, over the "
                           f"limit of {MAX_CLAIM_RECORD_BYTES}")
    return record, text


def rebuild_record(ctx: Context, record: ClaimRecord,
                   parsed: FitRequest | None = None) -> ClaimRecord:
    """``record`` with its request parsed (unless ``parsed`` is given), its placement
    checked against the host of ``ctx`` and its XML made again from them
    (``RequestError`` if either is not valid)."""
    from hostagent.fit.libvirt_xml import fragments
    from hostagent.fit.request import parse_request

    req = parsed if parsed is not None else parse_request(record.request)
    norm = check_placement(ctx, record.placement, vcpus=req.vcpus, memory_mib=req.memory_mib)
    xml = fragments(vcpus=req.vcpus, placement=norm, realtime=norm["realtime_vcpus"],
                    floating_cpus=sorted(ctx.shared & ctx.online), claim_id=record.id)
    return dataclasses.replace(record, placement=norm, libvirt_xml=xml,
                               memory_kib=req.memory_mib * 1024)


def record_json(record: ClaimRecord) -> str:
    """The record as one line of JSON (``RequestError`` if its request is not JSON data)."""
    try:
        return json.dumps(record.doc(), separators=(",", ":"), allow_nan=False,
                          sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise RequestError(f"op claim: the request cannot be kept as JSON: {exc}") from None


_XML_ORDER = ("vcpu", "cputune", "numatune", "cpu", "memoryBacking", "devices", "metadata")


def claim_domain_xml(record: ClaimRecord, *, name: str | None = None,
                     domain_type: str = "kvm") -> str:
    """A whole (minimal) domain XML of the claim's fragments: what the tracker accounts
    for the claim, and a start for whoever boots it (``name`` defaults to the claim id)."""
    uid = _uuid.uuid5(_NAMESPACE, record.id)
    parts = "".join(record.libvirt_xml[k] for k in _XML_ORDER if k in record.libvirt_xml)
    return (f"<domain type='{domain_type}'><name>{name or record.id}</name><uuid>{uid}</uuid>"
            f"<memory unit='KiB'>{record.memory_kib}</memory>{parts}"
            "<os><type>hvm</type></os></domain>")


def parsed_claim_spec(record: ClaimRecord) -> GuestSpec:
    """The claim's domain (``claim_domain_xml``) made and parsed back, as the tracker
    reads the guest booted from it, without its cache tunes (the claim holds its ways
    from the placement): the oracle ``claim_spec`` is tested against."""
    return dataclasses.replace(parse_domain(claim_domain_xml(record)), cachetunes=())


_CPUSET_ATTR = re.compile(r'cpuset="([^"]*)"')


def claim_spec(record: ClaimRecord) -> GuestSpec:
    """``parsed_claim_spec(record)``, built from the placement directly (no XML made and
    parsed: the cost of a decision). ``record`` is one ``rebuild_record`` made: its
    placement normalised, its XML made from it. Equal to the round trip for every
    placement (tests/test_claims_direct.py); the one shape whose XML does not parse
    (shared vCPUs with no shared threads) takes the round trip, which names the error."""
    p = record.placement
    cells = p["cells"]
    if any(c["shared_vcpus"] and not c["shared_cpus"] for c in cells):
        return parsed_claim_spec(record)
    nvcpus = sum(len(c["vcpus"]) for c in cells) + len(p["shared_vcpus"])
    cpuset = None
    if p["floating"]:  # the floating threads the XML was made with
        m = _CPUSET_ATTR.search(record.libvirt_xml.get("vcpu", ""))
        cpuset = parse_cpuset(m.group(1)) if m else None
    pins: dict[int, tuple[int, ...]] = {}
    for c in cells:
        for v, cpu in c["pinning"].items():
            pins[int(v)] = (cpu,)
        shared = tuple(c["shared_cpus"])
        for v in c["shared_vcpus"]:
            pins[v] = shared
    numatune = None
    if cells:
        numatune = NumaTune("strict", tuple(sorted({c["host_cell"] for c in cells})), None,
                            tuple(MemNode(c["guest_cell"], "strict", (c["host_cell"],))
                                  for c in cells))
    by_size: dict[int, list[int]] = {}
    for c in cells:
        if c["page_size_kib"] != SMALL_PAGE_KIB:
            by_size.setdefault(c["page_size_kib"], []).append(c["guest_cell"])
    t = p["topology"]
    realtime = p["realtime_vcpus"]
    return GuestSpec(
        name=record.id, uuid=str(_uuid.uuid5(_NAMESPACE, record.id)), domain_id=None,
        vcpus=nvcpus, current_vcpus=nvcpus, vcpu_placement="static", cpuset=cpuset,
        vcpupin=pins, emulatorpin=tuple(p["emulator_cpus"]) or None, iothreads=0,
        iothreadpin={},
        vcpusched=(VcpuSched(tuple(realtime), "fifo", 1),) if realtime else (),
        cachetunes=(), memorytunes=(), numatune=numatune,
        topology=CpuTopology(t["sockets"], 1, 1, t["cores"], t["threads"]),
        cells=tuple(GuestCell(c["guest_cell"], tuple(c["vcpus"]), c["memory_mib"] * 1024)
                    for c in cells),
        memory_kib=record.memory_kib, current_memory_kib=record.memory_kib,
        hugepages=bool(by_size),
        pages=tuple(HugePage(size, tuple(sorted(set(by_size[size]))))
                    for size in sorted(by_size)),
        hostdevs=tuple(_pci_text(d["address"]) for d in p["pci"]),
        idle_cpus=tuple(sorted({cpu for c in cells for cpu in c["reserved_cpus"]})),
        claim_id=record.id,
    )


def _pci_text(address: str) -> str:
    """A PCI address as the domain XML parser gives back the one ``fragments`` wrote."""
    dom, bus, rest = address.split(":")
    slot, func = rest.split(".")
    parts = [format(int(f"0x{x}", 0), f"0{w}x")
             for x, w in ((dom, 4), (bus, 2), (slot, 2), (func, 1))]
    return f"{parts[0]}:{parts[1]}:{parts[2]}.{parts[3]}"


def claim_contribution(ctx: Context, record: ClaimRecord) -> Contribution:
    """What the claim holds, accounted as the guest booted from its XML will be
    (``claim_spec``); its ``entry`` is the ``usage.claims`` item and ``cache_ways`` the
    placement's ways."""
    spec = claim_spec(record)
    c = guest_contribution(ctx, GuestRecord(record.id, f"claim {record.id}", "claimed", True,
                                            spec))
    assert c.entry is not None
    cache = record.placement.get("cache") or []
    ways = tuple((e["resource"], e["id"], parse_mask(e["mask"]), e["group"]) for e in cache)
    entry = {"id": record.id, "claimant": record.claimant, "created": record.created,
             "expires": record.expires}
    entry.update((k, v) for k, v in c.entry.items() if k in _ENTRY_KEYS)
    entry["cache"] = [{k: e[k] for k in ("vcpus", "resource", "id", "mask", "ways", "group")}
                      for e in cache]
    return dataclasses.replace(c, entry=entry, cache_ways=ways)


_ENTRY_KEYS = ("vcpus", "memory_kib", "page_size_kib", "cells", "pinning", "emulator_cpus",
               "dedicated_cpus", "idle_cpus", "pci", "shared_vcpus", "floating_vcpus")


# --------------------------------------------------------------------------- decisions


@dataclass(frozen=True)
class Prepared:
    """A claim made ready to be judged: its record and contribution, or, when the
    request does not fit, the fit's answer (``record`` None)."""

    record: ClaimRecord | None
    contribution: Contribution | None
    answer: Mapping[str, Any] | None = None
    text: str | None = None  # the record's line in the claims file


def prepare_claim(ctx: Context, snapshot: Mapping[str, Any] | HostView, ask: ClaimAsk, *,
                  claim_id: str, now: float, search_steps: int,
                  parsed: FitRequest | None = None) -> Prepared:
    """Fit ``ask`` on ``snapshot`` (a snapshot, or the fit's view of one:
    ``ClaimTracker.fit_view``) unless it names its placement, and make the claim of the
    placement on the host of ``ctx`` (``parsed``: ``ask.request`` as ``parse_request``
    read it, if already read). Pure (a worker thread may run it); ``RequestError`` for
    an invalid request or placement."""
    from hostagent.fit.request import parse_request

    req = parsed if parsed is not None else parse_request(ask.request)
    placement = ask.placement
    answer = None
    if placement is None:
        from hostagent.fit import fit

        answer = fit(snapshot, req, strategy=ask.strategy, search_steps=search_steps,
                     libvirt_xml=False)
        if not answer["fits"]:
            return Prepared(None, None, answer)
        placement = answer["placement"]
    record, text = _made(ctx, ask, placement, claim_id=claim_id, now=now, parsed=req)
    return Prepared(record, claim_contribution(ctx, record), answer, text)


def judge_quickly(tracker: ClaimTracker, c: Contribution) -> list[dict[str, Any]]:
    """``judge``, answered from the claims overlay when ``c`` is free (no fold of the
    usage: ``hostagent.claim_overlay``); when it is not, ``judge`` names the reasons."""
    return [] if tracker.is_free(c) else judge(tracker, c)


def _reason(resource: str, message: str, cell: int | None = None) -> dict[str, Any]:
    return {"host_cell": cell, "guest_cell": None, "resource": resource, "message": message}


def judge(tracker: UsageTracker, c: Contribution) -> list[dict[str, Any]]:
    """Why ``c`` may not be held now (empty: it may): what it takes that is not free in
    the tracker's usage of this moment (every guest and outstanding claim counted), or a
    problem it has on its own (a thread that is not dedicated or not online, a page size
    the cell has no pool of, ...). Each reason names what is taken and who holds it.
    ``ClaimTracker.grant`` holds it."""
    usage = tracker.usage()
    free = _free_view(usage)
    reasons = [_reason(k["kind"], k["detail"].replace(c.name, "this claim"), k.get("cell"))
               for k in c.conflicts]
    reasons += _threads_taken(free, c)
    reasons += _memory_taken(free, c)
    reasons += _capacity(tracker.ctx, usage, c)
    reasons += [_reason("pci_devices", f"PCI function {a} is held by {free.who(free.pci[a])}")
                for a in c.pci if a in free.pci]
    reasons += _cache_taken(free, c)
    return reasons


@dataclass(frozen=True)
class _Free:
    """One usage read once for ``judge``: free threads, thread entries by CPU, cells by
    id, held PCI functions, free cache ways, and guest names."""

    threads: frozenset[int]  # free dedicated threads (usage.cells[].free_cpus)
    entries: Mapping[int, Mapping[str, Any]]  # CPU → its usage.threads entry
    cells: Mapping[int, Mapping[str, Any]]
    pci: Mapping[str, tuple[str | None, str | None]]  # address → (guest, claim)
    ways: Mapping[tuple[str, int], tuple[int, str]]  # (resource, id) → (free mask, cbm)
    names: Mapping[str, str]  # guest uuid → name

    def who(self, holder: tuple[str | None, str | None]) -> str:
        guest, claim = holder
        return f"guest {self.names.get(guest, guest)}" if guest else f"claim {claim}"

    def thread_holder(self, cpu: int) -> str:
        t = self.entries.get(cpu)
        if t is None:
            return "nobody: it is not a CPU of this host"
        if t["guest"]:
            what = (f"vCPU {t['vcpu']}" if t["vcpu"] is not None else "emulator"
                    if t["emulator"] else f"iothread {t['iothread']}")
            return f"held by guest {self.names.get(t['guest'], t['guest'])} ({what})"
        if t.get("claim"):
            return f"held by claim {t['claim']}"
        if t["held_by"]:
            return f"kept idle by guest {self.names.get(t['held_by'], t['held_by'])}"
        if t["shared_guests"]:
            return "where shared vCPUs of " + ", ".join(
                self.names.get(u, u) for u in t["shared_guests"][:4]) + " run"
        return f"not a free dedicated thread (role {t['role']})"


def _free_view(usage: Mapping[str, Any]) -> _Free:
    """``usage`` read for ``judge``."""
    return _Free(
        threads=frozenset(t for cell in usage["cells"] for t in cell["free_cpus"]),
        entries={t["cpu"]: t for t in usage["threads"]},
        cells={cell["id"]: cell for cell in usage["cells"]},
        pci={p["address"]: (p["guest"], p.get("claim")) for p in usage["pci"]
             if p["guest"] or p.get("claim")},
        ways={(e["resource"], e["id"]): (parse_mask(e["free_mask"]), e["cbm_mask"])
              for e in usage["caches"]},
        names={g["uuid"]: g["name"] for g in usage["guests"]},
    )


def _threads_taken(free: _Free, c: Contribution) -> list[dict[str, Any]]:
    """Threads the claim runs on or keeps idle that are not free."""
    out = []
    for cpu in sorted({cl.cpu for cl in c.claims} | set(c.idle)):
        if cpu not in free.threads:
            cell = free.entries.get(cpu, {}).get("cell")
            out.append(_reason("dedicated_threads", f"dedicated CPU {cpu} is "
                               f"{free.thread_holder(cpu)}", cell))
    return out


def _memory_taken(free: _Free, c: Contribution) -> list[dict[str, Any]]:
    """Hugepages and ordinary memory beyond what each cell has free."""
    out = []
    for cid, size, n in c.pages:
        pools = {h["size_kib"]: h for h in free.cells[cid]["hugepages"]} if cid in \
            free.cells else {}
        have = pools[size]["free"] if size in pools else 0
        if n > have:
            out.append(_reason("hugepages", f"cell {cid}: needs {n} pages of {size} KiB, "
                               f"{have} free", cid))
    for cid, kib in c.memory:
        have = free.cells[cid]["memory_free_kib"] if cid in free.cells else 0
        if kib > have:
            out.append(_reason("memory", f"cell {cid}: needs {kib} KiB of ordinary memory, "
                               f"{have} KiB free", cid))
    if c.floating_pages:
        out.append(_reason("hugepages", "hugepages bound to no one cell cannot be claimed"))
    return out


def _capacity(ctx: Context, usage: Mapping[str, Any], c: Contribution) -> list[dict[str, Any]]:
    """Shared vCPUs over a cell's (or the host's) overcommit limit, floating memory over
    the host's: the limits a fit respects that are not conflicts."""
    out = []
    cells = {cell["id"]: cell for cell in usage["cells"]}
    for cid, n in c.shared_vcpus:
        cell = cells.get(cid)
        if cell is not None and cell["shared_vcpus"] + n > cell["shared_vcpus_limit"]:
            out.append(_reason("shared_threads", f"cell {cid}: {n} shared vCPUs, "
                               f"{max(0, cell['shared_vcpus_limit'] - cell['shared_vcpus'])} "
                               f"left of {cell['shared_vcpus_limit']}", cid))
    if c.floating_vcpus:
        cap = int(len(ctx.shared & ctx.online) * ctx.cpu_ratio)
        used = sum(cell["shared_vcpus"] for cell in usage["cells"]) + usage["floating_vcpus"]
        if used + c.floating_vcpus > cap:
            out.append(_reason("shared_threads", f"{c.floating_vcpus} floating vCPUs, "
                               f"{max(0, cap - used)} left of the host's {cap}"))
    if c.floating_memory_kib:
        cap = sum(cell["memory_limit_kib"] for cell in usage["cells"])
        used = sum(cell["memory_used_kib"] for cell in usage["cells"]) + usage[
            "floating_memory_kib"]
        if used + c.floating_memory_kib > cap:
            out.append(_reason("memory", f"{c.floating_memory_kib} KiB of floating memory, "
                               f"{max(0, cap - used)} KiB left of the host's {cap} KiB"))
    return out


def _cache_taken(free: _Free, c: Contribution) -> list[dict[str, Any]]:
    """Ways of ``c`` that are not free (a group's or another claim's)."""
    out = []
    for res, cid, mask, _group in c.cache_ways:
        have, full = free.ways.get((res, cid), (0, ""))
        if mask & ~have:
            width = len(full) or 1
            out.append(_reason("cache", f"{res} cache {cid}: ways {mask & ~have:0{width}x} "
                               f"are taken (free: {have:0{width}x})"))
    return out


# --------------------------------------------------------------------------- the tracker


@dataclass(frozen=True)
class ClaimEvent:
    """Something that happened to a claim outside a request: ``consumed`` (a guest
    booted from it appeared; ``mismatch`` says how it differs), ``dropped`` (its
    placement is no longer valid on the re-probed host; ``why``)."""

    kind: str
    record: ClaimRecord
    guest: str | None = None
    mismatch: str | None = None
    why: str | None = None


class ClaimTracker(UsageTracker):
    """A ``UsageTracker`` that also holds the agent's claims (``records`` by id; their
    contributions in ``claims``) and hands a claim over to the guest booted from it.

    ``on_event(ClaimEvent)`` (set by the daemon) is told of every consumed or dropped
    claim, as the record that consumes it arrives (``update``, ``replace_all``,
    ``set_host``)."""

    def __init__(self, topo: HostTopology, resources: Mapping[str, Any]) -> None:
        self.sums = ClaimSums()  # what the claims hold, added up (claim_overlay)
        self._base: GuestBase | None = None  # the guests alone, per generation
        self._topology_doc: tuple[Context, dict[str, Any]] | None = None
        self.claim_records: dict[str, ClaimRecord] = {}
        # guest uuid → (the claim it was booted from, the context and that claim's
        # contribution on it)
        self.consumed: dict[str, tuple[ClaimRecord, Context, Contribution | None]] = {}
        self.on_event: Callable[[ClaimEvent], None] = lambda event: None
        super().__init__(topo, resources)

    # ---- the overlay: what a decision reads (hostagent.claim_overlay)

    def put_claim(self, contribution: Contribution) -> None:
        old = self.claims.get(contribution.uuid)
        if old is not None:
            self.sums.remove(old)
        super().put_claim(contribution)
        self.sums.add(contribution)

    def drop_claim(self, claim_id: str) -> bool:
        old = self.claims.get(claim_id)
        if old is not None:
            self.sums.remove(old)
        return super().drop_claim(claim_id)

    def guest_base(self) -> GuestBase:
        """The guests alone, folded once per ``generation`` (host or guest change)."""
        base = self._base
        if base is None or base.generation != self.generation or base.ctx is not self.ctx:
            from hostagent.model import topology_to_dict

            if self._topology_doc is None or self._topology_doc[0] is not self.ctx:
                self._topology_doc = (self.ctx, topology_to_dict(self.ctx.topo))
            base = self._base = guest_base(self.ctx, self.generation,
                                           self.contributions.values(),
                                           self._topology_doc[1])
        return base

    def fit_view(self) -> HostView:
        """The fit's view of this moment (guests and claims): exactly ``host_view`` of a
        snapshot of ``usage()``, without folding it."""
        return self.sums.fit_view(self.guest_base(), self.claims.values())

    def is_free(self, c: Contribution) -> bool:
        """Whether ``judge`` finds nothing against holding ``c`` now, without folding."""
        return self.sums.is_free(self.guest_base(), self.claims.values(), c)

    # ---- claims

    def grant(self, record: ClaimRecord, c: Contribution) -> None:
        """Hold ``record`` (``c`` its contribution; ``judge`` found it free)."""
        self.claim_records[record.id] = record
        self.put_claim(c)

    def restore(self, record: ClaimRecord) -> ClaimRecord:
        """Hold a claim read back from the claims file; returns it as held (its placement
        checked and its XML made again on this host). ``RequestError`` if the placement
        is not valid on this host any more; overlaps show as conflicts."""
        record = rebuild_record(self.ctx, record)
        self.claim_records[record.id] = record
        self.put_claim(claim_contribution(self.ctx, record))
        return record

    def release(self, claim_id: str) -> ClaimRecord | None:
        record = self.claim_records.pop(claim_id, None)
        if record is not None:
            self.drop_claim(claim_id)
        return record

    def expire(self, now: float) -> list[ClaimRecord]:
        """Release every claim whose ``expires`` is not after ``now``; those claims."""
        gone = [r for r in self.claim_records.values() if r.expires <= now]
        for r in gone:
            self.release(r.id)
        return gone

    def next_expiry(self) -> float | None:
        return min((r.expires for r in self.claim_records.values()), default=None)

    # ---- the host and guests

    def set_host(self, topo: HostTopology, resources: Mapping[str, Any]) -> None:
        super().set_host(topo, resources)  # guests: recomputed through _contribute
        for record in list(self.claim_records.values()):
            try:  # accounted as made again on this host (its cpusets may have changed)
                self.put_claim(claim_contribution(self.ctx, rebuild_record(self.ctx, record)))
            except RequestError as exc:
                self.release(record.id)
                self.on_event(ClaimEvent("dropped", record, why=str(exc)))

    def remove(self, uuid: str) -> None:
        self.consumed.pop(uuid, None)
        super().remove(uuid)

    def replace_all(self, records: Iterable[GuestRecord]) -> None:
        records = list(records)
        present = {r.uuid for r in records}
        for uuid in [u for u in self.consumed if u not in present]:
            del self.consumed[uuid]
        super().replace_all(records)

    def _contribute(self, record: GuestRecord) -> Contribution:
        c = guest_contribution(self.ctx, record)
        claim_id = record.spec.claim_id if record.spec is not None else None
        if c.entry is None or claim_id is None:
            self.consumed.pop(record.uuid, None)
            return c
        fresh = self.claim_records.pop(claim_id, None)
        if fresh is not None:  # the guest booted from an outstanding claim: consumed
            held = self.claims.get(claim_id)
            self.drop_claim(claim_id)
            self.consumed[record.uuid] = (fresh, self.ctx, held)
        held = self.consumed.get(record.uuid)
        if held is None or held[0].id != claim_id:
            return c  # a claim id this agent does not hold (expired, released, another's)
        claim, ctx, claim_c = held
        if claim_c is None or ctx is not self.ctx:  # made on another host view: again
            try:
                claim_c = claim_contribution(self.ctx, rebuild_record(self.ctx, claim))
            except RequestError:
                claim_c = None
            self.consumed[record.uuid] = (claim, self.ctx, claim_c)
        diff = "its claim is not valid on this host any more" if claim_c is None else \
            holdings_differ(claim_c, c)
        if fresh is not None:
            self.on_event(ClaimEvent("consumed", claim, guest=record.uuid, mismatch=diff))
        if diff is None:
            return c
        conflict = {"kind": "claim_mismatch",
                    "detail": f"{record.name} was booted from {claim.id} but {diff}",
                    "guests": [record.uuid], "claims": [claim.id]}
        return dataclasses.replace(c, conflicts=(*c.conflicts, conflict))


def _holdings(c: Contribution) -> dict[str, Any]:
    return {
        "dedicated threads": sorted((cl.cpu, cl.vcpu, cl.emulator, cl.iothread)
                                    for cl in c.claims),
        "threads kept idle": sorted(c.idle),
        "memory per cell": c.memory,
        "hugepages per cell": c.pages,
        "shared vCPUs per cell": c.shared_vcpus,
        "floating vCPUs": c.floating_vcpus,
        "floating memory": c.floating_memory_kib,
        "PCI functions": sorted(c.pci),
    }


def _holding_text(key: str, value: Any) -> str:
    if not value:
        return "none"
    if key == "dedicated threads":
        return format_cpulist({cpu for cpu, *_ in value}) + " (" + ", ".join(
            f"{cpu}:{'vCPU ' + str(v) if v is not None else 'emulator' if e else 'iothread'}"
            for cpu, v, e, _ in value) + ")"
    if key == "threads kept idle":
        return format_cpulist(value)
    if key == "memory per cell":
        return ", ".join(f"cell {cell}: {kib} KiB" for cell, kib in value)
    if key == "hugepages per cell":
        return ", ".join(f"cell {cell}: {n} x {size} KiB" for cell, size, n in value)
    if key == "shared vCPUs per cell":
        return ", ".join(f"cell {cell}: {n}" for cell, n in value)
    if key == "PCI functions":
        return ", ".join(value)
    return str(value)


def holdings_differ(claim: Contribution, guest: Contribution) -> str | None:
    """How what ``guest`` holds differs from ``claim`` (None = the same): threads (with
    their vCPUs), threads kept idle, memory and hugepages per cell, shared and floating
    vCPUs and memory, PCI functions."""
    a, b = _holdings(claim), _holdings(guest)
    diffs = [f"holds {key} {_holding_text(key, b[key])} where the claim held "
             f"{_holding_text(key, a[key])}" for key in a if a[key] != b[key]]
    return "; ".join(diffs) if diffs else None


# --------------------------------------------------------------------------- claims file


def claims_path(runtime_dir: str | os.PathLike[str]) -> Path:
    return Path(runtime_dir) / CLAIMS_FILE_NAME


def render_claims(records: Iterable[ClaimRecord],
                  texts: Callable[[ClaimRecord], str] = record_json) -> str:
    """The claims file's text: ``{"version": 1, "claims": [record, ...]}``, one record per
    line."""
    body = ",\n".join(texts(r) for r in records)
    return f'{{"version": {CLAIMS_FILE_VERSION}, "claims": [\n{body}\n]}}\n'


def save_claims(path: str | os.PathLike[str], text: str) -> None:
    """Write the claims file atomically (``atomic_file.write_atomically``: a temporary
    file in the same directory, fsync, rename over ``path``, fsync of the directory).
    ``OSError`` if it cannot."""
    write_atomically(path, text)


@dataclass(frozen=True)
class LoadedClaims:
    """What ``load_claims`` read: the live records, and one message per problem (a bad
    file, a bad record skipped) and per expired claim dropped."""

    records: tuple[ClaimRecord, ...]
    problems: tuple[str, ...] = ()
    expired: tuple[str, ...] = ()


def load_claims(path: str | os.PathLike[str], now: float) -> LoadedClaims:
    """Read the claims file. A missing file is no claims. A file that is not a regular
    file, is over ``MAX_CLAIMS_FILE_BYTES``, is not JSON or not shaped like a claims
    file is reported (in ``problems``) and yields no claims; a bad record is reported
    and skipped; an expired one is dropped. Never raises for what the file holds."""
    p = Path(path)
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    except FileNotFoundError:
        return LoadedClaims(())
    except OSError as exc:
        return LoadedClaims((), (f"{p}: cannot read: {exc.strerror}",))
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            return LoadedClaims((), (f"{p}: not a regular file",))
        data = fh.read(MAX_CLAIMS_FILE_BYTES + 1)
    if len(data) > MAX_CLAIMS_FILE_BYTES:
        return LoadedClaims((), (f"{p}: over the limit of {MAX_CLAIMS_FILE_BYTES} bytes",))
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        return LoadedClaims((), (f"{p}: not a claims file: not JSON ({exc})",))
    if (not isinstance(doc, dict) or doc.get("version") != CLAIMS_FILE_VERSION
            or not isinstance(doc.get("claims"), list)):
        return LoadedClaims((), (f"{p}: not a claims file: expected "
                                 f'{{"version": {CLAIMS_FILE_VERSION}, "claims": [...]}}',))
    records, problems, expired = [], [], []
    for i, item in enumerate(doc["claims"][:MAX_CLAIMS]):
        try:
            record = record_from_doc(item)
        except RequestError as exc:
            problems.append(f"{p}: claims[{i}]: {exc}; skipped")
            continue
        if record.expires <= now:
            expired.append(record.id)
        else:
            records.append(record)
    if len(doc["claims"]) > MAX_CLAIMS:
        problems.append(f"{p}: {len(doc['claims'])} claims, over the limit of {MAX_CLAIMS}; "
                        "the rest skipped")
    return LoadedClaims(tuple(records), tuple(problems), tuple(expired))


def record_from_doc(item: Any) -> ClaimRecord:
    """A record as saved (``ClaimRecord.doc``); ``RequestError`` names what is wrong. The
    request and placement are checked against the host, and the XML made again from
    them, when it is held again (``ClaimTracker.restore``)."""
    if not isinstance(item, dict):
        raise RequestError("not a map")
    claim_id = parse_claim_id(item.get("id"), "claims file")
    claimant = parse_claimant(item.get("claimant"))
    numbers = {}
    for key in ("created", "expires"):
        value = item.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(
                value):
            raise RequestError(f"{key}={_shown(value)}: must be a number (unix seconds)")
        numbers[key] = float(value)
    request, placement, xml = item.get("request"), item.get("placement"), item.get(
        "libvirt_xml")
    strategy = item.get("strategy")
    if not isinstance(request, dict) or not isinstance(placement, dict):
        raise RequestError("request and placement must be maps")
    if not isinstance(xml, dict) or not all(isinstance(v, str) for v in xml.values()):
        raise RequestError("libvirt_xml must be a map of strings")
    if strategy not in STRATEGIES:
        raise RequestError(f"strategy={_shown(strategy)}: must be one of "
                           f"{', '.join(STRATEGIES)}")
    return ClaimRecord(id=claim_id, claimant=claimant, created=numbers["created"],
                       expires=numbers["expires"], request=request, strategy=strategy,
                       placement=placement, libvirt_xml=xml, memory_kib=0)

