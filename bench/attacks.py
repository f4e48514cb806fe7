#!/usr/bin/env python3
"""The agent before and after every attack on its sockets: snapshot latency and RSS.

A real ``hostagent run`` (fixture tree, ``test:///`` guests, ipc endpoints) answers N
``{op: "snapshot"}`` requests, takes the whole attack battery (tests/attack_battery.py),
then answers N more; the peer is the same agent before the attacks, in the same run.
Printed: request round trip p50/p99 before and right after, RSS before, at its peak
during the battery and once it has settled (the agent returns freed heap within about
5 s, docs/security.md).

    .venv/bin/python bench/attacks.py [--fixture big-448] [--requests 200]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import zmq  # noqa: E402
from attack_battery import run_battery  # noqa: E402
from daemon_helpers import DaemonProc  # noqa: E402

from hostagent import wire  # noqa: E402

MAX_MESSAGE_BYTES = 262_144  # daemon_helpers' config


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def latencies(endpoint: str, n: int) -> list[float]:
    ctx: zmq.Context[bytes] = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.linger = 0
    s.rcvtimeo = 30_000
    s.connect(endpoint)
    out = []
    payload = wire.pack({"op": "snapshot"})
    try:
        for _ in range(n):
            t = time.perf_counter()
            s.send(payload)
            rep = wire.decode_reply(s.recv())
            out.append((time.perf_counter() - t) * 1000)
            assert rep["ok"], rep
    finally:
        ctx.destroy(linger=0)
    return out


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fixture", default="big-448")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--settle-seconds", type=float, default=30.0)
    args = ap.parse_args()

    d = DaemonProc(args.fixture, dedicated=None)
    try:
        d.wait_notify("READY=1", timeout=60)
        pid = d.proc.pid
        latencies(d.req, 20)  # warm-up
        before = latencies(d.req, args.requests)
        rss_before = rss_mb(pid)
        peak = [rss_before]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak.append(rss_mb(pid))
                time.sleep(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t = time.perf_counter()
        run_battery(d.stream, d.req, max_message_bytes=MAX_MESSAGE_BYTES)
        battery_s = time.perf_counter() - t
        after = latencies(d.req, args.requests)
        deadline = time.monotonic() + args.settle_seconds
        while rss_mb(pid) > rss_before + 20 and time.monotonic() < deadline:
            time.sleep(0.2)
        settle_s = args.settle_seconds - max(0.0, deadline - time.monotonic())
        done.set()
        sampler.join()
        rss_after = rss_mb(pid)
        assert d.stop() == 0
    finally:
        d.close()

    print(f"agent on {args.fixture}: {args.requests} snapshot requests before and after "
          f"the attack battery ({battery_s:.1f} s)")
    print(f"{'':28} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    for name, xs in (("before (same agent, peer)", before), ("right after the battery", after)):
        print(f"{name:28} {statistics.median(xs):8.2f} {pct(xs, 99):8.2f} {max(xs):8.2f}")
    print(f"RSS MB: before {rss_before:.1f}, peak during {max(peak):.1f}, "
          f"after {rss_after:.1f} (settled in {settle_s:.1f} s; the bound is before + 20)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
