"""bench/claims: claims per second and claim latency on a real agent, against fit-only.

    .venv/bin/python bench/claims.py [--seconds 5] [--levels 1,2,4,8,16,32]

A real ``hostagent run`` on fixtures/sysfs/big-448 (448 threads, 8 cells) with the 200
guests of ``bench/tracker.py`` running in its test:/// driver (100 pinned guests leave 16
dedicated threads free). Clients are DEALER sockets in this process (asyncio), each
sending one request at a time:

1. fit-only, the peer: ``{op: "fit"}`` of a 1-vCPU dedicated guest, 1 client back to
   back and, per level, that many clients (at most ``MAX_REQUESTS_IN_FLIGHT`` are served
   at once; the others are answered ``busy`` and retry after 1 ms);
2. claims: per level, that many clients each claiming the same request (``ttl_s`` 60)
   and releasing it at once when granted, for ``--seconds``. A decision is a claim
   answered ``claimed: true`` (granted) or ``false`` (the 16 free threads are all
   claimed at that moment). Latency is from sending the claim to its reply; the
   release is timed apart.

Also, in this process, one claim decision's parts on the same host and guests: the
claims overlay's view (``ClaimTracker.fit_view``), the fit on it, making the claim
(placement check, XML, accounting), the judge (``judge_quickly``), and the slow path
the overlay replaced (a fold of the usage, ``host_view`` of its snapshot). Goals
(issue 13): p99 < 10 ms, >= 500 claims/s. The load average of the machine (1 minute)
is printed before and after each level: the figures are only comparable at the same
load.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

import zmq  # noqa: E402
import zmq.asyncio  # noqa: E402

from hostagent import wire  # noqa: E402

REQUEST = {"vcpus": 1, "memory_mb": 256, "extra_specs": {"hw:cpu_policy": "dedicated"}}


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


async def _call(sock: Any, req: dict[str, Any]) -> tuple[dict[str, Any], float]:
    t0 = time.perf_counter()
    await sock.send(wire.pack(req))
    reply = wire.unpack(await asyncio.wait_for(sock.recv(), 60))
    return reply, (time.perf_counter() - t0) * 1000


async def fit_clients(endpoint: str, n: int, seconds: float) -> dict[str, Any]:
    ctx = zmq.asyncio.Context.instance()
    lat: list[float] = []
    busy = 0
    stop = time.monotonic() + seconds

    async def client() -> None:
        nonlocal busy
        s = ctx.socket(zmq.DEALER)
        s.linger = 0
        s.connect(endpoint)
        try:
            while time.monotonic() < stop:
                reply, ms = await _call(s, {"op": "fit", "request": REQUEST})
                if not reply["ok"]:
                    assert reply["error"].startswith("busy"), reply
                    busy += 1
                    await asyncio.sleep(0.001)
                    continue
                lat.append(ms)
        finally:
            s.close()

    t0 = time.monotonic()
    await asyncio.gather(*(client() for _ in range(n)))
    return {"lat": lat, "rate": len(lat) / (time.monotonic() - t0), "busy": busy}


async def claim_clients(endpoint: str, n: int, seconds: float) -> dict[str, Any]:
    ctx = zmq.asyncio.Context.instance()
    lat: list[float] = []
    rel: list[float] = []
    granted = refused = busy = 0
    stop = time.monotonic() + seconds

    async def client(i: int) -> None:
        nonlocal granted, refused, busy
        s = ctx.socket(zmq.DEALER)
        s.linger = 0
        s.connect(endpoint)
        try:
            while time.monotonic() < stop:
                reply, ms = await _call(s, {"op": "claim", "request": REQUEST, "ttl_s": 60,
                                            "claimant": f"bench{i}"})
                if not reply["ok"]:
                    assert reply["error"].startswith("busy"), reply
                    busy += 1
                    await asyncio.sleep(0.001)
                    continue
                lat.append(ms)
                if not reply["claimed"]:
                    refused += 1
                    continue
                granted += 1
                reply, ms = await _call(s, {"op": "release", "id": reply["claim"]["id"]})
                assert reply["ok"], reply
                rel.append(ms)
        finally:
            s.close()

    t0 = time.monotonic()
    await asyncio.gather(*(client(i) for i in range(n)))
    wall = time.monotonic() - t0
    return {"lat": lat, "rel": rel, "granted": granted, "refused": refused, "busy": busy,
            "rate": len(lat) / wall, "granted_rate": granted / wall}


def in_process_parts(repeat: int) -> dict[str, float]:
    """Median ms of one decision's parts, on the same host and guests, in this process:
    the agent's path (the claims overlay) and, for comparison, the slow path it replaced
    (a fold of the whole usage and the fit's view read from its snapshot)."""
    import tracker as tb  # bench/tracker.py
    from libvirt_helpers import probe_fixture, uuid_for

    from hostagent import claims
    from hostagent.fit import fit
    from hostagent.fit.host import host_view
    from hostagent.fit.request import parse_request
    from hostagent.guests.source import record_from_xml
    from hostagent.model import topology_to_dict
    from hostagent.snapshot import assemble_snapshot

    topo = probe_fixture("big-448")
    res = tb.host_config(topo)
    tr = claims.ClaimTracker(topo, res)
    tr.replace_all(record_from_xml(x, uuid=uuid_for(n), name=n) for n, x in tb.guest_xmls(200))
    doc = topology_to_dict(topo)
    ask = claims.parse_claim_op({"request": REQUEST}, default_ttl=60, default_strategy="spread")
    tr.guest_base()  # made once per guest change, not per decision
    parts: dict[str, list[float]] = {"overlay view": [], "fit": [], "make the claim": [],
                                     "judge (overlay)": [], "slow path: fold": [],
                                     "slow path: host_view": [],
                                     "of which: holdings from the placement": [],
                                     "before: holdings by the XML round trip": []}
    parsed = parse_request(REQUEST)  # the agent parses a request once
    for _ in range(repeat):
        t0 = time.perf_counter()
        view = tr.fit_view()
        t1 = time.perf_counter()
        answer = fit(view, parsed, libvirt_xml=False)
        t2 = time.perf_counter()
        record = claims.make_record(tr.ctx, ask, answer["placement"],
                                    claim_id=claims.new_claim_id(), now=0, parsed=parsed)
        c = claims.claim_contribution(tr.ctx, record)
        t3 = time.perf_counter()
        claims.claim_spec(record)
        t8 = time.perf_counter()
        claims.parsed_claim_spec(record)
        t9 = time.perf_counter()
        reasons = claims.judge_quickly(tr, c)
        t4 = time.perf_counter()
        assert not reasons
        tr.grant(record, c)
        t5 = time.perf_counter()
        usage = tr.usage()
        t6 = time.perf_counter()
        host_view(assemble_snapshot(doc, res, usage, host="h", epoch="e", seq=1, now=0))
        t7 = time.perf_counter()
        tr.release(record.id)
        for key, a, b in zip(parts, (t0, t1, t2, t9, t5, t6, t3, t8),
                             (t1, t2, t3, t4, t6, t7, t8, t9), strict=True):
            parts[key].append((b - a) * 1000)
    return {k: statistics.median(v) for k, v in parts.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0, help="per level")
    ap.add_argument("--levels", default="1,2,4,8,16,32")
    ap.add_argument("--repeat", type=int, default=200, help="in-process decisions")
    ap.add_argument("--runtime-dir", default="",
                    help="the agent's runtime_dir, where the claims file is written (default: "
                    "a new directory on /dev/shm, tmpfs like /run; give one on a disk to "
                    "see the fsync)")
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]

    import tracker as tb
    from daemon import Agent, running  # bench/daemon.py
    from libvirt_helpers import probe_fixture

    from hostagent.cpulist import format_cpulist

    load0 = os.getloadavg()
    parts = in_process_parts(args.repeat)
    topo = probe_fixture("big-448")
    res = tb.host_config(topo)
    resources = (f'dedicated_cpus = "{format_cpulist(res["dedicated_cpus"])}"\n'
                 f'shared_cpus = "{format_cpulist(res["shared_cpus"])}"')
    import tempfile

    runtime = args.runtime_dir or tempfile.mkdtemp(prefix="hab-run-", dir="/dev/shm")
    agent = Agent("big-448", resources, [running(x) for _, x in tb.guest_xmls(200)],
                  heartbeat=1.0, coalesce_ms=50, runtime_dir=runtime)
    try:
        time.sleep(1.0)  # the guests are read and published
        fit_rows = [(n, asyncio.run(fit_clients(agent.req, n, args.seconds)))
                    for n in levels]
        claim_rows = []
        for n in levels:
            before = os.getloadavg()[0]
            cpu0 = agent.ps.cpu_times()
            row = asyncio.run(claim_clients(agent.req, n, args.seconds))
            cpu1 = agent.ps.cpu_times()
            # the agent's own CPU time per claim decided (with its release): what the
            # machine's other load does not change much, unlike the latencies
            cpu_ms = (cpu1.user + cpu1.system - cpu0.user - cpu0.system) * 1000
            claim_rows.append((n, {**row, "load": (before, os.getloadavg()[0]),
                                   "cpu_ms": cpu_ms / max(1, len(row["lat"]))}))
    finally:
        rc = agent.stop()
    load1 = os.getloadavg()

    print(f"claims bench: real agent on big-448 with 200 guests (16 dedicated threads free), "
          f"request: 1 dedicated vCPU, {args.seconds:g} s per level")
    print(f"load average before / after: {load0[0]:.2f} / {load1[0]:.2f} on "
          f"{os.cpu_count()} CPUs; agent exit {rc}; claims file in {runtime}")
    print()
    print(f"{'clients':>7}  {'fit-only p50 / p99 ms':>22} {'fits/s':>7}  "
          f"{'claim p50 / p99 ms':>19} {'decided/s':>9} {'granted/s':>9} "
          f"{'refused':>7} {'busy':>5}  {'release p50 ms':>14}  {'agent CPU ms/claim':>18}  "
          f"{'load':>11}")
    for (n, f), (_, c) in zip(fit_rows, claim_rows, strict=True):
        print(f"{n:>7}  {pct(f['lat'], 50):>10.2f} / {pct(f['lat'], 99):<9.2f} "
              f"{f['rate']:>7.0f}  {pct(c['lat'], 50):>8.2f} / {pct(c['lat'], 99):<8.2f} "
              f"{c['rate']:>9.0f} {c['granted_rate']:>9.0f} {c['refused']:>7} {c['busy']:>5}  "
              f"{pct(c['rel'], 50):>14.2f}  {c['cpu_ms']:>18.2f}  "
              f"{c['load'][0]:>5.2f}-{c['load'][1]:<5.2f}")
    print()
    print("one decision in this process (median ms): "
          + ", ".join(f"{k} {v:.2f}" for k, v in parts.items()))
    print("goals: claim p99 < 10 ms, >= 500 claims/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
