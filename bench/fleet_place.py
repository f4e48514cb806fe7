"""bench/fleet_place: the fleet index alone, in-process — update cost, memory per host,
place latency — at N hosts (no sockets; bench/fleet.py measures the whole stream).

    .venv/bin/python bench/fleet_place.py [--hosts 1000,10000] [--places 300]

Hosts are copies (distinct names, shared decoded parts) of a few snapshots of the
fixture shapes with guests placed by the fitter: xeon-2s-cat with 0, 10 and 20 pinned
guests (of 2 vCPUs; 20 fill it), epyc-amd with 4 and 20, vm-1s-nosmt empty. Reported:
``Fleet.update`` µs per snapshot (hashing skipped when a host's topology and config are
its shape's), the index's memory per host (tracemalloc), ``Fleet.place`` latency p50/p99
for a 2-vCPU pinned guest (spread, pack, the default weigher) while the fleet changes
(``--changes`` hosts get a new snapshot before each place, untimed: 5 = 1,000 updates/s
against 200 places/s; the host placed on is among them, as after its claim), the first
place of a request/weigher (it scores every host once) apart, the same request placed by
running ``fit`` on every host (the naive scheduler), and exact fits per place.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from fleet_helpers import PINNED2, host_snapshot  # noqa: E402

from hostagent.fit import fit, prepare  # noqa: E402
from hostagent.fleet import Fleet  # noqa: E402

KINDS = [("xeon-2s-cat", 0), ("xeon-2s-cat", 10), ("xeon-2s-cat", 20), ("epyc-amd", 4),
         ("epyc-amd", 20), ("vm-1s-nosmt", 0)]


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hosts", default="1000,10000")
    ap.add_argument("--places", type=int, default=300)
    ap.add_argument("--changes", type=int, default=5)
    args = ap.parse_args()
    bases = [host_snapshot(f, f"{f}-{g}", guests=g) for f, g in KINDS]
    print(f"load average {os.getloadavg()[0]:.2f} (2 cores)")
    for n in map(int, args.hosts.split(",")):
        snaps = [dict(bases[i % len(bases)], host=f"h{i}") for i in range(n)]
        tracemalloc.start()
        fleet = Fleet()
        t0 = time.perf_counter()
        for s in snaps:
            fleet.update(s, 0.0)
        first = (time.perf_counter() - t0) / n
        mem = tracemalloc.get_traced_memory()[0] / n
        tracemalloc.stop()
        t0 = time.perf_counter()
        for s in snaps:
            fleet.update(dict(s, seq=2), 0.0)
        again = (time.perf_counter() - t0) / n
        print(f"{n} hosts: update {first * 1e6:.0f} µs (new host), {again * 1e6:.0f} µs "
              f"(same shape); index {mem / 1024:.1f} KiB per host")
        rng = random.Random(1)
        seq = 2
        for weigher in ("spread", "pack", None):
            t0 = time.perf_counter()
            got = fleet.place(PINNED2, weigher=weigher, now=0.0)
            build = time.perf_counter() - t0
            lat = []
            before = fleet.stats["exact_fits"]
            for _ in range(args.places):
                seq += 1
                changed = [got[0].host] + [f"h{rng.randrange(n)}"
                                           for _ in range(args.changes - 1)]
                for h in changed:
                    fleet.update(dict(snaps[int(h[1:])], seq=seq), 0.0)
                t0 = time.perf_counter()
                got = fleet.place(PINNED2, weigher=weigher, now=0.0)
                lat.append(time.perf_counter() - t0)
                assert got
            fits = (fleet.stats["exact_fits"] - before) / args.places
            print(f"  place {weigher or 'default'}: first {build * 1e3:.0f} ms, then p50 "
                  f"{pct(lat, .5) * 1e3:.2f} ms  p99 {pct(lat, .99) * 1e3:.2f} ms  "
                  f"({fits:.1f} exact fits per place)")
        views = [prepare(b) for b in bases]
        t0 = time.perf_counter()
        k = min(n, 1000)
        for i in range(k):
            fit(views[i % len(views)], PINNED2)
        naive = (time.perf_counter() - t0) / k * n
        print(f"  naive (fit on every host, prepared views): {naive * 1e3:.0f} ms per place")
    return 0


if __name__ == "__main__":
    sys.exit(main())
