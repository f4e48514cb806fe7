"""Shared test helpers: libvirt ``test:///`` node files and domain XML for guests.

- ``probe_fixture(name)``: the ``HostTopology`` of ``fixtures/sysfs/<name>``;
  ``pools_free(topo)``: the same with every hugepage pool wholly free in the kernel's
  count (the fixtures show pages in use by no guest: a ``hugepages_untracked`` conflict).
- ``node_xml(topo, domains)`` / ``write_node(dir, topo, domains)``: a custom test-driver
  node file whose ``<cpu>`` matches the topology (cells, sockets, cores, threads, online
  CPUs) and whose ``<memory>`` is the hosts's total, holding ``domains`` (strings from
  ``domain_xml``). ``write_node`` returns the ``test:///<path>`` URI; every ``open()`` of
  a custom file starts from the file's contents (independent state per connection).
- ``open_test(uri)``: ``libvirt.open`` with libvirt's stderr error printer silenced.
- ``domain_xml(name, ...)``: a test-driver domain with the placement elements the tracker
  reads (vcpu cpuset, vcpupin, emulatorpin, iothreadpin, NUMA cells, numatune, hugepages,
  cachetune, memorytune). ``running=True/False`` adds ``<test:runstate>`` for domains
  embedded in a node file (1 running, 5 shut off); leave it None for ``defineXML``.
- ``uuid_for(name)``: a stable uuid per name.
"""

from __future__ import annotations

import uuid as _uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from hostagent.model import HostTopology

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures" / "sysfs"
TEST_NS = "http://libvirt.org/schemas/domain/test/1.0"


def probe_fixture(name: str) -> HostTopology:
    from fixture_trees import need_fixture

    from hostagent.probe.host import probe_host

    base = need_fixture(name)
    return probe_host(base, base / "fs" / "resctrl")


def pools_free(topo: HostTopology) -> HostTopology:
    """``topo`` with each hugepage pool's kernel ``free`` equal to its ``total``: for tests
    about guests, which should not also see the fixture host's own page users."""
    from hostagent.model import replace

    cells = tuple(replace(c, hugepages=tuple(replace(p, free=p.total) for p in c.hugepages))
                  for c in topo.cells)
    return replace(topo, cells=cells)


def uuid_for(name: str) -> str:
    return str(_uuid.uuid5(_uuid.NAMESPACE_DNS, f"{name}.guests.hostagent.test"))


def node_xml(topo: HostTopology, domains: Iterable[str] = ()) -> str:
    online = [c for c in topo.cpus if c.online]
    nodes = max(1, sum(1 for c in topo.cells if c.cpus))
    sockets = len({c.socket for c in online}) or 1
    threads = max((len(c.siblings) for c in online), default=1) or 1
    per_node_sockets = max(1, sockets // nodes)
    cores = max(1, len(online) // (nodes * per_node_sockets * threads))
    memory = sum(c.memory_kib for c in topo.cells) or 8 * 1024 * 1024
    body = "\n".join(domains)
    return f"""<node>
  <cpu>
    <mhz>2400</mhz>
    <model>x86_64</model>
    <nodes>{nodes}</nodes>
    <sockets>{per_node_sockets}</sockets>
    <cores>{cores}</cores>
    <threads>{threads}</threads>
    <active>{len(online)}</active>
  </cpu>
  <memory>{memory}</memory>
{body}
</node>
"""


def write_node(directory: Path, topo: HostTopology, domains: Iterable[str] = (),
               name: str = "node.xml") -> str:
    path = Path(directory) / name
    path.write_text(node_xml(topo, domains))
    return f"test://{path.resolve()}"


def open_test(uri: str) -> Any:
    import libvirt

    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    return libvirt.open(uri)


def domain_xml(
    name: str,
    *,
    uuid: str | None = None,
    vcpus: int = 2,
    memory_kib: int = 1048576,
    cpuset: str | None = None,
    vcpupin: Mapping[int, str] | None = None,
    emulatorpin: str | None = None,
    iothreads: int = 0,
    iothreadpin: Mapping[int, str] | None = None,
    vcpusched: Sequence[tuple[str, str, int]] = (),
    cells: Sequence[tuple[str, int]] | None = None,
    numa_memory: tuple[str, str] | None = None,
    memnodes: Mapping[int, str] | None = None,
    hugepages: Sequence[tuple[int | None, str | None]] | None = None,
    cachetunes: Sequence[tuple[str, Sequence[tuple[int, int, str, int]]]] = (),
    memorytunes: Sequence[tuple[str, Sequence[tuple[int, int]]]] = (),
    topology: tuple[int, int, int] | None = None,
    running: bool | None = None,
) -> str:
    """One domain. ``cells``: [(vcpus, memory KiB)]; ``hugepages``: [(size KiB or None,
    guest nodeset or None)] (``[]`` = ``<hugepages/>`` only); ``cachetunes``:
    [(vcpus, [(cache id, level, type, size KiB)])]; ``memorytunes``: [(vcpus, [(node,
    bandwidth)])]; ``numa_memory``: (mode, nodeset); ``memnodes``: {guest cell: nodeset}."""
    uid = uuid or uuid_for(name)
    cs = f" cpuset='{cpuset}'" if cpuset else ""
    tune: list[str] = []
    for v, cpus in (vcpupin or {}).items():
        tune.append(f"<vcpupin vcpu='{v}' cpuset='{cpus}'/>")
    if emulatorpin:
        tune.append(f"<emulatorpin cpuset='{emulatorpin}'/>")
    for t, cpus in (iothreadpin or {}).items():
        tune.append(f"<iothreadpin iothread='{t}' cpuset='{cpus}'/>")
    for vs, sched, prio in vcpusched:
        tune.append(f"<vcpusched vcpus='{vs}' scheduler='{sched}' priority='{prio}'/>")
    for vs, caches in cachetunes:
        inner = "".join(
            f"<cache id='{cid}' level='{lvl}' type='{typ}' size='{size}' unit='KiB'/>"
            for cid, lvl, typ, size in caches
        )
        tune.append(f"<cachetune vcpus='{vs}'>{inner}</cachetune>")
    for vs, nodes in memorytunes:
        inner = "".join(f"<node id='{n}' bandwidth='{bw}'/>" for n, bw in nodes)
        tune.append(f"<memorytune vcpus='{vs}'>{inner}</memorytune>")
    cputune = f"<cputune>{''.join(tune)}</cputune>" if tune else ""
    numatune = ""
    if numa_memory or memnodes:
        parts = []
        if numa_memory:
            parts.append(f"<memory mode='{numa_memory[0]}' nodeset='{numa_memory[1]}'/>")
        for cid, ns in (memnodes or {}).items():
            parts.append(f"<memnode cellid='{cid}' mode='strict' nodeset='{ns}'/>")
        numatune = f"<numatune>{''.join(parts)}</numatune>"
    backing = ""
    if hugepages is not None:
        pages = "".join(
            "<page" + (f" size='{size}' unit='KiB'" if size else "")
            + (f" nodeset='{ns}'" if ns else "") + "/>"
            for size, ns in hugepages if size is not None or ns is not None
        )
        backing = (f"<memoryBacking><hugepages>{pages}</hugepages></memoryBacking>"
                   if pages else "<memoryBacking><hugepages/></memoryBacking>")
    cpu = ""
    if cells or topology:
        top = ""
        if topology:
            top = (f"<topology sockets='{topology[0]}' cores='{topology[1]}' "
                   f"threads='{topology[2]}'/>")
        numa = ""
        if cells:
            numa = "<numa>" + "".join(
                f"<cell id='{i}' cpus='{vs}' memory='{mem}' unit='KiB'/>"
                for i, (vs, mem) in enumerate(cells)
            ) + "</numa>"
        cpu = f"<cpu>{top}{numa}</cpu>"
    iot = f"<iothreads>{iothreads}</iothreads>" if iothreads else ""
    ns_attr = f" xmlns:test='{TEST_NS}'" if running is not None else ""
    runstate = f"<test:runstate>{1 if running else 5}</test:runstate>" \
        if running is not None else ""
    return (
        f"<domain type='test'{ns_attr}><name>{name}</name><uuid>{uid}</uuid>"
        f"<memory unit='KiB'>{memory_kib}</memory>"
        f"<currentMemory unit='KiB'>{memory_kib}</currentMemory>{backing}"
        f"<vcpu placement='static'{cs}>{vcpus}</vcpu>{iot}{cputune}{numatune}"
        f"<os><type arch='x86_64'>hvm</type></os>{cpu}{runstate}</domain>"
    )
