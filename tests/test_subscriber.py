"""subscriber: the per-host state machine, gap fetch, many sources, sync and asyncio."""

import asyncio
import threading

import pytest
from zmq_helpers import run, running_publisher, snapshot_data, source

from hostagent import wire
from hostagent.errors import HostagentError
from hostagent.subscriber import (
    AsyncSubscriber,
    Source,
    Subscriber,
    SubscriberState,
    request,
)


def _snap(seq, epoch="e1", host="h1"):
    return wire.make_body("snapshot", host, epoch, seq, 1.0, {**snapshot_data(), "seq": seq})


def _hb(seq, epoch="e1", host="h1"):
    return wire.make_body("heartbeat", host, epoch, seq, 1.0, None)


def test_state_drops_stale_and_duplicate_snapshots():
    st = SubscriberState()
    assert st.feed(_snap(3), 0.0).kind == "snapshot"
    assert st.feed(_snap(3), 0.1) is None  # a re-publish for a newcomer
    assert st.feed(_snap(2), 0.2) is None
    upd = st.feed(_snap(4), 0.3)
    assert upd.seq == 4 and st.hosts["h1"].snapshot["seq"] == 4
    assert st.stats["duplicates"] == 2 and st.stats["gaps"] == 0


def test_state_counts_gaps_and_resets_on_a_new_epoch():
    st = SubscriberState()
    st.feed(_snap(1), 0)
    st.feed(_snap(5), 0)  # full snapshots: a gap needs nothing more
    assert st.hosts["h1"].seq == 5 and st.stats["gaps"] == 1
    upd = st.feed(_snap(1, epoch="e2"), 0)  # the agent restarted
    assert upd.kind == "snapshot" and upd.epoch == "e2" and st.hosts["h1"].seq == 1
    assert st.hosts["h1"].resets == 1


def test_heartbeat_above_the_held_seq_marks_the_host_stale_once():
    st = SubscriberState()
    st.feed(_snap(2), 0)
    assert st.feed(_hb(2), 0) is None
    upd = st.feed(_hb(3), 0)
    assert upd.kind == "stale" and upd.seq == 2 and st.hosts["h1"].stale
    assert st.feed(_hb(3), 0) is None  # reported once
    st.feed(_snap(3), 0)
    assert not st.hosts["h1"].stale
    # a new agent that has published nothing yet (seq 0) is not stale
    assert st.feed(_hb(0, epoch="e9", host="h2"), 0) is None


def test_liveness_from_any_message():
    st = SubscriberState(dead_after=1.0)
    st.feed(_snap(1), 10.0)
    st.feed(_hb(1), 10.5)
    # a lower bound since expiry stopped walking every host on each poll (issue 15):
    # h1 could have died at 11.0 had the heartbeat not come
    assert 0.5 <= st.next_expiry(10.5) <= 1.0
    assert st.expire(11.4) == []
    dead = st.expire(11.6)
    assert [(u.kind, u.host) for u in dead] == [("dead", "h1")]
    assert st.expire(20) == [] and not st.hosts["h1"].alive
    st.feed(_hb(1), 21.0)
    assert st.hosts["h1"].alive


def test_source_parsing():
    assert Source.parse("tcp://a:1,tcp://a:2") == Source("tcp://a:1", "tcp://a:2")
    assert Source.parse("ipc:///x") == Source("ipc:///x", None)
    for bad in ("a:1", "tcp://a:1,", "tcp://a:1,tcp://a:2,tcp://a:3", "tcp://a:1,udp://b"):
        with pytest.raises(HostagentError):
            Source.parse(bad)
    with pytest.raises(HostagentError, match="no endpoint"):
        Subscriber([])


def test_async_gap_fetches_a_fresh_snapshot_through_the_request_endpoint(tmp_path):
    async def main():
        async with running_publisher(tmp_path, heartbeat_seconds=0.05) as pub:
            await pub.publish(snapshot_data(1))
            sub = AsyncSubscriber([source(tmp_path)])
            await sub.wait_snapshot("h1")
            real_send = pub._send

            async def lose(frames):  # this snapshot never reaches anyone
                pub._last_send = 0.0

            pub._send = lose
            await pub.publish(snapshot_data(2))
            pub._send = real_send
            kinds = []
            while sub.hosts["h1"].seq < 2:
                kinds += [u.kind for u in await sub.poll(2.0)]
            assert kinds == ["stale", "snapshot"]
            assert sub.latest("h1")["usage"] == {"n": 2}
            assert sub.stats["fetches"] == 1 and sub.stats["stale"] == 1
            sub.close()
    run(main())


def test_bad_messages_are_counted_and_dropped(tmp_path):
    async def main():
        async with running_publisher(tmp_path, heartbeat_seconds=30) as pub:
            sub = AsyncSubscriber([source(tmp_path)])
            await asyncio.sleep(0.1)
            for frames in ([b"hostagent.h1.", b"\xc1"], [b"hostagent.h1."],
                           [b"hostagent.h1.", wire.pack(_snap(1, host="h2"))]):
                await pub.xpub.send_multipart(frames)
            await pub.publish(snapshot_data(5))
            await sub.wait_snapshot("h1")
            assert sub.stats["bad_messages"] == 3 and list(sub.hosts) == ["h1"]
            sub.close()
    run(main())


def test_sync_subscriber_many_sources_and_host_filter(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    ready = threading.Event()
    done = threading.Event()

    def agents():
        async def main():
            async with running_publisher(a, "alpha", heartbeat_seconds=0.05) as pa, \
                    running_publisher(b, "beta", heartbeat_seconds=0.05) as pb:
                await pa.publish(snapshot_data(1))
                await pb.publish(snapshot_data(2))
                ready.set()
                while not done.is_set():
                    await asyncio.sleep(0.02)
        asyncio.run(main())

    t = threading.Thread(target=agents)
    t.start()
    try:
        assert ready.wait(10)
        with Subscriber([source(a), source(b)]) as sub:
            assert sub.wait_snapshot("alpha")["usage"] == {"n": 1}
            assert sub.wait_snapshot("beta")["usage"] == {"n": 2}
            assert sub.alive("alpha") and sub.hosts["beta"].source == 1
        with Subscriber([source(a), source(b)], hosts=["beta"]) as only:
            only.wait_snapshot("beta")
            only.poll(0.2)
            assert list(only.hosts) == ["beta"]
        rep = request(f"ipc://{a}/request", {"op": "snapshot"})
        assert rep["ok"] and rep["host"] == "alpha"
        with pytest.raises(HostagentError, match="no reply within 0.2 s"):
            request(f"ipc://{tmp_path}/nobody", {"op": "snapshot"}, timeout=0.2)
    finally:
        done.set()
        t.join(10)


def test_dead_host_is_reported_when_the_agent_stops(tmp_path):
    async def main():
        sub = None
        async with running_publisher(tmp_path, heartbeat_seconds=0.05) as pub:
            await pub.publish(snapshot_data())
            sub = AsyncSubscriber([source(tmp_path)], dead_after=0.3)
            await sub.wait_snapshot("h1")
        kinds = []
        while "dead" not in kinds:
            kinds += [u.kind for u in await sub.poll(2.0)]
        assert not sub.alive("h1") and sub.latest("h1") is not None
        sub.close()
    run(main())


def test_subscriber_maxmsgsize_drops_oversized_snapshots(tmp_path):
    async def main():
        async with running_publisher(tmp_path, heartbeat_seconds=30) as pub:
            small = AsyncSubscriber([source(tmp_path)], max_message_bytes=4096)
            big = AsyncSubscriber([source(tmp_path)])
            await asyncio.sleep(0.1)
            await pub.publish({**snapshot_data(), "pad": "x" * 10_000})
            await big.wait_snapshot("h1")
            assert await small.poll(0.3) == [] and small.latest("h1") is None
            assert small.stats["snapshots"] == 0  # (small heartbeats may get through)
            small.close()
            big.close()
    run(main())



def test_unchanged_topology_is_reused_and_snapshots_stay_full(tmp_path):
    topo = {"cpus": [{"id": i, "siblings": [i, i ^ 1]} for i in range(2000)]}

    def data(n):
        return {"schema": 1, "topology": topo, "config": {},
                "usage": {"n": n, "pad": list(range(3000))}}

    async def main():
        async with running_publisher(tmp_path, heartbeat_seconds=30) as pub:
            sub = AsyncSubscriber([source(tmp_path)])
            await pub.publish(data(1))
            first = await sub.wait_snapshot("h1")
            await pub.publish(data(2))
            while sub.hosts["h1"].seq < 2:
                await sub.poll(2.0)
            second = sub.latest("h1")
            assert "enc" in wire.unpack(pub._latest_frames[1])  # travelled compressed
            assert wire.decode_stream(pub._latest_frames)["data"] == second  # full document
            assert second["usage"]["n"] == 2 and second["topology"] == topo
            assert second["topology"] is first["topology"]  # reused, not decoded again
            # a plain uncompressed body is still accepted
            await pub.xpub.send_multipart([wire.topic("h1"), wire.pack(
                wire.make_body("snapshot", "h1", pub.epoch, 3, 1.0, data(3)))])
            while sub.hosts["h1"].seq < 3:
                await sub.poll(2.0)
            assert sub.latest("h1")["usage"]["n"] == 3
            sub.close()
    run(main())
