"""bench/fit_hostile: what hostile fit requests cost, and snapshot latency while a fit runs.

    .venv/bin/python bench/fit_hostile.py [--snapshots-idle 50] [--no-agent]

1. In-process, one fresh process per request (``ru_maxrss`` is the process's peak): wall
   time and peak RSS of ``fit()`` on big-448 (8 cells, 448 threads) for the issue's two
   requests (10,000,000 pinned vCPUs; 2**64-1 vCPUs), the largest valid vCPU count (8192,
   far more than the host has), and a valid request whose search is exhausted (8 guest
   cells whose cache reservations fit no complete placement; ``expensive``).
2. A real agent (``hostagent run`` on big-448 with test:///): the same requests over a
   DEALER socket, reply time each, and the agent's VmRSS / VmHWM (peak) before and after.
3. Snapshot round trips (one DEALER, ``{op: "snapshot"}``, back to back) while the
   ``expensive`` fit runs in the agent, against the same round trips on the idle agent.

Runs on older trees too (without ``[fit] search_steps``), to compare before and after.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import zmq  # noqa: E402

from hostagent import wire  # noqa: E402

DED = {"hw:cpu_policy": "dedicated"}
BIG_DEDICATED = "2-55,58-111,114-167,170-223,226-279,282-335,338-391,394-447"


def expensive() -> dict[str, Any]:
    groups = ";".join(f"vcpus={i}:type=both,size=21mb" for i in range(8))
    return {"vcpus": 8, "memory_mb": 8192, "extra_specs": {
        **DED, "hw:numa_nodes": "8", "hw:cache_reservation": groups}}


REQUESTS = {
    "vcpus 10,000,000": {"vcpus": 10_000_000, "memory_mb": 1, "extra_specs": DED},
    "vcpus 2**64-1": {"vcpus": 2**64 - 1, "memory_mb": 1, "extra_specs": DED},
    "vcpus 8192 (valid)": {"vcpus": 8192, "memory_mb": 1, "extra_specs": DED},
    "expensive (valid)": expensive(),
}

CHILD = r"""
import json, resource, sys, time
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/tests"]
from test_fit_fixtures import topology
from hostagent.config import Config, ResourcesConfig
from hostagent.fit import fit
from hostagent.snapshot import build_snapshot
topo = topology("big-448")
ded = tuple(c.id for c in topo.cpus if c.online and c.core >= 2)
snap = build_snapshot(topo, Config(resources=ResourcesConfig(dedicated_cpus=ded)), [],
                      host="h", epoch="e", seq=1, now=0.0)
req = json.loads(sys.stdin.read())
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
try:
    out = fit(snap, req)
    what = "fits" if out["fits"] else "no: " + out["reasons"][-1]["resource"]
except Exception as exc:
    what = type(exc).__name__
dt = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"ms": dt * 1000, "base_mib": base / 1024, "peak_mib": peak / 1024,
                  "what": what}))
"""


def in_process(name: str, req: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(ROOT)], input=json.dumps(req),
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        return {"ms": float("nan"), "base_mib": 0, "peak_mib": 0,
                "what": f"died ({proc.stderr.strip().splitlines()[-1][:60]})"}
    return json.loads(proc.stdout)


def status(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(rest.split()[0]) // 1024
    return out


def dealer(endpoint: str) -> Any:
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.linger = 0
    s.connect(endpoint)
    return s


def ask(sock: Any, req: dict[str, Any], timeout: float = 600.0) -> tuple[dict[str, Any], float]:
    t = time.perf_counter()
    sock.send(wire.pack(req))
    if not sock.poll(timeout * 1000):
        raise SystemExit(f"no reply within {timeout} s")
    return wire.decode_reply(sock.recv()), (time.perf_counter() - t) * 1000


def summary(rep: dict[str, Any]) -> str:
    if not rep["ok"]:
        return "error: " + rep["error"][:60]
    res = rep["result"]
    return "fits" if res["fits"] else "no: " + res["reasons"][-1]["resource"]


def snapshot_latencies(sock: Any, n: int) -> list[float]:
    return [ask(sock, {"op": "snapshot"})[1] for _ in range(n)]


def while_fit(endpoint: str, snap: Any) -> tuple[list[float], float, str]:
    fit_sock = dealer(endpoint)
    t = time.perf_counter()
    fit_sock.send(wire.pack({"op": "fit", "request": expensive()}))
    lat: list[float] = []
    while not fit_sock.poll(0):
        lat.append(ask(snap, {"op": "snapshot"})[1])
    rep = wire.decode_reply(fit_sock.recv())
    fit_ms = (time.perf_counter() - t) * 1000
    fit_sock.close()
    return lat, fit_ms, summary(rep)


def stats(lat: list[float]) -> str:
    if not lat:
        return "none answered during the fit"
    s = sorted(lat)
    return (f"n={len(s)} median {statistics.median(s):.2f} ms, p99 "
            f"{s[min(len(s) - 1, int(len(s) * 0.99))]:.2f} ms, max {s[-1]:.2f} ms")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--snapshots-idle", type=int, default=50)
    ap.add_argument("--no-agent", action="store_true")
    args = ap.parse_args()

    print("in-process fit() on big-448, one process per request")
    print(f"{'request':22} {'answer':28} {'time':>10} {'peak RSS (base)':>18}")
    for name, req in REQUESTS.items():
        r = in_process(name, req)
        print(f"{name:22} {r['what'][:28]:28} {r['ms']:8.1f} ms "
              f"{r['peak_mib']:7.0f} MiB ({r['base_mib']:.0f})")
    if args.no_agent:
        return 0

    from daemon_helpers import DaemonProc

    d = DaemonProc("big-448", dedicated=BIG_DEDICATED)
    try:
        d.wait_notify("READY=1", timeout=120)
        snap = dealer(d.req)
        ask(snap, {"op": "fit", "request": {"vcpus": 2, "memory_mb": 512}})  # warm up
        print("\nagent on big-448: requests over a DEALER socket")
        print(f"{'request':22} {'reply':40} {'time':>10} {'VmRSS':>7} {'VmHWM':>7}")
        before = status(d.proc.pid)
        print(f"{'(before)':22} {'':40} {'':>10} {before['VmRSS']:5} MiB "
              f"{before['VmHWM']:5} MiB")
        for name, req in REQUESTS.items():
            rep, ms = ask(dealer(d.req), {"op": "fit", "request": req})
            st = status(d.proc.pid)
            print(f"{name:22} {summary(rep)[:40]:40} {ms:8.1f} ms {st['VmRSS']:5} MiB "
                  f"{st['VmHWM']:5} MiB")
        idle = snapshot_latencies(snap, args.snapshots_idle)
        busy, fit_ms, what = while_fit(d.req, snap)
        print("\nsnapshot round trips")
        print(f"  idle agent:          {stats(idle)}")
        print(f"  while a fit runs:    {stats(busy)}  (the fit: {fit_ms:.0f} ms, {what})")
        snap.close()
    finally:
        d.stop(timeout=120)
        d.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
