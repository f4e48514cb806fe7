"""Domain XML → ``GuestSpec``: everything the tracker needs about one libvirt guest.

Pure parsing (``xml.etree``), no libvirt. It reads what ``virDomainGetXMLDesc`` prints
for a running domain (the live XML, with ``id`` attributes) as well as hand-written
XML, and follows libvirt's own rules where it matters:

* sizes are libvirt "scaled integers": ``unit`` is ``b``/``bytes``, ``k``/``KiB``
  (1024), ``KB`` (1000), and likewise ``M``, ``G``, ``T``, ``P``, ``E``, case-insensitive;
  the default unit is KiB for ``memory``, ``currentMemory``, ``cpu/numa/cell/@memory``,
  hugepage ``page/@size``, memory devices and ``cachetune/cache/@size`` (checked
  against libvirt: ``size='2048'`` comes back as ``size='2' unit='MiB'``); memory is
  rounded up to whole KiB as libvirt does;
* CPU sets use libvirt's bitmap syntax: ``1-4,^3,6`` (ranges, ``^`` excludes), ids below
  16384 (``VIR_DOMAIN_CPUMASK_LEN``);
* a ``cachetune``/``memorytune`` allocation id is the ``id`` attribute libvirt writes
  into the live XML, else ``vcpus_<list>`` exactly as libvirt derives it (``virBitmapFormat``);
* ``metadata/fit/idle/@cpus`` in hostagent's namespace (``FIT_METADATA_NS``, written by
  ``hostagent fit`` for ``isolate`` guests) lists host threads the guest keeps idle;
  elements are matched by namespace URI, not prefix (libvirt may re-prefix them);
  ``metadata/fit/claim/@id`` there names the agent's claim the domain was booted from
  (``hostagent.claims``; at most one, ``CLAIM_ID_PATTERN``);

Every problem raises ``DomainXMLError`` naming the domain, the element or attribute and
the bad value. Nothing here knows the host: checking pins against host CPUs and cells is
the tracker's job (those are conflicts, not parse errors).
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

from hostagent.cpulist import (
    BACKWARDS,
    BAD_ELEMENT,
    OUT_OF_RANGE,
    CpuListError,
    format_cpulist,
    parse_cpu_ranges,
)
from hostagent.errors import HostagentError

MAX_CPU_ID = 16383  # libvirt's VIR_DOMAIN_CPUMASK_LEN - 1
MEMORY_MODES = ("strict", "preferred", "interleave", "restrictive")
CACHE_TYPES = ("both", "code", "data")
SCHEDULERS = ("batch", "idle", "fifo", "rr")
# hostagent's domain metadata namespace (hostagent.fit.libvirt_xml.METADATA_NS writes it)
FIT_METADATA_NS = "https://hostagent.dev/xmlns/fit/1"
_FIT = f"{{{FIT_METADATA_NS}}}fit"
_IDLE = f"{{{FIT_METADATA_NS}}}idle"
_CLAIM = f"{{{FIT_METADATA_NS}}}claim"
#: What a claim id looks like (``hostagent.claims`` makes them; the metadata carries one).
CLAIM_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class DomainXMLError(HostagentError):
    """A domain XML that cannot be parsed; the message names the element and value."""

    def __init__(self, domain: str | None, where: str, problem: str, value: object = None):
        self.domain = domain
        self.where = where
        self.problem = problem
        self.value = value
        text = f"domain {domain!r}: " if domain else "domain XML: "
        text += f"{where}: {problem}" if where else problem
        if value is not None:
            text += f" (got {value!r})"
        super().__init__(text)


# --------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class CpuTopology:
    """``cpu/topology``: the guest's sockets × dies × clusters × cores × threads."""

    sockets: int
    dies: int
    clusters: int
    cores: int
    threads: int


@dataclass(frozen=True)
class GuestCell:
    """One ``cpu/numa/cell``: guest NUMA node ``id`` with its vCPUs and memory.

    ``memory_kib`` includes memory devices (``devices/memory/target/node``) of this cell.
    """

    id: int
    vcpus: tuple[int, ...]
    memory_kib: int


@dataclass(frozen=True)
class MemNode:
    """``numatune/memnode``: where one guest cell's memory comes from."""

    cellid: int
    mode: str
    nodeset: tuple[int, ...]


@dataclass(frozen=True)
class NumaTune:
    """``numatune``: the default memory binding (``memory``) and per-cell ones."""

    mode: str | None  # of numatune/memory; None when there is no memory element
    nodeset: tuple[int, ...] | None  # host cells; None = not given (placement auto/none)
    placement: str | None
    memnodes: tuple[MemNode, ...] = ()

    def memnode(self, cellid: int) -> MemNode | None:
        for m in self.memnodes:
            if m.cellid == cellid:
                return m
        return None


@dataclass(frozen=True)
class HugePage:
    """``memoryBacking/hugepages/page``. ``size_kib`` None = the host's default size.

    ``nodeset`` lists guest cells this page size backs; None = every cell not named by
    another ``page``.
    """

    size_kib: int | None
    nodeset: tuple[int, ...] | None


@dataclass(frozen=True)
class CacheRequest:
    """``cachetune/cache``: ``size_bytes`` of cache ``id`` at ``level`` (type both/code/data)."""

    id: int
    level: int
    type: str
    size_bytes: int


@dataclass(frozen=True)
class CacheMonitor:
    """``cachetune/monitor``."""

    level: int
    vcpus: tuple[int, ...]


@dataclass(frozen=True)
class CacheTune:
    """One ``cachetune``. ``alloc_id`` names its resctrl group suffix (see module doc).

    A cachetune with no ``cache`` element allocates nothing (its vCPUs stay in the
    default group; only monitors are created).
    """

    vcpus: tuple[int, ...]
    alloc_id: str
    caches: tuple[CacheRequest, ...]
    monitors: tuple[CacheMonitor, ...]


@dataclass(frozen=True)
class MemoryTune:
    """One ``memorytune``: ``nodes`` = ((MB domain id, bandwidth), ...)."""

    vcpus: tuple[int, ...]
    alloc_id: str
    nodes: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class VcpuSched:
    """``cputune/vcpusched``."""

    vcpus: tuple[int, ...]
    scheduler: str
    priority: int | None


@dataclass(frozen=True)
class GuestSpec:
    """What one domain XML says about CPU, memory, NUMA and cache placement."""

    name: str
    uuid: str
    domain_id: int | None  # the running domain's id (live XML only)
    vcpus: int  # maximum vCPUs (the <vcpu> value)
    current_vcpus: int
    vcpu_placement: str  # static | auto
    cpuset: tuple[int, ...] | None  # <vcpu cpuset>: default affinity of every vCPU
    vcpupin: Mapping[int, tuple[int, ...]]
    emulatorpin: tuple[int, ...] | None
    iothreads: int
    iothreadpin: Mapping[int, tuple[int, ...]]
    vcpusched: tuple[VcpuSched, ...]
    cachetunes: tuple[CacheTune, ...]
    memorytunes: tuple[MemoryTune, ...]
    numatune: NumaTune | None
    topology: CpuTopology | None
    cells: tuple[GuestCell, ...]  # () = no guest NUMA topology
    memory_kib: int
    current_memory_kib: int
    hugepages: bool  # memoryBacking/hugepages present
    pages: tuple[HugePage, ...]  # () with hugepages = the default size for all memory
    hostdevs: tuple[str, ...] = ()  # PCI addresses assigned (hostdev, interface hostdev)
    idle_cpus: tuple[int, ...] = ()  # host threads kept idle (hostagent:fit metadata)
    claim_id: str | None = None  # the agent's claim it was booted from (hostagent:fit metadata)

    def vcpu_affinity(self, vcpu: int) -> tuple[int, ...] | None:
        """Host CPUs vCPU ``vcpu`` may run on: its vcpupin, else ``<vcpu cpuset>``."""
        pin = self.vcpupin.get(vcpu)
        return pin if pin is not None else self.cpuset

    def emulator_affinity(self) -> tuple[int, ...] | None:
        """Emulator threads: emulatorpin, else ``<vcpu cpuset>`` (libvirt's default)."""
        return self.emulatorpin if self.emulatorpin is not None else self.cpuset

    def page_size_for_cell(self, cellid: int) -> tuple[bool, int | None]:
        """(hugepage-backed?, size in KiB or None = host default) for one guest cell."""
        if not self.hugepages:
            return False, None
        fallback: HugePage | None = None
        for page in self.pages:
            if page.nodeset is None:
                fallback = fallback or page
            elif cellid in page.nodeset:
                return True, page.size_kib
        return True, fallback.size_kib if fallback else None


@dataclass(frozen=True)
class GuestRecord:
    """One domain as read from libvirt (``hostagent.guests.source.read_guest``): its
    identity, state and parsed XML. ``spec`` is None when inactive or unparsable; then
    ``error`` says why it did not parse (None for an inactive domain)."""

    uuid: str
    name: str
    state: str
    active: bool
    spec: GuestSpec | None
    error: str | None = None


# --------------------------------------------------------------------------- helpers

_UNIT_POWER = {"k": 1, "m": 2, "g": 3, "t": 4, "p": 5, "e": 6}
_NUMBER = re.compile(r"\s*\+?(\d+)\s*\Z")


def unit_factor(unit: str | None, default: int) -> int | None:
    """Bytes per ``unit`` (libvirt's ``virScaleInteger``), or None for an unknown unit."""
    if unit is None or unit == "":
        return default
    u = unit.lower()
    if u in ("b", "bytes"):
        return 1
    power = _UNIT_POWER.get(u[0])
    if power is None:
        return None
    rest = u[1:]
    if rest in ("", "ib"):
        return 1024**power
    if rest == "b":
        return 1000**power
    return None


def parse_cpuset(text: str) -> tuple[int, ...]:
    """libvirt's bitmap syntax ``"1-4,^3,6"`` → sorted ids; ValueError with the reason.

    The grammar of ``hostagent.cpulist.parse_cpu_ranges`` with ``^`` exclusions and blanks
    inside elements, ids up to ``MAX_CPU_ID``; unlike a kernel list, a cpuset may not be
    empty nor exclude every id it names.
    """
    if not text.strip():
        raise ValueError("empty CPU set")
    try:
        out = parse_cpu_ranges(text, last=MAX_CPU_ID, exclusions=True, blanks=True)
    except CpuListError as exc:
        raise ValueError(exc.reworded(_CPUSET_WORDS)) from None
    if not out:
        raise ValueError("the set is empty")
    return out


_CPUSET_WORDS = {
    BAD_ELEMENT: "bad element {element!r}",
    BACKWARDS: "range {element!r} runs backwards",
    OUT_OF_RANGE: "id {cpu} above the maximum {last}",
}


class _Ctx:
    """Error reporting and typed attribute access for one domain."""

    def __init__(self, name: str | None) -> None:
        self.name = name

    def fail(self, where: str, problem: str, value: object = None) -> DomainXMLError:
        return DomainXMLError(self.name, where, problem, value)

    def attr(self, el: ET.Element, key: str, where: str, *, required: bool = True) -> str | None:
        value = el.get(key)
        if value is None and required:
            raise self.fail(f"{where}/@{key}", "missing attribute")
        return value

    def int_attr(
        self, el: ET.Element, key: str, where: str, *, minimum: int = 0,
        required: bool = True, default: int | None = None,
    ) -> int | None:
        value = self.attr(el, key, where, required=required)
        if value is None:
            return default
        return self.to_int(value, f"{where}/@{key}", minimum=minimum)

    def to_int(self, value: str, where: str, *, minimum: int = 0) -> int:
        m = _NUMBER.match(value)
        if not m:
            raise self.fail(where, "not a non-negative integer", value)
        n = int(m.group(1))
        if n < minimum:
            raise self.fail(where, f"must be >= {minimum}", value)
        return n

    def cpuset(self, value: str | None, where: str) -> tuple[int, ...]:
        if value is None:
            raise self.fail(where, "missing attribute")
        try:
            return parse_cpuset(value)
        except ValueError as exc:
            raise self.fail(where, f"not a CPU set ({exc})", value) from None

    def choice(self, value: str | None, where: str, choices: tuple[str, ...]) -> str:
        if value not in choices:
            raise self.fail(where, f"must be one of {', '.join(choices)}", value)
        return value  # type: ignore[return-value]

    def scaled(
        self, el: ET.Element, where: str, *, value_attr: str | None, default_unit: int,
        to_unit: int,
    ) -> int:
        """A scaled integer (value in text or ``value_attr``; ``unit`` attribute) in
        multiples of ``to_unit`` bytes, rounded up."""
        raw = el.get(value_attr) if value_attr else el.text
        vwhere = f"{where}/@{value_attr}" if value_attr else where
        if raw is None or not raw.strip():
            raise self.fail(vwhere, "missing value")
        number = self.to_int(raw, vwhere)
        unit = el.get("unit")
        factor = unit_factor(unit, default_unit)
        if factor is None:
            raise self.fail(
                f"{where}/@unit", "unknown unit (use b, KiB, MiB, GiB, TiB, KB, MB, GB, ...)",
                unit,
            )
        total = number * factor
        return -(-total // to_unit)


def _alloc_id(ctx: _Ctx, el: ET.Element, vcpus: tuple[int, ...], where: str) -> str:
    explicit = el.get("id")
    if explicit is not None:
        if not explicit or "/" in explicit or explicit in (".", ".."):
            raise ctx.fail(f"{where}/@id", "not a usable allocation id", explicit)
        return explicit
    return "vcpus_" + format_cpulist(vcpus)


def _tune_vcpus(ctx: _Ctx, el: ET.Element, where: str, nvcpus: int) -> tuple[int, ...]:
    raw = el.get("vcpus")
    vcpus = tuple(range(nvcpus)) if raw is None else ctx.cpuset(raw, f"{where}/@vcpus")
    bad = [v for v in vcpus if v >= nvcpus]
    if bad:
        raise ctx.fail(f"{where}/@vcpus", f"vCPU {bad[0]} does not exist (the domain has "
                       f"{nvcpus})", raw)
    return vcpus


# --------------------------------------------------------------------------- parsing
#
# One function per domain element, in the order libvirt's virDomainDefParseXML reads
# them (identity, vcpu, cputune, iothreads, memory, numatune, cpu, devices,
# memoryBacking, metadata). Checks run in that order too: a document with several
# problems reports the first one met.


def parse_domain(xml: str) -> GuestSpec:
    """Parse one domain XML document. Raises ``DomainXMLError`` naming the problem."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise DomainXMLError(None, "", f"not well-formed XML: {exc}") from None
    if root.tag != "domain":
        raise DomainXMLError(None, "", "the root element is not <domain>", root.tag)
    ctx, name, uuid, domain_id = _parse_identity(root)
    vcpu = _parse_vcpu(ctx, root.find("vcpu"))
    nvcpus = vcpu.count
    tune = _parse_cputune(ctx, root.find("cputune"), nvcpus)
    iothreads = _parse_iothreads(ctx, root.find("iothreads"), tune.iothreadpin)
    memory_kib, current_memory = _parse_memory(ctx, root)
    numatune = _parse_numatune(ctx, root.find("numatune"))
    topology, cells = _parse_cpu(ctx, root.find("cpu"), nvcpus)
    extra = _parse_memory_devices(ctx, root)
    cells = _add_memory_devices(ctx, cells, extra)
    if memory_kib == 0:  # no <memory>: the guest cells' sum, else the memory devices'
        memory_kib = sum(c.memory_kib for c in cells) + (0 if cells else sum(extra.values()))
        current_memory = current_memory or memory_kib
    _check_memnodes(ctx, numatune, cells)
    hugepages, pages = _parse_memory_backing(ctx, root.find("memoryBacking"))
    hostdevs = _parse_pci_devices(ctx, root)
    idle, claim_id = _parse_fit_metadata(ctx, root)
    return GuestSpec(
        name=name,
        uuid=uuid,
        domain_id=domain_id,
        vcpus=nvcpus,
        current_vcpus=vcpu.current,
        vcpu_placement=vcpu.placement,
        cpuset=vcpu.cpuset,
        vcpupin=tune.vcpupin,
        emulatorpin=tune.emulatorpin,
        iothreads=max(iothreads, max(tune.iothreadpin, default=0)),
        iothreadpin=tune.iothreadpin,
        vcpusched=tune.vcpusched,
        cachetunes=tune.cachetunes,
        memorytunes=tune.memorytunes,
        numatune=numatune,
        topology=topology,
        cells=cells,
        memory_kib=memory_kib,
        current_memory_kib=current_memory,
        hugepages=hugepages,
        pages=pages,
        hostdevs=hostdevs,
        idle_cpus=idle,
        claim_id=claim_id,
    )


_UUID = re.compile(r"[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}")


def _parse_identity(root: ET.Element) -> tuple[_Ctx, str, str, int | None]:
    """``name``, ``uuid`` (lower case, with dashes) and ``domain/@id`` (None unless the
    domain runs), and the error context named after the domain."""
    name_el = root.find("name")
    name = (name_el.text or "").strip() if name_el is not None else ""
    ctx = _Ctx(name or None)
    if not name:
        raise ctx.fail("name", "missing domain name")
    uuid_el = root.find("uuid")
    uuid = (uuid_el.text or "").strip().lower() if uuid_el is not None else ""
    if not _UUID.fullmatch(uuid):
        raise ctx.fail("uuid", "missing or not a UUID", uuid or None)
    if "-" not in uuid:
        uuid = f"{uuid[:8]}-{uuid[8:12]}-{uuid[12:16]}-{uuid[16:20]}-{uuid[20:]}"
    domain_id = None
    if root.get("id") is not None:
        raw_id = root.get("id", "")
        domain_id = None if raw_id.strip() == "-1" else ctx.to_int(raw_id, "domain/@id")
    return ctx, name, uuid, domain_id


class _Vcpu(NamedTuple):
    """``vcpu``: the maximum count, ``current``, ``placement`` and ``cpuset``."""

    count: int = 1
    current: int = 1
    placement: str = "static"
    cpuset: tuple[int, ...] | None = None


def _parse_vcpu(ctx: _Ctx, el: ET.Element | None) -> _Vcpu:
    if el is None:
        return _Vcpu()
    nvcpus = ctx.to_int(el.text or "", "vcpu", minimum=1)
    current = ctx.int_attr(el, "current", "vcpu", minimum=1, required=False,
                           default=nvcpus) or nvcpus
    if current > nvcpus:
        raise ctx.fail("vcpu/@current", f"more than the {nvcpus} vCPUs", current)
    placement = ctx.choice(el.get("placement", "static"), "vcpu/@placement",
                           ("static", "auto"))
    cpuset = None
    if el.get("cpuset") is not None:
        cpuset = ctx.cpuset(el.get("cpuset"), "vcpu/@cpuset")
    return _Vcpu(nvcpus, current, placement, cpuset)


class _CpuTune(NamedTuple):
    """``cputune``: pins, vCPU schedulers, cache and memory bandwidth allocations."""

    vcpupin: dict[int, tuple[int, ...]]
    emulatorpin: tuple[int, ...] | None
    iothreadpin: dict[int, tuple[int, ...]]
    vcpusched: tuple[VcpuSched, ...]
    cachetunes: tuple[CacheTune, ...]
    memorytunes: tuple[MemoryTune, ...]


def _parse_cputune(ctx: _Ctx, cputune: ET.Element | None, nvcpus: int) -> _CpuTune:
    if cputune is None:
        return _CpuTune({}, None, {}, (), (), ())
    vcpupin = _parse_vcpupins(ctx, cputune, nvcpus)
    emulatorpin = None
    emu = cputune.find("emulatorpin")
    if emu is not None:
        emulatorpin = ctx.cpuset(emu.get("cpuset"), "cputune/emulatorpin/@cpuset")
    iothreadpin = _parse_iothreadpins(ctx, cputune)
    scheds = []
    for el in cputune.findall("vcpusched"):
        vs = _tune_vcpus(ctx, el, "cputune/vcpusched", nvcpus)
        sched = ctx.choice(el.get("scheduler"), "cputune/vcpusched/@scheduler", SCHEDULERS)
        prio = ctx.int_attr(el, "priority", "cputune/vcpusched", required=False)
        scheds.append(VcpuSched(vs, sched, prio))
    cachetunes = tuple(_parse_cachetune(ctx, el, f"cputune/cachetune[{i + 1}]", nvcpus)
                       for i, el in enumerate(cputune.findall("cachetune")))
    memorytunes = tuple(_parse_memorytune(ctx, el, f"cputune/memorytune[{i + 1}]", nvcpus)
                        for i, el in enumerate(cputune.findall("memorytune")))
    return _CpuTune(vcpupin, emulatorpin, iothreadpin, tuple(scheds), cachetunes,
                    memorytunes)


def _parse_vcpupins(ctx: _Ctx, cputune: ET.Element, nvcpus: int) -> dict[int, tuple[int, ...]]:
    vcpupin: dict[int, tuple[int, ...]] = {}
    for pin in cputune.findall("vcpupin"):
        v = ctx.int_attr(pin, "vcpu", "cputune/vcpupin")
        assert v is not None
        where = f"cputune/vcpupin[@vcpu='{v}']"
        if v >= nvcpus:
            raise ctx.fail(f"{where}/@vcpu", f"vCPU {v} does not exist (the domain has "
                           f"{nvcpus})", pin.get("vcpu"))
        if v in vcpupin:
            raise ctx.fail(where, "duplicate vcpupin for this vCPU")
        vcpupin[v] = ctx.cpuset(pin.get("cpuset"), f"{where}/@cpuset")
    return vcpupin


def _parse_iothreadpins(ctx: _Ctx, cputune: ET.Element) -> dict[int, tuple[int, ...]]:
    iothreadpin: dict[int, tuple[int, ...]] = {}
    for pin in cputune.findall("iothreadpin"):
        t = ctx.int_attr(pin, "iothread", "cputune/iothreadpin", minimum=1)
        assert t is not None
        where = f"cputune/iothreadpin[@iothread='{t}']"
        if t in iothreadpin:
            raise ctx.fail(where, "duplicate iothreadpin for this iothread")
        iothreadpin[t] = ctx.cpuset(pin.get("cpuset"), f"{where}/@cpuset")
    return iothreadpin


def _parse_cachetune(ctx: _Ctx, el: ET.Element, where: str, nvcpus: int) -> CacheTune:
    vs = _tune_vcpus(ctx, el, where, nvcpus)
    caches = []
    for c in el.findall("cache"):
        cw = f"{where}/cache"
        cid = ctx.int_attr(c, "id", cw)
        level = ctx.int_attr(c, "level", cw, minimum=1)
        ctype = ctx.choice(c.get("type"), f"{cw}/@type", CACHE_TYPES)
        size = ctx.scaled(c, cw, value_attr="size", default_unit=1024, to_unit=1)
        assert cid is not None and level is not None
        caches.append(CacheRequest(cid, level, ctype, size))
    monitors = []
    for m in el.findall("monitor"):
        mw = f"{where}/monitor"
        level = ctx.int_attr(m, "level", mw, minimum=1)
        assert level is not None
        monitors.append(CacheMonitor(level, _tune_vcpus(ctx, m, mw, nvcpus)))
    return CacheTune(vs, _alloc_id(ctx, el, vs, where), tuple(caches), tuple(monitors))


def _parse_memorytune(ctx: _Ctx, el: ET.Element, where: str, nvcpus: int) -> MemoryTune:
    vs = _tune_vcpus(ctx, el, where, nvcpus)
    nodes = []
    for n in el.findall("node"):
        nid = ctx.int_attr(n, "id", f"{where}/node")
        bw = ctx.int_attr(n, "bandwidth", f"{where}/node")
        assert nid is not None and bw is not None
        nodes.append((nid, bw))
    return MemoryTune(vs, _alloc_id(ctx, el, vs, where), tuple(nodes))


def _parse_iothreads(ctx: _Ctx, el: ET.Element | None,
                     iothreadpin: Mapping[int, tuple[int, ...]]) -> int:
    """The ``iothreads`` count (0 without the element); every ``iothreadpin`` names one
    of them when it is given."""
    iothreads = 0
    if el is not None:
        iothreads = ctx.to_int(el.text or "", "iothreads")
    for t in iothreadpin:
        if iothreads and t > iothreads:
            raise ctx.fail(f"cputune/iothreadpin[@iothread='{t}']/@iothread",
                           f"iothread {t} does not exist (the domain has {iothreads})", t)
    return iothreads


def _parse_memory(ctx: _Ctx, root: ET.Element) -> tuple[int, int]:
    """(``memory``, ``currentMemory``) in KiB; 0 without ``memory``, and ``currentMemory``
    defaults to ``memory``."""
    mem_el = root.find("memory")
    memory_kib = 0
    if mem_el is not None:
        memory_kib = ctx.scaled(mem_el, "memory", value_attr=None, default_unit=1024,
                                to_unit=1024)
    cur_el = root.find("currentMemory")
    current_memory = memory_kib
    if cur_el is not None:
        current_memory = ctx.scaled(cur_el, "currentMemory", value_attr=None,
                                    default_unit=1024, to_unit=1024)
    return memory_kib, current_memory


def _parse_numatune(ctx: _Ctx, nt: ET.Element | None) -> NumaTune | None:
    if nt is None:
        return None
    mode = nodeset = placement = None
    m = nt.find("memory")
    if m is not None:
        mode = ctx.choice(m.get("mode", "strict"), "numatune/memory/@mode", MEMORY_MODES)
        placement = m.get("placement")
        if m.get("nodeset") is not None:
            nodeset = ctx.cpuset(m.get("nodeset"), "numatune/memory/@nodeset")
        if placement is not None:
            ctx.choice(placement, "numatune/memory/@placement", ("static", "auto"))
    memnodes = []
    seen: set[int] = set()
    for mn in nt.findall("memnode"):
        cid = ctx.int_attr(mn, "cellid", "numatune/memnode")
        assert cid is not None
        where = f"numatune/memnode[@cellid='{cid}']"
        if cid in seen:
            raise ctx.fail(where, "duplicate memnode for this guest cell")
        seen.add(cid)
        memnodes.append(MemNode(
            cid,
            ctx.choice(mn.get("mode", "strict"), f"{where}/@mode", MEMORY_MODES),
            ctx.cpuset(mn.get("nodeset"), f"{where}/@nodeset"),
        ))
    return NumaTune(mode, nodeset, placement, tuple(memnodes))


def _parse_cpu(ctx: _Ctx, cpu_el: ET.Element | None,
               nvcpus: int) -> tuple[CpuTopology | None, tuple[GuestCell, ...]]:
    """``cpu/topology`` and the guest NUMA cells of ``cpu/numa``."""
    if cpu_el is None:
        return None, ()
    topology = None
    top = cpu_el.find("topology")
    if top is not None:
        vals = {
            k: ctx.int_attr(top, k, "cpu/topology", minimum=1,
                            required=k in ("sockets", "cores", "threads"), default=1)
            for k in ("sockets", "dies", "clusters", "cores", "threads")
        }
        topology = CpuTopology(**vals)  # type: ignore[arg-type]
    numa = cpu_el.find("numa")
    cells = _parse_numa_cells(ctx, numa, nvcpus) if numa is not None else ()
    return topology, cells


def _parse_numa_cells(ctx: _Ctx, numa: ET.Element, nvcpus: int) -> tuple[GuestCell, ...]:
    cells: list[GuestCell] = []
    taken: dict[int, int] = {}  # vCPU -> the guest cell that has it
    for i, cell in enumerate(numa.findall("cell")):
        cid = ctx.int_attr(cell, "id", "cpu/numa/cell", required=False, default=i)
        assert cid is not None
        where = f"cpu/numa/cell[@id='{cid}']"
        if any(c.id == cid for c in cells):
            raise ctx.fail(where, "duplicate guest cell id")
        vs: tuple[int, ...] = ()
        if cell.get("cpus") is not None and cell.get("cpus", "").strip():
            vs = ctx.cpuset(cell.get("cpus"), f"{where}/@cpus")
        for v in vs:
            if v >= nvcpus:
                raise ctx.fail(f"{where}/@cpus", f"vCPU {v} does not exist (the "
                               f"domain has {nvcpus})", cell.get("cpus"))
            if v in taken:
                raise ctx.fail(f"{where}/@cpus", f"vCPU {v} is already in guest "
                               f"cell {taken[v]}", cell.get("cpus"))
            taken[v] = cid
        mem = ctx.scaled(cell, where, value_attr="memory", default_unit=1024,
                         to_unit=1024)
        cells.append(GuestCell(cid, vs, mem))
    return tuple(cells)


def _parse_memory_devices(ctx: _Ctx, root: ET.Element) -> dict[int, int]:
    """Memory devices (dimm, nvdimm, virtio-mem, ...): KiB per guest cell (``target/node``,
    default 0)."""
    extra: dict[int, int] = {}
    for i, dev in enumerate(root.findall("devices/memory")):
        size_el = dev.find("target/size")
        if size_el is None:
            continue
        where = f"devices/memory[{i + 1}]/target/size"
        size = ctx.scaled(size_el, where, value_attr=None, default_unit=1024, to_unit=1024)
        node_el = dev.find("target/node")
        node = ctx.to_int(node_el.text or "", f"devices/memory[{i + 1}]/target/node") \
            if node_el is not None else 0
        extra[node] = extra.get(node, 0) + size
    return extra


def _add_memory_devices(ctx: _Ctx, cells: tuple[GuestCell, ...],
                        extra: Mapping[int, int]) -> tuple[GuestCell, ...]:
    """The guest cells with their memory devices added (each names an existing cell)."""
    if not (extra and cells):
        return cells
    known = {c.id for c in cells}
    for node in extra:
        if node not in known:
            raise ctx.fail("devices/memory/target/node", "no such guest cell", node)
    return tuple(GuestCell(c.id, c.vcpus, c.memory_kib + extra.get(c.id, 0)) for c in cells)


def _check_memnodes(ctx: _Ctx, numatune: NumaTune | None,
                    cells: tuple[GuestCell, ...]) -> None:
    """Every ``numatune/memnode`` names a guest cell of ``cpu/numa``."""
    if numatune is not None and cells:
        known = {c.id for c in cells}
        for mn in numatune.memnodes:
            if mn.cellid not in known:
                raise ctx.fail(f"numatune/memnode[@cellid='{mn.cellid}']/@cellid",
                               "no such guest cell in cpu/numa", mn.cellid)
    elif numatune is not None and numatune.memnodes:
        raise ctx.fail("numatune/memnode", "memnode needs guest NUMA cells (cpu/numa)")


def _parse_memory_backing(ctx: _Ctx,
                          mb: ET.Element | None) -> tuple[bool, tuple[HugePage, ...]]:
    """(``memoryBacking/hugepages`` present?, its ``page`` elements)."""
    hp = mb.find("hugepages") if mb is not None else None
    if hp is None:
        return False, ()
    pages = []
    for i, page in enumerate(hp.findall("page")):
        where = f"memoryBacking/hugepages/page[{i + 1}]"
        size = ctx.scaled(page, where, value_attr="size", default_unit=1024, to_unit=1024)
        if size <= 0:
            raise ctx.fail(f"{where}/@size", "must be > 0", page.get("size"))
        ns = None
        if page.get("nodeset") is not None:
            ns = ctx.cpuset(page.get("nodeset"), f"{where}/@nodeset")
        pages.append(HugePage(size, ns))
    return True, tuple(pages)


def _parse_pci_devices(ctx: _Ctx, root: ET.Element) -> tuple[str, ...]:
    """PCI devices passed through: ``hostdev``, and ``interface type='hostdev'`` (VFs)."""
    hostdevs: list[str] = []
    for kind, path in (("hostdev", "devices/hostdev"), ("interface", "devices/interface")):
        for i, dev in enumerate(root.findall(path)):
            if dev.get("type") not in ("pci", "hostdev"):
                continue
            addr = dev.find("source/address")
            if addr is None:
                continue
            where = f"devices/{kind}[{i + 1}]/source/address"
            hostdevs.append(_pci_address(ctx, addr, where))
    return tuple(hostdevs)


def _parse_fit_metadata(ctx: _Ctx, root: ET.Element) -> tuple[tuple[int, ...], str | None]:
    """Host threads kept idle (``hostagent fit`` metadata for isolate guests), sorted, and
    the claim id the domain was booted from (None without one)."""
    idle: set[int] = set()
    claims: list[str] = []
    for fit_el in root.findall(f"metadata/{_FIT}"):
        for i, el in enumerate(fit_el.findall(_IDLE)):
            where = f"metadata/hostagent:fit/hostagent:idle[{i + 1}]/@cpus"
            idle.update(ctx.cpuset(el.get("cpus"), where))
        for i, el in enumerate(fit_el.findall(_CLAIM)):
            where = f"metadata/hostagent:fit/hostagent:claim[{i + 1}]/@id"
            value = el.get("id")
            if value is None:
                raise ctx.fail(where, "missing attribute")
            if not CLAIM_ID_PATTERN.fullmatch(value):
                raise ctx.fail(where, "not a claim id (1-64 letters, digits, '.', '_', '-')",
                               value[:80])
            claims.append(value)
    if len(set(claims)) > 1:
        raise ctx.fail("metadata/hostagent:fit/hostagent:claim", "several claim ids",
                       ", ".join(claims[:4]))
    return tuple(sorted(idle)), (claims[0] if claims else None)


def _pci_address(ctx: _Ctx, addr: ET.Element, where: str) -> str:
    """``<address domain='0x0000' bus='0xaf' slot='0x01' function='0x0'/>`` →
    ``0000:af:01.0`` (the form sysfs and the snapshot's ``topology.pci`` use)."""
    parts = []
    for key, width in (("domain", 4), ("bus", 2), ("slot", 2), ("function", 1)):
        raw = addr.get(key, "0" if key == "domain" else None)
        if raw is None:
            raise ctx.fail(f"{where}/@{key}", "missing attribute")
        try:
            value = int(raw, 0)
        except ValueError:
            raise ctx.fail(f"{where}/@{key}", "not a number", raw) from None
        if value < 0:
            raise ctx.fail(f"{where}/@{key}", "must be >= 0", raw)
        parts.append(format(value, f"0{width}x"))
    return f"{parts[0]}:{parts[1]}:{parts[2]}.{parts[3]}"
