"""The daemon's speed and footprint, measured on real agent processes.

    .venv/bin/python bench/daemon.py [--events 1000] [--idle-seconds 10] [--subscribers 100]

Two agents run as real ``hostagent run`` processes with the test:/// libvirt driver:

* small: fixtures/sysfs/xeon-2s-cat (48 threads, 2 cells, L3 CAT), no guests;
* big: fixtures/sysfs/big-448 (448 threads, 8 cells) with the 200 guests of
  ``bench/tracker.py`` (100 pinned, 60 shared, 40 floating) running in its test driver.

Measured:

1. event-to-subscriber latency: a guest started (or destroyed) through the agent's
   ``test-domain`` request until a ``Subscriber`` holds a snapshot showing it; the
   clock starts before the request is sent, so it includes the request hop, the libvirt
   event, the domain read, the tracker, packing, compression, ZeroMQ, and the
   subscriber's decode. Events are spaced just past the coalescing window (``coalesce_ms``
   5 here), i.e. each is an isolated change as with the default 50 ms window and events
   more than 50 ms apart;
2. snapshot size on the wire (msgpack, zlib above 16 KiB) and as JSON, for the big host;
3. idle CPU of the big agent (default timers: heartbeat 1 s, hugepage poll 5 s) over
   ``--idle-seconds`` (30 for the full measurement), and RSS;
4. fan-out to ``--subscribers`` SUB sockets: time until the last of them has the new
   snapshot (the bench decodes only the outer body, not the snapshot), and heartbeats
   received per subscriber while idle;

against the named peer, the *poll model*: a scheduler running the one-shot
``hostagent snapshot --json`` on the same host and guests (process start, probe,
libvirt read, tracker) every time it wants a fresh view.
Targets: p99 < 10 ms, snapshot < 64 KiB, idle CPU < 0.5 %, RSS < 60 MB.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

import psutil  # noqa: E402
import zmq  # noqa: E402
from libvirt_helpers import TEST_NS, domain_xml, probe_fixture, write_node  # noqa: E402

from hostagent import wire  # noqa: E402
from hostagent.cpulist import format_cpulist  # noqa: E402
from hostagent.subscriber import Subscriber  # noqa: E402

XEON_DEDICATED = "2-11,14-23,26-35,38-47"


def running(xml: str) -> str:
    """A domain embedded in a test-driver node file, running at load."""
    xml = xml.replace("<domain type='test'", f"<domain type='test' xmlns:test='{TEST_NS}'", 1)
    return xml.replace("</domain>", "<test:runstate>1</test:runstate></domain>")


class Agent:
    def __init__(self, fixture: str, resources: str, domains: list[str], *,
                 heartbeat: float, coalesce_ms: float, runtime_dir: str | None = None) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="hab-"))
        runtime_dir = runtime_dir or f"{self.dir}/run"
        sysfs = ROOT / "fixtures" / "sysfs" / fixture / "sys"
        self.topo = probe_fixture(fixture)
        self.uri = write_node(self.dir, self.topo, domains)
        self.stream, self.req = f"ipc://{self.dir}/s", f"ipc://{self.dir}/r"
        self.config = self.dir / "hostagent.toml"
        self.config.write_text(f"""[host]
name = "{fixture}"
[probe]
sysfs_root = "{sysfs}"
resctrl_root = "{sysfs}/fs/resctrl"
udev = false
[libvirt]
uri = "{self.uri}"
[resources]
{resources}
[publisher]
endpoints = ["{self.stream}"]
request_endpoints = ["{self.req}"]
coalesce_ms = {coalesce_ms}
heartbeat_seconds = {heartbeat}
max_message_bytes = 1048576
[agent]
runtime_dir = "{runtime_dir}"
log_level = "warning"
""")
        notify = str(self.dir / "notify")
        self.ns = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.ns.bind(notify)
        self.ns.settimeout(60)
        self.log = open(self.dir / "agent.log", "wb")
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hostagent.cli", "run", "--config", str(self.config)],
            stdout=self.log, stderr=self.log, cwd=ROOT,
            env={**os.environ, "NOTIFY_SOCKET": notify})
        while b"READY=1" not in self.ns.recv(4096):
            pass
        self.startup_ms = (time.perf_counter() - t0) * 1000
        self.ps = psutil.Process(self.proc.pid)

    def stop(self) -> int:
        self.proc.terminate()
        rc = self.proc.wait(30)
        self.log.close()
        self.ns.close()
        return rc


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))]


def names(snap: dict[str, Any]) -> set[str]:
    return {g["name"] for g in snap["usage"]["guests"]}


def latency(agent: Agent, host: str, xml: str, events: int, gap: float,
            split: list[float] | None = None) -> list[float]:
    """ms per event: start/destroy the domain in ``xml`` until a subscriber sees it.
    ``split`` receives, per event, the ms until the agent stamped the snapshot
    (request, libvirt event, domain read, tracker, packing the usage); the rest is
    packing the header, compression, ZeroMQ and the subscriber's decode."""
    ctx = zmq.Context.instance()
    dealer = ctx.socket(zmq.DEALER)
    dealer.linger = 0
    dealer.connect(agent.req)
    dealer.send(wire.pack({"op": "test-domain", "action": "define", "xml": xml}))
    assert wire.decode_reply(dealer.recv())["ok"]
    out = []
    with Subscriber([agent.stream], hosts=[host]) as sub:
        sub.wait_snapshot(host, timeout=30)
        for i in range(events):
            start = i % 2 == 0
            t0 = time.perf_counter()
            w0 = time.time()
            dealer.send(wire.pack({"op": "test-domain", "action": "start" if start else
                                   "destroy", "name": "bench-x"}))
            while True:
                snap = sub.latest(host)
                if snap is not None and ("bench-x" in names(snap)) == start:
                    break
                sub.poll(10)
            out.append((time.perf_counter() - t0) * 1000)
            if split is not None:
                split.append((snap["time"] - w0) * 1000)
            assert wire.decode_reply(dealer.recv())["ok"]
            time.sleep(gap)
    dealer.close()
    return out


def fanout(agent: Agent, host: str, n: int, events: int, hb_seconds: float,
           idle: float) -> tuple[list[float], list[int], int]:
    """Snapshot fan-out times (ms until all ``n`` SUBs have it) and heartbeats per SUB."""
    ctx = zmq.Context.instance()
    subs = []
    for _ in range(n):
        s = ctx.socket(zmq.SUB)
        s.linger = 0
        s.rcvhwm = 100000
        s.subscribe(wire.topic(host))
        s.connect(agent.stream)
        subs.append(s)
    poller = zmq.Poller()
    for s in subs:
        poller.register(s, zmq.POLLIN)

    def drain(until_seq: int | None, timeout: float, hb: list[int] | None) -> set[int]:
        got: set[int] = set()
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            for s, _ in poller.poll(max(1, (deadline - time.perf_counter()) * 1000)):
                while True:
                    try:
                        frames = s.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    body = wire.unpack(frames[1])  # outer body only
                    if body["kind"] == "heartbeat" and hb is not None:
                        hb[subs.index(s)] += 1
                    elif until_seq is not None and body["kind"] == "snapshot" and \
                            body["seq"] >= until_seq:
                        got.add(subs.index(s))
            if until_seq is not None and len(got) == n:
                return got
        return got

    time.sleep(0.5)
    drain(None, 1.0, None)  # welcome re-publishes and connection set-up
    req = ctx.socket(zmq.DEALER)
    req.linger = 0
    req.connect(agent.req)
    xml = domain_xml("fan-x", vcpus=1, vcpupin={0: "3"})
    req.send(wire.pack({"op": "test-domain", "action": "define", "xml": xml}))
    assert wire.decode_reply(req.recv())["ok"]
    req.send(wire.pack({"op": "snapshot"}))
    seq = wire.decode_reply(req.recv())["seq"]
    times = []
    for i in range(events):
        t0 = time.perf_counter()
        req.send(wire.pack({"op": "test-domain", "action": "start" if i % 2 == 0 else
                            "destroy", "name": "fan-x"}))
        got = drain(seq + 1, 10.0, None)
        assert len(got) == n, f"only {len(got)} of {n} subscribers got seq {seq + 1}"
        times.append((time.perf_counter() - t0) * 1000)
        assert wire.decode_reply(req.recv())["ok"]
        seq += 1
        time.sleep(0.01)
    hb = [0] * n
    drain(None, idle, hb)
    for s in subs:
        s.close()
    req.close()
    return times, hb, int(idle / hb_seconds)


def peer_poll(agent: Agent, fixture: str) -> tuple[float, int]:
    """The poll model: ``hostagent snapshot --json`` on the same host and guests."""
    cfg = agent.dir / "peer.toml"
    text = agent.config.read_text()
    cfg.write_text(text.split("[publisher]")[0])
    runs = []
    size = 0
    for _ in range(3):
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "hostagent.cli", "snapshot", "--config",
                            str(cfg), "--json"], capture_output=True, cwd=ROOT, check=True)
        runs.append((time.perf_counter() - t0) * 1000)
        size = len(r.stdout)
    return statistics.median(runs), size


def table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=1000)
    ap.add_argument("--big-events", type=int, default=None,
                    help="events on the big host (default: --events)")
    ap.add_argument("--idle-seconds", type=float, default=10.0,
                    help="idle CPU window (30 for the full measurement)")
    ap.add_argument("--subscribers", type=int, default=100)
    ap.add_argument("--fanout-events", type=int, default=50)
    args = ap.parse_args()
    big_events = args.events if args.big_events is None else args.big_events

    # small host, no guests
    small = Agent("xeon-2s-cat", f'dedicated_cpus = "{XEON_DEDICATED}"', [],
                  heartbeat=0.2, coalesce_ms=5)
    bench_x = domain_xml("bench-x", vcpus=2, vcpupin={0: "2", 1: "26"}, emulatorpin="0-1",
                         numa_memory=("strict", "0"))
    lat_small = latency(small, "xeon-2s-cat", bench_x, args.events, 0.006)
    rss_small = small.ps.memory_info().rss
    fan, hb, hb_expected = fanout(small, "xeon-2s-cat", args.subscribers,
                                  args.fanout_events, 0.2, 2.0)
    small_rc = small.stop()

    # big host, 200 guests
    import tracker as tb  # bench/tracker.py: the same host config and guests

    topo = probe_fixture("big-448")
    res = tb.host_config(topo)
    resources = (f'dedicated_cpus = "{format_cpulist(res["dedicated_cpus"])}"\n'
                 f'shared_cpus = "{format_cpulist(res["shared_cpus"])}"')
    domains = [running(x) for _, x in tb.guest_xmls(200)]
    big = Agent("big-448", resources, domains, heartbeat=1.0, coalesce_ms=5)
    ctx = zmq.Context.instance()
    with Subscriber([big.stream], hosts=["big-448"]) as sub:
        snap = sub.wait_snapshot("big-448", timeout=30)
    n_guests = len(snap["usage"]["guests"])
    s = ctx.socket(zmq.SUB)
    s.subscribe(b"")
    s.connect(big.stream)
    s.rcvtimeo = 10000
    while True:
        frames = s.recv_multipart()
        if wire.unpack(frames[1])["kind"] == "snapshot":
            break
    s.close()
    wire_bytes = len(frames[1])
    raw_bytes = len(wire.pack(snap))
    import json

    json_bytes = len(json.dumps(snap, separators=(",", ":")))
    cpu0 = big.ps.cpu_times()
    t0 = time.monotonic()
    time.sleep(args.idle_seconds)
    cpu1 = big.ps.cpu_times()
    idle_pct = ((cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)) / (
        time.monotonic() - t0) * 100
    rss_big_idle = big.ps.memory_info().rss
    big_x = domain_xml("bench-x", vcpus=2, vcpupin={0: "222", 1: "446"},
                       emulatorpin="196-197,420-421", numa_memory=("strict", "7"))
    split: list[float] = []
    lat_big = latency(big, "big-448", big_x, big_events, 0.006, split)
    rest = [a - b for a, b in zip(lat_big, split, strict=True)]
    rss_big = big.ps.memory_info().rss
    peer_ms, peer_json = peer_poll(big, "big-448")
    big_rc = big.stop()

    mib = 1024 * 1024
    print(f"daemon bench: real agent processes, test:/// libvirt; small = xeon-2s-cat "
          f"(48 threads), big = big-448 (448 threads) with {n_guests} guests")
    print()
    rows = [("measure", "hostagent", "peer: poll `hostagent snapshot`", "target")]
    rows.append((f"event → subscriber, small, p50 / p99 ({len(lat_small)} events)",
                 f"{pct(lat_small, 50):.2f} / {pct(lat_small, 99):.2f} ms", "", "p99 < 10 ms"))
    rows.append((f"event → subscriber, big, p50 / p99 ({len(lat_big)} events)",
                 f"{pct(lat_big, 50):.2f} / {pct(lat_big, 99):.2f} ms",
                 f"{peer_ms:.0f} ms per fresh view", "p99 < 10 ms"))
    rows.append(("  of which agent: request → snapshot built, usage packed",
                 f"{pct(split, 50):.2f} / {pct(split, 99):.2f} ms", "", ""))
    rows.append(("  of which zlib, ZeroMQ, subscriber decode",
                 f"{pct(rest, 50):.2f} / {pct(rest, 99):.2f} ms", "", ""))
    rows.append(("snapshot size, big (wire: msgpack+zlib)", f"{wire_bytes / 1024:.1f} KiB",
                 f"{peer_json / 1024:.0f} KiB JSON", "< 64 KiB"))
    rows.append(("  uncompressed msgpack / JSON", f"{raw_bytes / 1024:.0f} / "
                 f"{json_bytes / 1024:.0f} KiB", "", ""))
    rows.append((f"idle CPU, big, over {args.idle_seconds:g} s", f"{idle_pct:.2f} %", "",
                 "< 0.5 %"))
    rows.append(("RSS small / big idle / big after events",
                 f"{rss_small / mib:.0f} / {rss_big_idle / mib:.0f} / {rss_big / mib:.0f} MB",
                 "", "< 60 MB"))
    rows.append((f"snapshot to all {args.subscribers} subscribers, small, p50 / p99",
                 f"{pct(fan, 50):.2f} / {pct(fan, 99):.2f} ms", "", ""))
    rows.append((f"heartbeats per subscriber in 2 s (sent ~{hb_expected})",
                 f"min {min(hb)} max {max(hb)}", "", f"all {args.subscribers} get them"))
    rows.append(("startup to READY, small / big",
                 f"{small.startup_ms:.0f} / {big.startup_ms:.0f} ms", "", ""))
    table(rows)
    ok = (pct(lat_small, 99) < 10 and pct(lat_big, 99) < 10 and wire_bytes < 64 * 1024
          and idle_pct < 0.5 and rss_big < 60 * mib and min(hb) > 0)
    print()
    print("targets:", "met" if ok else "MISSED", f"(agent exit codes {small_rc}, {big_rc})")
    return 0 if ok and small_rc == 0 and big_rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
