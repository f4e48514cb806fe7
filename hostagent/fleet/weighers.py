"""Weighers: how good a host is for a request, from its summary (pure; docs/fleet.md §4).

Each weigher maps (shape, summary, needs) to a number in [0, 1], higher is better; a
weigher spec combines them with weights (``"spread"``, ``"pack:2,numa:1,cache:0.5"``) and
the host's score is the weighted mean. ``numa`` is also measured on the exact placement
(``placement_numa``), which replaces its estimate in a candidate's final score.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from hostagent.errors import RequestError
from hostagent.fleet.summary import LOCAL_DISTANCE, HostSummary, Needs, Shape

#: the weigher spec ``Fleet.place`` uses when none is given
DEFAULT_WEIGHER = "spread:1,numa:1,cores:0.5,cache:0.5"
#: the largest weight one weigher may be given
MAX_WEIGHT = 1000.0
#: at most this many characters in a weigher spec
MAX_WEIGHER_CHARS = 256


def utilisation(shape: Shape, s: HostSummary, needs: Needs) -> float:
    """How full the host is in what the request uses: dedicated threads for pinned
    guests, small-page memory for the others (0 empty .. 1 full)."""
    if needs.pinned:
        return 1.0 - s.free_threads / shape.dedicated if shape.dedicated else 1.0
    free = sum(c.memory_kib for c in s.cells)
    return 1.0 - min(1.0, free / s.memory_total_kib) if s.memory_total_kib else 1.0


def pack(shape: Shape, s: HostSummary, needs: Needs) -> float:
    """Fill hosts: the fullest host first, leaving whole hosts free."""
    return utilisation(shape, s, needs)


def spread(shape: Shape, s: HostSummary, needs: Needs) -> float:
    """Spread over hosts: the emptiest host first."""
    return 1.0 - utilisation(shape, s, needs)


def numa(shape: Shape, s: HostSummary, needs: Needs) -> float:
    """A guest of several cells: 1 when one socket has enough cells each holding the
    largest guest cell's threads and memory (its cells can be close), else 0; 1 for a
    guest of one cell."""
    k = len(needs.cells)
    if k < 2:
        return 1.0
    want_threads = max(d for d, _, _ in needs.cells) if needs.pinned else 0
    want_mem = max(m for _, _, m in needs.cells)
    per_socket: dict[int, int] = {}
    for sc, c in zip(shape.cells, s.cells, strict=True):
        if sc.socket is None:
            continue
        mem = c.memory_kib if not isinstance(needs.page_size, int) else sum(
            n * z for z, n in c.pages if z == needs.page_size)
        if c.free_threads >= want_threads and (mem >= want_mem or needs.page_size in (
                "large", "any")):
            per_socket[sc.socket] = per_socket.get(sc.socket, 0) + 1
    return 1.0 if max(per_socket.values(), default=0) >= k else 0.0


def cores(shape: Shape, s: HostSummary, needs: Needs) -> float:
    """Keep whole cores for ``isolate``/``require`` guests: other pinned guests go where
    most free threads are on broken cores; whole-core guests where the fewest whole cores
    are left (best fit). 0.5 for guests that pin nothing."""
    if not needs.pinned:
        return 0.5
    total_cores = sum(sc.cores for sc in shape.cells)
    if needs.whole_core_policy is not None:
        return 1.0 - s.whole_cores / total_cores if total_cores else 0.0
    if not s.free_threads:
        return 0.0
    broken = sum(max(0, c.free_threads - c.whole_cores * sc.threads_per_core)
                 for sc, c in zip(shape.cells, s.cells, strict=True))
    return broken / s.free_threads


def cache(shape: Shape, s: HostSummary, needs: Needs) -> float:
    """Cache ways left: a guest reserving cache goes where most ways are free; the others
    where the fewest are (keeping ways for guests that reserve them)."""
    free = s.total_free_ways / shape.cache_ways if shape.cache_ways else 0.0
    return free if needs.cache else 1.0 - free


WEIGHERS: Mapping[str, Callable[[Shape, HostSummary, Needs], float]] = {
    "pack": pack, "spread": spread, "numa": numa, "cores": cores, "cache": cache}


def parse_weigher(spec: str | Mapping[str, float] | None) -> tuple[tuple[str, float], ...]:
    """``"spread"`` or ``"pack:2,numa:1"`` (or a {name: weight} map) as (name, weight)
    pairs; ``RequestError`` naming the part that is wrong."""
    if spec is None:
        spec = DEFAULT_WEIGHER
    if isinstance(spec, str):
        if len(spec) > MAX_WEIGHER_CHARS:
            raise RequestError(f"weigher of {len(spec)} characters: at most "
                               f"{MAX_WEIGHER_CHARS}")
        items: list[tuple[str, Any]] = []
        for part in spec.split(","):
            name, _, weight = part.strip().partition(":")
            items.append((name.strip(), weight.strip() or "1"))
    elif isinstance(spec, Mapping):
        items = list(spec.items())
    else:
        raise RequestError(f"weigher={spec!r}: expected a string like 'pack:2,numa:1'")
    out: dict[str, float] = {}
    for name, raw in items:
        if name not in WEIGHERS:
            raise RequestError(f"weigher {name!r}: must be one of {', '.join(WEIGHERS)}")
        try:
            weight = float(raw)
        except (TypeError, ValueError):
            weight = math.nan
        if isinstance(raw, bool) or not 0 <= weight <= MAX_WEIGHT:
            raise RequestError(f"weigher {name}:{raw!r}: the weight must be a number from 0 "
                               f"to {MAX_WEIGHT:g}")
        if name in out:
            raise RequestError(f"weigher {name!r} given twice")
        out[name] = weight
    if out.get("pack") and out.get("spread"):
        raise RequestError("weigher: pack and spread pull opposite ways; give one of them")
    if not any(out.values()):
        raise RequestError(f"weigher {spec!r}: every weight is 0")
    return tuple(out.items())


def in_host_strategy(weights: tuple[tuple[str, float], ...]) -> str:
    """The fit's cell strategy for a weigher spec: ``pack`` when it packs."""
    return "pack" if dict(weights).get("pack") else "spread"


def score(shape: Shape, s: HostSummary, needs: Needs,
          weights: tuple[tuple[str, float], ...]) -> float:
    """The weighted mean of the weighers (0 .. 1)."""
    total = sum(w for _, w in weights)
    return sum(w * WEIGHERS[name](shape, s, needs) for name, w in weights if w) / total


def placement_numa(shape: Shape, placement: Mapping[str, Any]) -> float:
    """How close an exact placement's host cells are: 1 when every pair is as close as
    the host's closest pair of distinct cells allows (or one cell), 0 at its farthest."""
    ids = [int(c["host_cell"]) for c in placement.get("cells") or ()]
    if len(ids) < 2:
        return 1.0
    pairs = [shape.distance(a, b) for i, a in enumerate(ids) for b in ids[i + 1:]]
    far = max(shape.distances.values(), default=LOCAL_DISTANCE)
    near = min((d for (a, b), d in shape.distances.items() if a != b), default=far)
    if far <= near:
        return 1.0
    return max(0.0, min(1.0, (far - sum(pairs) / len(pairs)) / (far - near)))


def final_score(shape: Shape, s: HostSummary, needs: Needs,
                weights: tuple[tuple[str, float], ...], placement: Mapping[str, Any]) -> float:
    """``score`` with the ``numa`` weigher measured on the exact placement."""
    w = dict(weights).get("numa", 0.0)
    base = score(shape, s, needs, weights)
    if not w:
        return base
    total = sum(x for _, x in weights)
    return base + w * (placement_numa(shape, placement) - numa(shape, s, needs)) / total
