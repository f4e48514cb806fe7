"""place_and_claim against real agents: the advertised request endpoint, a refusal
(another scheduler won) answered by a refreshed snapshot, a host that dies mid-claim;
``[publisher] advertise_request`` in the config and the snapshot."""

from __future__ import annotations

import contextlib
import logging
import signal
import time

import pytest
from claim_helpers import held
from daemon_helpers import DaemonProc

from hostagent.config import config_from_dict
from hostagent.errors import ConfigError
from hostagent.fleet import Fleet, feed, place_and_claim
from hostagent.subscriber import Subscriber

PINNED4 = {"vcpus": 4, "memory_mb": 1024, "extra_specs": {"hw:cpu_policy": "dedicated"}}
DEDICATED = {2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 26, 27,
             28, 29, 30, 31, 32, 33, 34, 35, 38, 39, 40, 41, 42, 43, 44, 45, 46, 47}


@pytest.mark.parametrize(("value", "msg"), [
    ("http://h:1", "must start with tcp:// or ipc://"),
    ("tcp://*:6511", "not a wildcard"),
    ("tcp://0.0.0.0:6511", "not a wildcard"),
    ("tcp://10.0.0.5", "not a wildcard"),
    ("ipc:///" + "x" * 300, "at most 256 characters"),
    (5, "advertise_request"),
])
def test_advertise_request_is_checked(value, msg):
    with pytest.raises(ConfigError, match=msg) as err:
        config_from_dict({"publisher": {"advertise_request": value}})
    assert "advertise_request" in str(err.value)


def test_advertise_request_accepted():
    cfg = config_from_dict({"publisher": {"advertise_request": "tcp://10.0.0.5:6511"}})
    assert cfg.publisher.advertise_request == "tcp://10.0.0.5:6511"
    assert config_from_dict({}).publisher.advertise_request == ""


def agent(name: str, *, advertise: bool) -> DaemonProc:
    d = DaemonProc("xeon-2s-cat", start=False)
    text = d.config.read_text().replace('name = "testhost"', f'name = "{name}"')
    if advertise:
        text = text.replace("[publisher]\n", f'[publisher]\nadvertise_request = "{d.req}"\n')
    d.config.write_text(text)
    d.start()
    d.wait_notify("READY=1")
    return d


def fed(sources: list[str], hosts: int, **kw) -> tuple[Subscriber, Fleet]:
    sub = Subscriber(sources, **kw)
    fleet = Fleet()
    deadline = time.monotonic() + 30
    while len(fleet.hosts()) < hosts:
        assert time.monotonic() < deadline, fleet.hosts()
        feed(sub, fleet, timeout=1.0)
    return sub, fleet


def test_place_and_claim_on_real_agents(caplog):
    """Two real agents (~3 s to start on a loaded machine)."""
    caplog.set_level(logging.INFO, "hostagent.fleet")
    a = agent("a", advertise=True)
    b = agent("b", advertise=False)
    with contextlib.ExitStack() as stack:
        stack.callback(b.close)
        stack.callback(a.close)
        # a is heard with no REQUEST endpoint: only its advertised one says where to claim
        sub, fleet = fed([a.stream, f"{b.stream},{b.req}"], 2)
        stack.callback(sub.close)
        assert sub.latest("a")["agent"]["request_endpoint"] == a.req
        assert "request_endpoint" not in sub.latest("b")["agent"]
        assert fleet.entry("a").endpoint == a.req and fleet.entry("b").endpoint == b.req

        # pack: both schedulers' first choice is the same host and threads
        stale, stale2 = Fleet(), Fleet()
        for h in ("a", "b"):
            for f in (stale, stale2):
                f.update(sub.latest(h), time.monotonic(),
                         request_endpoint=fleet.entry(h).endpoint)
        first = place_and_claim(fleet, PINNED4, weigher="pack", claimant="s1")
        assert first is not None and first.attempts == 1
        # claiming its own (stale) placement: refused, refreshed, claimed elsewhere
        second = place_and_claim(stale, PINNED4, weigher="pack", claimant="s2",
                                 own_placement=True)
        assert second is not None
        assert stale.stats["claim_refused"] >= 1  # it lost, refreshed, and moved on
        assert second.attempts == stale.stats["claim_refused"] + 1
        # the agent fitting for a scheduler whose view is stale: granted at once, around
        # what is claimed there
        third = place_and_claim(stale2, PINNED4, weigher="pack", claimant="s3")
        assert third is not None and third.attempts == 1 and third.host == first.host
        threads = [held(c.placement, DEDICATED)["threads"] for c in (first, second, third)
                   if c.host == third.host]
        assert sum(map(len, threads)) == len(set().union(*threads))  # disjoint
        mine = held(first.placement, DEDICATED)["threads"]
        theirs = held(second.placement, DEDICATED)["threads"]
        assert first.host != second.host or not mine & theirs
        assert "claim refused" in caplog.text and "refreshing its snapshot" in caplog.text
        # the claimed host is not offered to this scheduler until its snapshot counts it
        assert not fleet.offered(first.host)

        # a host dies mid-claim: the claim is not answered, the next host is claimed
        victim = first.host
        other = "b" if victim == "a" else "a"
        while not fleet.offered(victim):
            feed(sub, fleet, timeout=1.0)
        (a if victim == "a" else b).signal(signal.SIGKILL)
        (a if victim == "a" else b).proc.wait(10)
        got = place_and_claim(fleet, PINNED4, weigher="pack", timeout=1.0)
        assert got is not None and got.host == other
        assert not fleet.offered(victim)
        assert f"host {victim!r}: claim not answered" in caplog.text


def test_an_agent_answering_busy_is_left_out_not_marked_dead(tmp_path):
    """Two hosts whose request endpoints answer every claim ``busy`` as the agent's claim
    desk does when 64 claims wait (real ROUTER sockets, replies in the agent's format):
    place_and_claim tries each once, gives up, and marks neither dead."""
    import threading

    import zmq
    from fleet_helpers import host_snapshot

    from hostagent import wire

    ctx = zmq.Context.instance()
    stop = threading.Event()
    endpoints, socks = [], []
    for i in range(2):
        s = ctx.socket(zmq.ROUTER)
        s.linger = 0
        ep = f"ipc://{tmp_path}/busy{i}"
        s.bind(ep)
        endpoints.append(ep)
        socks.append(s)

    def serve() -> None:
        poller = zmq.Poller()
        for s in socks:
            poller.register(s, zmq.POLLIN)
        while not stop.is_set():
            for s, _ in poller.poll(50):
                ident, payload = s.recv_multipart()
                assert wire.decode_request(payload)["op"] == "claim"
                s.send_multipart([ident, wire.pack(wire.error_reply(
                    "busy: 64 claim requests waiting (the limit); retry later"))])

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        fleet = Fleet()
        for i, ep in enumerate(endpoints):
            fleet.update(host_snapshot("xeon-2s-cat", f"h{i}"), time.monotonic(),
                         request_endpoint=ep)
        assert place_and_claim(fleet, PINNED4, timeout=5.0) is None
        assert fleet.stats["claim_busy"] == 2
        assert fleet.offered("h0") and fleet.offered("h1")
    finally:
        stop.set()
        t.join(5)
        for s in socks:
            s.close(linger=0)


def test_two_real_agents_under_one_name(caplog):
    """Two real agents both named "dup" (~3 s to start): the subscriber binds the name to
    the source it heard first and drops the other with one warning, so the fleet holds
    one host, never alternating, and the claim lands at that agent only."""
    caplog.set_level(logging.WARNING, "hostagent")
    first = agent("dup", advertise=True)
    second = agent("dup", advertise=True)
    with contextlib.ExitStack() as stack:
        stack.callback(second.close)
        stack.callback(first.close)
        sub, fleet2 = fed([first.stream, second.stream], 1)
        stack.callback(sub.close)
        deadline = time.monotonic() + 30
        while sub.stats["foreign_source"] == 0:
            assert time.monotonic() < deadline, sub.stats
            feed(sub, fleet2, timeout=0.5)
        bound = sub.binding("dup")[0]
        owner, other = (first, second) if bound == first.stream else (second, first)
        assert fleet2.hosts() == ["dup"] and fleet2.entry("dup").endpoint == owner.req
        assert fleet2.stats["epochs"] == 0  # never alternated
        got = place_and_claim(fleet2, PINNED4)
        assert got is not None and got.endpoint == owner.req
        assert len(owner.request({"op": "claims"})["claims"]) == 1
        assert other.request({"op": "claims"})["claims"] == []
        warned = [r.getMessage() for r in caplog.records if "dropped: it is bound" in
                  r.getMessage()]
        assert len(warned) == 1, warned
