"""Subscriber hardening: an oversized frame, forged sources, bad seq, invalid snapshot
shapes, and `hostagent watch` on schema-invalid data. Real ZeroMQ sockets on ipc."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq
from zmq_helpers import run, running_publisher, snapshot_data, source

from hostagent import wire
from hostagent.curve import ClientCurve, ServerCurve, make_keypair, start_authenticator
from hostagent.subscriber import (
    RECONNECT_GRACE_SECONDS,
    RECONNECT_MAX_SECONDS,
    AsyncSubscriber,
    Source,
    Subscriber,
    SubscriberState,
    reconnect_delay,
)

ROOT = Path(__file__).resolve().parent.parent
WAIT = 20.0  # generous bound for anything that should happen "soon" on a loaded machine


def valid(n: int = 0) -> dict:
    """The smallest snapshot the subscriber's shape check accepts."""
    return {"schema": 1, "topology": {"cells": []}, "config": {}, "usage": {"n": n}}


def body_frames(host: str, epoch: str, seq: int, data: dict | None,
                kind: str = "snapshot") -> list[bytes]:
    return [wire.topic(host), wire.pack(wire.make_body(kind, host, epoch, seq, 1.0, data))]


class RawPub:
    """A bare XPUB (any peer can be this): sees every (un)subscription, sends raw frames."""

    def __init__(self, ctx: zmq.Context, endpoint: str) -> None:
        self.sock = ctx.socket(zmq.XPUB)
        self.sock.linger = 0
        self.sock.setsockopt(zmq.XPUB_VERBOSER, 1)
        self.sock.bind(endpoint)

    def subscribed(self, timeout: float = WAIT) -> bool:
        """True once a subscribe message arrived (unsubscribes are skipped)."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if self.sock.poll(left * 1000) and self.sock.recv()[:1] == b"\x01":
                return True
        return False

    def pending_subscribe(self) -> bool:
        """A subscribe message already queued (no wait)."""
        while self.sock.poll(0):
            if self.sock.recv()[:1] == b"\x01":
                return True
        return False

    def send(self, frames: list[bytes]) -> None:
        self.sock.send_multipart(frames)

    def close(self) -> None:
        self.sock.close(linger=0)


# --- (3) one oversized frame must not leave the subscriber deaf ------------------------

def test_oversized_frame_then_the_source_is_reconnected_and_delivers_again(tmp_path):
    ctx = zmq.Context()
    pub = RawPub(ctx, f"ipc://{tmp_path}/s")
    try:
        with Subscriber([f"ipc://{tmp_path}/s"], max_message_bytes=4096, ctx=ctx) as sub:
            assert pub.subscribed()
            pub.send(body_frames("h1", "e1", 1, valid(1)))
            sub.wait_snapshot("h1", timeout=WAIT)
            pub.send([wire.topic("h1"), b"x" * 10_000])  # libzmq drops the connection
            deadline = time.monotonic() + WAIT
            while not pub.pending_subscribe():  # the library connects again
                assert time.monotonic() < deadline, dict(sub.stats)
                sub.poll(0.05)
            for seq in range(2, 22):
                pub.send(body_frames("h1", "e1", seq, valid(seq)))
            got = []
            deadline = time.monotonic() + WAIT
            while len(got) < 20 and time.monotonic() < deadline:
                got += [u.seq for u in sub.poll(0.2) if u.kind == "snapshot"]
            assert got == list(range(2, 22))
            assert sub.stats["disconnects"] == 1 and sub.stats["reconnects"] == 1
            assert sub.latest("h1")["usage"] == {"n": 21}
    finally:
        pub.close()
        ctx.destroy(linger=0)


def test_async_subscriber_resyncs_with_the_agent_after_an_oversized_frame(tmp_path):
    async def main():
        async with running_publisher(tmp_path, heartbeat_seconds=0.05) as pub:
            await pub.publish(snapshot_data(1))
            sub = AsyncSubscriber([source(tmp_path)], max_message_bytes=4096)
            await sub.wait_snapshot("h1", timeout=WAIT)
            await pub.xpub.send_multipart([wire.topic("h1"), b"x" * 10_000])
            for n in range(2, 22):  # while the connection is down: all lost for it
                await pub.publish(snapshot_data(n))
            deadline = time.monotonic() + WAIT
            while sub.hosts["h1"].seq < 21:  # re-publish on reconnect, or stale + fetch
                assert time.monotonic() < deadline, dict(sub.stats)
                await sub.poll(0.2)
            assert sub.latest("h1")["usage"] == {"n": 21}
            assert sub.stats["reconnects"] >= 1
            sub.close()
    run(main(), timeout=60)


def test_reconnect_delay_doubles_up_to_its_cap():
    assert [reconnect_delay(n) for n in range(4)] == [
        RECONNECT_GRACE_SECONDS * k for k in (1, 2, 4, 8)]
    assert reconnect_delay(10) == reconnect_delay(10**6) == RECONNECT_MAX_SECONDS


def test_agent_whose_snapshots_are_all_too_big_backs_off_then_recovers(tmp_path):
    async def main():
        async with running_publisher(tmp_path, heartbeat_seconds=30) as pub:
            await pub.publish({**snapshot_data(1), "pad": "x" * 10_000})
            sub = AsyncSubscriber([source(tmp_path)], max_message_bytes=4096)
            deadline = time.monotonic() + WAIT
            while sub.stats["reconnects"] < 2:  # every re-publish drops the connection
                assert time.monotonic() < deadline, dict(sub.stats)
                await sub.poll(0.2)
            assert sub._links[0].failures == sub.stats["reconnects"]  # no reset between
            assert sub.latest("h1") is None
            await pub.publish(snapshot_data(2))  # small again: the next reconnect gets it
            deadline = time.monotonic() + WAIT
            while sub.latest("h1") is None:
                assert time.monotonic() < deadline, dict(sub.stats)
                await sub.poll(0.2)
            assert sub.latest("h1")["usage"] == {"n": 2} and sub._links[0].failures == 0
            sub.close()
    run(main(), timeout=60)


# --- (4) no source can freeze another source's host -----------------------------------

def test_forged_source_with_huge_seq_does_not_freeze_the_real_agent(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()

    async def main():
        ctx = zmq.Context()
        forger = RawPub(ctx, f"ipc://{b}/s")
        try:
            async with running_publisher(a, "h1", heartbeat_seconds=0.05) as pub:
                await pub.publish(snapshot_data(1))
                sub = AsyncSubscriber([source(a), f"ipc://{b}/s"])
                await sub.wait_snapshot("h1", timeout=WAIT)
                assert await asyncio.to_thread(forger.subscribed)
                fake = {**valid(), "fake": True}

                async def real_goes_on(n: int, other_seq: int) -> None:
                    # a marker after the forged messages: once it is read, so are they
                    forger.send(body_frames("other", "e9", other_seq, valid(9)))
                    deadline = time.monotonic() + WAIT
                    while sub.hosts.get("other") is None or \
                            sub.hosts["other"].seq < other_seq:
                        assert time.monotonic() < deadline, dict(sub.stats)
                        await sub.poll(0.2)
                    await pub.publish(snapshot_data(n))
                    deadline = time.monotonic() + WAIT
                    while sub.hosts["h1"].seq < pub.seq:
                        assert time.monotonic() < deadline, dict(sub.stats)
                        for u in await sub.poll(0.2):
                            assert not (u.snapshot or {}).get("fake"), u
                    assert sub.latest("h1")["usage"] == {"n": n}

                # the issue's case: the real epoch with the largest msgpack int
                forger.send(body_frames("h1", pub.epoch, 2**64 - 1, fake))
                await real_goes_on(2, 1)
                # in range, but from another source than the one h1 was first heard on
                forger.send(body_frames("h1", pub.epoch, 2**53 - 2, fake))
                forger.send(body_frames("h1", "e-other", 1, fake))  # a "restart"
                forger.send(body_frames("h1", pub.epoch, 2**53 - 2, None, "heartbeat"))
                await real_goes_on(3, 2)
                assert "fake" not in sub.latest("h1")
                assert sub.hosts["h1"].epoch == pub.epoch and sub.hosts["h1"].source == 0
                assert sub.hosts["other"].source == 1 and sub.hosts["other"].seq == 2
                assert sub.stats["bad_messages"] == 1  # seq 2**64-1
                assert sub.stats["foreign_source"] == 3
                sub.close()
        finally:
            forger.close()
            ctx.destroy(linger=0)
    run(main(), timeout=60)


def test_state_binds_a_host_to_its_first_source_until_it_goes_dead():
    st = SubscriberState(dead_after=1.0)
    snap = wire.make_body("snapshot", "h1", "e1", 5, 1.0, valid(5))
    assert st.feed(snap, 10.0, source=0).kind == "snapshot"
    other = wire.make_body("snapshot", "h1", "e2", 1, 1.0, valid(99))
    assert st.feed(other, 10.5, source=1) is None  # bound to source 0
    assert st.feed(other, 10.6, source=1) is None
    assert st.stats["foreign_source"] == 2 and st.hosts["h1"].seq == 5
    # silent on source 0 for dead_after: the binding is released, source 1 takes the host
    upd = st.feed(other, 11.6, source=1)
    assert upd.kind == "snapshot" and upd.snapshot["usage"] == {"n": 99}
    assert st.hosts["h1"].source == 1 and st.stats["rebinds"] == 1
    # and now source 0 is the foreign one
    assert st.feed(wire.make_body("snapshot", "h1", "e1", 6, 1.0, valid(6)), 11.7, 0) is None


def test_agent_moving_to_another_source_is_followed_once_the_old_one_is_dead(tmp_path):
    ctx = zmq.Context()
    old, new = RawPub(ctx, f"ipc://{tmp_path}/old"), RawPub(ctx, f"ipc://{tmp_path}/new")
    try:
        with Subscriber([f"ipc://{tmp_path}/old", f"ipc://{tmp_path}/new"], dead_after=0.3,
                        ctx=ctx) as sub:
            assert old.subscribed() and new.subscribed()
            old.send(body_frames("h1", "e1", 7, valid(7)))
            sub.wait_snapshot("h1", timeout=WAIT)
            kinds: list[str] = []
            deadline = time.monotonic() + WAIT
            while "dead" not in kinds:  # the old source goes silent
                assert time.monotonic() < deadline
                kinds += [u.kind for u in sub.poll(0.5)]
            new.send(body_frames("h1", "e1", 1, valid(1)))  # same epoch, lower seq: accepted
            deadline = time.monotonic() + WAIT
            while sub.hosts["h1"].source != 1:
                assert time.monotonic() < deadline
                sub.poll(0.2)
            assert sub.latest("h1")["usage"] == {"n": 1} and sub.alive("h1")
            assert sub.stats["rebinds"] == 1
    finally:
        old.close()
        new.close()
        ctx.destroy(linger=0)


def test_seq_is_bounded_to_what_json_and_doubles_carry_exactly():
    ok = wire.make_body("heartbeat", "h1", "e1", wire.MAX_SEQ, 1.0, None)
    assert wire.check_body(ok)["seq"] == 2**53 - 1
    for seq in (2**53, 2**64 - 1, -1, 1.0, True):
        with pytest.raises(wire.WireError, match="body.seq"):
            wire.check_body({**ok, "seq": seq})


def test_curve_sources_each_with_their_own_agent_key(tmp_path):
    """Each source can carry its agent's server key; a host stays bound to the source
    (endpoint and key) it was first heard on."""
    keys, allowed = tmp_path / "keys", tmp_path / "allowed"
    allowed.mkdir()
    a_pub, a_sec = make_keypair(keys, "agent_a")
    b_pub, b_sec = make_keypair(keys, "agent_b")
    _, client_sec = make_keypair(allowed, "sched")
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    client = ClientCurve.load(client_sec, a_pub)  # default server key: agent a's
    b_key = ClientCurve.load(client_sec, b_pub).server_public

    async def main():
        ctx = zmq.asyncio.Context()
        auth = start_authenticator(ctx, str(allowed))
        try:
            async with running_publisher(a, "h1", curve=ServerCurve.load(str(a_sec), str(
                    allowed)), ctx=ctx, heartbeat_seconds=0.05) as pa, running_publisher(
                    b, "h2", curve=ServerCurve.load(str(b_sec), str(allowed)), ctx=ctx,
                    heartbeat_seconds=0.05) as pb:
                await pa.publish(snapshot_data(1))
                await pb.publish(snapshot_data(2))
                sub = AsyncSubscriber(
                    [source(a), Source(f"ipc://{b}/stream", f"ipc://{b}/request",
                                       server_key=b_key)], curve=client, ctx=ctx)
                await sub.wait_snapshot("h1", timeout=WAIT)
                await sub.wait_snapshot("h2", timeout=WAIT)
                assert sub.hosts["h1"].source == 0 and sub.hosts["h2"].source == 1
                assert sub.binding("h2") == (f"ipc://{b}/stream", b_key)
                # agent b (a valid CURVE peer, but of another source) claims h1
                await pb.xpub.send_multipart(body_frames("h1", pa.epoch, 99, valid(99)))
                await pb.publish(snapshot_data(3))  # after the claim on the same socket
                deadline = time.monotonic() + WAIT
                while sub.hosts["h2"].seq < 2:
                    assert time.monotonic() < deadline
                    await sub.poll(0.2)
                assert sub.latest("h1")["usage"] == {"n": 1}
                assert sub.stats["foreign_source"] == 1
                sub.close()
        finally:
            auth.stop()
            ctx.destroy(linger=0)
    run(main(), timeout=60)


# --- (4) a snapshot's shape is checked before it is accepted ---------------------------

ISSUE_PAYLOAD = {"topology": 5, "usage": [], "config": "x"}

INVALID = [
    (ISSUE_PAYLOAD, "data.schema"),
    ({**valid(), "schema": 2}, "data.schema = 2"),
    ({**valid(), "topology": 5}, "data.topology is a int"),
    ({k: v for k, v in valid().items() if k != "usage"}, "data.usage is missing"),
    ({**valid(), "config": "x"}, "data.config is a str"),
    ({**valid(), "usage": []}, "data.usage is a list"),
    ({**valid(), "topology": {"cells": {}}}, "data.topology.cells is a dict"),
    ({**valid(), "topology": {"resctrl": []}}, "data.topology.resctrl is a list"),
    ({**valid(), "usage": {"threads": [{"cpu": 0}, 3]}}, r"data.usage.threads\[1\] is a int"),
    ({**valid(), "config": {"dedicated_cpus": "0-3"}}, "data.config.dedicated_cpus is a str"),
    ({**valid(), "agent": "x"}, "data.agent is a str"),
    ({**valid(), "host": "h2"}, "data.host = 'h2'"),
    ({**valid(), "seq": 5}, "data.seq = 5"),
]


@pytest.mark.parametrize(("data", "message"), INVALID)
def test_check_snapshot_names_what_is_wrong(data, message):
    body = wire.make_body("snapshot", "h1", "e1", 1, 1.0, data)
    with pytest.raises(wire.WireError, match=message):
        wire.check_snapshot(data, body)


def test_real_snapshot_shape_passes_the_check():
    from hostagent.config import config_from_dict
    from hostagent.probe.host import probe_host
    from hostagent.snapshot import build_snapshot

    sysfs = ROOT / "fixtures/sysfs/xeon-2s-cat/sys"
    topo = probe_host(str(sysfs), str(sysfs / "fs/resctrl"))  # read only
    snap = build_snapshot(topo, config_from_dict({}), [], host="h1", epoch="e1", seq=4,
                          now=1.0)
    snap["agent"] = {"version": "0.1.0", "libvirt": {"uri": "test:///default",
                                                     "connected": True}}
    wire.check_snapshot(snap, wire.make_body("snapshot", "h1", "e1", 4, 1.0, snap))


def test_invalid_snapshots_are_counted_and_skipped(tmp_path):
    ctx = zmq.Context()
    pub = RawPub(ctx, f"ipc://{tmp_path}/s")
    try:
        with Subscriber([f"ipc://{tmp_path}/s"], ctx=ctx) as sub:
            assert pub.subscribed()
            pub.send(body_frames("h1", "e1", 1, valid(1)))
            sub.wait_snapshot("h1", timeout=WAIT)
            for i, (data, _) in enumerate(INVALID):
                pub.send(body_frames("h1", "e1", 2 + i, data))
            pub.send(body_frames("h1", "e2", 1, ISSUE_PAYLOAD))  # invalid: no reset either
            pub.send(body_frames("h1", "e1", 50, valid(50)))
            kinds = []
            deadline = time.monotonic() + WAIT
            while sub.hosts["h1"].seq < 50:
                assert time.monotonic() < deadline, dict(sub.stats)
                kinds += [(u.kind, u.seq) for u in sub.poll(0.2)]
            assert kinds == [("snapshot", 50)]
            assert sub.stats["invalid_snapshots"] == len(INVALID) + 1
            assert sub.stats["epoch_resets"] == 0 and sub.hosts["h1"].epoch == "e1"
            assert sub.latest("h1")["usage"] == {"n": 50}
    finally:
        pub.close()
        ctx.destroy(linger=0)


# --- (5) hostagent watch on schema-invalid data ----------------------------------------

def _watch(tmp_path, *args: str, messages: list[list[bytes]]) -> subprocess.CompletedProcess:
    ctx = zmq.Context()
    pub = RawPub(ctx, f"ipc://{tmp_path}/s")
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "hostagent.cli", "watch", f"ipc://{tmp_path}/s", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        try:
            assert pub.subscribed(timeout=30)
            for frames in messages:
                pub.send(frames)
            out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    finally:
        pub.close()
        ctx.destroy(linger=0)


def test_watch_text_skips_invalid_and_odd_snapshots_without_a_traceback(tmp_path):
    odd = {**valid(), "usage": {"cells": [{"id": 0, "hugepages": [{"size_kib": "big",
                                                                     "free": 1}]}],
                                "caches": [{"id": 0}]}}
    r = _watch(tmp_path, "--count", "1", messages=[
        body_frames("h1", "e1", 1, ISSUE_PAYLOAD),
        body_frames("h1", "e1", 2, odd),
        body_frames("h1", "e1", 3, valid(3)),
    ])
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("h1 seq 2: skipped, unreadable snapshot: ")
    assert lines[1].startswith("h1 seq 3  free: pCPUs -") and len(lines) == 2
    assert "1 invalid snapshot dropped" in r.stderr
    assert "1 unreadable snapshot skipped" in r.stderr
    assert "data.schema" in r.stderr  # the subscriber's warning says what was wrong


def test_watch_json_skips_a_snapshot_json_cannot_carry(tmp_path):
    r = _watch(tmp_path, "--json", "--count", "1", messages=[
        body_frames("h1", "e1", 1, ISSUE_PAYLOAD),
        body_frames("h1", "e1", 2, {**valid(), "usage": {"blob": b"\x00"}}),
        body_frames("h1", "e1", 3, valid(3)),
    ])
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    import json

    docs = [json.loads(line) for line in r.stdout.splitlines()]
    assert [d["usage"] for d in docs] == [{"n": 3}]
    assert "h1 seq 2: skipped, unreadable snapshot: " in r.stderr


def test_show_refuses_odd_snapshots_with_one_line_not_a_traceback(tmp_path):
    ctx = zmq.Context()
    pub = RawPub(ctx, f"ipc://{tmp_path}/s")
    odd = {**valid(), "host": "h1", "epoch": "e1", "seq": 2,
           "config": {"dedicated_cpus": ["x"]}, "usage": {"cells": [{"id": 0}]}}
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "hostagent.cli", "show", "--endpoint",
             f"ipc://{tmp_path}/s", "--timeout", "60"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        try:
            assert pub.subscribed(timeout=30)
            # the issue's payload (with the header keys a reader looks at), then an odd one
            pub.send(body_frames("h1", "e1", 1, {**ISSUE_PAYLOAD, "host": "h1", "seq": 1}))
            pub.send(body_frames("h1", "e1", 2, odd))
            out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    finally:
        pub.close()
        ctx.destroy(linger=0)
    assert proc.returncode == 2 and "Traceback" not in err, err
    assert err.splitlines()[-1].startswith("hostagent: snapshot is missing or has a bad field")
    assert "data.schema" in err  # the issue's payload was dropped by the subscriber
