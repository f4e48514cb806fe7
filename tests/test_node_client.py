"""The wire protocol from another language: examples/node/client.mjs (Node.js, with the
npm packages zeromq, @msgpack/msgpack and pako) against a real agent and a scripted
publisher, checked against what the Python side sees (docs/wire.md).

Node.js and the packages come from scripts/setup-node. Without them these tests are
skipped, except under CI (``CI`` set), where they fail: CI must run the example.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import subprocess
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import zmq
from daemon_helpers import DaemonProc
from libvirt_helpers import domain_xml

from hostagent import wire
from hostagent.curve import ClientCurve, make_keypair

ROOT = Path(__file__).resolve().parent.parent
NODE_DIR = ROOT / "examples" / "node"
CLIENT = NODE_DIR / "client.mjs"
MIN_NODE_MAJOR = 18  # Debian 12's nodejs; scripts/setup-node checks the same
NODE_PACKAGES = ("zeromq", "@msgpack/msgpack", "pako")

# big-448: cores 0-1 of every socket shared, the rest dedicated (as tests/test_security_fitreq)
BIG_DEDICATED = "2-55,58-111,114-167,170-223,226-279,282-335,338-391,394-447"


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _node_problem() -> str | None:
    """Why the Node client cannot run here, or None."""
    node = shutil.which("node")
    if node is None:
        return "node (Node.js) is not installed"
    out = subprocess.run([node, "-p", "process.versions.node"], capture_output=True,
                         text=True, timeout=60)
    major = int(out.stdout.split(".")[0]) if out.returncode == 0 else 0
    if major < MIN_NODE_MAJOR:
        return f"node {out.stdout.strip() or '?'} is older than {MIN_NODE_MAJOR}"
    imports = "".join(f"await import({name!r});" for name in NODE_PACKAGES)
    out = subprocess.run([node, "--input-type=module", "-e", imports], cwd=NODE_DIR,
                         capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        lines = out.stderr.strip().splitlines() or ["?"]
        why = next((line for line in lines if "Error" in line), lines[-1])
        return f"the npm packages of examples/node do not load ({why.strip()[:200]})"
    return None


@pytest.fixture(scope="module")
def node() -> str:
    problem = _node_problem()
    if problem is not None:
        if _in_ci():
            pytest.fail(f"{problem}; CI runs the Node.js example, so scripts/setup must "
                        "run scripts/setup-node")
        pytest.skip(f"{problem}; run scripts/setup-node")
    return shutil.which("node") or "node"


# --- the client as a process -----------------------------------------------------------

_FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')


@dataclass
class Event:
    """One line of the client: ``snapshot host=h1 seq=3 ...``."""

    kind: str
    fields: dict[str, str] = field(default_factory=dict)

    def __getitem__(self, key: str) -> str:
        return self.fields[key]

    def num(self, key: str) -> int:
        return int(self.fields[key])


def parse_line(line: str) -> Event:
    kind, _, rest = line.partition(" ")
    return Event(kind, {k: v for k, v in _FIELD.findall(rest)})


class NodeClient:
    """examples/node/client.mjs running; its stdout lines are read by a thread."""

    def __init__(self, node: str, *args: str) -> None:
        self.proc = subprocess.Popen([node, str(CLIENT), *args], cwd=NODE_DIR,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def next(self, timeout: float = 60.0) -> Event:
        """The next line, parsed."""
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no line from the client within {timeout} s; so far:\n"
                                 + "\n".join(self.seen)) from None
        if line is None:
            self.lines.put(None)
            raise AssertionError(f"the client ended (rc {self.proc.wait(10)}): "
                                 f"{self.stderr()}\n" + "\n".join(self.seen))
        self.seen.append(line)
        return parse_line(line)

    def until(self, kinds: tuple[str, ...], timeout: float = 60.0) -> Event:
        """Skip lines until one of ``kinds``."""
        deadline = time.monotonic() + timeout
        while True:
            ev = self.next(max(0.1, deadline - time.monotonic()))
            if ev.kind in kinds:
                return ev

    def wait(self, timeout: float = 60.0) -> int:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError("the client did not end; so far:\n"
                                 + "\n".join(self.seen)) from None
        self._reader.join(10)
        while True:  # collect what is left
            try:
                line = self.lines.get_nowait()
            except queue.Empty:
                break
            if line is not None:
                self.seen.append(line)
        return rc

    def events(self, kind: str | None = None) -> list[Event]:
        return [e for e in map(parse_line, self.seen) if kind in (None, e.kind)]

    def stderr(self) -> str:
        assert self.proc.stderr is not None
        return self.proc.stderr.read() if self.proc.poll() is not None else ""

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def free_pcpus(snap: dict[str, Any]) -> str:
    return ",".join(f"c{c['id']}:{c['free_pcpus']}" for c in snap["usage"]["cells"]) or "-"


# --- a real agent ----------------------------------------------------------------------

def record_until(sub: Any, seen: dict[int, dict[str, Any]], pred: Any,
                 timeout: float = 60.0) -> dict[str, Any]:
    """Poll the Python subscriber, keeping every snapshot by seq, until ``pred`` holds
    for the latest one."""
    deadline = time.monotonic() + timeout
    while True:
        snap = sub.latest("testhost")
        if snap is not None:
            seen.setdefault(snap["seq"], snap)
            if pred(snap):
                return snap
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no matching snapshot; seqs seen {sorted(seen)}")
        for upd in sub.poll(min(left, 1.0)):
            if upd.kind == "snapshot" and upd.host == "testhost":
                seen[upd.seq] = upd.snapshot


def pinned_guest(i: int) -> str:
    # big-448 cell 0 holds CPUs 0-55; 2.. are dedicated
    return domain_xml(f"node{i}", vcpus=1, memory_kib=1048576, vcpupin={0: str(2 + i)},
                      emulatorpin="0-1", numa_memory=("strict", "0"))


def test_node_client_sees_what_the_python_subscriber_sees(node, tmp_path):
    """On big-448 every snapshot is over 16 KiB, so each travels zlib-compressed with
    ``enc`` after ``data``: the Node client inflates it (pako, bounded), and its seq,
    epoch, host, time, guests and free pCPUs per cell equal the Python subscriber's for
    the same seq; the inflated size equals the msgpack of the Python-decoded snapshot,
    and each whole snapshot it decoded (written as JSON) equals the Python one. Its
    first snapshot is an ``{op: "snapshot"}`` fetch; the welcome re-publish that follows
    the subscription is a duplicate."""
    d = DaemonProc("big-448", dedicated=BIG_DEDICATED)
    client = None
    try:
        d.wait_notify("READY=1", timeout=120)
        seen: dict[int, dict[str, Any]] = {}
        with d.subscriber() as sub:
            record_until(sub, seen, lambda s: True)
            client = NodeClient(node, "--stream", d.stream, "--request", d.req,
                                "--host", "testhost", "--count", "4", "--timeout", "300",
                                "--verbose", "--dump", str(tmp_path))
            first = client.next(timeout=120)
            assert first.kind == "snapshot" and first["via"] == "fetch", client.seen
            # the subscription is live once anything arrives on the stream
            live = client.until(("heartbeat", "duplicate"), timeout=120)
            assert live.num("seq") >= first.num("seq")
            for i in range(3):
                assert d.request({"op": "test-domain", "action": "create",
                                  "xml": pinned_guest(i)}, timeout=30)["ok"]
                record_until(sub, seen, lambda s, n=i + 1: len(s["usage"]["guests"]) == n)
            assert client.wait(timeout=300) == 0, client.stderr()
        snaps = client.events("snapshot")
        assert len(snaps) == 4 and [e["via"] for e in snaps[1:]] == ["stream"] * 3
        seqs = [e.num("seq") for e in snaps]
        assert seqs == sorted(set(seqs))
        for ev in snaps:
            py = seen[ev.num("seq")]
            assert (ev["host"], ev["epoch"]) == (py["host"], py["epoch"])
            assert float(ev["time"]) == py["time"]  # a float64 of unix seconds, exact
            assert ev.num("guests") == len(py["usage"]["guests"])
            assert ev.num("threads") == len(py["usage"]["threads"]) == 448
            assert ev.num("cells") == len(py["topology"]["cells"]) == 8
            assert ev["free_pcpus"] == free_pcpus(py)
            assert ev["libvirt"] == "up"
            dumped = tmp_path / f"testhost-{ev['epoch']}-{ev['seq']}.json"
            assert json.loads(dumped.read_text()) == py
            if ev["via"] == "stream":
                assert ev["enc"] == "zlib" and ev.num("bytes") < ev.num("inflated")
                assert ev.num("inflated") == len(wire.pack(py)) > wire.COMPRESS_MIN_BYTES
        assert snaps[-1].num("guests") == 3
        # late join: the subscription made the agent re-publish the fetched seq unchanged
        assert [e.num("seq") for e in client.events("duplicate")] == [first.num("seq")]
        assert not client.events("bad") and not client.events("gap")
        assert d.stop() == 0, d.log_text()
    finally:
        if client is not None:
            client.close()
        d.close()


def test_node_client_with_curve_keys(node):
    """With CURVE the client needs the agent's public key and its own key pair whose
    public key is in the agent's allowed_clients_dir; a key the agent does not allow
    gets no reply."""
    d = DaemonProc("vm-1s-nosmt", start=False, dedicated=None)
    clients: list[NodeClient] = []
    try:
        keys, allowed = d.dir / "keys", d.dir / "allowed"
        allowed.mkdir()
        server_pub, server_sec = make_keypair(keys, "server")
        _, good_sec = make_keypair(allowed, "sched")
        _, bad_sec = make_keypair(keys, "intruder")
        d.config.write_text(d.config.read_text() + f"""
[curve]
enabled = true
server_secret_key = "{server_sec}"
allowed_clients_dir = "{allowed}"
""")
        d.start()
        d.wait_notify("READY=1", timeout=60)
        common = ["--stream", d.stream, "--request", d.req, "--server-key", str(server_pub)]
        good = NodeClient(node, *common, "--client-key", str(good_sec), "--count", "2",
                          "--timeout", "120", "--verbose")
        clients.append(good)
        assert good.next(timeout=60)["via"] == "fetch"
        good.until(("heartbeat", "duplicate"), timeout=60)
        assert d.request({"op": "test-domain", "action": "create",
                          "xml": domain_xml("curved", vcpus=1)}, timeout=30,
                         curve=ClientCurve.load(good_sec, server_pub))["ok"]
        assert good.wait(timeout=120) == 0, good.stderr()
        assert [e["via"] for e in good.events("snapshot")] == ["fetch", "stream"]
        bad = NodeClient(node, *common, "--client-key", str(bad_sec), "--count", "1",
                         "--request-timeout", "1", "--timeout", "60")
        clients.append(bad)
        assert bad.wait(timeout=60) == 1
        assert "no reply within 1 s" in bad.stderr() and not bad.events()
        assert d.stop() == 0, d.log_text()
    finally:
        for c in clients:
            c.close()
        d.close()


# --- a scripted publisher: every rule, deterministic -----------------------------------

class ScriptedAgent:
    """A real XPUB and ROUTER on ipc, sending bodies built with hostagent.wire; the
    ROUTER answers ``{op: "snapshot"}`` requests from ``replies``, one each, in order."""

    def __init__(self, tmp: Path, replies: list[dict[str, Any]]) -> None:
        self.ctx = zmq.Context()
        self.xpub = self.ctx.socket(zmq.XPUB)
        self.xpub.linger = 0
        self.xpub.setsockopt(zmq.XPUB_VERBOSE, 1)
        self.stream = f"ipc://{tmp}/s"
        self.request = f"ipc://{tmp}/r"
        self.xpub.bind(self.stream)
        self.replies = list(replies)
        self.requests: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._router = threading.Thread(target=self._serve, daemon=True)
        self._router.start()

    def _serve(self) -> None:
        router = self.ctx.socket(zmq.ROUTER)
        router.linger = 0
        router.bind(self.request)
        try:
            while not self._stop.is_set():
                if not router.poll(100):
                    continue
                ident, payload = router.recv_multipart()
                self.requests.append(wire.decode_request(payload))
                reply = wire.ok_reply(**self.replies.pop(0)) if self.replies else \
                    wire.error_reply("no more replies")
                router.send_multipart([ident, wire.pack(reply)])
        finally:
            router.close(linger=0)

    def wait_subscription(self, timeout: float = 60.0) -> bytes:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.xpub.poll(100):
                msg = self.xpub.recv()
                if msg[:1] == b"\x01":
                    return msg[1:]
        raise AssertionError("no subscription")

    def send(self, frames: list[bytes]) -> None:
        self.xpub.send_multipart(frames)

    def close(self) -> None:
        self._stop.set()
        self._router.join(10)
        self.xpub.close(linger=0)
        self.ctx.term()


def snap(epoch: str, seq: int, guests: int = 0) -> dict[str, Any]:
    data = {"schema": 1, "host": "h1", "epoch": epoch, "seq": seq, "time": 1.5,
            "topology": {"cells": [{"id": 0}]}, "config": {},
            "usage": {"cells": [{"id": 0, "free_pcpus": 4 - guests}], "threads": [],
                      "guests": [{"uuid": f"g{i}"} for i in range(guests)]}}
    return wire.make_body("snapshot", "h1", epoch, seq, 1700000000.25, data)


def frames_of(body: dict[str, Any], *, compress: bool = False) -> list[bytes]:
    return wire.encode_stream(body, compress_min=0 if compress else None)


def test_node_client_applies_the_subscriber_rules(node, tmp_path):
    """Duplicates, gaps, a stale heartbeat answered by a fetch, an epoch reset, seq out
    of 0..2^53-1, a zlib bomb over the inflate limit, a topic for another host, an
    unknown version, and a frame over the size limit (libzmq drops the connection and
    does not retry; the client connects again): each as docs/wire.md says, and each bad
    message is one wire.decode_stream refuses too."""
    limit = 64 * 1024
    bomb_data = wire.pack({"schema": 1, "pad": "x" * (4 * limit)})
    bomb = {**snap("E1", 10), "data": zlib.compress(bomb_data, 9), "enc": "zlib"}
    bad = {
        "seq": frames_of(snap("E1", wire.MAX_SEQ + 1)),
        "bomb": [wire.topic("h1"), wire.pack(bomb)],
        "topic": [wire.topic("h2"), frames_of(snap("E1", 11))[1]],
        "version": frames_of({**snap("E1", 12), "v": 2}),
    }
    for frames in bad.values():
        with pytest.raises(wire.WireError):
            wire.decode_stream(frames, max_bytes=limit)
    agent = ScriptedAgent(tmp_path, [snap("E1", 5), snap("E1", 9, guests=2)])
    client = None
    try:
        client = NodeClient(node, "--stream", agent.stream, "--request", agent.request,
                            "--count", "6", "--max-bytes", str(limit), "--timeout", "120",
                            "--verbose", "--dead-after", "60")
        assert agent.wait_subscription() == b"hostagent."
        compressed = frames_of(snap("E1", 8, guests=1), compress=True)
        assert list(wire.unpack(compressed[1]))[-2:] == ["data", "enc"]  # enc after data
        for frames in (frames_of(snap("E1", 5)), frames_of(snap("E1", 6)), compressed,
                       frames_of(wire.make_body("heartbeat", "h1", "E1", 8, 2.0, None)),
                       frames_of(wire.make_body("heartbeat", "h1", "E1", 9, 2.0, None)),
                       *bad.values(), frames_of(snap("E2", 1))):
            agent.send(frames)
        reset = client.until(("reset",), timeout=60)
        assert (reset["epoch"], reset["was"]) == ("E2", "E1")
        client.until(("snapshot",), timeout=60)  # E2 seq 1: everything before is read
        # a frame over --max-bytes: libzmq drops the connection for good; the client
        # connects again and subscribes anew
        agent.send([wire.topic("h1"), b"\0" * (limit + 1)])
        assert agent.wait_subscription() == b"hostagent."
        agent.send(frames_of(snap("E2", 2, guests=3), compress=True))
        assert client.wait(timeout=120) == 0, client.stderr()
    finally:
        if client is not None:
            client.close()
        agent.close()
    got = [(e.kind, e.fields.get("epoch"), e.fields.get("seq"), e.fields.get("via"))
           for e in client.events() if e.kind != "bad"]
    assert got == [
        ("snapshot", "E1", "5", "fetch"),
        ("duplicate", None, "5", "stream"),
        ("snapshot", "E1", "6", "stream"),
        ("gap", None, None, None),
        ("snapshot", "E1", "8", "stream"),
        ("heartbeat", None, "8", None),
        ("heartbeat", None, "9", None),
        ("stale", None, None, None),
        ("snapshot", "E1", "9", "fetch"),
        ("reset", "E2", None, None),
        ("snapshot", "E2", "1", "stream"),
        ("reconnect", None, None, None),
        ("snapshot", "E2", "2", "stream"),
    ], client.seen
    snaps = client.events("snapshot")
    assert [e["enc"] for e in snaps] == ["none", "none", "zlib", "none", "none", "zlib"]
    assert snaps[2].num("inflated") == len(wire.pack(snap("E1", 8, guests=1)["data"]))
    assert [e.num("guests") for e in snaps] == [0, 0, 1, 2, 0, 3]
    assert [e["free_pcpus"] for e in snaps] == ["c0:4", "c0:4", "c0:3", "c0:2", "c0:4", "c0:1"]
    gap = client.events("gap")[0]
    assert (gap.num("after"), gap.num("got")) == (6, 8)
    stale = client.events("stale")[0]
    assert (stale.num("held"), stale.num("heard")) == (8, 9)
    reasons = [e["reason"] for e in client.events("bad")]
    assert len(reasons) == 4, client.seen
    assert "must be an integer from 0 to 9007199254740991" in reasons[0]
    assert f"inflates to over the limit of {limit} bytes" in reasons[1]
    assert "topic names host h2" in reasons[2]
    assert "only version 1" in reasons[3]
    assert agent.requests == [{"op": "snapshot"}, {"op": "snapshot"}]
