"""The delta stream (issue 15 item 6, docs/wire.md §12): ``hostagent-delta.<host>.``
carries a full snapshot on join and after a gap, then deltas; a subscriber with
``deltas=True`` rebuilds exactly the snapshot the full stream carries, refuses hostile
deltas without changing what it holds, and heals a gap with a full snapshot.
"""

from __future__ import annotations

import random
import time

import pytest
import zmq
from daemon_helpers import running_agent
from forward_helpers import ForwardProc
from libvirt_helpers import domain_xml, probe_fixture

from hostagent import wire
from hostagent.config import Config
from hostagent.snapshot import build_snapshot
from hostagent.subscriber import Subscriber, SubscriberState

WAIT = 20.0
BODY = {"host": "h1", "epoch": "e1", "seq": 2, "time": 2.0}


def test_make_delta_then_apply_gives_the_new_lists():
    """Random list edits (removals, insertions, replacements, equal copies, swaps): the
    delta applied to the old lists gives the new ones, through msgpack."""
    rng = random.Random(5)
    for _ in range(2000):
        pool = [{"x": n} for n in range(30)]
        old = rng.sample(pool, rng.randint(0, 12))
        new = list(old)
        for _ in range(rng.randint(0, 4)):
            op = rng.random()
            if op < 0.3 and new:
                new.pop(rng.randrange(len(new)))
            elif op < 0.6:
                new.insert(rng.randint(0, len(new)), {"x": rng.randint(100, 200)})
            elif op < 0.8 and new:
                new[rng.randrange(len(new))] = {"x": rng.randint(100, 200)}
            elif new:
                a, b = rng.randrange(len(new)), rng.randrange(len(new))
                new[a], new[b] = new[b], new[a]
            if rng.random() < 0.2 and new:
                i = rng.randrange(len(new))
                new[i] = dict(new[i])
        delta = wire.unpack(wire.pack(wire.make_delta({"usage": {"l": old}},
                                                      {"usage": {"l": new}})))
        assert wire.apply_delta({"usage": {"l": old}}, delta, BODY)["usage"]["l"] == new


def full_snapshot(seq: int = 1) -> dict:
    snap = build_snapshot(probe_fixture("xeon-2s-cat"), Config(), [], host="h1",
                          epoch="e1", seq=seq, now=float(seq))
    return wire.unpack(wire.pack(snap))


def fed_state() -> tuple[SubscriberState, dict]:
    st = SubscriberState()
    snap = full_snapshot()
    body = wire.make_body("snapshot", "h1", "e1", 1, 1.0, snap)
    assert st.feed(body, time.monotonic(), 0).kind == "snapshot"
    return st, snap


def delta_body(delta: dict, seq: int = 2) -> dict:
    return wire.make_body("delta", "h1", "e1", seq, float(seq), delta)


def test_a_good_delta_is_applied_and_shares_the_rest():
    st, snap = fed_state()
    threads = snap["usage"]["threads"]
    changed = {**threads[3], "guest": "web"}
    upd = st.feed(delta_body({"parts": {"usage": {"splice": {"threads": [[3, 1, [changed]]]},
                                                  "set": {"floating_vcpus": 2}}}}),
                  time.monotonic(), 0, size=100)
    assert upd.kind == "snapshot" and upd.seq == 2
    new = st.hosts["h1"].snapshot
    assert new["usage"]["threads"][3] == changed and new["usage"]["floating_vcpus"] == 2
    assert new["seq"] == 2 and new["time"] == 2.0
    assert new["topology"] is snap["topology"]  # unchanged parts shared
    assert snap["usage"]["threads"][3] is threads[3]  # the held one not changed
    assert st.stats["deltas"] == 1 and not st.heal


HOSTILE = [
    ({"parts": {"usage": {"splice": {"threads": [[49, 0, []]]}}}}, "outside the list"),
    ({"parts": {"usage": {"splice": {"threads": [[47, 2, []]]}}}}, "outside the list"),
    ({"parts": {"usage": {"splice": {"threads": [[-1, 0, []]]}}}}, "outside the list"),
    ({"parts": {"usage": {"splice": {"threads": [[0, 0]]}}}}, "must be \\[start, delete"),
    ({"parts": {"usage": {"splice": {"threads": 5}}}}, "not a list"),
    ({"parts": {"usage": {"splice": {"nothing": [[0, 0, []]]}}}}, "held value is not a list"),
    ({"parts": {"topology": {"set": {}}}}, "only usage can be patched"),
    ({"parts": {"usage": {"set": {"threads": 5}}}}, "data.usage.threads is a int"),
    ({"parts": {"usage": {"splice": {"threads": [[0, 1, [7]]]}}}}, "threads\\[0\\] is a int"),
    ({"set": {"seq": 99}}, "the message's own field"),
    ({"set": {"schema": 2}}, "only schema 1"),
    ({"del": ["nope"]}, "not a key of the held snapshot"),
    ({"del": ["usage"]}, "data.usage is missing"),
    ({"patch": {}}, "unknown keys"),
]


@pytest.mark.parametrize(("delta", "why"), HOSTILE)
def test_a_hostile_delta_changes_nothing_and_asks_for_a_full_snapshot(delta, why, caplog):
    st, snap = fed_state()
    upd = st.feed(delta_body(delta), time.monotonic(), 0, size=100)
    assert upd.kind == "stale"
    assert st.hosts["h1"].snapshot is snap and st.hosts["h1"].seq == 1
    assert st.stats["invalid_deltas"] == 1 and st.heal == {(0, "h1")}
    assert any(r.levelname == "WARNING" and __import__("re").search(why, r.getMessage())
               for r in caplog.records), [r.getMessage() for r in caplog.records]


def test_gaps_unknown_hosts_and_the_byte_budget_ask_for_a_full_snapshot():
    st, snap = fed_state()
    assert st.feed(delta_body({}, seq=3), time.monotonic(), 0).kind == "stale"  # 2 missed
    assert st.hosts["h1"].snapshot is snap and st.heal == {(0, "h1")}
    st2 = SubscriberState()  # nothing held: nothing to apply it to
    assert st2.feed(delta_body({}), time.monotonic(), 0) is None
    assert st2.hosts == {} and st2.heal == {(0, "h1")} and st2.stats["unusable_deltas"] == 1
    st3, _ = fed_state()
    st3.max_delta_bytes = 1000
    assert st3.feed(delta_body({}), time.monotonic(), 0, size=600).kind == "snapshot"
    assert st3.feed(delta_body({}, 3), time.monotonic(), 0, size=600).kind == "stale"
    full = wire.make_body("snapshot", "h1", "e1", 4, 4.0, full_snapshot(4))
    assert st3.feed(full, time.monotonic(), 0).kind == "snapshot"  # healed: budget anew
    assert st3.hosts["h1"].delta_bytes == 0 and not st3.heal


def test_decode_refuses_deltas_off_the_delta_stream_and_compressed_ones():
    body = wire.pack(delta_body({}))
    with pytest.raises(wire.WireError, match="body.kind = 'delta': must be one of snapshot, "
                       "heartbeat$"):
        wire.decode_stream([wire.topic("h1"), body])
    assert wire.decode_stream([wire.delta_topic("h1"), body])["kind"] == "delta"
    with pytest.raises(wire.WireError, match="deltas are never compressed"):
        wire.decode_stream([wire.delta_topic("h1"),
                            wire.pack({**delta_body({}), "data": b"x", "enc": "zlib"})])
    with pytest.raises(wire.WireError, match="of a delta: must be at least 2"):
        wire.decode_stream([wire.delta_topic("h1"), wire.pack(delta_body({}, seq=1))])


def test_a_gap_is_healed_by_asking_the_agent_again(tmp_path):
    """A scripted agent (a bare XPUB) sends a full snapshot, a delta, then a delta after a
    missed one: the subscriber subscribes to that host's delta topic again (the agent's
    welcome), and holds the full snapshot the agent sends in answer."""
    ctx = zmq.Context.instance()
    xpub = ctx.socket(zmq.XPUB)
    xpub.linger = 0
    xpub.setsockopt(zmq.XPUB_VERBOSER, 1)
    ep = f"ipc://{tmp_path}/a"
    xpub.bind(ep)
    try:
        with Subscriber([ep], deltas=True) as sub:
            assert xpub.poll(WAIT * 1000) and xpub.recv() == b"\x01" + wire.DELTA_PREFIX
            snap = full_snapshot()
            xpub.send_multipart([wire.delta_topic("h1"), wire.pack(
                wire.make_body("snapshot", "h1", "e1", 1, 1.0, snap))])
            xpub.send_multipart([wire.delta_topic("h1"), wire.pack(delta_body(
                {"parts": {"usage": {"set": {"floating_vcpus": 3}}}}))])
            deadline = time.monotonic() + WAIT
            while sub.hosts.get("h1") is None or sub.hosts["h1"].seq < 2:
                assert time.monotonic() < deadline
                sub.poll(0.2)
            assert sub.latest("h1")["usage"]["floating_vcpus"] == 3
            xpub.send_multipart([wire.delta_topic("h1"), wire.pack(delta_body({}, seq=4))])
            asked = []
            while wire.delta_topic("h1") not in asked:
                assert time.monotonic() < deadline
                sub.poll(0.2)
                while xpub.poll(0):
                    msg = xpub.recv()
                    if msg[:1] == b"\x01":
                        asked.append(msg[1:])
            assert sub.stats["heal_requests"] == 1 and sub.hosts["h1"].stale
            xpub.send_multipart([wire.delta_topic("h1"), wire.pack(
                wire.make_body("snapshot", "h1", "e1", 4, 4.0, full_snapshot(4)))])
            while sub.hosts["h1"].seq < 4:
                assert time.monotonic() < deadline
                sub.poll(0.2)
            assert not sub.hosts["h1"].stale and sub.latest("h1")["seq"] == 4
    finally:
        xpub.close(linger=0)


def test_a_real_agent_through_the_forwarder_deltas_equal_the_full_stream():
    """A real agent, guests started and stopped: a delta subscriber (through the
    forwarder) holds, for every seq, exactly what a full-stream subscriber holds; the
    agent sent deltas. (> 2 s: an agent and a forwarder process.)"""
    with running_agent() as d:
        fwd = ForwardProc([d.stream])
        try:
            fwd.start()
            with d.subscriber() as full, Subscriber([fwd.stream], deltas=True) as delta:
                full.wait_snapshot("testhost", timeout=WAIT)
                delta.wait_snapshot("testhost", timeout=WAIT)
                seen: dict[int, dict] = {}
                for i in range(4):
                    xml = domain_xml(f"g{i}", vcpus=2, vcpupin={0: str(2 + i), 1: str(26 + i)})
                    assert d.request({"op": "test-domain", "action": "create",
                                      "xml": xml})["ok"]
                    if i == 2:
                        assert d.request({"op": "test-domain", "action": "destroy",
                                          "name": "g0"})["ok"]
                deadline = time.monotonic() + WAIT
                target = None
                while target is None or delta.hosts["testhost"].seq < target:
                    assert time.monotonic() < deadline, (target, delta.stats)
                    for upd in full.poll(0.05):
                        if upd.kind == "snapshot":
                            seen[upd.seq] = upd.snapshot
                    for upd in delta.poll(0.05):
                        if upd.kind == "snapshot" and upd.seq in seen:
                            assert upd.snapshot == seen[upd.seq]
                    last = full.latest("testhost")
                    if len(last["usage"]["guests"]) == 3:
                        target = last["seq"]
                assert delta.latest("testhost") == full.latest("testhost")
                assert delta.stats["deltas"] >= 1, delta.stats
                assert delta.stats["invalid_deltas"] == 0 and delta.stats["bad_messages"] == 0
            assert fwd.stop() == 0
        finally:
            fwd.close()


class WalkCountingDict(dict):
    """A hosts dict that counts how often all its values are walked."""

    walks = 0

    def values(self):
        self.walks += 1
        return super().values()


def test_polling_does_not_walk_every_host():
    """At 10,000 hosts the subscriber's liveness check walked every host on every poll
    (the bench's first run: 40 % of the scheduler's CPU). Now it walks them only when a
    host may have died."""
    hosts = WalkCountingDict()
    st = SubscriberState(dead_after=5.0, hosts=hosts)
    for i in range(100):
        st.feed(wire.make_body("heartbeat", f"h{i}", "e", 0, 1.0, None), 10.0 + i * 0.01)
    for k in range(1000):  # polls within the next 4 seconds
        assert st.expire(11.0 + k * 0.004) == []
        assert st.next_expiry(11.0 + k * 0.004) is not None
    assert hosts.walks == 0
    assert [u.host for u in st.expire(15.005)] == ["h0"] and hosts.walks == 1
    assert st.expire(15.006) == [] and hosts.walks == 1  # h1 is due at 15.01


def test_hosts_of_one_shape_share_decoded_parts_and_the_table_is_bounded():
    """Two hosts with the same topology bytes hold one decoded topology (and equal usage
    elements are one object); the values equal a plain decode; the shared table starts
    again empty when full."""
    shared = wire.SharedDecoded(max_entries=1000)
    got = {}
    for host in ("h1", "h2"):
        snap = {**full_snapshot(), "host": host}
        frames = wire.encode_stream(wire.make_body("snapshot", host, "e1", 1, 1.0, snap))
        assert "enc" in wire.unpack(frames[1])  # compressed: the caches are used
        got[host] = wire.decode_stream(frames, cache=wire.DecodeCache(shared=shared))["data"]
        assert got[host] == wire.decode_stream(frames)["data"]
    assert got["h1"]["topology"] is got["h2"]["topology"]
    assert got["h1"]["usage"]["threads"][5] is got["h2"]["usage"]["threads"][5]
    assert shared.hits > 0 and 0 < len(shared.values) <= 1000
    small = wire.SharedDecoded(max_entries=3)
    for i in range(10):
        small.put(bytes([i]) * wire.SHARED_MIN_BYTES, i)
    assert len(small.values) <= 3 and small.resets == 3


def test_an_overloaded_poll_still_returns(tmp_path):
    """``poll`` read every queued message before returning: a scheduler receiving faster
    than it decodes never got out of ``poll`` (the fleet bench at 10,000 hosts on a busy
    machine). Now one turn reads at most ``POLL_BATCH`` messages per source."""
    from hostagent.subscriber import POLL_BATCH

    ctx = zmq.Context.instance()
    xpub = ctx.socket(zmq.XPUB)
    xpub.linger = 0
    xpub.sndhwm = 0
    ep = f"ipc://{tmp_path}/flood"
    xpub.bind(ep)
    try:
        with Subscriber([ep], rcvhwm=0) as sub:
            assert xpub.poll(WAIT * 1000)
            xpub.recv()
            total = 3 * POLL_BATCH
            for i in range(total):
                xpub.send_multipart([wire.topic("h1"), wire.pack(
                    wire.make_body("heartbeat", "h1", "e1", 0, float(i), None))])
            steps = []
            deadline = time.monotonic() + WAIT
            while sub.stats["heartbeats"] < total:
                assert time.monotonic() < deadline
                before = sub.stats["heartbeats"]
                sub.poll(0)
                steps.append(sub.stats["heartbeats"] - before)
            assert max(steps) <= POLL_BATCH and len([s for s in steps if s]) >= 3
    finally:
        xpub.close(linger=0)


def test_a_scheduler_with_its_own_copy_need_not_hold_snapshots():
    """``keep_snapshots=False``: the snapshot comes in its update and is not held (a
    ``Fleet`` keeps its own compact copy); seq, duplicates and staleness work as before."""
    from hostagent.errors import HostagentError

    st = SubscriberState(keep_snapshots=False)
    snap = full_snapshot()
    upd = st.feed(wire.make_body("snapshot", "h1", "e1", 1, 1.0, snap), 1.0, 0)
    assert upd.kind == "snapshot" and upd.snapshot is snap
    assert st.hosts["h1"].snapshot is None and st.hosts["h1"].seq == 1
    assert st.feed(wire.make_body("snapshot", "h1", "e1", 1, 1.0, snap), 1.0, 0) is None
    hb = st.feed(wire.make_body("heartbeat", "h1", "e1", 3, 1.0, None), 1.0, 0)
    assert hb.kind == "stale"
    with pytest.raises(HostagentError, match="deltas=True needs keep_snapshots=True"):
        Subscriber(["ipc:///nonexistent"], deltas=True, keep_snapshots=False)
