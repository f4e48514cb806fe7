"""Test helpers for the fleet index: schema-v1 snapshots of fixture hosts with guests.

- ``host_snapshot(fixture, name, guests=N, request=R)``: a snapshot of ``fixtures/sysfs/
  <fixture>`` (probed once per session) named ``name``, with ``guests`` guests of fit
  request ``R`` placed one by one by the fitter and tracked as booted guests (what an
  agent would publish after booting them).
- ``PINNED2`` / ``SHARED1``: small requests.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

from claim_helpers import _guest_xml
from libvirt_helpers import pools_free, probe_fixture

from hostagent.config import ResourcesConfig, resolve_resources
from hostagent.cpulist import parse_cpulist
from hostagent.fit import fit
from hostagent.guests.source import record_from_xml
from hostagent.model import topology_to_dict
from hostagent.snapshot import assemble_snapshot
from hostagent.tracker import UsageTracker

PINNED2 = {"vcpus": 2, "memory_mb": 1024, "extra_specs": {"hw:cpu_policy": "dedicated"}}
SHARED1 = {"vcpus": 1, "memory_mb": 512}

#: dedicated threads per fixture: the housekeeping threads stay shared
DEDICATED = {"xeon-2s-cat": "2-11,14-23,26-35,38-47", "xeon-2s-cdp": "2-11,14-23,26-35,38-47",
             "epyc-amd": "2-31,34-63", "large-8cell": None, "big-448": "4-223,228-447",
             "vm-1s-nosmt": "1-3"}


@functools.cache
def _base(fixture: str) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    topo = pools_free(probe_fixture(fixture))
    ded = DEDICATED.get(fixture)
    if fixture == "large-8cell":
        online = [c.id for c in topo.cpus if c.online]
        ded_ids: tuple[int, ...] | None = tuple(online[2:])
    else:
        ded_ids = tuple(parse_cpulist(ded)) if ded else None
    resources = resolve_resources(ResourcesConfig(dedicated_cpus=ded_ids), topo)
    return topo, topology_to_dict(topo), resources


def host_snapshot(fixture: str, name: str, *, guests: int = 0,
                  request: dict[str, Any] | None = None, seq: int = 1,
                  epoch: str = "e1", strategy: str = "spread") -> dict[str, Any]:
    """A snapshot of host ``name`` of shape ``fixture`` with ``guests`` guests booted."""
    topo, tdict, resources = _base(fixture)
    tr = UsageTracker(topo, resources)
    req = request or PINNED2
    for n in range(guests):
        s = assemble_snapshot(tdict, resources, tr.usage(), host=name, epoch=epoch, seq=seq,
                              now=0.0)
        answer = fit(s, req, strategy=strategy)
        assert answer["fits"], (fixture, n, answer["reasons"][:3])
        uuid, xml = _guest_xml(answer, n, req["memory_mb"])
        tr.update(record_from_xml(xml, uuid=uuid, name=f"g{n}"))
    return assemble_snapshot(copy.deepcopy(tdict), copy.deepcopy(resources),
                             copy.deepcopy(tr.usage()), host=name, epoch=epoch, seq=seq,
                             now=1000.0)
