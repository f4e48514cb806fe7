"""The fleet fed through a real subscriber from a real XPUB socket: garbage and other
schemas from one publisher never reach or break the index; the good hosts stay placed."""

from __future__ import annotations

import copy
import logging
import time

import zmq
from fleet_helpers import PINNED2, host_snapshot

from hostagent import wire
from hostagent.fleet import Fleet, feed
from hostagent.subscriber import Subscriber


def publish(pub: zmq.Socket, snap: dict, seq: int) -> None:
    body = wire.make_body("snapshot", snap["host"], snap["epoch"], seq, time.time(),
                          dict(snap, seq=seq))
    pub.send_multipart(wire.encode_stream(body))


def test_garbage_on_the_stream_is_dropped_or_refused_once(tmp_path, caplog):
    caplog.set_level(logging.WARNING, "hostagent")
    ctx = zmq.Context.instance()
    pub = ctx.socket(zmq.XPUB)
    pub.linger = 0
    ep = f"ipc://{tmp_path}/s"
    pub.bind(ep)
    fleet = Fleet()
    with Subscriber([ep]) as sub:
        assert pub.poll(10000)  # the subscription arrived
        pub.recv()
        good = host_snapshot("xeon-2s-cat", "good")
        other_schema = dict(host_snapshot("xeon-2s-cat", "future"), schema=2)
        evil = copy.deepcopy(host_snapshot("xeon-2s-cat", "evil"))
        evil["usage"]["threads"] = [{"cpu": "not a number"}]  # passes check_snapshot
        seq = 0
        for _ in range(3):
            seq += 1
            for snap in (good, other_schema, evil):
                publish(pub, snap, seq)
        deadline = time.monotonic() + 30
        while fleet.stats["refused"] < 3 or "good" not in fleet.hosts():
            assert time.monotonic() < deadline, (fleet.stats, sub.stats)
            feed(sub, fleet, timeout=0.5)
        assert sub.stats["invalid_snapshots"] == 3  # schema 2: dropped by the subscriber
        assert "future" not in fleet.hosts()
        assert fleet.hosts() == ["good"]  # "evil" refused at its first snapshot
        refused = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
        assert refused == ["snapshot of host 'evil' refused: ValueError: invalid literal "
                           "for int() with base 10: 'not a number'"], refused
        [best] = fleet.place(PINNED2)
        assert best.host == "good" and best.answer["fits"]
    pub.close(linger=0)
