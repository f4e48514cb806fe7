"""A simulated fleet through a real forwarder into one scheduler's ``Fleet`` (issue 15).

    .venv/bin/python bench/fleet.py [--hosts 1000,10000] [--seconds 12] [--procs 2]

Fleet: ``--procs`` simulator processes, each one XPUB carrying N/procs hosts under their
own topics (``hostagent.<host>.``, and ``hostagent-delta.<host>.`` when asked for):
realistic schema-v1 snapshots of the 48-thread ``xeon-2s-cat`` fixture with 20 random
guests (``bench/fleet_snapshots.py``: chains of real ``UsageTracker`` usages one guest
event apart), each host changing every ``--period`` seconds (default 10: N/10 updates/s)
and sending a heartbeat when it sent nothing for a second, answering subscriptions with
a welcome re-publish like the agent. The simulators send messages made from templates
packed once per chain step (``Templates``: per message only the host's own fields and
the usage's deflate, ~0.1 ms for both streams), so that at 10,000 hosts they leave the
machine's cores to the scheduler. A real ``hostagent forward`` process connects to them;
the scheduler (this process) subscribes to the forwarder and feeds one ``Fleet``.

For each N, for the full stream and the delta stream, after the join and (at most
``--settle`` s) the draining of its backlog: the updates per second applied, the
scheduler's CPU per update and per second (its own process time: what one core has to
do), the lag (update's ``time`` to applied) p50/p99, bytes per update on the wire;
scheduler memory per host (RSS growth over the join / N: subscriber and ``Fleet``);
then placing while the fleet keeps changing, each turn applying at most
``FEED_PER_TURN`` queued messages and placing one guest: ``place`` p50/p99, placements
per second of this one process, and the ingest meanwhile (updates/s, lag), ``kept_up``
when both phases applied >= 90 % of the offered updates with a lag p99 under 1 s; and the
peer: a naive scheduler running ``fit`` on every host per placement (timed on a sample of
hosts, scaled to N).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from fleet_snapshots import Chain, SimEncoder, assemble_snapshot  # noqa: E402

from hostagent import wire  # noqa: E402

FIXTURE = "xeon-2s-cat"
GUESTS = 20
CHAIN_STEPS = 120
CHAINS_PER_PROC = 3
HEARTBEAT_S = 1.0
#: messages the scheduler applies at most between two placements (Subscriber.poll's
#: max_messages): 50 per turn at 200 placements/s is 10,000 messages/s, what 10,000
#: hosts send (1,000 updates and 9,000 heartbeats)
FEED_PER_TURN = 50
REQUEST = {"vcpus": 2, "memory_mb": 2048, "extra_specs": {"hw:cpu_policy": "dedicated"}}


# --- the simulated agents --------------------------------------------------------------

def _token(i: int) -> bytes:
    """4 bytes naming host ``i``'s guests (base 36: distinct for 1.6 million hosts)."""
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    for _ in range(4):
        i, r = divmod(i, 36)
        out = digits[r] + out
    return out.encode()


class Templates:
    """One chain's messages packed once, for the simulators (so that 10,000 simulated
    hosts cost the machine little CPU and the scheduler gets the cores): per chain step
    the usage's msgpack bytes and the delta from the step before (packed between two
    snapshots of equal host/epoch/seq/time, so it holds only the usage's patch; the
    receiver takes those four from the message body), and the topology + config as one
    deflate segment shared by every message, as the agent's publisher caches it. Per
    message only the host's own parts are done: its guests' token put in, the small head
    (host, epoch, seq, time) packed, the usage deflated, the Adler-32 summed. The bytes
    decode to exactly ``assemble_snapshot``'s map (checked by ``check()``)."""

    def __init__(self, chain: Chain) -> None:
        self.chain = chain
        self.token = chain.token.encode()
        mid = (wire.pack("topology") + wire.pack(chain.topology)
               + wire.pack("config") + wire.pack(chain.config))
        self.mid = mid
        self.mid_segment = _deflate(mid, final=False)
        self.usages = [wire.pack("usage") + wire.pack(u) for u in chain.usages]
        self.deltas = []
        n = len(chain.usages)
        for i in range(n):
            a, b = (assemble_snapshot(chain.topology, chain.config, chain.usages[k], host="h",
                                      epoch="e", seq=1, now=0.0) for k in ((i - 1) % n, i))
            self.deltas.append(wire.pack(wire.make_delta(a, b)))

    def full(self, host: str, epoch: str, seq: int, step: int, now: float,
             token: bytes) -> list[bytes]:
        """The two frames of the full snapshot ``seq`` of ``host`` at chain ``step``."""
        head = (b"\x88" + wire.pack("schema") + wire.pack(1) + wire.pack("host")
                + wire.pack(host) + wire.pack("epoch") + wire.pack(epoch) + wire.pack("seq")
                + wire.pack(seq) + wire.pack("time") + wire.pack(float(now)))
        usage = self.usages[step % len(self.usages)].replace(self.token, token)
        adler = zlib.adler32(usage, zlib.adler32(self.mid, zlib.adler32(head)))
        data = b"".join((b"\x78\x01", _deflate(head, final=False), self.mid_segment,
                         _deflate(usage, final=True), adler.to_bytes(4, "big")))
        body = wire.make_body("snapshot", host, epoch, seq, now, None)
        return [wire.topic(host), wire.pack({**body, "data": data, "enc": "zlib"})]

    def delta(self, host: str, epoch: str, seq: int, step: int, now: float,
              token: bytes) -> list[bytes]:
        """The two frames of the delta from chain step ``step - 1`` to ``step``."""
        body = wire.pack(wire.make_body("delta", host, epoch, seq, now, None))
        assert body.endswith(b"\xa4data\xc0")
        data = self.deltas[step % len(self.deltas)].replace(self.token, token)
        return [wire.delta_topic(host), body[:-1] + data]

    def check(self) -> None:
        """The frames decode to what ``assemble_snapshot`` and ``make_delta`` give."""
        c, tok = self.chain, b"zz99"
        for step in (0, 1):
            usage = wire.unpack(wire.pack(c.usages[step]).replace(self.token, tok))
            want = assemble_snapshot(c.topology, c.config, usage, host="sim00001",
                                     epoch="e" * 16, seq=7 + step, now=12.5 + step)
            got = wire.decode_stream(self.full("sim00001", "e" * 16, 7 + step, step,
                                               12.5 + step, tok))
            assert got["data"] == want, "full template"
            if step:
                d = wire.decode_stream(self.delta("sim00001", "e" * 16, 8, 1, 13.5, tok))
                held = dict(want, seq=7, time=12.5, usage=wire.unpack(
                    wire.pack(c.usages[0]).replace(self.token, tok)))
                assert wire.apply_delta(held, d["data"], d) == want, "delta template"


def _deflate(raw: bytes, *, final: bool) -> bytes:
    """``raw`` as independent raw deflate blocks (the publisher's segments)."""
    c = zlib.compressobj(1, zlib.DEFLATED, -15)
    return c.compress(raw) + c.flush(zlib.Z_FINISH if final else zlib.Z_SYNC_FLUSH)


class SimHosts:
    """The hosts of one simulator process: each at a step of one of the process's chains
    (``Templates``), its messages made from the templates when sent."""

    def __init__(self, first: int, count: int, seed: int) -> None:
        self.chains = [Chain(FIXTURE, GUESTS, CHAIN_STEPS, seed * 10 + k)
                       for k in range(CHAINS_PER_PROC)]
        self.templates = [Templates(c) for c in self.chains]
        self.templates[0].check()
        rng = random.Random(seed)
        self.hosts = [f"sim{first + i:05d}" for i in range(count)]
        self.epoch = f"{seed:016x}"
        self.state = {h: {"chain": i % len(self.chains), "step": rng.randrange(CHAIN_STEPS),
                          "seq": 1, "sent": 0.0, "token": _token(first + i)}
                      for i, h in enumerate(self.hosts)}
        self.order = list(self.hosts)
        rng.shuffle(self.order)
        self.deltas = False  # a subscriber asked for the delta stream
        self.hb_next = 0  # where the next heartbeat pass starts

    def full(self, h: str, now: float) -> list[bytes]:
        """Host ``h``'s current snapshot, both frames."""
        s = self.state[h]
        return self.templates[s["chain"]].full(h, self.epoch, s["seq"], s["step"], now,
                                               s["token"])

    def welcome(self, xpub: object, prefix: bytes) -> None:
        """Re-publish the latest snapshot of every host the subscription ``prefix`` matches
        (on each stream it matches), as the agent does."""
        now = time.time()
        hosts = self.hosts
        try:  # one host's topic (a subscriber healing it): that host only
            one = wire.stream_of_topic(prefix)[0]
            hosts = [one] if one in self.state else []
        except wire.WireError:
            pass
        for h in hosts:
            s = self.state[h]
            frame = None
            for topic in (wire.topic(h), wire.delta_topic(h)):
                if topic.startswith(prefix):
                    frame = frame or self.full(h, now)[1]
                    xpub.send_multipart([topic, frame])  # type: ignore[attr-defined]
                    s["sent"] = time.monotonic()

    def heartbeats(self, xpub: object, mono: float) -> None:
        """Heartbeats for the hosts silent for ``HEARTBEAT_S``, looking at a twentieth
        of the hosts per call (round robin: each is looked at every ~0.1 s), so that the
        simulator does not spend its core walking 5,000 hosts every 5 ms."""
        now = time.time()
        step = max(1, len(self.hosts) // 20)
        start = self.hb_next
        self.hb_next = (start + step) % len(self.hosts)
        for k in range(start, start + step):
            h = self.hosts[k % len(self.hosts)]
            s = self.state[h]
            if mono - s["sent"] < HEARTBEAT_S:
                continue
            hb = wire.pack(wire.make_body("heartbeat", h, self.epoch, s["seq"], now, None))
            xpub.send_multipart([wire.topic(h), hb])  # type: ignore[attr-defined]
            if self.deltas:
                xpub.send_multipart([wire.delta_topic(h), hb])  # type: ignore[attr-defined]
            s["sent"] = mono

    def change(self, xpub: object, h: str) -> None:
        """One event on host ``h``: its next chain step, published on both streams."""
        s = self.state[h]
        s["step"] += 1
        s["seq"] += 1
        now = time.time()
        xpub.send_multipart(self.full(h, now))  # type: ignore[attr-defined]
        if self.deltas:
            xpub.send_multipart(self.templates[s["chain"]].delta(  # type: ignore[attr-defined]
                h, self.epoch, s["seq"], s["step"], now, s["token"]))
        s["sent"] = time.monotonic()


def simulate(endpoint: str, first: int, count: int, period: float, seed: int) -> None:
    """One simulator process: hosts ``first`` .. ``first + count - 1`` on one XPUB,
    ``count / period`` changes per second, heartbeats, welcomes."""
    import zmq

    sim = SimHosts(first, count, seed)
    ctx = zmq.Context()
    xpub = ctx.socket(zmq.XPUB)
    xpub.linger = 0
    xpub.sndhwm = 200_000
    xpub.setsockopt(zmq.XPUB_VERBOSER, 1)
    xpub.bind(endpoint)
    next_change = time.monotonic()
    turn = 0
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    while True:
        while xpub.poll(0):
            msg = xpub.recv()
            if msg[:1] == b"\x01":
                prefix = msg[1:]
                if wire.DELTA_PREFIX.startswith(prefix) or prefix.startswith(wire.DELTA_PREFIX):
                    sim.deltas = True
                sim.welcome(xpub, prefix)
        mono = time.monotonic()
        if mono < next_change:
            sim.heartbeats(xpub, mono)
            time.sleep(min(0.005, max(0.0, next_change - time.monotonic())))
            continue
        sim.change(xpub, sim.order[turn % count])
        turn += 1
        next_change += period / count


# --- the scheduler (this process) ------------------------------------------------------

def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


class Run:
    """Simulators + a forwarder for N hosts; ``close()`` stops them."""

    def __init__(self, n: int, procs: int, period: float, tmp: Path) -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        self.procs: list[subprocess.Popen[bytes]] = []
        eps = []
        per = -(-n // procs)
        for p in range(procs):
            ep = f"ipc://{tmp}/sim{p}"
            eps.append(ep)
            count = min(per, n - p * per)
            self.procs.append(subprocess.Popen(
                [sys.executable, __file__, "--simulate", ep, str(p * per), str(count),
                 str(period), str(p + 1)], stdout=subprocess.PIPE, cwd=ROOT))
        for proc in self.procs:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == b"ready"
        self.stream = f"ipc://{tmp}/fwd"
        cfg = tmp / "forward.toml"
        cfg.write_text(f'[forward]\nendpoints = ["{self.stream}"]\n'
                       f"upstream = {json.dumps(eps)}\nrecv_hwm = 100000\nsend_hwm = 200000\n"
                       f'runtime_dir = "{tmp}"\nlog_level = "warning"\n')
        self.forwarder = subprocess.Popen(
            [sys.executable, "-m", "hostagent.cli", "forward", "--config", str(cfg)],
            cwd=ROOT)
        self.procs.append(self.forwarder)
        time.sleep(0.5)

    def close(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


def measure(n: int, deltas: bool, args: argparse.Namespace, tmp: Path) -> dict:
    from hostagent.fleet import Fleet, feed
    from hostagent.subscriber import Subscriber

    run = Run(n, args.procs, args.period, tmp / f"{n}-{int(deltas)}")
    out: dict = {"hosts": n, "stream": "delta" if deltas else "full"}
    try:
        import gc

        gc.collect()
        rss0 = rss_bytes()
        fleet = Fleet(stale_after_s=60.0)
        # the full stream: the Fleet keeps its own copy (keep_snapshots=False); the delta
        # stream needs the held snapshot to apply deltas to
        sub = Subscriber([run.stream], deltas=deltas, keep_snapshots=deltas, dead_after=30.0,
                         rcvhwm=200_000)
        deadline = time.monotonic() + args.join_timeout
        while len(fleet.entries) < n and time.monotonic() < deadline:
            feed(sub, fleet, 0.2)
        print(f"[{n} {out['stream']}] joined {len(fleet.entries)} hosts", file=sys.stderr,
              flush=True)
        out["joined"] = len(fleet.entries)
        out["join_s"] = round(time.monotonic() - deadline + args.join_timeout, 1)
        # settle: drain what queued during the join (bounded), then measure steady state
        settle = time.monotonic() + args.settle
        while time.monotonic() < settle:
            late = []
            for u in sub.poll(0.05):
                if u.kind == "snapshot" and u.snapshot is not None:
                    fleet.update(u.snapshot, time.monotonic())
                    late.append(time.time() - u.snapshot["time"])
            if late and max(late) < 1.0:
                break
        out["settle_s"] = round(time.monotonic() - settle + args.settle, 1)
        gc.collect()
        out["mem_per_host_kib"] = round((rss_bytes() - rss0) / n / 1024, 1)
        if args.gc_freeze:  # what is held now is not walked by later full collections
            gc.freeze()
        # ingest: only feeding
        lag: list[float] = []
        updates = 0
        stats0 = dict(sub.stats)
        cpu0, t0 = time.process_time(), time.monotonic()
        while time.monotonic() - t0 < args.seconds:
            for upd in sub.poll(0.05):
                if upd.kind == "snapshot" and upd.snapshot is not None:
                    fleet.update(upd.snapshot, time.monotonic())
                    lag.append(time.time() - upd.snapshot["time"])
                    updates += 1
                elif upd.kind == "stale":
                    fleet.mark_stale(upd.host)
        cpu, wall = time.process_time() - cpu0, time.monotonic() - t0
        print(f"[{n} {out['stream']}] ingest measured", file=sys.stderr, flush=True)
        msgs = sum(sub.stats.get(k, 0) - stats0.get(k, 0)
                   for k in ("snapshots", "heartbeats", "duplicates"))
        out.update(
            updates_per_s=round(updates / wall), offered_per_s=round(n / args.period),
            cpu_per_update_us=round(cpu / max(updates, 1) * 1e6),
            cpu_share=round(cpu / wall, 2), messages_per_s=round(msgs / wall),
            lag_p50_ms=round(pct(lag, 0.5) * 1000, 1), lag_p99_ms=round(pct(lag, 0.99) * 1000, 1),
            cpu_per_message_us=round(cpu / max(msgs, 1) * 1e6),
            stale=sub.stats.get("stale", 0) - stats0.get("stale", 0),
            deltas=sub.stats.get("deltas", 0) - stats0.get("deltas", 0),
            heal_requests=sub.stats.get("heal_requests", 0),
            gaps=sub.stats.get("gaps", 0) - stats0.get("gaps", 0))
        out["wire_bytes_per_update"] = wire_bytes(deltas)
        out.update(place_while_changing(sub, fleet, args.seconds))
        out["kept_up"] = (out["updates_per_s"] >= 0.9 * out["offered_per_s"]
                          and out["placing_updates_per_s"] >= 0.9 * out["offered_per_s"]
                          and out["lag_p99_ms"] < 1000 and out["placing_lag_p99_ms"] < 1000)
        out["load_avg"] = round(os.getloadavg()[0], 1)
        out["naive_ms_per_placement"] = naive(fleet, n)
        sub.close()
    finally:
        run.close()
    return out


def place_while_changing(sub: Any, fleet: Any, seconds: float) -> dict:
    """Place one guest per turn for ``seconds`` while the fleet changes, each turn first
    applying what queued since the last one (at most ``FEED_PER_TURN`` messages: under a
    backlog it still places); the ingest meanwhile and the full collections of Python's
    garbage collector (generation 2: they stop everything) are measured too."""
    import gc

    out: dict = {}
    times: list[float] = []
    lag = []
    placed = updates = 0
    gc_pauses: list[float] = []
    gc_start = [0.0]

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            gc_start[0] = time.perf_counter()
        elif info.get("generation") == 2:
            gc_pauses.append(time.perf_counter() - gc_start[0])

    gc.callbacks.append(on_gc)
    stats0 = dict(sub.stats)
    cpu0, t0 = time.process_time(), time.monotonic()
    while time.monotonic() - t0 < seconds:
        for upd in sub.poll(0, max_messages=FEED_PER_TURN):
            if upd.kind == "snapshot" and upd.snapshot is not None:
                fleet.update(upd.snapshot, time.monotonic())
                lag.append(time.time() - upd.snapshot["time"])
                updates += 1
            elif upd.kind == "stale":
                fleet.mark_stale(upd.host)
            elif upd.kind == "dead":
                fleet.mark_dead(upd.host)
        a = time.perf_counter()
        got = fleet.place(REQUEST, 1, "pack")
        times.append(time.perf_counter() - a)
        placed += bool(got)
    cpu, wall = time.process_time() - cpu0, time.monotonic() - t0
    gc.callbacks.remove(on_gc)
    out.update(gc2_pauses=len(gc_pauses),
               gc2_pause_max_ms=round(max(gc_pauses, default=0.0) * 1000, 1))
    out.update(place_p50_ms=round(pct(times, 0.5) * 1000, 2),
               place_p99_ms=round(pct(times, 0.99) * 1000, 2),
               placements_per_s=round(len(times) / wall),
               placed_share=round(placed / max(len(times), 1), 2),
               placing_updates_per_s=round(updates / wall),
               placing_lag_p50_ms=round(pct(lag, 0.5) * 1000, 1),
               placing_lag_p99_ms=round(pct(lag, 0.99) * 1000, 1),
               placing_cpu_share=round(cpu / wall, 2),
               placing_stale=sub.stats.get("stale", 0) - stats0.get("stale", 0))
    return out


def naive(fleet: object, n: int) -> float:
    """The peer: ``fit`` on every host per placement (a sample of 100 hosts, scaled)."""
    from hostagent.fit import fit

    hosts = fleet.hosts()[:100]  # type: ignore[attr-defined]
    t0 = time.perf_counter()
    for h in hosts:
        fit(fleet.snapshot(h), REQUEST, strategy="pack")  # type: ignore[attr-defined]
    per_host = (time.perf_counter() - t0) / max(len(hosts), 1)
    return round(per_host * n * 1000, 1)


def wire_bytes(deltas: bool) -> int:
    """Mean bytes of one update on the wire for this stream (a fresh chain)."""
    c = Chain(FIXTURE, GUESTS, 40, 99)
    enc = SimEncoder(c)
    sizes = []
    prev = None
    for step in range(40):
        snap = assemble_snapshot(c.topology, c.config, c.usages[step], host="sim00000",
                                 epoch="e", seq=step + 1, now=float(step))
        frames = enc.frames("sim00000", "e", step + 1, step, float(step))
        if deltas and prev is not None:
            body = wire.make_body("delta", "sim00000", "e", step + 1, float(step),
                                  wire.make_delta(prev, snap))
            sizes.append(len(wire.pack(body)))
        elif not deltas:
            sizes.append(len(frames[1]))
        prev = snap
    return round(statistics.mean(sizes))


def micro(fixture: str, guests: int, hosts: int = 20, rounds: int = 15) -> dict:
    """Per update, without sockets: decoding (full stream: inflate + decode with the
    subscriber's caches + checks; delta stream: decode + apply + checks) and
    ``Fleet.update``, over ``hosts`` hosts each taking ``rounds`` one-event steps. CPU
    time of this thread (``thread_time``), so other processes on a loaded machine do not
    count."""
    from hostagent.fleet import Fleet
    from hostagent.subscriber import SubscriberState

    c = Chain(fixture, guests, rounds + 1, 7)
    enc = SimEncoder(c)
    full, delta = [], []
    prev: dict[str, dict] = {}
    for r in range(rounds + 1):
        for h in range(hosts):
            host = f"m{h}"
            step = (r + h) % len(c.usages)
            snap = assemble_snapshot(c.topology, c.config, c.usages[step], host=host,
                                     epoch="e", seq=r + 1, now=float(r))
            frames = enc.frames(host, "e", r + 1, step, float(r))
            full.append(frames)
            delta.append(frames if r == 0 else [wire.delta_topic(host), wire.pack(
                wire.make_body("delta", host, "e", r + 1, float(r),
                               wire.make_delta(prev[host], snap)))])
            prev[host] = snap
    out: dict = {"host": f"{fixture}+{guests}"}
    for name, msgs in (("full", full), ("delta", delta)):
        st = SubscriberState()
        caches: dict[str, wire.DecodeCache] = {}
        shared = wire.SharedDecoded()
        fleet = Fleet()
        dec = upd = 0.0
        for i, frames in enumerate(msgs):
            t0 = time.thread_time()
            host = wire.stream_of_topic(frames[0])[0]
            cache = caches.setdefault(host, wire.DecodeCache(shared=shared))
            got = st.feed(wire.decode_stream(frames, cache=cache), 0.0, 0, size=len(frames[1]))
            t1 = time.thread_time()
            fleet.update(got.snapshot, 0.0)
            t2 = time.thread_time()
            if i >= hosts:  # the first round is the join
                dec += t1 - t0
                upd += t2 - t1
        n = len(msgs) - hosts
        out[f"{name}_decode_us"] = round(dec / n * 1e6)
        out[f"{name}_fleet_update_us"] = round(upd / n * 1e6)
        out[f"{name}_wire_bytes"] = round(statistics.mean(len(f[1]) for f in msgs[hosts:]))
    return out


def memory_per_host(hosts: int = 1000) -> dict:
    """Scheduler memory per host, traced (``tracemalloc``): ``hosts`` distinct 48-thread
    hosts with 20 guests each fed through the subscriber's state and caches into a
    ``Fleet``: the full stream with ``keep_snapshots=False`` (the Fleet's copy only),
    and holding the decoded snapshots (what the delta stream needs)."""
    import gc
    import tracemalloc

    from hostagent.fleet import Fleet
    from hostagent.subscriber import SubscriberState

    chains = [Chain(FIXTURE, GUESTS, 8, 20 + k) for k in range(3)]
    encs = [SimEncoder(c) for c in chains]
    frames = [encs[i % 3].frames(f"sim{i:05d}", "e", 1, i, 1.0, _token(i))
              for i in range(hosts)]
    out = {}
    for name, keep in (("lean", False), ("held", True)):
        gc.collect()
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        st = SubscriberState(keep_snapshots=keep)
        shared = wire.SharedDecoded()
        caches = {}
        fleet = Fleet()
        for f in frames:
            host = wire.host_of_topic(f[0])
            cache = caches[host] = wire.DecodeCache(shared=shared)
            upd = st.feed(wire.decode_stream(f, cache=cache), 0.0, 0)
            fleet.update(upd.snapshot, 0.0)
        del upd
        gc.collect()
        used = tracemalloc.get_traced_memory()[0] - base
        tracemalloc.stop()
        out[f"traced_kib_per_host_{name}"] = round(used / hosts / 1024, 1)
        del st, caches, fleet, shared
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hosts", default="1000,10000")
    ap.add_argument("--seconds", type=float, default=8.0, help="per measurement phase")
    ap.add_argument("--period", type=float, default=10.0, help="seconds between changes of "
                    "one host")
    ap.add_argument("--procs", type=int, default=2, help="simulator processes")
    ap.add_argument("--join-timeout", type=float, default=60.0)
    ap.add_argument("--streams", default="delta,full")
    ap.add_argument("--settle", type=float, default=40.0,
                    help="at most this long after the join for the backlog to drain")
    ap.add_argument("--gc-freeze", action=argparse.BooleanOptionalAction, default=False,
                    help="gc.freeze() after the join (the held snapshots leave the "
                    "collector's generations)")
    ap.add_argument("--measure", nargs=2, metavar=("N", "STREAM"), help=argparse.SUPPRESS)
    ap.add_argument("--simulate", nargs=5, metavar=("EP", "FIRST", "COUNT", "PERIOD", "SEED"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.simulate:
        ep, first, count, period, seed = args.simulate
        simulate(ep, int(first), int(count), float(period), int(seed))
        return 0
    if args.measure:
        n, stream = args.measure
        with tempfile.TemporaryDirectory(prefix="hfb-") as d:
            print(json.dumps(measure(int(n), stream == "delta", args, Path(d))), flush=True)
        return 0
    for fixture, guests in ((FIXTURE, GUESTS), ("big-448", 200)):
        print(json.dumps(micro(fixture, guests)), flush=True)
    print(json.dumps(memory_per_host()), flush=True)
    rows = []
    for n in (int(x) for x in args.hosts.split(",")):
        for stream in args.streams.split(","):
            # one process per measurement: its RSS growth is this fleet's only
            r = subprocess.run(
                [sys.executable, __file__, "--measure", str(n), stream,
                 "--seconds", str(args.seconds), "--period", str(args.period),
                 "--procs", str(args.procs), "--join-timeout", str(args.join_timeout),
                 "--settle", str(args.settle),
                 "--gc-freeze" if args.gc_freeze else "--no-gc-freeze"],
                stdout=subprocess.PIPE, text=True, cwd=ROOT, check=True)
            row = json.loads(r.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(json.dumps(row), flush=True)
    print()
    keys = [k for k in rows[0] if k not in ("hosts", "stream")]
    keys += [k for r in rows for k in r if k not in keys and k not in ("hosts", "stream")]
    head = "measure".ljust(26) + "".join(f"{r['hosts']} {r['stream']}".rjust(14) for r in rows)
    print(head)
    for k in keys:
        print(k.ljust(26) + "".join(str(r.get(k, "")).rjust(14) for r in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
