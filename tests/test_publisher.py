"""publisher: XPUB stream, welcome re-publish, heartbeats, ROUTER requests, CURVE."""

import asyncio

import msgpack
import pytest
import zmq
import zmq.asyncio
from zmq_helpers import run, running_publisher, snapshot_data, source

from hostagent import wire
from hostagent.curve import ClientCurve, ServerCurve, make_keypair, start_authenticator
from hostagent.errors import HostagentError
from hostagent.subscriber import AsyncSubscriber, async_request


async def _recv(sock, timeout=5.0):
    return await asyncio.wait_for(sock.recv_multipart(), timeout)


async def _sub(ctx, tmp, topic=b"hostagent."):
    s = ctx.socket(zmq.SUB)
    s.linger = 0
    s.subscribe(topic)
    s.connect(f"ipc://{tmp}/stream")
    return s


async def _until(sock, kind, timeout=5.0):
    while True:
        body = wire.decode_stream(await _recv(sock, timeout))
        if body["kind"] == kind:
            return body


def test_late_subscriber_gets_latest_snapshot_at_once(tmp_path):
    async def main():
        async with running_publisher(tmp_path, heartbeat_seconds=30) as pub:
            await pub.publish(snapshot_data(1))
            await pub.publish(snapshot_data(2))
            sub = await _sub(pub.ctx, tmp_path)
            body = await _until(sub, "snapshot")  # no heartbeat for 30 s: it is the welcome
            assert body["seq"] == 2 and body["data"]["usage"] == {"n": 2}
            assert body["data"]["seq"] == 2 and body["data"]["epoch"] == "ep1"
            assert body["data"]["host"] == "h1"
            assert pub.subscribers == 1 and pub.stats["welcome_republishes"] == 1
            sub.close()
    run(main())


def test_other_hosts_subscription_gets_no_welcome(tmp_path):
    async def main():
        async with running_publisher(tmp_path, heartbeat_seconds=30) as pub:
            await pub.publish(snapshot_data())
            other = await _sub(pub.ctx, tmp_path, wire.topic("h10"))
            mine = await _sub(pub.ctx, tmp_path, wire.topic("h1"))
            assert (await _until(mine, "snapshot"))["seq"] == 1
            with pytest.raises(asyncio.TimeoutError):
                await _recv(other, 0.2)
            assert pub.stats["other_subscriptions"] == 1 and pub.subscribers == 1
            other.close()
            mine.close()
    run(main())


def test_many_subscribers_arriving_together_cause_few_republishes(tmp_path):
    async def main():
        async with running_publisher(tmp_path, heartbeat_seconds=30, coalesce_ms=100) as pub:
            await pub.publish(snapshot_data())
            subs = [await _sub(pub.ctx, tmp_path) for _ in range(20)]
            for s in subs:
                assert (await _until(s, "snapshot"))["seq"] == 1
            assert pub.subscribers == 20
            assert pub.stats["welcome_republishes"] < 20
            for s in subs:
                s.close()
            for _ in range(100):
                if pub.subscribers == 0:
                    break
                await asyncio.sleep(0.02)
            assert pub.subscribers == 0
    run(main())


def test_heartbeat_carries_current_seq_when_idle(tmp_path):
    async def main():
        async with running_publisher(tmp_path, heartbeat_seconds=0.05) as pub:
            await pub.publish(snapshot_data())
            sub = await _sub(pub.ctx, tmp_path)
            hb = await _until(sub, "heartbeat")
            assert hb["seq"] == 1 and hb["data"] is None and hb["epoch"] == "ep1"
            sub.close()
    run(main())


def test_slow_subscriber_never_blocks_publishing(tmp_path):
    async def main():
        async with running_publisher(tmp_path, heartbeat_seconds=30, send_hwm=5) as pub:
            stuck = pub.ctx.socket(zmq.SUB)
            stuck.rcvhwm = 1
            stuck.subscribe(b"")
            stuck.connect(f"ipc://{tmp_path}/stream")
            await pub.publish(snapshot_data())
            await asyncio.sleep(0.1)
            big = {"pad": "x" * 50_000}
            for _ in range(500):  # ~25 MB that nobody reads
                await asyncio.wait_for(pub.publish(big), 2.0)
            assert pub.seq == 501
            fresh = await _sub(pub.ctx, tmp_path)
            assert (await _until(fresh, "snapshot"))["seq"] == 501
            stuck.close()
            fresh.close()
    run(main())


# --- requests --------------------------------------------------------------------------

def _dealer(ctx, tmp):
    d = ctx.socket(zmq.DEALER)
    d.linger = 0
    d.connect(f"ipc://{tmp}/request")
    return d


async def _ask(d, payload, timeout=5.0):
    await d.send(payload)
    return wire.decode_reply(await asyncio.wait_for(d.recv(), timeout))


def test_snapshot_request_and_error_replies(tmp_path):
    async def main():
        async with running_publisher(tmp_path) as pub:
            d = _dealer(pub.ctx, tmp_path)
            rep = await _ask(d, wire.pack({"op": "snapshot"}))
            assert rep == {"v": 1, "ok": False, "error": "no snapshot yet: the agent is starting"}
            await pub.publish(snapshot_data(7))
            rep = await _ask(d, wire.pack({"op": "snapshot"}))
            assert rep["ok"] and rep["kind"] == "snapshot" and rep["seq"] == 1
            assert rep["data"]["usage"] == {"n": 7}
            cases = [
                (b"\xc1\xc1garbage", "bad request: not valid msgpack"),
                (wire.pack(["op", "snapshot"]), "not a map"),
                (wire.pack({"op": 12}), "request.op = 12"),
                (wire.pack({"op": "nope"}), "unknown op 'nope' (known: snapshot)"),
                (wire.pack({"op": "snapshot", "x": 1}), "takes no fields"),
                (msgpack.packb({1: "snapshot"}), "map key"),
                (wire.pack({"op": "snapshot", "pad": "y" * 100_000}), "over the limit of 65536"),
                (msgpack.packb(msgpack.ExtType(1, b"a")), "ext types"),
            ]
            for payload, needle in cases:
                rep = await _ask(d, payload)
                assert not rep["ok"] and needle in rep["error"], (payload[:20], rep)
            assert pub.stats["bad_requests"] == len(cases)
            rep = await _ask(d, wire.pack({"op": "snapshot"}))  # still serving
            assert rep["ok"]
            d.close()
    run(main())


def test_snapshot_reply_is_packed_once_per_snapshot(tmp_path):
    """Many peers asking for the same seq share one packed reply (and so one buffer in
    their queues); a new snapshot gets a new one."""
    async def main():
        async with running_publisher(tmp_path) as pub:
            await pub.publish(snapshot_data(1))
            ask = [b"peer", wire.pack({"op": "snapshot"})]
            first = (await pub.answer(list(ask)))[-1]
            second = (await pub.answer(list(ask)))[-1]
            assert first is second
            assert wire.decode_reply(first)["seq"] == 1
            await pub.publish(snapshot_data(2))
            third = (await pub.answer(list(ask)))[-1]
            assert third is not first
            rep = wire.decode_reply(third)
            assert rep["seq"] == 2 and rep["data"]["usage"] == {"n": 2}
    run(main())


def test_req_socket_envelope_and_oversized_frame_disconnects_only_that_peer(tmp_path):
    async def main():
        async with running_publisher(tmp_path, max_message_bytes=128 * 1024) as pub:
            await pub.publish(snapshot_data())
            req = pub.ctx.socket(zmq.REQ)
            req.linger = 0
            req.connect(f"ipc://{tmp_path}/request")
            await req.send(wire.pack({"op": "snapshot"}))
            assert wire.decode_reply(await asyncio.wait_for(req.recv(), 5))["seq"] == 1
            hog = _dealer(pub.ctx, tmp_path)
            await hog.send(b"\x00" * 200_000)  # over MAXMSGSIZE: libzmq drops the peer
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(hog.recv(), 0.3)
            await req.send(wire.pack({"op": "snapshot"}))
            assert wire.decode_reply(await asyncio.wait_for(req.recv(), 5))["ok"]
            req.close()
            hog.close()
    run(main())


def test_registered_handlers_errors_are_replies(tmp_path):
    async def main():
        async with running_publisher(tmp_path) as pub:
            async def echo(req):
                return {"echo": req.get("x")}

            async def refuse(req):
                raise HostagentError("request.x: must be positive")

            async def crash(req):
                raise RuntimeError("boom")

            pub.register("echo", echo)
            pub.register("refuse", refuse)
            pub.register("crash", crash)
            d = _dealer(pub.ctx, tmp_path)
            assert (await _ask(d, wire.pack({"op": "echo", "x": [1]})))["echo"] == [1]
            rep = await _ask(d, wire.pack({"op": "refuse"}))
            assert rep["error"] == "request.x: must be positive"
            rep = await _ask(d, wire.pack({"op": "crash"}))
            assert rep["error"] == "internal error: RuntimeError: boom"
            rep = await _ask(d, wire.pack({"op": "zzz"}))
            assert "known: crash, echo, refuse, snapshot" in rep["error"]
            assert pub.stats["internal_errors"] == 1 and pub.stats["failed_requests"] == 1
            d.close()
    run(main())


def test_bind_failure_names_the_endpoint(tmp_path):
    ctx = zmq.asyncio.Context()
    from hostagent.config import PublisherConfig
    from hostagent.publisher import Publisher

    pub = Publisher(ctx, PublisherConfig(endpoints=("tcp://127.0.0.1:x",),
                                         request_endpoints=()), "h", "e")
    with pytest.raises(HostagentError, match="cannot bind stream endpoint tcp://127.0.0.1:x"):
        pub.bind()
    pub.close()
    ctx.term()


# --- CURVE -----------------------------------------------------------------------------

def test_curve_allowed_client_receives_and_unknown_client_gets_nothing(tmp_path):
    keys, allowed = tmp_path / "keys", tmp_path / "allowed"
    allowed.mkdir()
    srv_pub, srv_sec = make_keypair(keys, "server")
    good_pub, good_sec = make_keypair(allowed, "good")
    _, bad_sec = make_keypair(keys, "bad")
    server = ServerCurve.load(str(srv_sec), str(allowed))
    good = ClientCurve.load(good_sec, srv_pub)
    bad = ClientCurve.load(bad_sec, srv_pub)

    async def main():
        ctx = zmq.asyncio.Context()
        auth = start_authenticator(ctx, str(allowed))
        try:
            async with running_publisher(tmp_path, curve=server, ctx=ctx,
                                         heartbeat_seconds=0.05) as pub:
                await pub.publish(snapshot_data(3))
                ok = AsyncSubscriber([source(tmp_path)], curve=good, ctx=ctx)
                nope = AsyncSubscriber([source(tmp_path)], curve=bad, ctx=ctx)
                plain = AsyncSubscriber([source(tmp_path)], ctx=ctx)
                snap = await ok.wait_snapshot("h1", timeout=5)
                assert snap["usage"] == {"n": 3}
                # the allowed client keeps getting heartbeats; the others get nothing at all
                await ok.poll(0.3)
                assert ok.stats["heartbeats"] > 0
                assert await nope.poll(0.3) == [] and await plain.poll(0.01) == []
                assert nope.hosts == {} and plain.hosts == {}
                rep = await async_request(f"ipc://{tmp_path}/request", {"op": "snapshot"},
                                          curve=good, ctx=ctx)
                assert rep["ok"]
                with pytest.raises(HostagentError, match="no reply"):
                    await async_request(f"ipc://{tmp_path}/request", {"op": "snapshot"},
                                        curve=bad, ctx=ctx, timeout=0.3)
                for s in (ok, nope, plain):
                    s.close()
        finally:
            auth.stop()
            ctx.destroy(linger=0)
    run(main())


def test_keypair_files(tmp_path):
    import os
    import stat

    pub, sec = make_keypair(tmp_path / "k", "agent")
    assert stat.S_IMODE(os.stat(sec).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "k").st_mode) == 0o700
    with pytest.raises(HostagentError, match="already exists"):
        make_keypair(tmp_path / "k", "agent")
    with pytest.raises(HostagentError, match="plain file name"):
        make_keypair(tmp_path / "k", "../x")
    from hostagent.errors import ConfigError

    with pytest.raises(ConfigError, match="has no secret-key"):
        ServerCurve.load(str(pub), str(tmp_path))
    with pytest.raises(ConfigError, match="allowed-clients directory does not exist"):
        ServerCurve.load(str(sec), str(tmp_path / "none"))
    with pytest.raises(ConfigError, match="no such key file"):
        ServerCurve.load(str(tmp_path / "none.key_secret"), str(tmp_path))
    junk = tmp_path / "junk.key_secret"
    junk.write_text("hello\n")
    with pytest.raises(ConfigError, match="junk.key_secret"):
        ServerCurve.load(str(junk), str(tmp_path))


def test_publish_sends_the_parts_packed_before(tmp_path):
    async def main():
        async with running_publisher(tmp_path, heartbeat_seconds=30) as pub:
            usage = {"threads": [{"cpu": i, "guest": None} for i in range(3000)]}
            data = {"schema": 1, "topology": {"cells": []}, "usage": usage}
            raw = pub.pack_part("usage", usage)
            assert raw == wire.pack(usage) and pub.pack_part("usage", usage) is raw
            await pub.publish(data)
            body = wire.decode_stream(pub._latest_frames)
            assert body["data"] == {**data, "host": "h1", "epoch": pub.epoch, "seq": 1,
                                    "time": body["time"]}
            assert "enc" in wire.unpack(pub._latest_frames[1])
    run(main())
