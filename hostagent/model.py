"""The host model: immutable records for what the probe finds, and their schema-v1 dicts.

Field names are the snapshot schema's keys (docs/schema.md), so
``topology_to_dict`` is a thin walk and ``topology_from_dict`` its exact inverse: a
scheduler holding a snapshot can rebuild the same ``HostTopology`` the agent used.
The dict form uses string map keys (``distances: {"1": 21}``, ``schemata: {"L3":
{"0": "ff"}}``) so JSON and msgpack carry the same document; the records use ints.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing is not imported at run time: `hostagent probe` starts faster
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any, TypeVar

    _M = TypeVar("_M")


_RENAMES = {"class_": "class"}  # field -> schema key, where the key is a Python keyword


class FrozenError(AttributeError):
    """Raised on assigning to or deleting a field of a model object (they are immutable)."""


def _frozen(cls: type) -> type:
    """Make ``cls`` an immutable record of the fields annotated in its body, in order.

    What ``@dataclass(frozen=True)`` would give, without importing ``dataclasses`` (which
    pulls in ``inspect`` and compiles methods from source at import: together the slowest
    part of ``hostagent probe``'s start-up). Each class writes its own ``__init__``; this
    adds ``_fields`` (the field names), ``_keys`` (each field's key in the schema: the
    same name, except ``class_`` → ``class``), ``__repr__``, ``__eq__``, ``__hash__`` and
    a ``__setattr__``/``__delattr__`` that refuse changes. ``replace`` makes a changed copy.

    An instance's ``__dict__`` holds exactly its fields, in field order (each ``__init__``
    sets them in that order and nothing else can): ``probe --json`` writes it as is.
    """
    names = tuple(cls.__annotations__)  # own annotations, in order (no inheritance here)
    qualname = cls.__qualname__

    def __repr__(self: Any) -> str:
        items = ", ".join(f"{n}={getattr(self, n)!r}" for n in names)
        return f"{self.__class__.__qualname__}({items})"

    def __eq__(self: Any, other: object) -> bool:
        if other.__class__ is self.__class__:
            return self.__dict__ == other.__dict__  # the fields, and only them
        return NotImplemented

    def __hash__(self: Any) -> int:
        return hash(tuple(self.__dict__.values()))

    def __setattr__(self: Any, name: str, value: Any) -> None:
        raise FrozenError(f"cannot assign to field {name!r} of {qualname}")

    def __delattr__(self: Any, name: str) -> None:
        raise FrozenError(f"cannot delete field {name!r} of {qualname}")

    for fn in (__repr__, __eq__, __hash__, __setattr__, __delattr__):
        fn.__qualname__ = f"{qualname}.{fn.__name__}"
        setattr(cls, fn.__name__, fn)
    cls._fields = names
    cls._keys = tuple(_RENAMES.get(n, n) for n in names)
    cls.__match_args__ = names
    return cls


def replace(obj: _M, **changes: Any) -> _M:
    """A copy of model object ``obj`` with the given fields changed (``dataclasses.replace``)."""
    names = obj._fields  # type: ignore[attr-defined]
    unknown = set(changes).difference(names)
    if unknown:
        raise TypeError(f"{obj.__class__.__qualname__} has no field {sorted(unknown)[0]!r}")
    return obj.__class__(**{n: changes[n] if n in changes else getattr(obj, n) for n in names})


@_frozen
class HugepagePool:
    """One hugepage pool of one cell (``node/nodeN/hugepages/hugepages-<size>kB``)."""

    size_kib: int
    total: int
    free: int
    surplus: int

    def __init__(self, size_kib: int, total: int, free: int, surplus: int) -> None:
        self.__dict__.update(size_kib=size_kib, total=total, free=free, surplus=surplus)


@_frozen
class Cell:
    """One NUMA cell. ``cpus`` may be empty (memory-only node) and memory may be 0."""

    id: int
    cpus: tuple[int, ...]
    memory_kib: int
    memory_free_kib: int
    distances: Mapping[int, int]
    hugepages: tuple[HugepagePool, ...]

    def __init__(
        self,
        id: int,
        cpus: tuple[int, ...],
        memory_kib: int,
        memory_free_kib: int,
        distances: Mapping[int, int],
        hugepages: tuple[HugepagePool, ...],
    ) -> None:
        self.__dict__.update(
            id=id,
            cpus=cpus,
            memory_kib=memory_kib,
            memory_free_kib=memory_free_kib,
            distances=distances,
            hugepages=hugepages,
        )


@_frozen
class Cpu:
    """One logical CPU (hardware thread). Offline CPUs have no topology: ids are -1."""

    id: int
    online: bool
    cell: int
    socket: int
    die: int
    cluster: int
    core: int
    siblings: tuple[int, ...]
    isolated: bool

    def __init__(
        self,
        id: int,
        online: bool,
        cell: int,
        socket: int,
        die: int,
        cluster: int,
        core: int,
        siblings: tuple[int, ...],
        isolated: bool,
    ) -> None:
        self.__dict__.update(
            id=id,
            online=online,
            cell=cell,
            socket=socket,
            die=die,
            cluster=cluster,
            core=core,
            siblings=siblings,
            isolated=isolated,
        )


@_frozen
class Cache:
    """One cache instance: unique per (level, type, id)."""

    level: int
    id: int
    type: str  # "unified" | "data" | "instruction"
    size_bytes: int
    ways: int
    line_bytes: int
    cpus: tuple[int, ...]

    def __init__(
        self,
        level: int,
        id: int,
        type: str,
        size_bytes: int,
        ways: int,
        line_bytes: int,
        cpus: tuple[int, ...],
    ) -> None:
        self.__dict__.update(
            level=level,
            id=id,
            type=type,
            size_bytes=size_bytes,
            ways=ways,
            line_bytes=line_bytes,
            cpus=cpus,
        )


@_frozen
class ResctrlResource:
    """One ``info/<name>/`` cache resource (L3, L3CODE, L3DATA, L2, L2CODE, L2DATA)."""

    name: str
    level: int
    type: str  # "both" | "code" | "data"
    cbm_mask: str
    cbm_bits: int
    min_cbm_bits: int
    num_closids: int
    shareable_bits: str
    sparse_masks: bool
    granularity_bytes: int
    min_bytes: int

    def __init__(
        self,
        name: str,
        level: int,
        type: str,
        cbm_mask: str,
        cbm_bits: int,
        min_cbm_bits: int,
        num_closids: int,
        shareable_bits: str,
        sparse_masks: bool,
        granularity_bytes: int,
        min_bytes: int,
    ) -> None:
        self.__dict__.update(
            name=name,
            level=level,
            type=type,
            cbm_mask=cbm_mask,
            cbm_bits=cbm_bits,
            min_cbm_bits=min_cbm_bits,
            num_closids=num_closids,
            shareable_bits=shareable_bits,
            sparse_masks=sparse_masks,
            granularity_bytes=granularity_bytes,
            min_bytes=min_bytes,
        )


@_frozen
class MemoryBandwidth:
    """``info/MB/``. ``unit`` is "percent" or "MBps" (mounted with ``-o mba_MBps``)."""

    bandwidth_gran: int
    min_bandwidth: int
    num_closids: int
    unit: str
    delay_linear: bool | None = None

    def __init__(
        self,
        bandwidth_gran: int,
        min_bandwidth: int,
        num_closids: int,
        unit: str,
        delay_linear: bool | None = None,
    ) -> None:
        self.__dict__.update(
            bandwidth_gran=bandwidth_gran,
            min_bandwidth=min_bandwidth,
            num_closids=num_closids,
            unit=unit,
            delay_linear=delay_linear,
        )


@_frozen
class ResctrlGroup:
    """The default group (name "") or a top-level CTRL_MON group.

    ``schemata`` maps a resource name to {cache_id: mask}; ``mb`` maps an MB domain id
    to its value in the unit in force.
    """

    name: str
    mode: str
    schemata: Mapping[str, Mapping[int, str]]
    mb: Mapping[int, int]
    cpus: tuple[int, ...]
    tasks: int

    def __init__(
        self,
        name: str,
        mode: str,
        schemata: Mapping[str, Mapping[int, str]],
        mb: Mapping[int, int],
        cpus: tuple[int, ...],
        tasks: int,
    ) -> None:
        self.__dict__.update(name=name, mode=mode, schemata=schemata, mb=mb, cpus=cpus, tasks=tasks)


@_frozen
class Resctrl:
    """A mounted resctrl filesystem."""

    cdp: Mapping[str, bool]
    resources: tuple[ResctrlResource, ...]
    mb: MemoryBandwidth | None
    groups: tuple[ResctrlGroup, ...]

    def __init__(
        self,
        cdp: Mapping[str, bool],
        resources: tuple[ResctrlResource, ...],
        mb: MemoryBandwidth | None,
        groups: tuple[ResctrlGroup, ...],
    ) -> None:
        self.__dict__.update(cdp=cdp, resources=resources, mb=mb, groups=groups)

    def resource(self, name: str) -> ResctrlResource | None:
        for res in self.resources:
            if res.name == name:
                return res
        return None

    def group(self, name: str) -> ResctrlGroup | None:
        for grp in self.groups:
            if grp.name == name:
                return grp
        return None


@_frozen
class PciDevice:
    """One PCI function. ``numa_node`` is -1 when the kernel does not know."""

    address: str
    numa_node: int
    class_: str  # "class" in the schema
    vendor: str
    device: str
    sriov_totalvfs: int

    def __init__(
        self,
        address: str,
        numa_node: int,
        class_: str,
        vendor: str,
        device: str,
        sriov_totalvfs: int,
    ) -> None:
        self.__dict__.update(
            address=address,
            numa_node=numa_node,
            class_=class_,
            vendor=vendor,
            device=device,
            sriov_totalvfs=sriov_totalvfs,
        )


@_frozen
class HostTopology:
    """Everything the probe reads from one host; immutable, re-probed on hotplug."""

    cells: tuple[Cell, ...]
    cpus: tuple[Cpu, ...]
    caches: tuple[Cache, ...]
    resctrl: Resctrl | None
    pci: tuple[PciDevice, ...] = ()

    def __init__(
        self,
        cells: tuple[Cell, ...],
        cpus: tuple[Cpu, ...],
        caches: tuple[Cache, ...],
        resctrl: Resctrl | None,
        pci: tuple[PciDevice, ...] = (),
    ) -> None:
        self.__dict__.update(cells=cells, cpus=cpus, caches=caches, resctrl=resctrl, pci=pci)

    def cell(self, cell_id: int) -> Cell | None:
        for c in self.cells:
            if c.id == cell_id:
                return c
        return None

    def cpu(self, cpu_id: int) -> Cpu | None:
        for c in self.cpus:
            if c.id == cpu_id:
                return c
        return None


# --------------------------------------------------------------------------- dict form

_SCALARS = (int, str, bool, float, type(None))
_SCALAR_SET = frozenset(_SCALARS)
_NAMES: dict[type, tuple[tuple[str, str], ...]] = {}  # record class -> (field, key) pairs


def _to_plain(value: Any) -> Any:
    """The schema dict form of a model value: record fields by their ``_keys``, mappings
    with string keys, tuples as lists. Tuples in the model hold one type each, so a tuple
    whose first item is a scalar is copied as is: the daemon walks the topology on every
    re-probe, and a 448-thread host has over a thousand CPU tuples."""
    cls = value.__class__
    if cls in _SCALAR_SET:
        return value
    if cls is tuple or cls is list:
        if not value or value[0].__class__ in _SCALARS:
            return list(value)
        return [_to_plain(v) for v in value]
    names = _NAMES.get(cls)
    if names is None:
        if hasattr(value, "keys"):  # a mapping by dict()'s rule; no collections.abc import
            return {str(k): _to_plain(v) for k, v in value.items()}
        keys = getattr(cls, "_keys", None)
        if keys is None:
            return value
        names = _NAMES[cls] = tuple(zip(cls._fields, keys, strict=True))
    return {key: _to_plain(getattr(value, name)) for name, key in names}


def topology_to_dict(topo: HostTopology) -> dict[str, Any]:
    """The ``topology`` part of schema v1."""
    return _to_plain(topo)


def _int_map(d: Mapping[str, Any]) -> dict[int, Any]:
    return {int(k): v for k, v in d.items()}


def topology_from_dict(d: Mapping[str, Any]) -> HostTopology:
    """Rebuild a ``HostTopology`` from its schema-v1 dict (inverse of ``topology_to_dict``)."""
    cells = tuple(
        Cell(
            id=c["id"],
            cpus=tuple(c["cpus"]),
            memory_kib=c["memory_kib"],
            memory_free_kib=c.get("memory_free_kib", 0),
            distances=_int_map(c.get("distances", {})),
            hugepages=tuple(HugepagePool(**h) for h in c.get("hugepages", [])),
        )
        for c in d["cells"]
    )
    cpus = tuple(
        Cpu(**{**c, "siblings": tuple(c["siblings"])}) for c in d["cpus"]
    )
    caches = tuple(Cache(**{**c, "cpus": tuple(c["cpus"])}) for c in d["caches"])
    rd = d.get("resctrl")
    resctrl = None
    if rd is not None:
        resctrl = Resctrl(
            cdp=dict(rd["cdp"]),
            resources=tuple(ResctrlResource(**r) for r in rd["resources"]),
            mb=MemoryBandwidth(**rd["mb"]) if rd.get("mb") else None,
            groups=tuple(
                ResctrlGroup(
                    name=g["name"],
                    mode=g["mode"],
                    schemata={r: _int_map(m) for r, m in g["schemata"].items()},
                    mb=_int_map(g.get("mb", {})),
                    cpus=tuple(g["cpus"]),
                    tasks=g["tasks"],
                )
                for g in rd["groups"]
            ),
        )
    pci = tuple(
        PciDevice(
            address=p["address"],
            numa_node=p["numa_node"],
            class_=p["class"],
            vendor=p["vendor"],
            device=p["device"],
            sriov_totalvfs=p["sriov_totalvfs"],
        )
        for p in d.get("pci", [])
    )
    return HostTopology(cells=cells, cpus=cpus, caches=caches, resctrl=resctrl, pci=pci)
