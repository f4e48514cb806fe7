"""Test and bench helper: every attack on an agent's sockets, played one after another.

``run_battery(d)`` plays, against a running ``DaemonProc`` (ipc endpoints), what the
hardening work found a hostile client could do: fit requests sized to exhaust the
agent, malformed requests, a frame over ``max_message_bytes``, a multipart message that
never ends (on the request and on the stream socket), a flood of distinct
subscriptions, a subscription longer than any topic, and peers that ask for snapshots
and never read the replies. Every loop is bounded in count; every socket has a timeout
and is closed before the function returns. It returns what each attack got back, for
the caller to check.

tests/test_security_agent.py asserts that the agent answers and gives its memory back
afterwards; bench/attacks.py times the agent's answers before and after.
"""

from __future__ import annotations

import contextlib
from typing import Any

import zmq
from zmtp_raw import RawPeer

from hostagent import wire

HOSTILE_FITS = (
    {"vcpus": 10_000_000, "memory_mb": 1, "extra_specs": {"hw:cpu_policy": "dedicated"}},
    {"vcpus": 2**64 - 1, "memory_mb": 1, "extra_specs": {"hw:cpu_policy": "dedicated"}},
    {"vcpus": -1, "memory_mb": 1},
    {"vcpus": 4, "memory_mb": 1, "extra_specs": {f"k{i}": "v" for i in range(5000)}},
    {"vcpus": 4, "memory_mb": 1, "extra_specs": {"hw:numa_cpus.0": "0-4000000000"}},
)

MALFORMED = (
    b"\xc1\xc1garbage",
    wire.pack(["op", "snapshot"]),
    wire.pack({"op": 12}),
    wire.pack({"op": "nope" * 1000}),
    wire.pack({"op": "snapshot", "x": 1}),
    b"\x91" * 40 + b"\xc0",  # nested arrays
    wire.pack({"op": "fit", "request": "x"}),
    wire.pack({"op": "fit", "request": {}, "strategy": "s" * 10_000}),
)


def _dealer(ctx: zmq.Context[Any], endpoint: str, timeout_ms: int = 30_000) -> Any:
    s = ctx.socket(zmq.DEALER)
    s.linger = 0
    s.rcvtimeo = timeout_ms
    s.sndtimeo = timeout_ms
    s.connect(endpoint)
    return s


def _ask(sock: Any, payload: bytes) -> dict[str, Any]:
    sock.send(payload)
    return wire.decode_reply(sock.recv())


def run_battery(stream: str, request: str, *, max_message_bytes: int,
                never_ending_frames: int = 200, subscriptions: int = 2000,
                unread_peers: int = 10, unread_requests: int = 20) -> dict[str, Any]:
    """Play every attack against the agent at ``stream``/``request`` (ipc endpoints)."""
    ctx: zmq.Context[Any] = zmq.Context()
    got: dict[str, Any] = {}
    try:
        d = _dealer(ctx, request)
        got["hostile_fits"] = [_ask(d, wire.pack({"op": "fit", "request": r}))
                               for r in HOSTILE_FITS]
        got["malformed"] = [_ask(d, p) for p in MALFORMED]
        d.close()

        # one frame over MAXMSGSIZE: libzmq drops that peer, nobody else
        big = _dealer(ctx, request)
        big.send(b"\0" * (max_message_bytes + 1))
        big.close()

        # multipart messages that never end, on both sockets, then the peer goes
        chunk = b"m" * 65_536
        with RawPeer(request, b"DEALER") as raw:
            for _ in range(never_ending_frames):
                raw.send_frame(chunk, more=True)
        with RawPeer(stream, b"SUB") as raw:
            for _ in range(never_ending_frames):
                raw.send_frame(b"\x01" + b"s" * 250, more=True)

        # distinct subscriptions (each one a trie branch), then the peer goes
        with RawPeer(stream, b"SUB") as raw:
            for i in range(subscriptions):
                raw.send_frame(b"\x01" + f"{i:08d}".encode() * 30)
        # a subscription longer than any topic: the agent drops that peer
        with contextlib.suppress(OSError), RawPeer(stream, b"SUB") as raw:
            raw.send_frame(b"\x01" + b"x" * 4000)

        # peers that ask for snapshots and never read the replies, then go
        lazy = [_dealer(ctx, request) for _ in range(unread_peers)]
        for s in lazy:
            for _ in range(unread_requests):
                s.send(wire.pack({"op": "snapshot"}))
        for s in lazy:
            s.close()
        got["lazy_requests"] = unread_peers * unread_requests
    finally:
        ctx.destroy(linger=0)
    return got
