"""Fit requests: a Nova flavor (plus image properties) parsed and validated into ``FitRequest``.

A request is ``{"vcpus": N, "memory_mb": M, "extra_specs": {...}, "image_properties": {...}}``.
The extra specs follow Nova's ``hw:`` keys (docs/fit.md lists every key, value and rule);
image properties (``hw_<name>``) may narrow what the flavor allows, never widen it. Every
invalid value or combination raises ``RequestError`` naming the key and the value. Every
field is bounded by what a host can have (``hostagent.fit_limits``) and refused early,
before anything of that size is built.

Parsing is pure and host-independent: whatever depends on the host (threads per core,
page sizes present, caches) is decided by the placement, which reports it as a reason.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from hostagent.cpulist import BACKWARDS, BAD_ELEMENT, OUT_OF_RANGE, CpuListError, parse_cpu_ranges
from hostagent.errors import RequestError
from hostagent.fit_limits import (
    MAX_GUEST_CELLS,
    MAX_INT_BITS,
    MAX_KEY_CHARS,
    MAX_MEMORY_MB,
    MAX_PAGE_SIZE_KIB,
    MAX_PCI_DEVICES,
    MAX_SPEC_KEYS,
    MAX_VALUE_CHARS,
    MAX_VCPUS,
    size_text,
)

NUMA_NODES_MAX = MAX_GUEST_CELLS
TOPOLOGY_MAX = 65536  # "no limit" for hw:cpu_max_*: above any vCPU count

CPU_POLICIES = ("shared", "dedicated", "mixed")
THREAD_POLICIES = ("prefer", "isolate", "require")
EMULATOR_POLICIES = ("share", "isolate")
PCI_POLICIES = ("required", "preferred", "legacy", "socket")
PAGE_KEYWORDS = ("small", "large", "any")

SMALL_PAGE_KIB = 4


@dataclass(frozen=True)
class GuestCell:
    """One guest NUMA cell: its vCPUs (split into dedicated and shared) and memory."""

    index: int
    vcpus: tuple[int, ...]
    dedicated: tuple[int, ...]
    shared: tuple[int, ...]
    memory_mib: int

    @property
    def memory_kib(self) -> int:
        return self.memory_mib * 1024


@dataclass(frozen=True)
class PciRequest:
    """``count`` PCI functions of ``vendor:device`` (lowercase hex, no ``0x``)."""

    vendor: str
    device: str
    count: int


@dataclass(frozen=True)
class CacheGroup:
    """One per-vCPU cache reservation: a libvirt ``cachetune`` / resctrl group.

    ``spec_text`` is the reservation in the syntax of ``hostagent.resctrl.parse_reservation``;
    the cache IDs are chosen by the fit (those serving the vCPUs' pinned threads).
    """

    vcpus: tuple[int, ...]
    spec_text: str
    spec: Any = field(default=None, compare=False)


@dataclass(frozen=True)
class TopologyPrefs:
    """Guest vCPU topology: preferred values (0 = don't care) and limits."""

    sockets: int = 0
    cores: int = 0
    threads: int = 0
    max_sockets: int = TOPOLOGY_MAX
    max_cores: int = TOPOLOGY_MAX
    max_threads: int = TOPOLOGY_MAX


@dataclass(frozen=True)
class FitRequest:
    """A validated request.

    ``numa`` is False for a guest with no NUMA constraint at all (shared vCPUs, no
    ``hw:numa_nodes``, no page size): it floats over the host's shared threads, as in
    Nova. ``page_size`` is None (unset), "small", "large", "any" or a size in KiB.
    """

    vcpus: int
    memory_mib: int
    numa: bool
    cells: tuple[GuestCell, ...]
    cpu_policy: str
    thread_policy: str | None
    emulator_policy: str | None
    realtime: tuple[int, ...]
    page_size: str | int | None
    topology: TopologyPrefs
    pci: tuple[PciRequest, ...]
    pci_policy: str
    cache: tuple[CacheGroup, ...]

    @property
    def dedicated_vcpus(self) -> tuple[int, ...]:
        return tuple(sorted(v for c in self.cells for v in c.dedicated))

    @property
    def pinned(self) -> bool:
        return self.cpu_policy in ("dedicated", "mixed")


# ----------------------------------------------------------------------------- helpers

_BOOL_TRUE = ("1", "t", "true", "on", "y", "yes")
_BOOL_FALSE = ("0", "f", "false", "off", "n", "no")

_FLAVOR_TOP = ("vcpus", "memory_mb", "extra_specs", "image_properties")

_INT_KEYS = ("sockets", "cores", "threads")

# hw: keys Nova knows that do not change where a guest goes: accepted and ignored.
_IGNORED_HW = frozenset(
    {
        "hw:boot_menu", "hw:cpu_model", "hw:cpu_mode", "hw:hide_hypervisor_id",
        "hw:locked_memory", "hw:pmu", "hw:serial_port_count", "hw:tpm_model",
        "hw:tpm_version", "hw:watchdog_action", "hw:vif_multiqueue_enabled",
        "hw:virtio_packed_ring", "hw:maxphysaddr_mode", "hw:maxphysaddr_bits",
        "hw:viommu_model", "hw:ephemeral_encryption", "hw:ephemeral_encryption_format",
        "hw:sound_model", "hw:usb_model", "hw:redirected_usb_ports", "hw:vif_model",
        "hw:disk_bus", "hw:firmware_type", "hw:machine_type", "hw:cdrom_bus",
    }
)
# hw: keys that would change placement in ways hostagent does not model: refused.
_UNSUPPORTED_HW = {
    "hw:pmem": "persistent memory (vPMEM) is not placed by hostagent",
    "hw:mem_encryption": "memory encryption (SEV) is not placed by hostagent",
}
_PLAIN_HW = (
    "hw:numa_nodes", "hw:cpu_policy", "hw:cpu_thread_policy", "hw:cpu_dedicated_mask",
    "hw:emulator_threads_policy", "hw:cpu_realtime", "hw:cpu_realtime_mask",
    "hw:mem_page_size", "hw:cpu_sockets", "hw:cpu_cores", "hw:cpu_threads",
    "hw:cpu_max_sockets", "hw:cpu_max_cores", "hw:cpu_max_threads",
    "hw:pci_numa_affinity_policy", "hw:pci_devices", "hw:cache_reservation",
)
_INDEXED_HW = re.compile(r"^hw:numa_(cpus|mem)\.(\d+)$")
_INDEXED_IMG = re.compile(r"^hw_numa_(cpus|mem)\.(\d+)$")
_RESOURCES = re.compile(r"^resources[0-9A-Za-z_-]*:(PCPU|VCPU)$")
_HT_TRAIT = re.compile(r"^trait[0-9A-Za-z_-]*:HW_CPU_HYPERTHREADING$")

# Image properties that only a flavor may set (an image must never widen a flavor).
_FLAVOR_ONLY_IMG = {
    "hw_cpu_realtime": "hw:cpu_realtime",
    "hw_cpu_dedicated_mask": "hw:cpu_dedicated_mask",
    "hw_pci_devices": "hw:pci_devices",
    "hw_cache_reservation": "hw:cache_reservation",
}


_VCPUS_WHY = "no host has more CPUs"
_MEMORY_WHY = "4 PiB, more than any host can address"


def short_repr(value: Any) -> str:
    """``repr(value)`` for an error message, cut short: a huge integer or a long string is
    described (its bit count, its length), never printed whole."""
    if isinstance(value, int) and not isinstance(value, bool) and \
            value.bit_length() > MAX_INT_BITS:
        return f"<an integer of {value.bit_length()} bits>"
    if isinstance(value, str) and len(value) > 64:
        return repr(value[:48] + "…") + f" ({len(value)} characters)"
    try:
        text = repr(value)
    except ValueError:  # e.g. a container holding an integer too long to print
        return f"<a {type(value).__name__}>"
    return text if len(text) <= 100 else text[:96] + "…"


def _fail(where: str, key: str, value: Any, why: str) -> RequestError:
    return RequestError(f"{where} {key}={short_repr(value)}: {why}")


def _show_key(key: str) -> str:
    return key if len(key) <= 64 else f"{key[:48]}… ({len(key)} characters)"


class _Specs:
    """Typed access to one dict of string values (extra specs or image properties)."""

    def __init__(self, where: str, data: Mapping[str, Any]) -> None:
        self.where = where
        self.data: dict[str, str] = {}
        if len(data) > MAX_SPEC_KEYS:
            raise RequestError(f"{where}: {len(data)} keys, at most {MAX_SPEC_KEYS} "
                               "(MAX_SPEC_KEYS)")
        for key, value in data.items():
            if not isinstance(key, str):
                raise _fail(where, short_repr(key), value, "keys must be strings")
            if len(key) > MAX_KEY_CHARS:
                raise RequestError(f"{where} {_show_key(key)}: keys may have at most "
                                   f"{MAX_KEY_CHARS} characters")
            if isinstance(value, bool):
                value = "true" if value else "false"
            elif isinstance(value, int):
                if value.bit_length() > MAX_INT_BITS:
                    raise _fail(where, _show_key(key), value,
                                f"integers must fit in {MAX_INT_BITS} bits")
                value = str(value)
            elif not isinstance(value, str):
                raise _fail(where, _show_key(key), value, "values must be strings (or integers)")
            if len(value) > MAX_VALUE_CHARS:
                raise _fail(where, _show_key(key), value,
                            f"values may have at most {MAX_VALUE_CHARS} characters")
            self.data[key] = value.strip()

    def has(self, key: str) -> bool:
        return key in self.data

    def get(self, key: str) -> str | None:
        return self.data.get(key)

    def fail(self, key: str, why: str) -> RequestError:
        return _fail(self.where, key, self.data.get(key), why)

    def integer(
        self, key: str, *, maximum: int, why: str, minimum: int = 1, between: bool = False
    ) -> int | None:
        """The integer value of ``key`` (None if absent), ``minimum..maximum``; ``why``
        says what the maximum is; ``between`` words every refusal as the range."""
        text = self.data.get(key)
        if text is None:
            return None
        value = int(text) if re.fullmatch(r"\d+", text) else None
        if between and (value is None or not minimum <= value <= maximum):
            raise self.fail(key, f"must be an integer between {minimum} and {maximum} ({why})")
        if value is None or value < minimum:
            raise self.fail(key, f"must be an integer >= {minimum}")
        if value > maximum:
            raise self.fail(key, f"must be an integer >= {minimum} and at most {maximum} "
                                 f"({why})")
        return value

    def boolean(self, key: str) -> bool | None:
        text = self.data.get(key)
        if text is None:
            return None
        low = text.lower()
        if low in _BOOL_TRUE:
            return True
        if low in _BOOL_FALSE:
            return False
        raise self.fail(key, "must be a boolean (true/false, yes/no, on/off, 1/0)")

    def choice(self, key: str, choices: tuple[str, ...]) -> str | None:
        text = self.data.get(key)
        if text is None:
            return None
        if text not in choices:
            raise self.fail(key, f"must be one of {', '.join(choices)}")
        return text


class CpuBeyondLimit(ValueError):
    """A CPU spec names a CPU above its limit (``cpu``)."""

    def __init__(self, cpu: int, limit: int) -> None:
        super().__init__(f"CPU {cpu} is beyond the last vCPU {limit}")
        self.cpu = cpu


def parse_cpu_spec(text: str, *, limit: int | None = None) -> set[int]:
    """Nova's CPU spec: ``0-3,^2,5`` (ranges, single ids, ``^`` exclusions).

    Every id must be at most ``limit`` (default the last of ``MAX_VCPUS``), else
    ``CpuBeyondLimit``. The grammar is ``hostagent.cpulist.parse_cpu_ranges`` with ``^``
    exclusions and blanks inside elements (ranges merged before they are expanded, so the
    work is bounded by the text and the limit). Raises ValueError with a reason; callers
    add the key and value.
    """
    if limit is None:
        limit = MAX_VCPUS - 1
    if not text.strip():
        raise ValueError("is empty")
    try:
        return set(parse_cpu_ranges(text, last=limit, exclusions=True, blanks=True))
    except CpuListError as exc:
        if exc.reason == OUT_OF_RANGE:
            raise CpuBeyondLimit(exc.cpu, limit) from None
        raise ValueError(exc.reworded(_CPU_SPEC_WORDS)) from None


_CPU_SPEC_WORDS = {
    BAD_ELEMENT: "{element!r} is not a CPU id, range or ^exclusion",
    BACKWARDS: "range {element!r} runs backwards",
}


def _mask(specs: _Specs, key: str, vcpus: int) -> set[int]:
    """A vCPU mask; a leading ``^`` means "all vCPUs but"."""
    text = specs.get(key) or ""
    if text.startswith("^"):
        text = f"0-{vcpus - 1}," + text
    try:
        return parse_cpu_spec(text, limit=vcpus - 1)
    except ValueError as exc:
        raise specs.fail(key, f"not a valid vCPU mask: {exc}") from None


_SIZE_UNITS = {
    "": 1024, "b": 1, "k": 1024, "kb": 1024, "kib": 1024, "m": 1 << 20, "mb": 1 << 20,
    "mib": 1 << 20, "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30, "t": 1 << 40,
    "tb": 1 << 40, "tib": 1 << 40,
}


def parse_page_size(text: str) -> str | int:
    """``small``/``large``/``any`` or a size: ``2048`` (KiB), ``2MB``, ``2M``, ``1GiB``."""
    low = text.strip().lower()
    if low in PAGE_KEYWORDS:
        return low
    m = re.fullmatch(r"(\d+)\s*([a-z]*)", low)
    if not m or m.group(2) not in _SIZE_UNITS:
        raise ValueError(
            "must be small, large, any or a size such as 2048 (KiB), 2MB or 1GB"
        )
    too_big = ValueError(f"must be at most {size_text(MAX_PAGE_SIZE_KIB)} (the largest "
                         "hugepage size Linux has)")
    if len(m.group(1).lstrip("0")) > 20:
        raise too_big
    size = int(m.group(1)) * _SIZE_UNITS[m.group(2)]
    if size <= 0 or size % 1024:
        raise ValueError("must be a positive whole number of KiB")
    if size // 1024 > MAX_PAGE_SIZE_KIB:
        raise too_big
    return size // 1024


# ----------------------------------------------------------------------------- parse


def parse_request(request: Any) -> FitRequest:
    """Validate a request dict into a ``FitRequest`` (raises ``RequestError``)."""
    if not isinstance(request, Mapping):
        raise RequestError(f"request must be a JSON object, got {type(request).__name__}")
    for key in request:
        if key not in _FLAVOR_TOP:
            raise _fail("request", _show_key(str(key)), request[key],
                        f"unknown key (known: {', '.join(_FLAVOR_TOP)})")
    vcpus = _top_int(request, "vcpus", MAX_VCPUS, _VCPUS_WHY)
    memory_mb = _top_int(request, "memory_mb", MAX_MEMORY_MB, _MEMORY_WHY)
    extra = request.get("extra_specs", {})
    image = request.get("image_properties", {})
    for name, value in (("extra_specs", extra), ("image_properties", image)):
        if not isinstance(value, Mapping):
            raise _fail("request", name, value, "must be an object of key: string value")
    flavor = _Specs("extra_specs", extra)
    img = _Specs("image_properties", image)
    _check_known_keys(flavor, img)

    cpu_policy = _cpu_policy(flavor, img)
    thread_policy = _thread_policy(flavor, img)
    emulator = _emulator_policy(flavor, img)
    cpu_policy, thread_policy = _resources_and_traits(
        flavor, img, cpu_policy, thread_policy, emulator, vcpus
    )
    realtime = _realtime(flavor, img, cpu_policy, emulator, vcpus)
    dedicated_mask = _dedicated_mask(flavor, cpu_policy, realtime, vcpus)

    if cpu_policy in (None, "shared"):
        if thread_policy is not None:
            src, key = _thread_policy_source(flavor, img)
            raise src.fail(key, "a thread policy needs hw:cpu_policy=dedicated or mixed")
        if emulator == "isolate":
            src = flavor if flavor.has("hw:emulator_threads_policy") else img
            key = "hw:emulator_threads_policy" if src is flavor else "hw_emulator_threads_policy"
            raise src.fail(key, "isolated emulator threads need hw:cpu_policy=dedicated or mixed")
    policy = cpu_policy or "shared"

    if policy == "dedicated":
        pcpus = set(range(vcpus))
    elif policy == "mixed":
        pcpus = dedicated_mask if dedicated_mask is not None else set(realtime)
    else:
        pcpus = set()

    page_size = _page_size(flavor, img)
    nodes = _numa_nodes(flavor, img, vcpus)
    cells_cpus, cells_mem = _numa_maps(flavor, img, nodes, vcpus, memory_mb)
    numa = nodes is not None or page_size is not None or policy != "shared"
    pci, pci_policy = _pci(flavor, img)
    cache = _cache(flavor, vcpus, pcpus)
    topo = _topology(flavor, img)

    n = nodes or 1
    if cells_cpus is None:
        if vcpus % n or memory_mb % n:
            key = "hw:numa_nodes" if flavor.has("hw:numa_nodes") else "hw_numa_nodes"
            src = flavor if flavor.has("hw:numa_nodes") else img
            raise src.fail(
                key,
                f"{vcpus} vCPUs and {memory_mb} MiB cannot be split evenly over {n} guest "
                "cells; give hw:numa_cpus.N and hw:numa_mem.N for every cell",
            )
        per_cpu, per_mem = vcpus // n, memory_mb // n
        cells_cpus = [set(range(i * per_cpu, (i + 1) * per_cpu)) for i in range(n)]
        cells_mem = [per_mem] * n
    assert cells_mem is not None
    cells = tuple(
        GuestCell(
            index=i,
            vcpus=tuple(sorted(cpus)),
            dedicated=tuple(sorted(cpus & pcpus)),
            shared=tuple(sorted(cpus - pcpus)),
            memory_mib=mem,
        )
        for i, (cpus, mem) in enumerate(zip(cells_cpus, cells_mem, strict=True))
    )
    return FitRequest(
        vcpus=vcpus,
        memory_mib=memory_mb,
        numa=numa,
        cells=cells,
        cpu_policy=policy,
        thread_policy=(thread_policy or "prefer") if policy != "shared" else None,
        emulator_policy=emulator,
        realtime=tuple(sorted(realtime)),
        page_size=page_size,
        topology=topo,
        pci=pci,
        pci_policy=pci_policy,
        cache=cache,
    )


def _top_int(request: Mapping[str, Any], key: str, maximum: int, why: str) -> int:
    if key not in request:
        raise RequestError(f"request: {key} is missing (a positive integer)")
    value = request[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _fail("request", key, value, "must be an integer >= 1")
    if value > maximum:
        raise _fail("request", key, value, f"must be an integer >= 1 and at most {maximum} "
                                           f"({why})")
    return value


def _check_known_keys(flavor: _Specs, img: _Specs) -> None:
    for key in flavor.data:
        if key in _UNSUPPORTED_HW:
            raise flavor.fail(key, _UNSUPPORTED_HW[key])
        if not key.startswith("hw:") or key in _IGNORED_HW or key in _PLAIN_HW:
            continue
        if _INDEXED_HW.match(key):
            continue
        raise flavor.fail(key, "unknown hw: key (docs/fit.md lists the supported keys)")
    for key in img.data:
        if key in _FLAVOR_ONLY_IMG:
            raise img.fail(key, f"only the flavor may set this ({_FLAVOR_ONLY_IMG[key]})")
        if key in ("hw_pmem", "hw_mem_encryption"):
            raise img.fail(key, _UNSUPPORTED_HW["hw:" + key[3:]])


def _cpu_policy(flavor: _Specs, img: _Specs) -> str | None:
    f = flavor.choice("hw:cpu_policy", CPU_POLICIES)
    i = img.choice("hw_cpu_policy", CPU_POLICIES)
    if f is None:
        return i
    if i is None or f == "dedicated":
        return f
    if f == "shared" and i in ("dedicated", "mixed"):
        raise img.fail("hw_cpu_policy", "the flavor's hw:cpu_policy=shared forbids pinning")
    if f == "mixed" and i == "dedicated":
        raise img.fail("hw_cpu_policy", "the flavor's hw:cpu_policy=mixed forbids dedicated")
    return f


def _thread_policy(flavor: _Specs, img: _Specs) -> str | None:
    f = flavor.choice("hw:cpu_thread_policy", THREAD_POLICIES)
    i = img.choice("hw_cpu_thread_policy", THREAD_POLICIES)
    if f in (None, "prefer"):
        return i or f
    if i is not None and i != f:
        raise img.fail("hw_cpu_thread_policy", f"the flavor's hw:cpu_thread_policy={f} forbids it")
    return f


def _emulator_policy(flavor: _Specs, img: _Specs) -> str | None:
    f = flavor.choice("hw:emulator_threads_policy", EMULATOR_POLICIES)
    i = img.choice("hw_emulator_threads_policy", EMULATOR_POLICIES)
    if f is not None and i is not None and i != f:
        raise img.fail(
            "hw_emulator_threads_policy", f"the flavor's hw:emulator_threads_policy={f} forbids it"
        )
    return f or i


def _both(first: _Specs, key: str, second: _Specs, other: str) -> RequestError:
    """Nova's refusal of a placement-form key next to the ``hw:`` form of the same choice."""
    return first.fail(key, f"cannot be combined with {second.where} {other}="
                           f"{short_repr(second.get(other))}; use one or the other "
                           "(Nova refuses the pair)")


def _resources_and_traits(
    flavor: _Specs, img: _Specs, policy: str | None, thread: str | None,
    emulator: str | None, vcpus: int,
) -> tuple[str | None, str | None]:
    """Nova's placement form: ``resources:PCPU|VCPU`` sets the CPU policy and
    ``trait:HW_CPU_HYPERTHREADING`` (flavor ``required``/``forbidden``, image ``required``)
    the thread policy. Either is refused next to a CPU or thread policy given by the flavor
    *or* the image, as ``numa_get_constraints`` refuses it, so an image never overrides it
    silently."""
    res: dict[str, list[str]] = {}
    for k in flavor.data:
        if m := _RESOURCES.match(k):
            res.setdefault(m.group(1), []).append(k)
    traits = [k for k in flavor.data if _HT_TRAIT.match(k)]
    if res:
        key = next(iter(res.values()))[0]
        if flavor.has("hw:cpu_policy"):
            raise flavor.fail(key, "cannot be combined with hw:cpu_policy")
        if img.has("hw_cpu_policy"):
            raise _both(flavor, key, img, "hw_cpu_policy")
        if len(res) > 1:
            raise flavor.fail(key, "resources:PCPU and resources:VCPU cannot both be given")
        if "PCPU" in res:
            # the request groups' counts add up (resources1:PCPU=2 + resources2:PCPU=2)
            want = vcpus + (1 if emulator == "isolate" else 0)
            count = sum(flavor.integer(k, maximum=MAX_VCPUS + 1,
                                       why="the vCPUs and an emulator thread") or 0
                        for k in res["PCPU"])
            if count != want and len(res["PCPU"]) == 1:
                raise flavor.fail(key, f"must equal the vCPU count ({want})")
            if count != want:
                raise RequestError(f"extra_specs {' + '.join(res['PCPU'])} = {count}: must "
                                   f"equal the vCPU count ({want})")
            policy = "dedicated"
        else:
            for k in res["VCPU"]:
                flavor.integer(k, maximum=MAX_VCPUS, why=_VCPUS_WHY)
            policy = "shared"
    for key in traits:
        value = flavor.get(key)
        if flavor.has("hw:cpu_thread_policy"):
            raise flavor.fail(key, "cannot be combined with hw:cpu_thread_policy")
        if img.has("hw_cpu_thread_policy"):
            raise _both(flavor, key, img, "hw_cpu_thread_policy")
        if value == "required":
            thread = "require"
        elif value == "forbidden":
            thread = "isolate"
        else:
            raise flavor.fail(key, "must be required or forbidden")
    # an image requires a trait with ``trait:NAME=required`` (Nova reads no other value)
    img_trait = next((k for k in img.data if _HT_TRAIT.match(k)
                      and img.get(k) == "required"), None)
    if img_trait is not None:
        if traits and flavor.get(traits[0]) != "required":
            raise img.fail(img_trait, f"conflicts with {flavor.where} {traits[0]}="
                                      f"{short_repr(flavor.get(traits[0]))}")
        for specs, key in ((flavor, "hw:cpu_thread_policy"), (img, "hw_cpu_thread_policy")):
            if specs.has(key):
                raise _both(img, img_trait, specs, key)
        thread = "require"
    return policy, thread


def _thread_policy_source(flavor: _Specs, img: _Specs) -> tuple[_Specs, str]:
    """Which key set the thread policy: ``hw:``/``hw_cpu_thread_policy`` or a
    ``trait:HW_CPU_HYPERTHREADING`` of the flavor or the image."""
    for specs, key in ((flavor, "hw:cpu_thread_policy"), (img, "hw_cpu_thread_policy")):
        if specs.has(key):
            return specs, key
    for specs in (flavor, img):
        trait = next((k for k in specs.data if _HT_TRAIT.match(k)), None)
        if trait is not None:
            return specs, trait
    return flavor, "hw:cpu_thread_policy"


def _realtime(
    flavor: _Specs, img: _Specs, policy: str | None, emulator: str | None, vcpus: int
) -> set[int]:
    enabled = flavor.boolean("hw:cpu_realtime")
    mask_src = img if img.has("hw_cpu_realtime_mask") else flavor
    mask_key = "hw_cpu_realtime_mask" if mask_src is img else "hw:cpu_realtime_mask"
    if not enabled:
        if mask_src.has(mask_key):
            raise mask_src.fail(mask_key, "a realtime mask needs hw:cpu_realtime=true")
        return set()
    if policy not in ("dedicated", "mixed"):
        raise flavor.fail("hw:cpu_realtime", "realtime needs hw:cpu_policy=dedicated or mixed")
    if mask_src.has(mask_key):
        rt = _mask(mask_src, mask_key, vcpus)
        if not rt:
            raise mask_src.fail(mask_key, "selects no vCPU")
    else:
        rt = set(range(vcpus))
    if len(rt) == vcpus and emulator is None:
        key = mask_key if mask_src.has(mask_key) else "hw:cpu_realtime"
        raise mask_src.fail(
            key,
            "every vCPU is realtime: leave one non-realtime vCPU "
            "(e.g. hw:cpu_realtime_mask=^0) or set hw:emulator_threads_policy",
        )
    return rt


def _dedicated_mask(
    flavor: _Specs, policy: str | None, realtime: set[int], vcpus: int
) -> set[int] | None:
    key = "hw:cpu_dedicated_mask"
    if not flavor.has(key):
        if policy == "mixed" and not realtime:
            raise RequestError(
                "extra_specs hw:cpu_policy='mixed': needs hw:cpu_dedicated_mask or "
                "hw:cpu_realtime=true with hw:cpu_realtime_mask"
            )
        return None
    if policy != "mixed":
        raise flavor.fail(key, "a dedicated mask needs hw:cpu_policy=mixed")
    if realtime:
        raise flavor.fail(
            key, "give either hw:cpu_dedicated_mask or a realtime mask for a mixed guest, not both"
        )
    mask = _mask(flavor, key, vcpus)
    if not mask or len(mask) == vcpus:
        raise flavor.fail(key, "a mixed guest needs at least one dedicated and one shared vCPU")
    return mask


def _page_size(flavor: _Specs, img: _Specs) -> str | int | None:
    def parse(specs: _Specs, key: str) -> str | int | None:
        text = specs.get(key)
        if text is None:
            return None
        try:
            return parse_page_size(text)
        except ValueError as exc:
            raise specs.fail(key, str(exc)) from None

    f = parse(flavor, "hw:mem_page_size")
    i = parse(img, "hw_mem_page_size")
    if i is None:
        return f
    if f is None:
        raise img.fail("hw_mem_page_size", "the flavor sets no hw:mem_page_size to narrow")
    if f == "any" or i == f:
        return i
    if f == "large" and (i == "large" or (isinstance(i, int) and i != SMALL_PAGE_KIB)):
        return i
    raise img.fail("hw_mem_page_size", f"would widen the flavor's hw:mem_page_size={f}")


def _numa_nodes(flavor: _Specs, img: _Specs, vcpus: int) -> int | None:
    if flavor.has("hw:numa_nodes") and img.has("hw_numa_nodes"):
        raise img.fail("hw_numa_nodes", "the flavor already sets hw:numa_nodes")
    specs, key = (img, "hw_numa_nodes") if img.has("hw_numa_nodes") else (flavor, "hw:numa_nodes")
    nodes = specs.integer(key, maximum=MAX_GUEST_CELLS, why="QEMU's limit", between=True)
    if nodes is not None and nodes > vcpus:
        raise specs.fail(key, f"more guest cells than vCPUs ({vcpus})")
    return nodes


def _numa_maps(
    flavor: _Specs, img: _Specs, nodes: int | None, vcpus: int, memory_mb: int
) -> tuple[list[set[int]] | None, list[int] | None]:
    f_keys = [k for k in flavor.data if _INDEXED_HW.match(k)]
    i_keys = [k for k in img.data if _INDEXED_IMG.match(k)]
    if f_keys and i_keys:
        raise img.fail(i_keys[0], "the flavor already sets hw:numa_cpus/hw:numa_mem")
    specs, pattern, prefix = (img, _INDEXED_IMG, "hw_numa_") if i_keys else (
        flavor, _INDEXED_HW, "hw:numa_")
    keys = i_keys or f_keys
    if not keys:
        return None, None
    if nodes is None:
        raise specs.fail(keys[0], "needs hw:numa_nodes")
    for key in keys:
        m = pattern.match(key)
        assert m is not None
        if int(m.group(2)) >= nodes:
            raise specs.fail(key, f"guest cell {m.group(2)} does not exist "
                                  f"(hw:numa_nodes={nodes})")
    cpus_list: list[set[int]] = []
    mems: list[int] = []
    owner: dict[int, int] = {}
    for n in range(nodes):
        ck, mk = f"{prefix}cpus.{n}", f"{prefix}mem.{n}"
        if not specs.has(ck) or not specs.has(mk):
            missing = ck if not specs.has(ck) else mk
            raise RequestError(
                f"{specs.where} {missing} is missing: CPU and memory must be given for "
                f"every guest cell (0-{nodes - 1})"
            )
        try:
            cpus = parse_cpu_spec(specs.data[ck], limit=vcpus - 1)
        except CpuBeyondLimit as exc:
            raise specs.fail(ck, f"vCPU {exc.cpu} is beyond the last vCPU {vcpus - 1}") from None
        except ValueError as exc:
            raise specs.fail(ck, f"not a valid CPU list: {exc}") from None
        if not cpus:
            raise specs.fail(ck, "selects no vCPU")
        for c in sorted(cpus):
            if c in owner:
                raise specs.fail(ck, f"vCPU {c} is already in guest cell {owner[c]}")
            owner[c] = n
        mem = specs.integer(mk, maximum=MAX_MEMORY_MB, why=_MEMORY_WHY)
        assert mem is not None
        cpus_list.append(cpus)
        mems.append(mem)
    left = sorted(set(range(vcpus)) - set(owner))
    if left:
        raise RequestError(
            f"{specs.where} {prefix}cpus.*: vCPUs {_fmt(left)} are in no guest cell"
        )
    if sum(mems) != memory_mb:
        raise RequestError(
            f"{specs.where} {prefix}mem.*: {sum(mems)} MiB given over the cells, but "
            f"memory_mb is {memory_mb}"
        )
    return cpus_list, mems


def _pci(flavor: _Specs, img: _Specs) -> tuple[tuple[PciRequest, ...], str]:
    f = flavor.choice("hw:pci_numa_affinity_policy", PCI_POLICIES)
    i = img.choice("hw_pci_numa_affinity_policy", PCI_POLICIES)
    if f is not None and i is not None and f != i:
        raise img.fail("hw_pci_numa_affinity_policy",
                       f"the flavor's hw:pci_numa_affinity_policy={f} forbids it")
    policy = f or i or "legacy"
    key = "hw:pci_devices"
    text = flavor.get(key)
    if text is None:
        return (), policy
    out: list[PciRequest] = []
    seen: set[tuple[str, str]] = set()
    for part in text.split(","):
        m = re.fullmatch(r"\s*(?:0x)?([0-9a-fA-F]{4}):(?:0x)?([0-9a-fA-F]{4})(?::(\d+))?\s*", part)
        if not m:
            raise flavor.fail(key, f"{part.strip()!r} is not VENDOR:DEVICE[:COUNT] "
                                   "(4 hex digits each, e.g. 8086:154d:2)")
        vendor, device = m.group(1).lower(), m.group(2).lower()
        count = int(m.group(3)) if m.group(3) else 1
        if count < 1:
            raise flavor.fail(key, f"{part.strip()!r}: the count must be >= 1")
        if count > MAX_PCI_DEVICES:
            raise flavor.fail(key, f"{part.strip()!r}: the count must be at most "
                                   f"{MAX_PCI_DEVICES} (the functions of a PCI segment)")
        if (vendor, device) in seen:
            raise flavor.fail(key, f"{vendor}:{device} is listed twice")
        seen.add((vendor, device))
        out.append(PciRequest(vendor, device, count))
    return tuple(out), policy


def _cache(flavor: _Specs, vcpus: int, pcpus: set[int]) -> tuple[CacheGroup, ...]:
    key = "hw:cache_reservation"
    text = flavor.get(key)
    if text is None:
        return ()
    groups: list[tuple[set[int], list[str]]] = []
    for raw in text.split(";"):
        item = raw.strip()
        if not item:
            raise flavor.fail(key, "has an empty item (two ';' in a row or a trailing ';')")
        m = re.match(r"vcpus\s*=\s*([^:]*):(.*)$", item)
        if m:
            try:
                cpus = parse_cpu_spec(m.group(1), limit=vcpus - 1)
            except ValueError as exc:
                raise flavor.fail(key, f"vcpus={m.group(1)}: {exc}") from None
            if not cpus:
                raise flavor.fail(key, f"vcpus={m.group(1)} selects no vCPU")
            groups.append((cpus, []))
            item = m.group(2).strip()
        elif not groups:
            raise flavor.fail(key, f"{item!r}: each reservation starts with vcpus=LIST: "
                                   "(e.g. vcpus=0-1:type=both,size=2mb)")
        fields_ = {p.split("=", 1)[0].strip().lower() for p in item.split(",") if p.strip()}
        if fields_ & {"cache-id", "cacheid"}:
            raise flavor.fail(key, f"{item!r}: cache-id is chosen by the fit (the cache "
                                   "serving each vCPU's threads); leave it out")
        if fields_ & {"mb", "node"}:
            raise flavor.fail(key, f"{item!r}: memory bandwidth is not placed by the fit")
        groups[-1][1].append(item)
    out: list[CacheGroup] = []
    owner: dict[int, int] = {}
    for n, (cpus, items) in enumerate(groups):
        shared = sorted(cpus - pcpus)
        if shared:
            raise flavor.fail(key, f"vCPUs {_fmt(shared)} are not dedicated; cache "
                                   "reservations need pinned vCPUs")
        for c in cpus:
            if c in owner:
                raise flavor.fail(key, f"vCPU {c} is in two reservations")
            owner[c] = n
        spec_text = ";".join(items)
        spec = None
        try:
            from hostagent import resctrl
        except ImportError:
            resctrl = None  # type: ignore[assignment]
        if resctrl is not None and hasattr(resctrl, "parse_reservation"):
            try:
                spec = resctrl.parse_reservation(spec_text)
            except RequestError as exc:
                raise flavor.fail(key, str(exc)) from None
        out.append(CacheGroup(vcpus=tuple(sorted(cpus)), spec_text=spec_text, spec=spec))
    return tuple(out)


_TOPOLOGY_KEYS = frozenset(
    [f"hw:cpu_{k}" for k in _INT_KEYS] + [f"hw:cpu_max_{k}" for k in _INT_KEYS]
    + [f"hw_cpu_{k}" for k in _INT_KEYS] + [f"hw_cpu_max_{k}" for k in _INT_KEYS])


def _topology(flavor: _Specs, img: _Specs) -> TopologyPrefs:
    if _TOPOLOGY_KEYS.isdisjoint(flavor.data) and _TOPOLOGY_KEYS.isdisjoint(img.data):
        return TopologyPrefs()  # no preference, no limit (most flavors)

    def get(specs: _Specs, key: str) -> int | None:
        return specs.integer(key, maximum=MAX_VCPUS, why=_VCPUS_WHY)

    fmax = {k: get(flavor, f"hw:cpu_max_{k}") for k in _INT_KEYS}
    imax = {k: get(img, f"hw_cpu_max_{k}") for k in _INT_KEYS}
    fpref = {k: get(flavor, f"hw:cpu_{k}") for k in _INT_KEYS}
    ipref = {k: get(img, f"hw_cpu_{k}") for k in _INT_KEYS}
    limits: dict[str, int] = {}
    for k in _INT_KEYS:
        fm, im = fmax[k], imax[k]
        if fm is not None and im is not None and im > fm:
            raise img.fail(f"hw_cpu_max_{k}", f"exceeds the flavor's hw:cpu_max_{k}={fm}")
        limits[k] = im or fm or TOPOLOGY_MAX
    for k in _INT_KEYS:
        f = fpref[k]
        if f is not None and f > limits[k]:
            raise flavor.fail(f"hw:cpu_{k}", f"exceeds the limit hw:cpu_max_{k}={limits[k]}")
        i = ipref[k]
        if i is not None and i > limits[k]:
            raise img.fail(f"hw_cpu_{k}", f"exceeds the limit hw:cpu_max_{k}={limits[k]}")
    pref = ipref if any(v is not None for v in ipref.values()) else fpref
    return TopologyPrefs(
        sockets=pref["sockets"] or 0,
        cores=pref["cores"] or 0,
        threads=pref["threads"] or 0,
        max_sockets=limits["sockets"],
        max_cores=limits["cores"],
        max_threads=limits["threads"],
    )


def _fmt(ids: list[int]) -> str:
    from hostagent.cpulist import format_cpulist

    return format_cpulist(ids)
