"""wire: strict msgpack decoding, stream message shapes, requests and replies."""

import datetime

import msgpack
import pytest

from hostagent import wire


def test_round_trip_plain_document():
    doc = {"a": [1, 2.5, None, True, "é"], "b": {"0": 3}}
    assert wire.unpack(wire.pack(doc)) == doc


@pytest.mark.parametrize(
    "payload, needle",
    [
        (b"", "empty message"),
        (b"\xc1", "not valid msgpack"),
        (b"\x81\x01\x02", "map key"),  # {1: 2}: int map key
        (b"\xa3ab", "incomplete"),
        (b"\x01\x02", "trailing bytes"),
        (b"\xdd\xff\xff\xff\xff", "exceeds"),  # array header claiming 2**32-1 items
        (b"\xdf\xff\xff\xff\xff", "exceeds"),  # map header claiming 2**32-1 items
        (b"\xa2\xff\xfe", "UTF-8"),
        (msgpack.packb(msgpack.ExtType(5, b"xx")), "ext types"),
        (msgpack.packb(datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC), datetime=True),
         "ext types"),
    ],
)
def test_unpack_refuses_bad_input(payload, needle):
    with pytest.raises(wire.WireError, match=needle):
        wire.unpack(payload)


def test_unpack_size_limit_and_depth():
    with pytest.raises(wire.WireError, match="over the limit of 10 bytes"):
        wire.unpack(wire.pack("x" * 20), max_bytes=10)
    nested: list = []
    for _ in range(40):
        nested = [nested]
    with pytest.raises(wire.WireError, match="deeper than 32"):
        wire.unpack(wire.pack(nested), max_depth=32)
    with pytest.raises(wire.WireError, match="deeper than 32"):
        wire.decode_request(wire.pack({"op": "x", "n": nested}))
    assert wire.unpack(wire.pack(nested)) == nested  # streams: msgpack's own limit
    with pytest.raises(wire.WireError, match="nests deeper than msgpack allows"):
        wire.unpack(b"\x91" * 1100 + b"\x90")  # 1100 nested one-element arrays


def test_topic_has_trailing_dot_and_round_trips():
    assert wire.topic("h1") == b"hostagent.h1."
    assert not wire.topic("h10").startswith(wire.topic("h1"))
    assert wire.host_of_topic(b"hostagent.h1.") == "h1"
    for bad in (b"other.h1.", b"hostagent.h1", b"hostagent..", b"hostagent.\xff."):
        with pytest.raises(wire.WireError):
            wire.host_of_topic(bad)


def _body(**over):
    body = wire.make_body("snapshot", "h1", "ep", 3, 1.5, {"schema": 1})
    body.update(over)
    return body


def test_stream_round_trip():
    frames = wire.encode_stream(_body())
    assert frames[0] == b"hostagent.h1."
    assert wire.decode_stream(frames) == _body()
    hb = wire.make_body("heartbeat", "h1", "ep", 3, 2.0, None)
    assert wire.decode_stream(wire.encode_stream(hb))["kind"] == "heartbeat"


@pytest.mark.parametrize(
    "over, needle",
    [
        ({"v": 2}, "body.v"),
        ({"kind": "delta"}, "body.kind"),
        ({"host": ""}, "body.host"),
        ({"epoch": 5}, "body.epoch"),
        ({"seq": -1}, "body.seq"),
        ({"seq": True}, "body.seq"),
        ({"seq": "3"}, "body.seq"),
        ({"time": "now"}, "body.time"),
        ({"time": float("nan")}, "body.time"),
        ({"data": None}, "data of a snapshot"),
        ({"kind": "heartbeat"}, "data of a heartbeat"),
    ],
)
def test_stream_body_checks(over, needle):
    frames = [wire.topic("h1"), wire.pack(_body(**over))]
    with pytest.raises(wire.WireError, match=needle):
        wire.decode_stream(frames)


def test_stream_frame_count_and_topic_mismatch():
    frames = wire.encode_stream(_body())
    with pytest.raises(wire.WireError, match="3 frames"):
        wire.decode_stream([*frames, b"x"])
    with pytest.raises(wire.WireError, match="topic names host 'h2'"):
        wire.decode_stream([wire.topic("h2"), frames[1]])
    with pytest.raises(wire.WireError, match="not a map"):
        wire.decode_stream([frames[0], wire.pack([1, 2])])


def test_requests_and_replies():
    assert wire.decode_request(wire.pack({"op": "snapshot"})) == {"op": "snapshot"}
    with pytest.raises(wire.WireError, match="request.op"):
        wire.decode_request(wire.pack({"op": 3}))
    with pytest.raises(wire.WireError, match="not a map"):
        wire.decode_request(wire.pack("snapshot"))
    with pytest.raises(wire.WireError, match="over the limit"):
        wire.decode_request(wire.pack({"op": "x", "pad": "y" * wire.MAX_REQUEST_BYTES}))
    assert wire.decode_reply(wire.pack(wire.ok_reply(a=1))) == {"v": 1, "ok": True, "a": 1}
    assert wire.decode_reply(wire.pack(wire.error_reply("no")))["error"] == "no"
    with pytest.raises(wire.WireError):
        wire.decode_reply(wire.pack({"v": 1, "ok": False}))
    with pytest.raises(wire.WireError):
        wire.decode_reply(wire.pack({"ok": True}))


def test_split_envelope():
    assert wire.split_envelope([b"id", b"p"]) == ([b"id"], b"p")
    assert wire.split_envelope([b"id", b"", b"p"]) == ([b"id", b""], b"p")
    with pytest.raises(wire.WireError, match="without a payload"):
        wire.split_envelope([b"id"])
    with pytest.raises(wire.WireError, match="at most"):
        wire.split_envelope([b"x"] * 20)


def test_large_snapshots_travel_compressed():
    data = {"schema": 1, "usage": {"threads": [{"cpu": i, "guest": None} for i in range(2000)]}}
    body = wire.make_body("snapshot", "h1", "ep", 9, 1.0, data)
    frames = wire.encode_stream(body)
    assert len(frames[1]) < len(wire.pack(body)) // 4
    outer = wire.unpack(frames[1])
    assert outer["enc"] == "zlib" and isinstance(outer["data"], bytes) and outer["seq"] == 9
    assert wire.decode_stream(frames) == body
    small = wire.encode_stream(_body())
    assert "enc" not in wire.unpack(small[1])
    assert wire.encode_stream(body, compress_min=None)[1] == wire.pack(body)


def test_compressed_body_limits_and_errors():
    import zlib

    data = {"pad": "x" * 100_000}
    frames = wire.encode_stream(wire.make_body("snapshot", "h1", "ep", 1, 1.0, data))
    assert len(frames[1]) < 2000
    with pytest.raises(wire.WireError, match="inflates to over the limit of 50000"):
        wire.decode_stream(frames, max_bytes=50_000)  # a zlib bomb stops at the limit

    def framed(**over):
        body = {**_body(), **over}
        return [wire.topic("h1"), wire.pack(body)]

    with pytest.raises(wire.WireError, match="body.enc = 'lz4'"):
        wire.decode_stream(framed(enc="lz4", data=b"x"))
    with pytest.raises(wire.WireError, match="must be bin"):
        wire.decode_stream(framed(enc="zlib", data={"a": 1}))
    with pytest.raises(wire.WireError, match="not valid zlib"):
        wire.decode_stream(framed(enc="zlib", data=b"not zlib"))
    with pytest.raises(wire.WireError, match="truncated"):
        wire.decode_stream(framed(enc="zlib", data=zlib.compress(wire.pack({"a": 1}))[:-4]))
    with pytest.raises(wire.WireError, match="data of a snapshot must be a map"):
        wire.decode_stream(framed(enc="zlib", data=zlib.compress(wire.pack([1]))))


def test_large_decode_pauses_and_restores_the_collector():
    import gc

    big = wire.pack({"x": ["y" * 10] * 20_000})
    assert len(big) >= wire.GC_PAUSE_BYTES
    assert gc.isenabled()
    assert len(wire.unpack(big)["x"]) == 20_000
    assert gc.isenabled()
    with pytest.raises(wire.WireError):
        wire.unpack(big[:-1])
    assert gc.isenabled()
    gc.disable()
    try:
        wire.unpack(big)
        assert not gc.isenabled()  # a caller's own choice is kept
    finally:
        gc.enable()


def _big_snapshot(n_guests: int = 3) -> dict:
    topo = {"cpus": [{"id": i, "cell": i // 64, "siblings": [i, i ^ 1]} for i in range(448)]}
    usage = {"threads": [{"cpu": i, "guest": None, "shared_guests": []} for i in range(448)],
             "guests": [{"name": f"g{i}", "pinning": {"0": i}} for i in range(n_guests)]}
    return {"schema": 1, "host": "h1", "topology": topo, "config": {"dedicated_cpus": [1, 2]},
            "usage": usage}


def test_pack_cache_gives_the_same_bytes_and_follows_a_new_topology():
    snap = _big_snapshot()
    cache = wire.PackCache()
    assert wire.pack_map(snap, cache) == wire.pack(snap)
    assert cache.parts["topology"][0] is snap["topology"]
    assert wire.pack_map(snap, cache) == wire.pack(snap)  # from the cache
    changed = {**snap, "topology": {"cpus": []}}  # a re-probe builds a new dict
    assert wire.pack_map(changed, cache) == wire.pack(changed)
    body = wire.make_body("snapshot", "h1", "ep", 2, 1.0, snap)
    assert wire.decode_stream(wire.encode_stream(body, cache=cache)) == body


def test_decode_cache_reuses_unchanged_parts_and_equals_a_full_decode():
    cache = wire.DecodeCache()
    first = wire.make_body("snapshot", "h1", "ep", 1, 1.0, _big_snapshot(3))
    second = wire.make_body("snapshot", "h1", "ep", 2, 2.0, _big_snapshot(4))
    frames1, frames2 = wire.encode_stream(first), wire.encode_stream(second)
    got1 = wire.decode_stream(frames1, cache=cache)
    got2 = wire.decode_stream(frames2, cache=cache)
    assert got1 == wire.decode_stream(frames1) == first
    assert got2 == wire.decode_stream(frames2) == second
    assert got2["data"]["topology"] is got1["data"]["topology"]  # not decoded again
    assert got2["data"]["usage"] is not got1["data"]["usage"]
    u1, u2 = got1["data"]["usage"], got2["data"]["usage"]
    assert u2["threads"][7] is u1["threads"][7]  # unchanged list elements are reused
    assert u2["guests"][2] is u1["guests"][2] and u2["guests"][3] == {"name": "g3",
                                                                       "pinning": {"0": 3}}
    assert isinstance(got2["data"]["topology"]["cpus"], list)  # lists stay lists
    assert isinstance(u2["threads"], list) and isinstance(u2["threads"][0]["shared_guests"],
                                                          list)
    assert cache.misses == 2 + 448 + 3 + 1 and cache.hits == 2 + 448 + 3


def test_decode_cache_never_returns_a_value_the_bytes_do_not_say():
    cache = wire.DecodeCache()
    a = _big_snapshot()
    first = wire.decode_stream(
        wire.encode_stream(wire.make_body("snapshot", "h1", "ep", 1, 1.0, a)), cache=cache)
    # same length, same shape, one cpu moved to another cell: bytes differ, so decoded
    b = _big_snapshot()
    b["topology"]["cpus"][5]["cell"] = 6
    body = wire.make_body("snapshot", "h1", "ep", 2, 1.0, b)
    # a hostile sender also claims in the header that the topology is unchanged (a
    # digest of the old one): no header field decides the reuse, only the bytes
    import hashlib

    outer = wire.unpack(wire.encode_stream(body)[1])
    outer["topology_digest"] = hashlib.blake2b(cache.parts["topology"][0]).digest()
    got = wire.decode_stream([wire.topic("h1"), wire.pack(outer)], cache=cache)
    assert got["data"] == b and got["data"]["topology"]["cpus"][5]["cell"] == 6
    assert got["data"]["config"] is first["data"]["config"]  # reused
    assert got["data"]["topology"] is not first["data"]["topology"]  # decoded again
    b["usage"]["threads"][3]["guest"] = "x"  # an element that differs is decoded
    got = wire.decode_stream(wire.encode_stream(body), cache=cache)
    assert got["data"]["usage"]["threads"][3]["guest"] == "x" and got["data"] == b
    assert first["data"]["usage"]["threads"][3]["guest"] is None  # the old one untouched
    # a bad message decodes nothing and leaves the cache as it was
    parts = dict(cache.parts)
    raw = wire.pack_map(a)
    for bad, needle in ((raw[:-3], "truncated"), (raw + b"\x01", "trailing"),
                        (b"\x81\x01\x02", "map key"),
                        (raw.replace(b"dedicated_cpus", b"dedicated\xff\xfecpus"), "UTF-8")):
        with pytest.raises(wire.WireError, match=needle):
            wire.unpack_map(bad, cache)
    assert cache.parts == parts
    # odd shapes inside the reused keys decode as they are
    for odd in ({"usage": [1, 2]}, {"usage": {"n": 5, "l": [[1], {"a": None}]}},
                {"topology": None, "usage": {}}):
        assert wire.unpack_map(wire.pack(odd), wire.DecodeCache()) == odd
    # and a non-map document goes the usual way (the body check refuses it)
    assert wire.unpack_map(wire.pack([1, 2]), cache) == [1, 2]
    with pytest.raises(wire.WireError, match="over the limit"):
        wire.unpack_map(raw, cache, max_bytes=10)


def test_decode_cache_refuses_a_tampered_reused_part():
    cache = wire.DecodeCache()
    snap = _big_snapshot()
    raw = wire.pack_map(snap)
    wire.unpack_map(raw, cache)
    # the reused part skips decoding; a broken copy of it must still fail, not reuse
    tampered = raw.replace(wire.pack("siblings"), b"\xa8sibl\xff\xfe\xfd\xfc")
    with pytest.raises(wire.WireError, match="UTF-8"):
        wire.unpack_map(tampered, cache)
    assert wire.unpack_map(raw, cache) == snap


def test_spliced_zlib_is_one_standard_stream_of_the_same_bytes():
    import zlib

    snap = _big_snapshot()
    cache = wire.PackCache()
    body = wire.make_body("snapshot", "h1", "ep", 1, 1.0, snap)
    frames = wire.encode_stream(body, cache=cache)
    outer = wire.unpack(frames[1])
    assert outer["enc"] == "zlib"
    assert zlib.decompress(outer["data"]) == wire.pack(snap)  # any zlib reader
    segment = cache.deflated["topology"][1]
    assert segment in outer["data"]
    again = wire.encode_stream(body, cache=cache)
    assert again == frames and cache.deflated["topology"][1] is segment  # reused
    # a new topology object gets a new segment; the stream is still the same bytes
    body["data"] = {**snap, "topology": {"cpus": list(range(5000))}}
    moved = wire.unpack(wire.encode_stream(body, cache=cache)[1])["data"]
    assert zlib.decompress(moved) == wire.pack(body["data"])
    assert cache.deflated["topology"][1] is not segment
    # the cached key first, last, or absent
    for data in ({"topology": snap["topology"], "usage": snap["usage"]},
                 {"usage": snap["usage"], "topology": snap["topology"]},
                 {"usage": snap["usage"]}, {"topology": snap["topology"]}):
        chunks = wire.pack_map_chunks(data, cache)
        assert zlib.decompress(wire.zlib_chunks(chunks, cache)) == wire.pack(data)
        b = wire.make_body("snapshot", "h1", "ep", 1, 1.0, data)
        assert wire.decode_stream(wire.encode_stream(b, cache=cache)) == b


def _usage(threads: int = 100, guests: int = 70) -> dict:
    return {"cells": [{"id": 0, "free_pcpus": 3}],
            "threads": [{"cpu": i, "guest": None, "shared_guests": []} for i in range(threads)],
            "caches": [],
            "guests": [{"name": f"g{i}", "vcpus": i % 5} for i in range(guests)],
            "conflicts": []}


def test_usage_is_packed_in_blocks_of_elements_with_the_same_bytes(monkeypatch):
    monkeypatch.setattr(wire, "BLOCK_ELEMENTS", 32)
    usage = _usage()
    cache = wire.PackCache()
    raw = cache.packed("usage", usage)
    assert raw == wire.pack(usage)
    chunks = cache.chunks("usage", usage)
    blocks = [c for c, tag in chunks if tag == wire.BLOCK]
    assert len(blocks) == 4 + 3  # 100 threads and 70 guests, 32 a block
    assert b"".join(c for c, _ in chunks) == raw
    assert cache.packed("usage", usage) is raw  # the same object: from the cache
    # the next fold: one thread changed, the other entries the same dicts
    nxt = {**usage, "threads": list(usage["threads"])}
    nxt["threads"][40] = {"cpu": 40, "guest": "u1", "shared_guests": []}
    kept = cache.elements[id(usage["threads"][39])][1]
    assert cache.packed("usage", nxt) == wire.pack(nxt)
    assert cache.elements[id(nxt["threads"][39])][1] is kept  # not packed again
    assert id(usage["threads"][40]) not in cache.elements  # dropped with its entry
    # an equal but new dict is packed again, to the same bytes
    again = {**nxt, "threads": [dict(t) for t in nxt["threads"]]}
    assert cache.packed("usage", again) == wire.pack(again)


@pytest.mark.parametrize("usage", [
    _usage(0, 0), _usage(32, 1), _usage(33, 64),
    {"threads": "not a list", "guests": [1, "two", None]},
    {"other": [{"a": 1}] * 40},
])
def test_block_packing_edge_cases_match_plain_msgpack(usage, monkeypatch):
    import zlib

    monkeypatch.setattr(wire, "BLOCK_ELEMENTS", 32)
    cache = wire.PackCache()
    assert cache.packed("usage", usage) == wire.pack(usage)
    data = {"topology": {"cpus": [1, 2]}, "usage": usage, "agent": {"v": "x"}}
    chunks = wire.pack_map_chunks(data, cache)
    assert zlib.decompress(wire.zlib_chunks(chunks, cache)) == wire.pack(data)


def test_unchanged_blocks_keep_their_deflate_segments(monkeypatch):
    import zlib

    monkeypatch.setattr(wire, "BLOCK_ELEMENTS", 32)
    cache = wire.PackCache()
    first = {"topology": {"cpus": list(range(300, 9000))}, "usage": _usage(200, 70)}
    body = wire.make_body("snapshot", "h1", "ep", 1, 1.0, first)
    frames = wire.encode_stream(body, cache=cache)
    assert zlib.decompress(wire.unpack(frames[1])["data"]) == wire.pack(first)
    segments = dict(cache.blocks)
    assert len(segments) == 7 + 3  # 200 threads, 70 guests
    usage = first["usage"]
    threads = list(usage["threads"])
    threads[100] = {"cpu": 100, "guest": "u1", "shared_guests": []}
    second = {**first, "usage": {**usage, "threads": threads}}
    body2 = wire.make_body("snapshot", "h1", "ep", 2, 2.0, second)
    got = wire.decode_stream(wire.encode_stream(body2, cache=cache))
    assert got == body2
    reused = [raw for raw, seg in cache.blocks.items() if segments.get(raw) is seg]
    assert len(cache.blocks) == 10 and len(reused) == 9  # only block 3 deflated again
    # a subscriber with a decode cache gets the same snapshot
    dcache = wire.DecodeCache()
    wire.decode_stream(frames, cache=dcache)
    assert wire.decode_stream(wire.encode_stream(body2, cache=cache), cache=dcache) == body2
