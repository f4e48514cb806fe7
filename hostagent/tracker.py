"""The tracker: who holds what on this host — per cell, per thread and per cache ID.

Pure functions over plain data (``HostTopology``, the resolved ``config`` dict, and
``GuestRecord``s); no I/O. The result is the ``usage`` part of the snapshot (schema v1,
``docs/tracker.md`` documents every field and rule).

Three steps, so that one guest's change costs one guest's work:

``make_context(topo, resources) -> Context``
    Indexes of the host (CPU → cell, dedicated/shared sets, cores, pools, reserved
    amounts, resctrl groups). Build once per topology or config change.
``guest_contribution(ctx, record) -> Contribution``
    Everything one guest holds, and its own conflicts, precomputed. Cache it per uuid.
``fold(ctx, contributions, previous=None, claims=()) -> usage dict``
    Sums the contributions: thread ownership, threads kept idle, shared guests per
    thread, per-cell totals and free amounts, thread entries, cache allocations, and the
    cross-guest conflicts. Linear in guests + threads. Pure: ``previous`` (the last
    usage folded on the same context) only lends the objects that did not change.
    ``claims`` are the contributions of the agent's outstanding claims
    (``hostagent.claims``): shaped like a guest's, counted like one in every total and
    free amount, listed in ``usage.claims`` instead of ``usage.guests``.

``compute_usage(topo, resources, guests)`` does all three (a full recompute).
``UsageTracker`` is the small stateful wrapper the daemon uses: ``set_host`` on a new
topology or config (recomputes every contribution), ``update(record)`` / ``remove(uuid)``
on a libvirt event (recomputes one), ``usage()`` to fold (memoised until the next change;
it keeps the last usage to hand to the next fold).

The output shares sub-objects (guest entries, per-thread guest lists, unchanged thread
entries and cache lists of the previous usage) with the cached contributions and the
previous usage: treat it as read-only.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from hostagent.cpulist import format_cpulist
from hostagent.guests.xml import GuestRecord, GuestSpec
from hostagent.model import Cell, HostTopology
from hostagent.resctrl_cbm import cache_ways, parse_mask, popcount

DEFAULT_HUGEPAGE_KIB = 2048
_HOSTNAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-")


# --------------------------------------------------------------------------- context


@dataclass(frozen=True)
class Context:
    """Host indexes for one (topology, resolved config) pair. Immutable: it holds
    nothing about guests or past folds (treat its dicts as read-only too)."""

    topo: HostTopology
    resources: Mapping[str, Any]
    dedicated: frozenset[int]
    shared: frozenset[int]
    online: frozenset[int]
    known: frozenset[int]
    cpu_cell: dict[int, int]  # online CPU → cell
    cell_ids: tuple[int, ...]
    cell_set: frozenset[int]
    cell_dedicated: dict[int, tuple[int, ...]]  # online dedicated threads per cell
    cell_shared_count: dict[int, int]
    cell_dedicated_cores: dict[int, tuple[tuple[int, ...], ...]]  # cores all-dedicated
    pools: dict[tuple[int, int], int]  # (cell, size_kib) → total pages
    kernel_free: dict[tuple[int, int], int]  # (cell, size_kib) → the kernel's free pages
    reserved_pages: dict[tuple[int, int], int]
    reserved_memory: dict[int, int]
    default_page_kib: int | None
    cpu_ratio: float
    ram_ratio: float
    group_names: tuple[str, ...]
    group_schemata: dict[str, Mapping[str, Mapping[int, str]]]
    pci_addresses: frozenset[str]


def default_hugepage_kib(topo: HostTopology) -> int | None:
    """The size a ``<hugepages/>`` without ``<page>`` uses: 2048 KiB when the host has
    that pool (the x86 kernel default), else the smallest pool; None without pools."""
    sizes = {p.size_kib for c in topo.cells for p in c.hugepages}
    if not sizes:
        return None
    return DEFAULT_HUGEPAGE_KIB if DEFAULT_HUGEPAGE_KIB in sizes else min(sizes)


def _online_cpu_cells(topo: HostTopology, online: frozenset[int]) -> dict[int, int]:
    """Online CPU → its cell: the cell that lists it, else the CPU's own ``cell``."""
    cpu_cell: dict[int, int] = {}
    for cell in topo.cells:
        for cpu in cell.cpus:
            if cpu in online:
                cpu_cell[cpu] = cell.id
    for c in topo.cpus:
        if c.online and c.id not in cpu_cell and c.cell >= 0:
            cpu_cell[c.id] = c.cell
    return cpu_cell


def make_context(topo: HostTopology, resources: Mapping[str, Any]) -> Context:
    """Index ``topo`` and the resolved config (``hostagent.config.resolve_resources``)."""
    dedicated = frozenset(resources.get("dedicated_cpus", ()))
    shared = frozenset(resources.get("shared_cpus", ()))
    online = frozenset(c.id for c in topo.cpus if c.online)
    known = frozenset(c.id for c in topo.cpus)
    cpu_cell = _online_cpu_cells(topo, online)
    cell_ids = tuple(sorted(c.id for c in topo.cells))
    cell_dedicated = {
        cid: tuple(sorted(t for t in dedicated if cpu_cell.get(t) == cid)) for cid in cell_ids
    }
    cell_shared_count = {cid: sum(1 for t in shared if cpu_cell.get(t) == cid)
                         for cid in cell_ids}
    cores: dict[int, set[tuple[int, ...]]] = {cid: set() for cid in cell_ids}
    for c in topo.cpus:
        if not c.online or c.id not in cpu_cell:
            continue
        threads = tuple(sorted(t for t in (c.siblings or (c.id,)) if t in online)) or (c.id,)
        if all(t in dedicated for t in threads):
            cores.setdefault(cpu_cell[c.id], set()).add(threads)
    pools = {(cell.id, p.size_kib): p.total for cell in topo.cells for p in cell.hugepages}
    kernel_free = {(cell.id, p.size_kib): p.free for cell in topo.cells for p in cell.hugepages}
    reserved_pages: dict[tuple[int, int], int] = {}
    for r in resources.get("reserved_hugepages", ()):
        key = (int(r["cell"]), int(r["size_kib"]))
        reserved_pages[key] = reserved_pages.get(key, 0) + int(r["count"])
    raw_mem = resources.get("reserved_memory_kib", {}) or {}
    if isinstance(raw_mem, int):
        reserved_memory = {cid: raw_mem for cid in cell_ids}
    else:
        reserved_memory = {int(k): int(v) for k, v in raw_mem.items()}
    groups = topo.resctrl.groups if topo.resctrl else ()
    return Context(
        topo=topo,
        resources=resources,
        dedicated=dedicated,
        shared=shared,
        online=online,
        known=known,
        cpu_cell=cpu_cell,
        cell_ids=cell_ids,
        cell_set=frozenset(cell_ids),
        cell_dedicated=cell_dedicated,
        cell_shared_count=cell_shared_count,
        cell_dedicated_cores={cid: tuple(sorted(v)) for cid, v in cores.items()},
        pools=pools,
        kernel_free=kernel_free,
        reserved_pages=reserved_pages,
        reserved_memory=reserved_memory,
        default_page_kib=default_hugepage_kib(topo),
        cpu_ratio=float(resources.get("cpu_allocation_ratio", 1.0)),
        ram_ratio=float(resources.get("ram_allocation_ratio", 1.0)),
        group_names=tuple(g.name for g in groups if g.name),
        group_schemata={g.name: g.schemata for g in groups if g.name},
        pci_addresses=frozenset(p.address for p in topo.pci),
    )


# --------------------------------------------------------------------------- contribution


@dataclass(frozen=True)
class Claim:
    """A dedicated thread held by a guest: by a vCPU, the emulator or an iothread."""

    cpu: int
    vcpu: int | None = None
    emulator: bool = False
    iothread: int | None = None


@dataclass(frozen=True)
class Contribution:
    """What one guest holds. ``entry`` is its ``usage.guests`` item (None = inactive)."""

    uuid: str
    name: str
    entry: dict[str, Any] | None
    claims: tuple[Claim, ...] = ()
    shared_cpus: frozenset[int] = frozenset()
    shared_vcpus: tuple[tuple[int, int], ...] = ()  # (cell, vCPUs)
    floating_vcpus: int = 0
    memory: tuple[tuple[int, int], ...] = ()  # (cell, KiB) on ordinary pages
    floating_memory_kib: int = 0
    pages: tuple[tuple[int, int, int], ...] = ()  # (cell, size_kib, pages)
    floating_pages: tuple[tuple[int, int], ...] = ()  # (size_kib, pages)
    groups: tuple[str, ...] = ()  # resctrl groups this guest's cachetunes/memorytunes own
    pci: tuple[str, ...] = ()  # PCI addresses passed through
    idle: tuple[int, ...] = ()  # dedicated threads this guest keeps idle (isolate siblings)
    conflicts: tuple[dict[str, Any], ...] = ()
    # cache ways a claim holds before its resctrl group exists: (resource, cache id, mask,
    # group name the placement planned); a guest's ways are in its groups' schemata
    cache_ways: tuple[tuple[str, int, int, str], ...] = ()


def machine_name(domain_id: int, name: str, driver: str = "qemu") -> str:
    """libvirt's machine name (``virDomainDriverGenerateMachineName``, privileged):
    ``qemu-<id>-<name>`` with the name reduced to hostname characters, runs of ``-``/``.``
    collapsed, cut once the whole string reaches 64 characters, trailing ``-``/``.`` dropped.
    """
    buf = f"{driver}-{domain_id}-"
    skip = True
    for ch in name:
        if len(buf) >= 64:
            break
        if ch in ".-":
            if not skip:
                buf += ch
                skip = True
            continue
        if ch not in _HOSTNAME_CHARS:
            continue
        buf += ch
        skip = False
    return buf.rstrip("-.")


def resctrl_group_name(spec: GuestSpec, alloc_id: str) -> str | None:
    """The resctrl group libvirt creates for one allocation of a running domain."""
    if spec.domain_id is None:
        return None
    return f"{machine_name(spec.domain_id, spec.name)}-{alloc_id}"


def _find_group(ctx: Context, spec: GuestSpec, alloc_id: str) -> str | None:
    want = resctrl_group_name(spec, alloc_id)
    if want is None:
        return None
    if want in ctx.group_schemata:
        return want
    # unprivileged (qemu-<user>-<id>-...) or embedded (qemu-embed-<hash>-<id>-...) drivers
    pattern = re.compile(rf"qemu-(?:.+-)?{spec.domain_id}-.*-{re.escape(alloc_id)}")
    found = [g for g in ctx.group_names if pattern.fullmatch(g)]
    return found[0] if len(found) == 1 else None


def _conflict(kind: str, detail: str, guests: Iterable[str], **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"kind": kind, "detail": detail, "guests": sorted(set(guests))}
    out.update(extra)
    return out


def _inactive(rec: GuestRecord) -> Contribution:
    return Contribution(uuid=rec.uuid, name=rec.name, entry=None)


def _error_contribution(rec: GuestRecord) -> Contribution:
    entry = {
        "uuid": rec.uuid, "name": rec.name, "state": rec.state, "vcpus": 0, "memory_kib": 0,
        "page_size_kib": None, "cells": [], "pinning": {}, "emulator_cpus": [], "cache": [],
        "dedicated_cpus": [], "idle_cpus": [], "pci": [], "shared_vcpus": 0,
        "floating_vcpus": 0, "domain_id": None,
        "error": rec.error,
    }
    c = _conflict("xml_error", f"{rec.name}: {rec.error}", [rec.uuid])
    return Contribution(uuid=rec.uuid, name=rec.name, entry=entry, conflicts=(c,))


def _memory_binding(spec: GuestSpec, cellid: int | None) -> tuple[str | None, tuple[int, ...]]:
    nt = spec.numatune
    if nt is None:
        return None, ()
    if cellid is not None:
        mn = nt.memnode(cellid)
        if mn is not None:
            return mn.mode, mn.nodeset
    if nt.nodeset:
        return nt.mode, nt.nodeset
    return None, ()


def guest_contribution(ctx: Context, rec: GuestRecord) -> Contribution:
    """Everything ``rec`` holds on the host described by ``ctx`` (docs/tracker.md §3),
    with its own conflicts (§4). The steps run in this order because later ones read
    what earlier ones found (memory binding, claimed threads) and the conflicts keep
    the order they are met in."""
    if not rec.active:
        return _inactive(rec)
    if rec.spec is None:
        return _error_contribution(rec)
    acc = _GuestAccount(ctx, rec, rec.spec)
    acc.add_memory()
    acc.add_vcpus()
    acc.add_helper_threads()
    acc.add_idle_threads()
    acc.add_own_conflicts()
    acc.add_cache()
    return acc.contribution()


class _GuestAccount:
    """The running account of what one guest holds, filled step by step by
    ``guest_contribution`` and turned into a ``Contribution`` at the end. Section
    numbers (§) are those of docs/tracker.md."""

    __slots__ = (
        "ctx", "rec", "spec", "uuid", "name", "conflicts", "missing_cells", "offline_pins",
        "floating_dedicated", "gcells", "vcpu_gcell", "gcell_hosts", "memory", "pages",
        "floating_pages", "floating_memory", "cell_entries", "first_page_size", "claims",
        "claimed", "dup", "shared_cpus", "shared_vcpus", "floating_vcpus", "pinning",
        "affinity_cells", "emulator", "idle", "groups", "cache_entries",
    )

    def __init__(self, ctx: Context, rec: GuestRecord, spec: GuestSpec) -> None:
        self.ctx = ctx
        self.rec = rec
        self.spec = spec
        self.uuid, self.name = rec.uuid, rec.name
        self.conflicts: list[dict[str, Any]] = []
        self.missing_cells: set[int] = set()  # host cells numatune names that do not exist
        self.offline_pins: dict[str, set[int]] = {}  # "vCPU 3" → offline/unknown CPUs
        self.floating_dedicated: list[str] = []  # what may run on unowned dedicated threads
        # guest cells (guest cell, vCPUs, KiB); one cell 0 when there is no cpu/numa
        if spec.cells:
            self.gcells = [(c.id, c.vcpus, c.memory_kib) for c in spec.cells]
        else:
            self.gcells = [(0, tuple(range(spec.vcpus)), spec.memory_kib)]
        self.vcpu_gcell = {v: gid for gid, vs, _ in self.gcells for v in vs}
        self.gcell_hosts: dict[int | None, tuple[int, ...]] = {}  # guest cell → bound cells
        # memory
        self.memory: dict[int, int] = {}  # host cell → KiB on ordinary pages
        self.pages: dict[tuple[int, int], int] = {}  # (host cell, size KiB) → pages
        self.floating_pages: dict[int, int] = {}  # size KiB → pages bound to no one cell
        self.floating_memory = 0
        self.cell_entries: list[dict[str, Any]] = []
        self.first_page_size: int | None = None
        # threads
        self.claims: list[Claim] = []
        self.claimed: dict[int, Claim] = {}
        self.dup: list[int] = []  # dedicated threads two of its vCPUs claim
        self.shared_cpus: set[int] = set()
        self.shared_vcpus: dict[int, int] = {}  # host cell → shared vCPUs counted there
        self.floating_vcpus = 0
        self.pinning: dict[str, int] = {}
        self.affinity_cells: dict[tuple[int, ...], frozenset[int]] = {}
        self.emulator: tuple[int, ...] | None = None
        self.idle: list[int] = []
        # resctrl
        self.groups: list[str] = []
        self.cache_entries: list[dict[str, Any]] = []

    # ---- memory (§3.3, §3.4)

    def bind(self, gid: int | None) -> tuple[int, ...]:
        """The host cells guest cell ``gid``'s memory is bound to: one, several
        (interleave), or none (floating); memoised per guest cell."""
        hosts = self.gcell_hosts.get(gid)
        if hosts is not None:
            return hosts
        mode, nodeset = _memory_binding(self.spec, gid)
        cell_set = self.ctx.cell_set
        present = tuple(n for n in nodeset if n in cell_set)
        self.missing_cells.update(n for n in nodeset if n not in cell_set)
        if len(present) > 1 and mode != "interleave":
            present = ()  # several cells, not interleaved: in no one cell
        self.gcell_hosts[gid] = present
        return present

    def add_memory(self) -> None:
        """Each guest cell's memory into its bound host cells, or floating."""
        for gid, gvcpus, gmem in self.gcells:
            hosts = self.bind(gid)
            backed, size = self._page_size(gid)
            if backed and self.first_page_size is None:
                self.first_page_size = size
            self._place_memory(gid, gmem, hosts, size if backed else None)
            self.cell_entries.append({
                "guest_cell": gid,
                "host_cell": hosts[0] if len(hosts) == 1 else None,
                "host_cells": list(hosts),
                "vcpus": len(gvcpus),
                "memory_kib": gmem,
                "page_size_kib": size if backed else None,
            })

    def _page_size(self, gid: int) -> tuple[bool, int | None]:
        """(hugepage-backed?, page size KiB) of one guest cell; the host's default size
        for a page without one (a conflict, and ordinary memory, on a host without pools)."""
        backed, size = self.spec.page_size_for_cell(gid)
        if backed and size is None:
            size = self.ctx.default_page_kib
            if size is None:
                self.conflicts.append(_conflict(
                    "hugepage_size_missing",
                    f"{self.name}: guest cell {gid} asks for hugepages of the default size "
                    "but the host has no hugepage pools", [self.uuid], cell=None,
                    size_kib=None))
                backed = False
        return backed, size

    def _place_memory(self, gid: int, kib: int, hosts: tuple[int, ...],
                      page_size: int | None) -> None:
        """``kib`` of guest cell ``gid`` over ``hosts``: in pages of ``page_size`` when
        hugepage-backed, else ordinary memory; floating when bound to no one cell."""
        shares = _split(kib, hosts)
        for host, share in shares:
            if page_size is None:
                self.memory[host] = self.memory.get(host, 0) + share
                continue
            key = (host, page_size)
            self.pages[key] = self.pages.get(key, 0) + -(-share // page_size)
            if key not in self.ctx.pools:
                self.conflicts.append(_conflict(
                    "hugepage_size_missing",
                    f"{self.name}: guest cell {gid} uses {page_size} KiB pages on host cell "
                    f"{host}, which has no such pool", [self.uuid], cell=host,
                    size_kib=page_size))
        if shares:
            return
        if page_size is None:
            self.floating_memory += kib
        else:
            self.floating_pages[page_size] = (self.floating_pages.get(page_size, 0)
                                              + -(-kib // page_size))

    # ---- threads (§3.1, §3.2)

    def claim(self, c: Claim) -> None:
        """A dedicated thread for this guest; the first claim on a thread holds it."""
        held = self.claimed.get(c.cpu)
        if held is not None:
            if c.vcpu is not None and held.vcpu is not None:
                self.dup.append(c.cpu)
            return
        self.claimed[c.cpu] = c
        self.claims.append(c)

    def check_online(self, aff: tuple[int, ...], what: str) -> None:
        """Note the CPUs of affinity ``aff`` (of ``what``) that are not online."""
        online = self.ctx.online
        bad = {c for c in aff if c not in online}
        if bad:
            self.offline_pins.setdefault(what, set()).update(bad)

    def count_vcpu(self, cell: int | None) -> None:
        """One shared vCPU counted in host cell ``cell``, or floating when None."""
        if cell is None:
            self.floating_vcpus += 1
        else:
            self.shared_vcpus[cell] = self.shared_vcpus.get(cell, 0) + 1

    def add_vcpus(self) -> None:
        """Every vCPU: pinned to one thread (owns it when dedicated), or shared."""
        ctx, spec = self.ctx, self.spec
        unpinned: list[int] = []
        for v in range(spec.vcpus):
            aff = spec.vcpu_affinity(v)
            if aff is None:
                unpinned.append(v)
                self._shared_vcpu(v, None)
            elif len(aff) == 1 and not _whole_shared_set(ctx, aff[0]):
                self._pinned_vcpu(v, aff)
            else:
                self._shared_vcpu(v, aff)
        if unpinned and ctx.dedicated:
            self.floating_dedicated.append(f"vCPUs {format_cpulist(unpinned)} (no pin)")

    def _pinned_vcpu(self, v: int, aff: tuple[int, ...]) -> None:
        """vCPU ``v`` pinned to exactly one thread."""
        ctx = self.ctx
        cpu = aff[0]
        self.pinning[str(v)] = cpu
        if cpu not in ctx.online:
            self.check_online(aff, f"vCPU {v}")
            if cpu in ctx.dedicated:
                self.claim(Claim(cpu, vcpu=v))
            else:
                self.floating_vcpus += 1
            return
        if cpu in ctx.dedicated:
            self.claim(Claim(cpu, vcpu=v))
            return
        self.conflicts.append(_conflict(
            "pin_not_dedicated",
            f"{self.name}: vCPU {v} is pinned to CPU {cpu} alone, which is not in "
            "dedicated_cpus", [self.uuid], cpus=[cpu]))
        self.shared_cpus.add(cpu)
        self.count_vcpu(ctx.cpu_cell.get(cpu))

    def _shared_vcpu(self, v: int, aff: tuple[int, ...] | None) -> None:
        """vCPU ``v`` with no affinity or several threads: counted in the one cell its
        affinity lies in, else the one cell its memory is bound to, else floating."""
        ctx = self.ctx
        cells: frozenset[int] = frozenset()
        if aff is not None:
            self.check_online(aff, f"vCPU {v}")
            known = self.affinity_cells.get(aff)
            if known is None:
                known = frozenset(ctx.cpu_cell[c] for c in aff if c in ctx.cpu_cell)
                self.affinity_cells[aff] = known
                if ctx.dedicated.intersection(aff):
                    self.floating_dedicated.append(f"vCPUs pinned to {format_cpulist(aff)}")
            cells = known
            self.shared_cpus.update(c for c in aff if c in ctx.online)
        if len(cells) == 1:
            self.count_vcpu(next(iter(cells)))
            return
        hosts = self.bind(self.vcpu_gcell.get(v))
        self.count_vcpu(hosts[0] if len(hosts) == 1 else None)

    def add_helper_threads(self) -> None:
        """The emulator and the iothreads: own the dedicated threads of their affinity."""
        spec = self.spec
        self.emulator = spec.emulator_affinity()
        self._helper(self.emulator, "emulator", emulator=True)
        for t in range(1, spec.iothreads + 1):
            self._helper(spec.iothreadpin.get(t, spec.cpuset), f"iothread {t}", iothread=t)

    def _helper(self, aff: tuple[int, ...] | None, label: str, **kind: Any) -> None:
        ctx = self.ctx
        if aff is None:
            if ctx.dedicated:
                self.floating_dedicated.append(f"{label} (no pin)")
            return
        self.check_online(aff, label)
        for cpu in aff:
            if cpu in ctx.dedicated:
                self.claim(Claim(cpu, **kind))
            elif cpu in ctx.online:
                self.shared_cpus.add(cpu)

    def add_idle_threads(self) -> None:
        """Threads kept idle (the siblings of an isolate guest's vCPUs, from the metadata
        hostagent fit writes, §3.1a): a dedicated thread is held, online or not, like a pin."""
        ctx = self.ctx
        not_dedicated: list[int] = []
        offline: list[int] = []
        for cpu in self.spec.idle_cpus:
            if cpu not in ctx.online:
                offline.append(cpu)
                if cpu in ctx.dedicated:
                    self.idle.append(cpu)
            elif cpu in ctx.dedicated:
                self.idle.append(cpu)
            else:
                not_dedicated.append(cpu)
        if offline:
            self.conflicts.append(_conflict(
                "pin_offline",
                f"{self.name}: the threads it keeps idle include "
                f"{_offline_text(ctx, offline)}", [self.uuid], cpus=offline))
        if not_dedicated:
            self.conflicts.append(_conflict(
                "pin_not_dedicated",
                f"{self.name}: keeps CPU(s) {format_cpulist(not_dedicated)} idle, which are "
                "not in dedicated_cpus", [self.uuid], cpus=not_dedicated))

    # ---- conflicts found on the way (§4)

    def add_own_conflicts(self) -> None:
        """The conflicts this guest has on its own: two vCPUs on one dedicated thread,
        pins to offline CPUs, threads on unowned dedicated CPUs, missing cells and PCI."""
        name, uuid, conflicts = self.name, self.uuid, self.conflicts
        if self.dup:
            conflicts.append(_conflict(
                "dedicated_overlap",
                f"{name}: several vCPUs are pinned to dedicated CPU(s) "
                f"{format_cpulist(self.dup)}", [uuid], cpus=sorted(set(self.dup))))
        for what, bad in sorted(self.offline_pins.items()):
            conflicts.append(_conflict(
                "pin_offline", f"{name}: {what} is pinned to {_offline_text(self.ctx, bad)}",
                [uuid], cpus=sorted(bad)))
        if self.floating_dedicated:
            conflicts.append(_conflict(
                "floating_on_dedicated",
                f"{name}: may run on dedicated CPUs it does not own: "
                + "; ".join(self.floating_dedicated), [uuid]))
        if self.missing_cells:
            conflicts.append(_conflict(
                "cell_missing",
                f"{name}: numatune binds memory to host cell(s) "
                f"{format_cpulist(self.missing_cells)}, which do not exist", [uuid],
                cells=sorted(self.missing_cells)))
        missing_pci = [a for a in self.spec.hostdevs if a not in self.ctx.pci_addresses]
        if missing_pci:
            conflicts.append(_conflict(
                "pci_missing",
                f"{name}: PCI device(s) {', '.join(missing_pci)} not on this host",
                [uuid], pci=missing_pci))

    # ---- cache (§3.6)

    def add_cache(self) -> None:
        """The resctrl groups of its cachetunes and memorytunes, and each requested
        cache with the group's mask."""
        ctx, spec, groups = self.ctx, self.spec, self.groups
        for ct in spec.cachetunes:
            if not ct.caches:
                continue  # monitor-only: the vCPUs stay in the default group
            group = _find_group(ctx, spec, ct.alloc_id)
            if group is None:
                want = resctrl_group_name(spec, ct.alloc_id) or f"qemu-?-…-{ct.alloc_id}"
                why = "resctrl is not mounted" if ctx.topo.resctrl is None else "no such group"
                self.conflicts.append(_conflict(
                    "cache_group_missing",
                    f"{self.name}: cachetune for vCPUs {format_cpulist(ct.vcpus)} has no "
                    f"resctrl group {want} ({why})", [self.uuid], group=want))
            elif group not in groups:
                groups.append(group)
            schemata = ctx.group_schemata.get(group or "", {})
            for req in ct.caches:
                res = f"L{req.level}" + _CACHE_SUFFIX[req.type]
                mask = schemata.get(res, {}).get(req.id)
                self.cache_entries.append({
                    "vcpus": list(ct.vcpus), "level": req.level, "id": req.id,
                    "type": req.type, "bytes": req.size_bytes, "mask": mask,
                    "ways": popcount(parse_mask(mask)) if mask else None, "group": group,
                })
        for mt in spec.memorytunes:
            group = _find_group(ctx, spec, mt.alloc_id)
            if group is not None and group not in groups:
                groups.append(group)

    # ---- the result

    def contribution(self) -> Contribution:
        spec, emu = self.spec, self.emulator
        entry = {
            "uuid": self.uuid,
            "name": self.name,
            "state": self.rec.state,
            "domain_id": spec.domain_id,
            "vcpus": spec.vcpus,
            "memory_kib": sum(c[2] for c in self.gcells),
            "page_size_kib": self.first_page_size,
            "cells": self.cell_entries,
            "pinning": self.pinning,
            "emulator_cpus": sorted(emu) if emu else [],
            "cache": self.cache_entries,
            "memory_bandwidth": [
                {"vcpus": list(mt.vcpus), "node": nid, "bandwidth": bw}
                for mt in spec.memorytunes for nid, bw in mt.nodes
            ],
            "vcpusched": [
                {"vcpus": list(s.vcpus), "scheduler": s.scheduler, "priority": s.priority}
                for s in spec.vcpusched
            ],
            "dedicated_cpus": sorted(self.claimed),
            "idle_cpus": list(spec.idle_cpus),
            "pci": list(spec.hostdevs),
            "shared_vcpus": sum(self.shared_vcpus.values()),
            "floating_vcpus": self.floating_vcpus,
            "error": None,
        }
        return Contribution(
            uuid=self.uuid,
            name=self.name,
            entry=entry,
            claims=tuple(self.claims),
            shared_cpus=frozenset(self.shared_cpus),
            shared_vcpus=tuple(sorted(self.shared_vcpus.items())),
            floating_vcpus=self.floating_vcpus,
            memory=tuple(sorted(self.memory.items())),
            floating_memory_kib=self.floating_memory,
            pages=tuple(sorted((c, s, n) for (c, s), n in self.pages.items())),
            floating_pages=tuple(sorted(self.floating_pages.items())),
            groups=tuple(self.groups),
            pci=spec.hostdevs,
            idle=tuple(self.idle),
            conflicts=tuple(self.conflicts),
        )


_CACHE_SUFFIX = {"both": "", "code": "CODE", "data": "DATA"}  # resctrl resource name


def _offline_text(ctx: Context, cpus: Iterable[int]) -> str:
    """``"offline CPU(s) 5 and CPU(s) 900 that do not exist"`` for CPUs that are not online."""
    off = sorted(c for c in cpus if c in ctx.known)
    unknown = sorted(c for c in cpus if c not in ctx.known)
    parts = []
    if off:
        parts.append(f"offline CPU(s) {format_cpulist(off)}")
    if unknown:
        parts.append(f"CPU(s) {format_cpulist(unknown)} that do not exist")
    return " and ".join(parts)


def _whole_shared_set(ctx: Context, cpu: int) -> bool:
    """``cpu`` is a shared thread and the only one of its cell (or of the host): a vCPU
    confined to it is a shared vCPU on a one-thread shared set, not a stray pin."""
    if cpu not in ctx.shared:
        return False
    if len(ctx.shared) == 1:
        return True
    cell = ctx.cpu_cell.get(cpu)
    return cell is not None and ctx.cell_shared_count.get(cell, 0) == 1


def _split(kib: int, hosts: tuple[int, ...]) -> list[tuple[int, int]]:
    """Memory over its bound host cells: all in one, or evenly (interleave)."""
    if not hosts:
        return []
    each, rest = divmod(kib, len(hosts))
    return [(h, each + (1 if i < rest else 0)) for i, h in enumerate(hosts)]


# --------------------------------------------------------------------------- fold


def fold(
    ctx: Context, contributions: Iterable[Contribution],
    previous: Mapping[str, Any] | None = None, claims: Iterable[Contribution] = (),
) -> dict[str, Any]:
    """Sum contributions into the ``usage`` dict (schema v1). Pure.

    ``previous`` is the usage an earlier fold on this same ``ctx`` returned (None for
    none). It changes nothing in the result, only which objects carry it: a thread entry
    equal to the previous one is that same dict, and the cache list is the previous one
    when no group changed owner, so packers keep their bytes (``hostagent.wire``).

    ``claims`` (``uuid`` = the claim id, ``entry`` = its ``usage.claims`` item) hold what
    they hold exactly as guests do, in the order given (``UsageTracker``: oldest first);
    a guest comes before every claim, so a thread both hold is the guest's. A thread a
    claim runs on or keeps idle carries the claim's id in ``claim`` (``guest`` and
    ``held_by`` stay about guests); a conflict a claim is part of lists it in ``claims``
    instead of ``guests``.
    """
    contribs = sorted((c for c in contributions if c.entry is not None), key=lambda c: c.uuid)
    held = [c for c in claims if c.entry is not None]  # in the order given: oldest first
    everyone = contribs + held if held else contribs
    claim_ids = frozenset(c.uuid for c in held)
    names = {c.uuid: c.name for c in everyone}
    conflicts: list[dict[str, Any]] = []  # in the order met; sorted at the end
    owner = _thread_owners(everyone, names, conflicts)
    held_by = _idle_holders(contribs)
    claimed = _claimed_threads(held)
    shared_on = _shared_guests_per_thread(contribs)
    _idle_threads_taken(everyone, owner, shared_on, names, conflicts)
    sums = _sum_contributions(everyone, conflicts)
    if held:
        claim_pages: dict[tuple[int, int], int] = {}
        for c in held:
            for cell, size, n in c.pages:
                claim_pages[(cell, size)] = claim_pages.get((cell, size), 0) + n
        sums = sums._replace(claim_pages=claim_pages)
    pci_out = _pci_users(sums.pci_users, names, conflicts, claim_ids)
    busy = _Busy(owner, shared_on, held_by, claimed, claim_ids)
    cells_out = _cell_usage(ctx, sums, busy, conflicts)
    threads = _thread_entries(ctx, busy, previous["threads"] if previous else ())
    caches = _cache_allocations(ctx.topo, sums.group_owners,
                                previous["caches"] if previous else None,
                                tuple((c.uuid, *w) for c in held for w in c.cache_ways))
    if claim_ids:
        _name_claims(conflicts, claim_ids)
    conflicts.sort(key=lambda c: (c["kind"], c["detail"]))
    return {
        "cells": cells_out,
        "threads": threads,
        "caches": caches,
        "guests": [c.entry for c in contribs],
        "claims": [c.entry for c in held],
        "pci": pci_out,
        "floating_vcpus": sums.floating_vcpus,
        "floating_memory_kib": sums.floating_memory,
        "floating_hugepages": [{"size_kib": s, "pages": n}
                               for s, n in sorted(sums.floating_pages.items())],
        "conflicts": conflicts,
    }


class _Busy(NamedTuple):
    """Who is on each thread: what ``usage.threads`` shows and what makes a thread not
    free."""

    owner: Mapping[int, tuple[str, Claim]]  # thread → its owner (a guest, else a claim)
    shared_on: Mapping[int, list[str]]  # thread → guests with shared vCPUs pinned there
    held_by: Mapping[int, str]  # thread → the guest keeping it idle
    claimed: Mapping[int, str]  # thread → the claim running on it or keeping it idle
    claim_ids: frozenset[str]

    def taken(self) -> set[int]:
        """The threads that are not free: owned, shared onto, kept idle or claimed."""
        return set(self.owner).union(self.shared_on, self.held_by, self.claimed)


def _claimed_threads(held: list[Contribution]) -> dict[int, str]:
    """Thread → the first claim (oldest first) whose vCPUs, emulator or iothreads run
    there or that keeps it idle."""
    claimed: dict[int, str] = {}
    for c in held:
        for cl in c.claims:
            claimed.setdefault(cl.cpu, c.uuid)
        for cpu in c.idle:
            claimed.setdefault(cpu, c.uuid)
    return claimed


def _name_claims(conflicts: list[dict[str, Any]], claim_ids: frozenset[str]) -> None:
    """A conflict a claim is part of lists it in ``claims``, not in ``guests``."""
    for i, c in enumerate(conflicts):
        ids = [u for u in c["guests"] if u in claim_ids]
        if ids:
            conflicts[i] = {**c, "guests": [u for u in c["guests"] if u not in claim_ids],
                            "claims": ids}


def _thread_owners(contribs: list[Contribution], names: Mapping[str, str],
                   conflicts: list[dict[str, Any]]) -> dict[int, tuple[str, Claim]]:
    """Dedicated thread → (uuid, claim) of its owner: the first claimant in uuid order;
    every further claim is a ``dedicated_overlap``."""
    owner: dict[int, tuple[str, Claim]] = {}
    contested: dict[int, list[tuple[str, Claim]]] = {}
    for c in contribs:
        for cl in c.claims:
            held = owner.get(cl.cpu)
            if held is None:
                owner[cl.cpu] = (c.uuid, cl)
            else:
                contested.setdefault(cl.cpu, [held]).append((c.uuid, cl))
    for cpu, holders in sorted(contested.items()):
        who = ", ".join(f"{names[u]} ({_claim_text(cl)})" for u, cl in holders)
        conflicts.append(_conflict(
            "dedicated_overlap", f"dedicated CPU {cpu} is held by {who}",
            [u for u, _ in holders], cpus=[cpu]))
    return owner


def _idle_holders(contribs: list[Contribution]) -> dict[int, str]:
    """Thread kept idle → the first guest in uuid order keeping it (two guests keeping
    one thread idle agree, so that is no conflict)."""
    held_by: dict[int, str] = {}
    for c in contribs:
        for cpu in c.idle:
            held_by.setdefault(cpu, c.uuid)
    return held_by


def _shared_guests_per_thread(contribs: list[Contribution]) -> dict[int, list[str]]:
    """Thread → the guests whose shared vCPUs, emulator or iothreads may run there.

    Guests are grouped by identical CPU sets, then merged per distinct membership
    signature: threads with equal memberships share one list."""
    by_set: dict[frozenset[int], list[str]] = {}
    for c in contribs:
        if c.shared_cpus:
            by_set.setdefault(c.shared_cpus, []).append(c.uuid)
    signature: dict[int, list[int]] = {}
    sets = list(by_set.items())
    for i, (cpus, _) in enumerate(sets):
        for cpu in cpus:
            signature.setdefault(cpu, []).append(i)
    merged: dict[tuple[int, ...], list[str]] = {}
    shared_on: dict[int, list[str]] = {}
    for cpu, sig in signature.items():
        key = tuple(sig)
        lst = merged.get(key)
        if lst is None:
            lst = sets[sig[0]][1] if len(sig) == 1 else sorted(
                u for i in sig for u in sets[i][1])
            merged[key] = lst
        shared_on[cpu] = lst
    return shared_on


def _idle_threads_taken(
    contribs: list[Contribution], owner: Mapping[int, tuple[str, Claim]],
    shared_on: Mapping[int, list[str]], names: Mapping[str, str],
    conflicts: list[dict[str, Any]],
) -> None:
    """``idle_thread_taken``: a thread one guest keeps idle that another guest runs on
    (its vCPU, emulator or iothread owns it, or its shared ones are pinned onto it)."""
    taken_idle: dict[tuple[str, tuple[str, ...]], list[int]] = {}
    for c in contribs:
        for cpu in c.idle:
            others = set(shared_on.get(cpu, ()))
            if cpu in owner:
                others.add(owner[cpu][0])
            others.discard(c.uuid)
            if others:
                taken_idle.setdefault((c.uuid, tuple(sorted(others))), []).append(cpu)
    for (idler, others_t), cpus in sorted(taken_idle.items()):
        conflicts.append(_conflict(
            "idle_thread_taken",
            f"{names[idler]} keeps CPU(s) {format_cpulist(cpus)} idle, but "
            + ", ".join(names[u] for u in others_t) + " run(s) there",
            [idler, *others_t], cpus=sorted(cpus)))


class _Sums(NamedTuple):
    """The contributions added up per host cell, page pool, group and PCI address."""

    shared_vcpus: dict[int, int]  # cell → vCPUs
    memory: dict[int, int]  # cell → KiB
    mem_users: dict[int, list[str]]  # cell → uuids
    pages: dict[tuple[int, int], int]  # (cell, size KiB) → pages
    page_users: dict[tuple[int, int], list[str]]  # (cell, size KiB) → uuids
    floating_vcpus: int
    floating_memory: int
    floating_pages: dict[int, int]  # size KiB → pages
    group_owners: dict[str, str]  # resctrl group → uuid
    pci_users: dict[str, list[str]]  # address → uuids
    # (cell, size KiB) → pages held by claims (counted in ``pages`` too; not in the
    # kernel's counters until their guests run)
    claim_pages: Mapping[tuple[int, int], int] = {}


def _sum_contributions(contribs: list[Contribution],
                       conflicts: list[dict[str, Any]]) -> _Sums:
    """Add up the contributions; their own conflicts join ``conflicts``."""
    shared_vcpus: dict[int, int] = {}
    memory: dict[int, int] = {}
    mem_users: dict[int, list[str]] = {}
    pages: dict[tuple[int, int], int] = {}
    page_users: dict[tuple[int, int], list[str]] = {}
    floating_vcpus = floating_memory = 0
    floating_pages: dict[int, int] = {}
    group_owners: dict[str, str] = {}
    pci_users: dict[str, list[str]] = {}
    for c in contribs:
        for cell, n in c.shared_vcpus:
            shared_vcpus[cell] = shared_vcpus.get(cell, 0) + n
        for cell, kib in c.memory:
            memory[cell] = memory.get(cell, 0) + kib
            mem_users.setdefault(cell, []).append(c.uuid)
        for cell, size, n in c.pages:
            pages[(cell, size)] = pages.get((cell, size), 0) + n
            page_users.setdefault((cell, size), []).append(c.uuid)
        floating_vcpus += c.floating_vcpus
        floating_memory += c.floating_memory_kib
        for size, n in c.floating_pages:
            floating_pages[size] = floating_pages.get(size, 0) + n
        for g in c.groups:
            group_owners.setdefault(g, c.uuid)
        for addr in c.pci:
            pci_users.setdefault(addr, []).append(c.uuid)
        conflicts.extend(c.conflicts)
    return _Sums(shared_vcpus, memory, mem_users, pages, page_users, floating_vcpus,
                 floating_memory, floating_pages, group_owners, pci_users)


def _pci_users(pci_users: Mapping[str, list[str]], names: Mapping[str, str],
               conflicts: list[dict[str, Any]],
               claim_ids: frozenset[str] = frozenset()) -> list[dict[str, Any]]:
    """``usage.pci``: each address with its first guest and first claim; two users are a
    ``pci_overlap``."""
    pci_out = []
    for addr, users in sorted(pci_users.items()):
        guest = next((u for u in users if u not in claim_ids), None)
        claim = next((u for u in users if u in claim_ids), None)
        pci_out.append({"address": addr, "guest": guest, "claim": claim})
        if len(set(users)) > 1:
            conflicts.append(_conflict(
                "pci_overlap", f"PCI device {addr} is assigned to "
                + ", ".join(names[u] for u in dict.fromkeys(users)), users, pci=[addr]))
    return pci_out


def _cell_usage(
    ctx: Context, sums: _Sums, busy: _Busy, conflicts: list[dict[str, Any]],
) -> list[dict[str, Any]]:
    """``usage.cells``: pinned and free dedicated threads and cores, shared vCPUs,
    ordinary memory and hugepage pools per host cell."""
    pinned_by_cell: dict[int | None, list[int]] = {}
    for t in sorted(busy.owner):
        if busy.owner[t][0] not in busy.claim_ids:  # pinned = a guest's
            pinned_by_cell.setdefault(ctx.cpu_cell.get(t), []).append(t)
    cells_out = []
    taken = busy.taken()
    for cell in ctx.topo.cells:
        cid = cell.id
        # a dedicated thread is free when nobody owns it, no guest's shared vCPUs,
        # emulator or iothreads are pinned onto it (that is a floating_on_dedicated
        # conflict), no guest keeps it idle (held_by) and no claim holds it
        free = [t for t in ctx.cell_dedicated[cid] if t not in taken]
        free_cores = sum(1 for core in ctx.cell_dedicated_cores.get(cid, ())
                         if taken.isdisjoint(core))
        pool_kib = sum(p.total * p.size_kib for p in cell.hugepages)
        reserved = ctx.reserved_memory.get(cid, 0)
        limit = int(max(0, cell.memory_kib - pool_kib - reserved) * ctx.ram_ratio)
        used = sums.memory.get(cid, 0)
        if used > limit:
            conflicts.append(_conflict(
                "memory_exhausted",
                f"cell {cid}: guests hold {used} KiB of ordinary memory, more than the "
                f"{limit} KiB available", sums.mem_users.get(cid, []), cell=cid))
        hp_out = _cell_hugepages(ctx, cell, sums, conflicts)
        nshared = ctx.cell_shared_count.get(cid, 0)
        cells_out.append({
            "id": cid,
            "pinned_cpus": pinned_by_cell.get(cid, []),
            "free_pcpus": len(free),
            "free_cores": free_cores,
            "free_cpus": free,
            "dedicated_cpus": len(ctx.cell_dedicated[cid]),
            "shared_cpus": nshared,
            "shared_vcpus": sums.shared_vcpus.get(cid, 0),
            "shared_vcpus_limit": int(nshared * ctx.cpu_ratio),
            "memory_used_kib": used,
            "memory_free_kib": max(0, limit - used),
            "memory_limit_kib": limit,
            "reserved_memory_kib": reserved,
            "hugepages": hp_out,
        })
    return cells_out


def _cell_hugepages(ctx: Context, cell: Cell, sums: _Sums,
                    conflicts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One cell's pools (and page sizes guests use there without a pool): total,
    reserved, used, free; ``hugepages_exhausted`` past ``total − reserved``, and
    ``hugepages_untracked`` (``_untracked_pages``)."""
    cid, pages = cell.id, sums.pages
    hp_out = []
    sizes = sorted({p.size_kib for p in cell.hugepages}
                   | {s for (c2, s) in pages if c2 == cid})
    for size in sizes:
        total = ctx.pools.get((cid, size), 0)
        res_pages = ctx.reserved_pages.get((cid, size), 0)
        avail = max(0, total - res_pages)
        n = pages.get((cid, size), 0)
        if n > avail and (cid, size) in ctx.pools:
            conflicts.append(_conflict(
                "hugepages_exhausted",
                f"cell {cid}: guests use {n} pages of {size} KiB, more than the {avail} "
                f"available ({total} in the pool, {res_pages} reserved)",
                sums.page_users.get((cid, size), []), cell=cid, size_kib=size))
        free = max(0, avail - n)
        # claimed pages are not in the kernel's counters yet: compared without them
        claimed = sums.claim_pages.get((cid, size), 0)
        _untracked_pages(ctx, cid, size, n - claimed, max(0, avail - n + claimed), conflicts)
        hp_out.append({"size_kib": size, "total": total, "reserved": res_pages,
                       "used": n, "free": free})
    return hp_out


def _untracked_pages(ctx: Context, cid: int, size: int, used: int, free: int,
                     conflicts: list[dict[str, Any]]) -> None:
    """``hugepages_untracked``: the kernel counts more pages of a pool in use
    (``total − kernel free``) than the guests hold plus ``reserved`` covers, so the
    accounting's ``free`` is more than the kernel's: something that is not a tracked guest
    (a vswitch, a process outside libvirt) holds pages, and a scheduler trusting ``free``
    would overbook the pool. One dict look-up per pool and fold."""
    kernel_free = ctx.kernel_free.get((cid, size))
    if kernel_free is None or free <= kernel_free:
        return
    total = ctx.pools[(cid, size)]
    untracked = total - kernel_free - used
    conflicts.append(_conflict(
        "hugepages_untracked",
        f"cell {cid}: {untracked} pages of {size} KiB are in use by something other than "
        f"the tracked guests (the kernel has {kernel_free} of {total} free, guests hold "
        f"{used}, {ctx.reserved_pages.get((cid, size), 0)} reserved): {free} counted free, "
        f"{kernel_free} really free", [], cell=cid, size_kib=size, untracked=untracked,
        kernel_free=kernel_free))


def _thread_entries(
    ctx: Context, busy: _Busy, previous: Sequence[dict[str, Any]],
) -> list[dict[str, Any]]:
    """``usage.threads``, one entry per CPU of the topology. An entry equal to the one in
    ``previous`` (the previous fold's on this ctx, or empty) is that same dict, so
    packers can keep its bytes (entries are never changed once made: read-only)."""
    threads = []
    empty: list[str] = []
    owner, shared_on, held_by, claimed = busy.owner, busy.shared_on, busy.held_by, busy.claimed
    for i, cpu in enumerate(ctx.topo.cpus):
        t = cpu.id
        held = owner.get(t)
        if held is not None and held[0] in busy.claim_ids:
            held = None  # a claim's thread: in ``claim``, not ``guest``
        cl = held[1] if held else None
        guest = held[0] if held else None
        vcpu = cl.vcpu if cl else None
        emulator = bool(cl and cl.emulator)
        iothread = cl.iothread if cl else None
        shared = shared_on.get(t, empty)
        holder = held_by.get(t)
        claim = claimed.get(t)
        if previous:
            old = previous[i]
            if (old["guest"] == guest and old["vcpu"] == vcpu and old["held_by"] == holder
                    and old["emulator"] == emulator and old["iothread"] == iothread
                    and old["shared_guests"] == shared and old.get("claim") == claim):
                threads.append(old)
                continue
        threads.append({
            "cpu": t,
            "cell": ctx.cpu_cell.get(t),
            "role": _role(ctx, t),
            "guest": guest,
            "vcpu": vcpu,
            "emulator": emulator,
            "iothread": iothread,
            "shared_guests": shared,
            "held_by": holder,
            "claim": claim,
        })
    return threads


def _cache_allocations(topo: HostTopology, group_owners: Mapping[str, str],
                       previous: list[dict[str, Any]] | None,
                       claimed: tuple[tuple[str, str, int, int, str], ...] = (),
                       ) -> list[dict[str, Any]]:
    """``usage.caches`` (``hostagent.resctrl_cbm.cache_ways`` with the groups' owners and the
    ways claims hold: (claim id, resource, cache id, mask, group)).

    ``previous`` (the previous fold's on the same topology, or None) is handed back as
    is when every group it lists has the same owner now and no claim holds ways, now or
    then: its contents depend on nothing else."""
    if previous is None or claimed:
        return cache_ways(topo, group_owners, claimed)
    for cache in previous:
        for alloc in cache["allocations"]:
            if alloc.get("claim") is not None or alloc["guest"] != group_owners.get(
                    alloc["group"]):
                return cache_ways(topo, group_owners, claimed)
    return previous


def _role(ctx: Context, cpu: int) -> str:
    if cpu not in ctx.online:
        return "offline"
    if cpu in ctx.dedicated:
        return "dedicated"
    if cpu in ctx.shared:
        return "shared"
    return "host"


def _claim_text(cl: Claim) -> str:
    if cl.vcpu is not None:
        return f"vCPU {cl.vcpu}"
    if cl.emulator:
        return "emulator"
    return f"iothread {cl.iothread}"


# --------------------------------------------------------------------------- entry points


def compute_usage(
    topo: HostTopology, resources: Mapping[str, Any], guests: Iterable[GuestRecord]
) -> dict[str, Any]:
    """The ``usage`` dict from scratch (a full recompute). Pure."""
    ctx = make_context(topo, resources)
    latest: dict[str, GuestRecord] = {}
    for g in guests:
        latest[g.uuid] = g
    return fold(ctx, (guest_contribution(ctx, g) for g in latest.values()))


class UsageTracker:
    """Cached contributions for the daemon: one guest's event costs one guest's work.

    >>> t = UsageTracker(topo, resources)
    >>> t.update(record)       # on a lifecycle/tunable/device event for that domain
    >>> t.remove(uuid)         # on undefine (or when read_guest says it vanished)
    >>> t.replace_all(records) # full resync (connect, reconnect, periodic)
    >>> t.set_host(topo, resources)  # re-probe (hotplug, resctrl change) or config reload
    >>> usage = t.usage()      # fold, memoised until the next change

    ``claims`` holds the contributions of outstanding claims by id (``put_claim``,
    ``drop_claim``; ``hostagent.claims.ClaimTracker`` keeps them current): they are folded
    with the guests.
    """

    def __init__(self, topo: HostTopology, resources: Mapping[str, Any]) -> None:
        self.ctx = make_context(topo, resources)
        self.records: dict[str, GuestRecord] = {}
        self.contributions: dict[str, Contribution] = {}
        self.claims: dict[str, Contribution] = {}
        self._usage: dict[str, Any] | None = None  # memo; None after a change
        # what the kernel does with each running guest's threads (hostagent.guests.threads
        # check_guests): uuid → {"pid", "threads", "drift"}; data, read elsewhere
        self.threads: dict[str, dict[str, Any]] = {}
        # host tasks allowed on dedicated threads (hostagent.guests.intruders
        # scan_intruders), None until a check ran; data, read elsewhere
        self.intruders: dict[str, Any] | None = None
        # the last fold on self.ctx: the next fold hands over its unchanged parts
        self._previous: dict[str, Any] | None = None
        # +1 whenever the host or a guest's contribution changes (not for claims):
        # what is worked out of the guests alone is kept while it stays the same
        self.generation = 0

    def set_host(self, topo: HostTopology, resources: Mapping[str, Any]) -> None:
        self.ctx = make_context(topo, resources)
        self.generation += 1
        self.contributions = {u: self._contribute(r) for u, r in self.records.items()}
        self._usage = self._previous = None  # a new context starts from fresh entries

    def _contribute(self, record: GuestRecord) -> Contribution:
        """One guest's contribution (a subclass may add to it: ``hostagent.claims``)."""
        return guest_contribution(self.ctx, record)

    def update(self, record: GuestRecord) -> None:
        self.records[record.uuid] = record
        self.contributions[record.uuid] = self._contribute(record)
        self.generation += 1
        self._usage = None

    def remove(self, uuid: str) -> None:
        if self.records.pop(uuid, None) is not None:
            self.contributions.pop(uuid, None)
            self.generation += 1
            self._usage = None

    def replace_all(self, records: Iterable[GuestRecord]) -> None:
        self.records = {r.uuid: r for r in records}
        self.contributions = {u: self._contribute(r) for u, r in self.records.items()}
        self.generation += 1
        self._usage = None

    def set_threads(self, checked: Mapping[str, dict[str, Any]]) -> None:
        """The latest thread check of the running guests (replaces the previous one)."""
        if checked != self.threads:
            self.threads = dict(checked)
            self._usage = None

    def set_intruders(self, scanned: Mapping[str, Any] | None) -> None:
        """The latest intruder scan (replaces the previous one; None: no scan)."""
        if scanned != self.intruders:
            self.intruders = None if scanned is None else dict(scanned)
            self._usage = None

    def put_claim(self, contribution: Contribution) -> None:
        """Hold a claim (``contribution.uuid`` = its id)."""
        self.claims[contribution.uuid] = contribution
        self._usage = None

    def drop_claim(self, claim_id: str) -> bool:
        """Stop holding a claim; False if it was not held."""
        if self.claims.pop(claim_id, None) is None:
            return False
        self._usage = None
        return True

    def usage(self) -> dict[str, Any]:
        if self._usage is None:
            folded = fold(self.ctx, self.contributions.values(), self._previous,
                          self.claims.values())
            self._previous = folded
            self._usage = with_intruders(with_threads(folded, self.threads),
                                         self.intruders)
        return self._usage


def with_threads(usage: dict[str, Any], checked: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
    """``usage`` with ``guests[].threads`` (and ``guests[].pid``) for each guest in
    ``checked`` and an ``affinity_drift`` conflict per drifting thread. Pure; ``usage``
    and its guest entries are not modified (new dicts where something is added)."""
    if not checked:
        return usage
    guests: list[dict[str, Any]] = []
    conflicts = list(usage["conflicts"])
    for g in usage["guests"]:
        info = checked.get(g["uuid"])
        if info is None:
            guests.append(g)
            continue
        guests.append({**g, "pid": info["pid"], "threads": info["threads"]})
        for d in info["drift"]:
            what = "emulator thread" if d["vcpu"] is None else f"vCPU {d['vcpu']}"
            conflicts.append(_conflict(
                "affinity_drift",
                f"{g['name']}: {what} (tid {d['tid']}) runs on "
                f"{format_cpulist(d['actual'])}, the XML says {format_cpulist(d['declared'])}",
                [g["uuid"]], vcpu=d["vcpu"], tid=d["tid"], declared=d["declared"],
                actual=d["actual"]))
    conflicts.sort(key=lambda c: (c["kind"], c["detail"]))
    return {**usage, "guests": guests, "conflicts": conflicts}


def with_intruders(usage: dict[str, Any], scanned: Mapping[str, Any] | None) -> dict[str, Any]:
    """``usage`` with ``intruders`` (``[{cpu, tasks, conflicting}]`` per online dedicated
    thread) and, when conflicting host tasks were found, one ``host_tasks_on_dedicated``
    conflict naming the worst (``hostagent.guests.intruders.scan_intruders``). Pure;
    ``usage`` is not modified. Nothing is added without a scan (``None``)."""
    if scanned is None:
        return usage
    out = {**usage, "intruders": scanned["cpus"]}
    if scanned["conflicting"]:
        worst = scanned["worst"]
        cpus = sorted({c["cpu"] for c in scanned["cpus"] if c["conflicting"]})
        named = ", ".join(f"{t['comm']} (pid {t['pid']}, tid {t['tid']}) on "
                          f"{format_cpulist(t['cpus'])}" for t in worst)
        more = scanned["conflicting"] - len(worst)
        n = scanned["conflicting"]
        detail = (f"{n} host task{'s' if n != 1 else ''} may run on dedicated "
                  f"thread{'s' if len(cpus) != 1 else ''} {format_cpulist(cpus)}: {named}"
                  + (f" and {more} more" if more else ""))
        conflicts = [*usage["conflicts"], _conflict(
            "host_tasks_on_dedicated", detail, [], cpus=cpus, count=n, tasks=worst)]
        conflicts.sort(key=lambda c: (c["kind"], c["detail"]))
        out["conflicts"] = conflicts
    return out
