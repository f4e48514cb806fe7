"""The snapshot: one schema-v1 dict = topology + resolved config + usage (docs/schema.md).

``build_snapshot`` assembles it from scratch. A daemon that keeps the topology dict and
a ``UsageTracker`` uses ``assemble_snapshot`` to avoid re-walking the topology per change.
Everything in the result is JSON- and msgpack-safe: str/int/float/bool/None, lists and
dicts with string keys.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from hostagent.config import Config, resolve_resources
from hostagent.guests.xml import GuestRecord
from hostagent.model import HostTopology, topology_to_dict
from hostagent.tracker import compute_usage, with_intruders, with_threads

SCHEMA_VERSION = 1


def assemble_snapshot(
    topology: Mapping[str, Any],
    config: Mapping[str, Any],
    usage: Mapping[str, Any],
    *,
    host: str,
    epoch: str,
    seq: int,
    now: float,
) -> dict[str, Any]:
    """Wrap already-built parts into a snapshot (no copying)."""
    return {
        "schema": SCHEMA_VERSION,
        "host": host,
        "epoch": epoch,
        "seq": int(seq),
        "time": float(now),
        "topology": topology,
        "config": config,
        "usage": usage,
    }


def build_snapshot(
    topo: HostTopology,
    config: Config,
    guests: Iterable[GuestRecord],
    *,
    host: str,
    epoch: str,
    seq: int,
    now: float,
    thread_check: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The whole schema-v1 document for ``topo``, ``config`` and ``guests``;
    ``thread_check`` (``hostagent.guests.intruders.check_threads``) adds the guests'
    threads, drift and the host's intruders as the daemon does."""
    resources = resolve_resources(config.resources, topo)
    usage = compute_usage(topo, resources, guests)
    if thread_check is not None:
        usage = with_intruders(with_threads(usage, thread_check["guests"]),
                               thread_check["intruders"])
    return assemble_snapshot(
        topology_to_dict(topo),
        resources,
        usage,
        host=host,
        epoch=epoch,
        seq=seq,
        now=now,
    )
