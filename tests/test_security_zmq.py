"""What a ZeroMQ peer can make the agent hold: raw ZMTP peers against a real agent.

Each attack is played by a raw ZMTP 3.0 peer (tests/zmtp_raw.py) against a real
``hostagent run`` process (RSS read from /proc) or an in-process Publisher. Where libzmq
cannot bound what one peer makes the agent hold (a multipart message that never ends,
the subscription trie), the exposure is refused by configuration: the config tests.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import msgpack
import pytest
import zmq
import zmq.asyncio
from daemon_helpers import ROOT, DaemonProc, running_agent
from zmq_helpers import pub_config, run, running_publisher, snapshot_data
from zmtp_raw import COMMAND, MORE, RawPeer, frame

from hostagent import publisher as publisher_mod
from hostagent import wire
from hostagent.config import config_from_dict, exposed_endpoints
from hostagent.errors import ConfigError, HostagentError
from hostagent.publisher import MAX_SUBSCRIPTION_BYTES, Publisher

MB = 1 << 20


def rss(pid: int) -> int:
    """Resident set size of process ``pid`` in bytes."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def wait_until(pred: Callable[[], Any], timeout: float, what: str, pause: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(pause)


def counters(d: DaemonProc) -> dict[str, int]:
    """The publisher's counters from a fresh SIGUSR1 dump."""
    path = d.dir / "run" / "hostagent-dump.json"
    path.unlink(missing_ok=True)
    d.signal(signal.SIGUSR1)
    wait_until(path.exists, 30, "the debug dump", pause=0.05)
    return json.loads(path.read_text())["publisher"]["counters"]


def wait_rss_below(d: DaemonProc, limit: int, what: str, timeout: float = 90) -> None:
    """Wait until the agent's RSS is below ``limit`` (the agent trims every few seconds)."""
    deadline = time.monotonic() + timeout
    while (now := rss(d.proc.pid)) >= limit:
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: RSS still {now / MB:.0f} MB, over "
                                 f"{limit / MB:.0f} MB")
        time.sleep(0.2)


def settled_rss(d: DaemonProc) -> int:
    """The agent's RSS once it is idle (a request answered, then a short pause)."""
    assert d.request({"op": "snapshot"}, timeout=30)["ok"]
    time.sleep(0.5)
    return rss(d.proc.pid)


@pytest.fixture
def big_agent():
    with running_agent("big-448", ready_timeout=60, dedicated=None) as d:
        yield d


@pytest.fixture
def agent():
    with running_agent() as d:
        yield d


# --- requests whose replies are never read ---------------------------------------------

def test_peers_that_never_read_replies_cost_a_bounded_amount(big_agent):
    """20 peers x 120 snapshot requests, replies never read: the ROUTER's per-peer send
    queue (REQUEST_SEND_HWM replies) bounds what they hold; it is returned when they go."""
    d = big_agent
    base = settled_rss(d)
    reply_bytes = len(msgpack.packb(d.request({"op": "snapshot"}, timeout=30)))
    assert reply_bytes > 100_000  # big-448: each reply is a 128 KB snapshot
    before = counters(d).get("requests", 0)
    request = msgpack.packb({"op": "snapshot"})
    peers = [RawPeer(d.req) for _ in range(20)]
    try:
        for p in peers:
            for _ in range(120):
                p.send_message([request])
        wait_until(lambda: counters(d).get("requests", 0) >= before + 20 * 120, 180,
                   "every request to be answered", pause=0.5)
        held = rss(d.proc.pid) - base
        # before the fix: 20 x ~100 (send_hwm) x 128 KB = ~250 MB
        assert held < 60 * MB, f"{held / MB:.0f} MB held by 20 peers that never read"
    finally:
        for p in peers:
            p.close()
    wait_rss_below(d, base + 20 * MB, "the memory of the gone peers was not returned")
    assert d.request({"op": "snapshot"}, timeout=30)["ok"]


# --- the subscription trie -------------------------------------------------------------

def test_subscription_flood_is_returned_when_the_peer_goes(agent):
    """Distinct subscriptions fill libzmq's trie (unbounded while the peer stays, see
    docs/daemon.md §6.1); when the peer goes, the agent gives the memory back."""
    d = agent
    base = settled_rss(d)
    before = counters(d).get("other_subscriptions", 0)
    rnd = random.Random(7)
    n = 8000
    with RawPeer(d.stream, b"SUB") as p:
        for _ in range(n):
            p.send_frame(b"\x01" + rnd.randbytes(MAX_SUBSCRIPTION_BYTES - 20))
        wait_until(lambda: counters(d).get("other_subscriptions", 0) >= before + n, 120,
                   "every subscription to be read", pause=0.5)
        grown = rss(d.proc.pid) - base
        assert grown > 40 * MB, f"only {grown / MB:.0f} MB: the flood did not land"
    wait_rss_below(d, base + 25 * MB, "the trie's memory was not returned")
    assert d.request({"op": "snapshot"}, timeout=30)["ok"]


@pytest.mark.parametrize("kind", ["request", "stream"])
def test_a_multipart_message_that_never_ends_is_returned_when_the_peer_goes(agent, kind):
    """libzmq holds every frame of an unfinished message (MAXMSGSIZE is per frame, the
    HWM counts whole messages): unbounded while the peer stays connected, which is why
    non-loopback tcp needs CURVE. When the peer goes, the memory comes back."""
    d = agent
    base = settled_rss(d)
    endpoint, socket_type = (d.req, b"DEALER") if kind == "request" else (d.stream, b"SUB")
    chunk = b"\x01" + b"m" * (MAX_SUBSCRIPTION_BYTES - 20)
    thousand = frame(chunk, MORE) * 1000
    with RawPeer(endpoint, socket_type) as p:
        for _ in range(100):  # 100,000 frames of ~280 bytes, the last one with MORE set
            p.sock.sendall(thousand)
    wait_rss_below(d, base + 25 * MB, "the unfinished message's memory was not returned")
    assert d.request({"op": "snapshot"}, timeout=30)["ok"]


def test_a_subscription_longer_than_any_topic_disconnects_the_peer(tmp_path):
    async def main():
        async with running_publisher(tmp_path, heartbeat_seconds=30) as pub:
            await pub.publish(snapshot_data())
            endpoint = pub.bound["stream"][0]

            def long_then_ours() -> list[bytes]:
                with RawPeer(endpoint, b"SUB") as p:
                    # the longest legal host name (253) is kept, and the peer stays
                    p.send_frame(b"\x01" + wire.topic("a" * 253))
                    p.send_frame(b"\x01" + wire.topic("h1"))
                    frames = []
                    while len(frames) < 2:
                        flags, body = p.recv_frame()
                        if not flags & COMMAND:
                            frames.append(body)
                    return frames

            topic, body = await asyncio.to_thread(long_then_ours)
            assert topic == wire.topic("h1") and wire.decode_stream([topic, body])["seq"] == 1
            # the same through libzmq (ZMTP 3.1 sends SUBSCRIBE commands: 10 bytes more)
            sub = pub.ctx.socket(zmq.SUB)
            sub.linger = 0
            sub.subscribe(wire.topic("a" * 253))
            sub.subscribe(wire.topic("h1"))
            sub.connect(endpoint)
            frames = await asyncio.wait_for(sub.recv_multipart(), 10)
            assert wire.decode_stream(frames)["seq"] == 1
            sub.close()

            def too_long() -> None:
                with RawPeer(endpoint, b"SUB") as p:
                    # 400 bytes: longer than any topic (host names have at most 253)
                    p.send_frame(b"\x01" + b"x" * 400)
                    for _ in range(100):
                        p.recv_frame()

            with pytest.raises(ConnectionError):
                await asyncio.to_thread(too_long)
    run(main(), timeout=60)


# --- dead and silent peers -------------------------------------------------------------

def test_a_peer_that_answers_no_heartbeat_is_dropped(tmp_path, monkeypatch):
    monkeypatch.setattr(publisher_mod, "PEER_HEARTBEAT_IVL_MS", 100)
    monkeypatch.setattr(publisher_mod, "PEER_HEARTBEAT_TIMEOUT_MS", 300)

    async def main():
        async with running_publisher(tmp_path, heartbeat_seconds=30) as pub:
            def silent() -> list[bytes]:
                seen = []
                with RawPeer(pub.bound["request"][0], b"DEALER") as p:
                    for _ in range(100):
                        try:
                            seen.append(p.recv_frame()[1])
                        except ConnectionError:
                            return seen
                raise AssertionError(f"still connected after {seen}")

            seen = await asyncio.to_thread(silent)
            assert any(f.startswith(b"\x04PING") for f in seen)
    run(main(), timeout=60)


def test_a_peer_that_never_finishes_the_handshake_is_dropped(tmp_path, monkeypatch):
    monkeypatch.setattr(publisher_mod, "HANDSHAKE_TIMEOUT_MS", 200)

    async def main():
        async with running_publisher(tmp_path, heartbeat_seconds=30) as pub:
            def mute() -> bytes:
                import socket

                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.settimeout(10)
                s.connect(pub.bound["request"][0][len("ipc://"):])
                got = b""
                with s:
                    for _ in range(100):
                        chunk = s.recv(4096)
                        if not chunk:
                            return got
                        got += chunk
                raise AssertionError("still connected")

            greeting = await asyncio.to_thread(mute)
            assert greeting.startswith(b"\xff")
    run(main(), timeout=60)


# --- configuration: no plaintext tcp beyond loopback -----------------------------------

EXPOSED = ["tcp://*:6510", "tcp://0.0.0.0:6510", "tcp://10.1.2.3:6510", "tcp://[::]:6510",
           "tcp://eth0:6510", "tcp://agent.example.com:6510", "tcp://[fe80::1%eth0]:6510",
           "tcp://[2001:db8::1]:6510"]
LOCAL = ["tcp://127.0.0.1:6510", "tcp://127.3.4.5:*", "tcp://[::1]:6510",
         "tcp://localhost:6510", "tcp://[::ffff:127.0.0.1]:6510", "ipc:///run/h/s",
         "inproc://x"]


@pytest.mark.parametrize("endpoint", EXPOSED)
@pytest.mark.parametrize("key", ["endpoints", "request_endpoints"])
def test_non_loopback_tcp_without_curve_is_refused(endpoint, key):
    with pytest.raises(ConfigError) as err:
        config_from_dict({"publisher": {key: [endpoint]}}, "test.toml")
    msg = str(err.value)
    assert msg.startswith(f"test.toml: publisher.{key} = ['{endpoint}']: ")
    assert "\n" not in msg
    assert f"{endpoint} binds tcp beyond loopback without CURVE" in msg
    assert "[curve] enabled = true" in msg and "insecure = true" in msg


@pytest.mark.parametrize("endpoint", LOCAL)
def test_loopback_and_ipc_need_no_curve(endpoint):
    cfg = config_from_dict({"publisher": {"endpoints": [endpoint],
                                          "request_endpoints": [endpoint]}})
    assert cfg.publisher.endpoints == (endpoint,) and exposed_endpoints(cfg.publisher) == []


def test_curve_or_insecure_allows_non_loopback_tcp():
    pub = {"endpoints": ["tcp://*:6510"], "request_endpoints": ["tcp://10.0.0.5:6511"]}
    with_curve = config_from_dict({"publisher": pub, "curve": {"enabled": True}})
    assert with_curve.publisher.insecure is False
    insecure = config_from_dict({"publisher": {**pub, "insecure": True}})
    assert insecure.publisher.insecure is True
    assert exposed_endpoints(insecure.publisher) == ["tcp://*:6510", "tcp://10.0.0.5:6511"]
    with pytest.raises(ConfigError, match=r"publisher.insecure = 'yes': must be true or false"):
        config_from_dict({"publisher": {**pub, "insecure": "yes"}}, "test.toml")


def test_publisher_refuses_exposed_plaintext_and_warns_when_insecure(tmp_path, caplog):
    ctx = zmq.asyncio.Context()
    # 192.0.2.1 (TEST-NET-1) is no address of this host: the bind fails, nothing is exposed
    cfg = pub_config(tmp_path, endpoints=("tcp://192.0.2.1:6510",))
    pub = Publisher(ctx, cfg, "h", "e")
    with pytest.raises(HostagentError, match=r"tcp://192.0.2.1:6510 binds tcp beyond "
                                             r"loopback without CURVE"):
        pub.bind()
    pub.close()
    pub = Publisher(ctx, pub_config(tmp_path, endpoints=cfg.endpoints, insecure=True), "h", "e")
    with caplog.at_level(logging.WARNING, logger="hostagent.publisher"):
        with pytest.raises(HostagentError, match="cannot bind stream endpoint tcp://192.0.2.1"):
            pub.bind()
    assert any("insecure" in r.getMessage() and "tcp://192.0.2.1:6510" in r.getMessage()
               for r in caplog.records if r.levelno == logging.WARNING)
    pub.close()
    ctx.term()


def test_run_with_exposed_plaintext_endpoint_exits_2(tmp_path):
    conf = tmp_path / "hostagent.toml"
    conf.write_text('[publisher]\nendpoints = ["tcp://*:6510"]\n')
    r = subprocess.run([sys.executable, "-m", "hostagent.cli", "run", "--config", str(conf)],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 2, r.stderr
    line, = r.stderr.strip().splitlines()
    assert line.startswith(f"hostagent: {conf}: publisher.endpoints = ['tcp://*:6510']: ")
    assert "insecure = true" in line
