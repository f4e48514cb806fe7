"""Realistic schema-v1 snapshots for a simulated fleet (bench/fleet.py, tests).

A *chain* is a list of usages of one host shape (a fixture tree) where each one differs
from the one before by one guest event (a guest started, stopped or resized), made by a
real ``UsageTracker`` from random guests' domain XML — what one agent publishes over time.
A simulated host walks its chain from its own offset, so consecutive snapshots of one
host differ by one event (as on a real agent) while hosts differ from each other; many
hosts share a chain's dict objects in the simulating process, which keeps 10,000 hosts
in a few processes' memory. ``SimEncoder`` encodes a host's next snapshot the way the
agent's publisher does (``wire.encode_stream`` with a ``PackCache`` per chain step, so
the packed topology and usage and their deflate segments are reused).
"""

from __future__ import annotations

import random
import sys
import zlib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from libvirt_helpers import domain_xml, probe_fixture, uuid_for  # noqa: E402

from hostagent import wire  # noqa: E402
from hostagent.config import config_from_dict, resolve_resources  # noqa: E402
from hostagent.cpulist import format_cpulist  # noqa: E402
from hostagent.guests.source import record_from_xml  # noqa: E402
from hostagent.model import topology_to_dict  # noqa: E402
from hostagent.snapshot import assemble_snapshot  # noqa: E402
from hostagent.tracker import UsageTracker  # noqa: E402

#: per fixture: the shared threads (two cores per cell), the rest dedicated
SHARED_CORES_PER_CELL = 2


def host_resources(topo: Any) -> dict[str, Any]:
    """The resources config of a simulated host: per cell the first two cores shared."""
    shared: list[int] = []
    for cell in topo.cells:
        cores: dict[tuple[int, int], list[int]] = {}
        for cpu in topo.cpus:
            if cpu.id in cell.cpus:
                cores.setdefault((cpu.socket, cpu.core), []).append(cpu.id)
        for key in sorted(cores, key=lambda k: min(cores[k]))[:SHARED_CORES_PER_CELL]:
            shared += cores[key]
    dedicated = [c.id for c in topo.cpus if c.id not in shared]
    doc = {"dedicated_cpus": format_cpulist(dedicated),
           "shared_cpus": format_cpulist(sorted(shared))}
    return resolve_resources(config_from_dict({"resources": doc}).resources, topo)


def _guest_xml(name: str, rng: random.Random, topo: Any, res: dict[str, Any],
               free: set[int]) -> str | None:
    """A random guest: 60% pinned 1:1 on free dedicated threads of one cell (2 or 4
    vCPUs), 25% pinned to a cell's shared threads, 15% floating; None when no room."""
    kind = rng.random()
    cell = rng.choice(topo.cells)
    shared = [c for c in res["shared_cpus"] if c in cell.cpus]
    if kind < 0.6:
        n = rng.choice((2, 4))
        room = sorted(c for c in free if c in cell.cpus)
        if len(room) < n:
            return None
        threads = room[:n]
        free.difference_update(threads)
        mem = n * 1048576
        return domain_xml(name, vcpus=n, memory_kib=mem,
                          vcpupin={v: str(t) for v, t in enumerate(threads)},
                          emulatorpin=format_cpulist(shared), cells=[(f"0-{n - 1}", mem)],
                          memnodes={0: str(cell.id)})
    if kind < 0.85:
        n = rng.choice((1, 2, 4))
        return domain_xml(name, vcpus=n, memory_kib=2 * 1048576,
                          vcpupin={v: format_cpulist(shared) for v in range(n)},
                          emulatorpin=format_cpulist(shared),
                          numa_memory=("strict", str(cell.id)))
    return domain_xml(name, vcpus=2, memory_kib=1048576,
                      cpuset=format_cpulist(res["shared_cpus"]))


class Chain:
    """``steps`` usages of one host shape with ``guests`` guests, one event apart."""

    def __init__(self, fixture: str, guests: int, steps: int, seed: int) -> None:
        rng = random.Random(seed)
        self.fixture = fixture
        #: every guest name starts with this 4-character token; ``SimEncoder`` replaces it
        #: by one of the host's own in the packed bytes (same length: still valid msgpack),
        #: so hosts walking one chain still hold guests of their own
        self.token = f"g{seed % 100:02d}-"
        topo = probe_fixture(fixture)
        self.topology = topology_to_dict(topo)
        self.config = host_resources(topo)
        free = set(self.config["dedicated_cpus"])
        tracker = UsageTracker(topo, self.config)
        records = {}
        counter = 0

        dedicated = set(self.config["dedicated_cpus"])

        def new_guest() -> Any:
            nonlocal counter
            counter += 1
            name = f"{self.token}{counter}"
            xml = None
            for _ in range(20):  # a pinned guest finds no room: draw another kind
                xml = _guest_xml(name, rng, topo, self.config, free)
                if xml is not None:
                    break
            if xml is None:
                xml = domain_xml(name, vcpus=1, memory_kib=1048576,
                                 cpuset=format_cpulist(self.config["shared_cpus"]))
            return record_from_xml(xml, uuid=uuid_for(name), name=name)

        while len(records) < guests:
            rec = new_guest()
            records[rec.uuid] = rec
        tracker.replace_all(list(records.values()))
        self.usages = [tracker.usage()]
        for _ in range(steps - 1):  # one event: a guest goes, another comes
            gone = rng.choice(list(records))
            free.update(_pinned(records.pop(gone)) & dedicated)
            tracker.remove(gone)
            rec = new_guest()
            records[rec.uuid] = rec
            tracker.update(rec)
            self.usages.append(tracker.usage())
        self.caches = [wire.PackCache() for _ in self.usages]


def _pinned(rec: Any) -> set[int]:
    out: set[int] = set()
    spec = rec.spec
    for pins in getattr(spec, "vcpupin", {}).values() if spec is not None else ():
        out.update(pins)
    return out


class SimEncoder:
    """Encodes a simulated host's next snapshot on its chain, like the agent's publisher."""

    def __init__(self, chain: Chain) -> None:
        self.chain = chain

    def frames(self, host: str, epoch: str, seq: int, step: int, now: float,
               token: bytes | None = None) -> list[bytes]:
        """The two stream frames of ``host``'s snapshot ``seq`` at chain step ``step``;
        with ``token`` (4 bytes) the guests are the host's own (their names' token)."""
        c = self.chain
        i = step % len(c.usages)
        snap = assemble_snapshot(c.topology, c.config, c.usages[i], host=host, epoch=epoch,
                                 seq=seq, now=now)
        body = wire.make_body("snapshot", host, epoch, seq, now, snap)
        if token is None:
            return wire.encode_stream(body, cache=c.caches[i])
        raw = wire.pack_map(snap, c.caches[i]).replace(c.token.encode(), token)
        return [wire.topic(host), wire.pack({**body, "data": zlib.compress(raw, 1),
                                             "enc": "zlib"})]

    def delta(self, host: str, old: dict, new: dict, token: bytes | None = None) -> bytes:
        """The delta body (packed) turning ``old`` into ``new`` (both of ``host``)."""
        body = wire.pack(wire.make_body("delta", host, new["epoch"], new["seq"], new["time"],
                                        wire.make_delta(old, new)))
        return body if token is None else body.replace(self.chain.token.encode(), token)

    def heartbeat(self, host: str, epoch: str, seq: int, now: float) -> list[bytes]:
        return wire.encode_stream(wire.make_body("heartbeat", host, epoch, seq, now, None))
