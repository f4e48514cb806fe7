"""The Prometheus endpoint's cost on the 448-thread fixture with 200 guests.

    .venv/bin/python bench/metrics.py [--guests 200] [--repeat 200]

The snapshot is bench/tracker.py's (big-448, 200 guests). Measured: rendering the text
(``generate_latest`` over the agent's registry: the collector building every family
from the snapshot, plus the process/platform/gc collectors), and a real HTTP GET through
``MetricsServer`` on loopback with the render cache (``RENDER_CACHE_SECONDS``) against
the same server rendering every scrape (peer: no cache).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

from libvirt_helpers import probe_fixture, uuid_for  # noqa: E402
from prometheus_client.exposition import generate_latest  # noqa: E402
from tracker import guest_xmls, host_config  # noqa: E402

from hostagent.agent import metrics  # noqa: E402
from hostagent.guests.source import record_from_xml  # noqa: E402
from hostagent.model import topology_to_dict  # noqa: E402
from hostagent.snapshot import assemble_snapshot  # noqa: E402
from hostagent.tracker import UsageTracker  # noqa: E402


def readings(guests: int) -> metrics.AgentReadings:
    topo = probe_fixture("big-448")
    res = host_config(topo)
    tracker = UsageTracker(topo, res)
    tracker.replace_all([record_from_xml(x, uuid=uuid_for(n), name=n)
                         for n, x in guest_xmls(guests)])
    snap = assemble_snapshot(topology_to_dict(topo), res, tracker.usage(), host="big-448",
                             epoch="e" * 16, seq=1, now=time.time())
    snap["agent"] = {"version": "0.1.0", "libvirt": {"uri": "test:///", "connected": True}}
    return metrics.AgentReadings(host="big-448", epoch="e" * 16, snapshot=snap,
                                 subscribers=1, publisher={}, agent={}, errors={},
                                 libvirt={})


def percentiles(times: list[float]) -> tuple[float, float]:
    times = sorted(times)
    return statistics.median(times), times[min(len(times) - 1, int(len(times) * 0.99))]


async def scrape_ms(r: metrics.AgentReadings, cache_seconds: float, repeat: int) -> list[float]:
    server = metrics.MetricsServer(metrics.build_registry(lambda: r), "127.0.0.1", 0,
                                   render_cache_seconds=cache_seconds)
    await server.start()

    def get() -> None:
        with urllib.request.urlopen(server.url, timeout=20) as resp:
            resp.read()

    times = []
    try:
        for _ in range(repeat):
            t0 = time.perf_counter()
            await asyncio.to_thread(get)
            times.append((time.perf_counter() - t0) * 1000)
    finally:
        await server.close()
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--guests", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=200)
    args = ap.parse_args()
    r = readings(args.guests)
    registry = metrics.build_registry(lambda: r)
    times = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        out = generate_latest(registry)
        times.append((time.perf_counter() - t0) * 1000)
    samples = sum(1 for line in out.splitlines() if not line.startswith(b"#"))
    render = percentiles(times)
    cached = percentiles(asyncio.run(scrape_ms(r, metrics.RENDER_CACHE_SECONDS, args.repeat)))
    uncached = percentiles(asyncio.run(scrape_ms(r, 0.0, args.repeat)))
    print(f"big-448, {args.guests} guests: {samples} samples, {len(out)} bytes of text")
    print("| measure | median | p99 |")
    print("|---|---|---|")
    print(f"| render (generate_latest) | {render[0]:.2f} ms | {render[1]:.2f} ms |")
    print(f"| HTTP GET, render cache {metrics.RENDER_CACHE_SECONDS:g} s | {cached[0]:.2f} ms "
          f"| {cached[1]:.2f} ms |")
    print(f"| HTTP GET, peer: no cache | {uncached[0]:.2f} ms | {uncached[1]:.2f} ms |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
