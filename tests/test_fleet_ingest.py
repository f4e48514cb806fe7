"""The fleet index's ingest cost (issue 15 item 6): ``Fleet.update`` keeps the usage it
is handed as it is (no packing again), and nothing the index does with it afterwards
(summaries, exact fits, ``snapshot``) changes the shared map."""

from __future__ import annotations

import copy

import pytest
from fleet_helpers import PINNED2, SHARED1, host_snapshot

from hostagent import wire
from hostagent.fleet import Fleet


@pytest.fixture(scope="module")
def loaded():
    """A 48-thread host with 6 guests and an empty one (built once)."""
    return (host_snapshot("xeon-2s-cat", "a", guests=6),
            host_snapshot("xeon-2s-cat", "b"))


def test_update_of_a_known_host_packs_nothing(loaded, monkeypatch):
    """The usage is not packed again: an update of a known host of a known shape calls
    no msgpack packer at all, and the index holds the very map it was handed."""
    fl = Fleet()
    a, b = loaded
    fl.update(a, 0.0)
    packed = []
    real_pack = wire.pack
    monkeypatch.setattr(wire, "pack", lambda obj: packed.append(obj) or real_pack(obj))
    newer = dict(a, seq=2, usage=copy.deepcopy(a["usage"]))
    fl.update(newer, 1.0)
    assert packed == []
    assert fl.entry("a").usage is newer["usage"]
    assert fl.snapshot("a")["usage"] is newer["usage"]
    assert fl.entry("a").seq == 2


def test_placing_leaves_the_shared_usage_unchanged(loaded):
    """Exact fits run on views of the held usage: after placements of several kinds on
    both hosts, the usage maps handed over are what they were (bit for bit)."""
    a, b = loaded
    before = [wire.pack(s["usage"]) for s in (a, b)]
    fl = Fleet()
    fl.update(a, 0.0)
    fl.update(b, 0.0)
    for request in (PINNED2, SHARED1):
        for weigher in ("pack", "spread"):
            assert fl.place(request, count=2, weigher=weigher, now=0.0)
    fl.why_not({"vcpus": 64, "memory_mb": 1024,
                "extra_specs": {"hw:cpu_policy": "dedicated"}}, now=0.0)
    assert [wire.pack(s["usage"]) for s in (a, b)] == before
    assert fl.entry("a").usage is a["usage"]


def test_feed_reads_a_bounded_number_of_messages_per_turn(tmp_path):
    """A scheduler under a backlog still gets to place between feeds: ``feed(...,
    max_messages=7)`` (``Subscriber.poll``'s bound) applies at most 7 of 40 queued
    snapshots per call, and all 40 within the calls that takes."""
    import zmq

    from hostagent.errors import HostagentError
    from hostagent.fleet import feed
    from hostagent.subscriber import POLL_BATCH, Subscriber

    base = host_snapshot("vm-1s-nosmt", "x")
    ctx = zmq.Context()
    xpub = ctx.socket(zmq.XPUB)
    xpub.linger = 0
    xpub.bind(f"ipc://{tmp_path}/stream")
    sub = Subscriber([f"ipc://{tmp_path}/stream"], keep_snapshots=False)
    try:
        assert xpub.poll(10_000), "no subscription within 10 s"
        xpub.recv()
        for i in range(40):
            snap = dict(base, host=f"h{i:02d}")
            xpub.send_multipart(wire.encode_stream(
                wire.make_body("snapshot", snap["host"], "e1", 1, 1.0, snap)))
        fl = Fleet()
        sizes = []
        for _ in range(200):  # bounded: 40 messages need at least 6 turns of 7
            sizes.append(feed(sub, fl, 5.0, max_messages=7))
            if len(fl.entries) == 40:
                break
        assert len(fl.entries) == 40
        assert max(sizes) <= 7 and len(sizes) >= 6
        for bad in (0, POLL_BATCH + 1, True):
            with pytest.raises(HostagentError, match=f"max_messages={bad!r}: must be an "
                               f"integer from 1 to {POLL_BATCH}"):
                sub.poll(0, max_messages=bad)
    finally:
        sub.close()
        ctx.destroy(linger=0)


def test_a_new_host_sharing_a_held_shapes_objects_is_not_hashed(loaded, monkeypatch):
    """Joining hosts of a known kind (the subscriber hands them one shared decoded
    topology and config) cost no hashing of 85 KiB of topology: no packing at all; hosts
    with equal but distinct objects still share the one shape (hashed), and a shape
    dropped with its last host is not found by its old objects."""
    a, b = loaded
    fl = Fleet()
    fl.update(a, 0.0)
    packed = []
    real_pack = wire.pack
    monkeypatch.setattr(wire, "pack", lambda obj: packed.append(obj) or real_pack(obj))
    fl.update(dict(b, host="c"), 0.0)  # b's topology/config are distinct, equal objects
    assert packed and fl.entry("c").shape is fl.entry("a").shape
    packed.clear()
    fl.update(dict(b, host="d", topology=a["topology"], config=a["config"]), 0.0)
    assert packed == [] and fl.entry("d").shape is fl.entry("a").shape
    assert len(fl.shapes) == 1
    for host in ("a", "c", "d"):
        fl.forget(host)
    assert fl.shapes == {} and fl._shape_of_objects == {}


def test_lean_subscriber_shares_equal_usage_elements_between_hosts(loaded, tmp_path):
    """``keep_snapshots=False`` (a ``Fleet`` holds the usage it is handed): two hosts whose
    usage lists hold elements of equal bytes get one decoded object for them, as a
    subscriber holding its snapshots does, so the fleet's copies share them."""
    import zmq

    from hostagent.subscriber import Subscriber

    base = loaded[0]  # 48 threads, 6 guests: a compressed snapshot
    ctx = zmq.Context()
    xpub = ctx.socket(zmq.XPUB)
    xpub.linger = 0
    xpub.bind(f"ipc://{tmp_path}/stream")
    sub = Subscriber([f"ipc://{tmp_path}/stream"], keep_snapshots=False)
    try:
        assert xpub.poll(10_000), "no subscription within 10 s"
        xpub.recv()
        for host in ("h1", "h2"):
            snap = dict(base, host=host)
            xpub.send_multipart(wire.encode_stream(
                wire.make_body("snapshot", host, "e1", 1, 1.0, snap)))
        got = {}
        for _ in range(100):  # bounded
            for upd in sub.poll(5.0):
                got[upd.host] = upd.snapshot
            if len(got) == 2:
                break
        threads = [got[h]["usage"]["threads"] for h in ("h1", "h2")]
        big = [i for i, t in enumerate(threads[0]) if len(wire.pack(t)) >= wire.SHARED_MIN_BYTES]
        assert big, "no element long enough to be shared"
        assert all(threads[0][i] is threads[1][i] for i in big)
        assert sub.latest("h1") is None  # still lean: not held
    finally:
        sub.close()
        ctx.destroy(linger=0)
