"""What a hung libvirt costs the agent, measured (the numbers in docs/daemon.md §10).

    .venv/bin/python bench/libvirt_hang.py [--runs 3] [--small-timeout 0.5]

1. start-up, real ``hostagent run`` processes on xeon-2s-cat: process start until a
   subscriber holds the first snapshot and until ``READY=1``, with a healthy test:///
   libvirt (the peer) and with a libvirt unix socket that accepts and never answers
   (``qemu+unix:///system?socket=…``; the open hangs), at the default
   ``call_timeout_seconds`` (10) and at ``--small-timeout``; then SIGTERM → exit while
   the open still hangs;
2. a hang in the middle of a run, the agent in-process over test:/// behind the tests'
   ``HangingConn`` (calls block while a gate is closed — a SIGSTOPped libvirtd): from
   the resync request whose listing hangs until a subscriber holds the snapshot saying
   ``connected: false``, at the default timeout and at ``--small-timeout``, with
   ``snapshot`` requests sent every 0.2 s meanwhile (up to 40, as in the issue); then
   ``stop()`` → ``run()`` returned while a call hangs.

Before the worker thread (commit 31ce4c8) the hung open never ended: no snapshot, no
READY, SIGTERM ignored.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from daemon_helpers import DaemonProc  # noqa: E402
from loop_helpers import run, until  # noqa: E402
from test_libvirt_hang import HungAgent, hung_daemon  # noqa: E402

from hostagent.subscriber import async_request  # noqa: E402


def start_up(call_timeout: float | None, hung: bool) -> dict[str, float]:
    """Seconds from process start to the first snapshot, to READY, and SIGTERM → exit."""
    if hung:
        d, server = hung_daemon(call_timeout, start=False)
    else:
        d, server = DaemonProc(start=False), None
    try:
        sub = d.subscriber()
        t0 = time.monotonic()
        d.start()
        sub.wait_snapshot("testhost", timeout=60)
        first = time.monotonic() - t0
        d.wait_notify("READY=1", timeout=60)
        ready = time.monotonic() - t0
        sub.close()
        time.sleep(1.0)  # the open is still hanging (the default timeout is 10 s)
        t1 = time.monotonic()
        assert d.stop(timeout=60) == 0
        return {"first snapshot": first, "READY": ready, "SIGTERM → exit": time.monotonic() - t1}
    finally:
        d.close()
        if server is not None:
            server.close()


def mid_run(call_timeout: float) -> dict[str, float]:
    """Seconds from a hanging resync to ``connected: false`` published; stop → returned."""
    p = HungAgent(call_timeout=call_timeout, reconnect_max=1.0)

    async def main() -> dict[str, float]:
        await p.start()
        a = p.agent
        p.gate.close()
        t0 = time.monotonic()
        a.watcher.request_resync()
        await until(lambda: p.gate.blocked >= 1, timeout=30)
        sent = answered = 0
        latencies = []
        while a.watcher.connected and sent < 40:  # the 40 requests, while hung
            t = time.monotonic()
            sent += 1
            rep = await async_request(p.req, {"op": "snapshot"}, timeout=5)
            answered += bool(rep["ok"])
            latencies.append(time.monotonic() - t)
            await asyncio.sleep(0.2)
        await p.snapshot_where(lambda s: not s["agent"]["libvirt"]["connected"],
                               timeout=call_timeout + 30)
        lost = time.monotonic() - t0
        print(f"  snapshot requests while hung (call_timeout {call_timeout:g} s): "
              f"{answered} of {sent} answered, max {max(latencies) * 1000:.1f} ms")
        await until(lambda: p.gate.blocked >= 1, timeout=30)
        t1 = time.monotonic()
        a.stop()
        assert await asyncio.wait_for(p.task, 30) == 0
        return {"hang → connected:false": lost, "stop → run() returned": time.monotonic() - t1}

    try:
        return run(main(), timeout=call_timeout + 90)
    finally:
        p.gate.open()
        p.sub.close()


def report(name: str, runs: list[dict[str, float]]) -> None:
    for key in runs[0]:
        vals = [r[key] for r in runs]
        print(f"{name:<44} {key:<24} median {statistics.median(vals):7.3f} s"
              f"  (min {min(vals):.3f}, max {max(vals):.3f}, n={len(vals)})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--small-timeout", type=float, default=0.5)
    args = ap.parse_args()
    small = args.small_timeout
    report("start-up, healthy test:/// (peer)",
           [start_up(None, hung=False) for _ in range(args.runs)])
    report("start-up, never-answering socket, 10 s",
           [start_up(None, hung=True) for _ in range(args.runs)])
    report(f"start-up, never-answering socket, {small:g} s",
           [start_up(small, hung=True) for _ in range(args.runs)])
    report("mid-run hang, call_timeout 10 s", [mid_run(10.0) for _ in range(args.runs)])
    report(f"mid-run hang, call_timeout {small:g} s", [mid_run(small) for _ in range(args.runs)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
