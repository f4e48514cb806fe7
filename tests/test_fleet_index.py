"""The fleet index (hostagent.fleet): ingest, summaries, the prefilter, placement,
weighers, and what it refuses (garbage, other schemas, duplicate host names)."""

from __future__ import annotations

import copy
import logging
import tracemalloc

import pytest
from fleet_helpers import PINNED2, SHARED1, host_snapshot
from hypothesis import HealthCheck, assume, event, given, settings
from test_fit_property import hosts as fit_hosts_strategy
from test_fit_property import requests as fit_requests_strategy

from hostagent.errors import RequestError
from hostagent.fit import fit, parse_request
from hostagent.fleet import Fleet, parse_weigher
from hostagent.fleet.summary import make_shape, needs_of, prefilter, summarize

ISOLATE4 = {"vcpus": 4, "memory_mb": 2048,
            "extra_specs": {"hw:cpu_policy": "dedicated", "hw:cpu_thread_policy": "isolate"}}
TWO_CELLS = {"vcpus": 8, "memory_mb": 4096,
             "extra_specs": {"hw:cpu_policy": "dedicated", "hw:numa_nodes": "2"}}
PAGES_1G = {"vcpus": 2, "memory_mb": 4096,
            "extra_specs": {"hw:cpu_policy": "dedicated", "hw:mem_page_size": "1GB"}}
HUGE = {"vcpus": 64, "memory_mb": 1024, "extra_specs": {"hw:cpu_policy": "dedicated"}}
REQUESTS = [PINNED2, SHARED1, ISOLATE4, TWO_CELLS, PAGES_1G, HUGE,
            {"vcpus": 4, "memory_mb": 1024, "extra_specs": {
                "hw:cpu_policy": "dedicated", "hw:cpu_thread_policy": "require"}},
            {"vcpus": 2, "memory_mb": 512, "extra_specs": {"hw:numa_nodes": "1"}}]


@pytest.fixture(scope="module")
def hosts():
    """Hosts of three shapes, some loaded (built once: ~1 s of fits for the guests)."""
    return {
        "x-empty": host_snapshot("xeon-2s-cat", "x-empty"),
        "x-half": host_snapshot("xeon-2s-cat", "x-half", guests=10),
        "x-full": host_snapshot("xeon-2s-cat", "x-full", guests=20),
        "epyc": host_snapshot("epyc-amd", "epyc", guests=4),
        "vm": host_snapshot("vm-1s-nosmt", "vm"),
    }


def fleet_of(hosts, now=0.0, **kw):
    fl = Fleet(**kw)
    for snap in hosts.values():
        fl.update(snap, now)
    return fl


def test_place_returns_the_exact_fit_answer_of_each_host_best_first(hosts):
    fl = fleet_of(hosts)
    assert fl.hosts() == sorted(hosts)
    assert len(fl.shapes) == 3  # the three xeon hosts share one shape
    spread = fl.place(PINNED2, count=3, weigher="spread", now=0.0)
    assert {c.host for c in spread[:2]} == {"x-empty", "vm"}  # the empty ones
    assert spread[2].host == "epyc"  # 8 of 60 threads taken
    for c in spread:
        assert c.answer == fit(hosts[c.host], PINNED2, strategy="spread")
        assert c.placement == c.answer["placement"]
    pack = fl.place(PINNED2, count=3, weigher="pack", now=0.0)
    assert pack[0].host == "x-half"  # x-full has no free thread left
    assert pack[0].answer == fit(hosts["x-half"], PINNED2, strategy="pack")
    assert [c.score for c in pack] == sorted((c.score for c in pack), reverse=True)
    # stop once enough fit: one exact fit for count=1 when the best host fits
    before = fl.stats["exact_fits"]
    assert len(fl.place(PINNED2, weigher="spread", now=0.0)) == 1
    assert fl.stats["exact_fits"] - before == 1


def test_prefilter_never_refuses_a_host_where_the_fit_succeeds(hosts):
    fl = fleet_of(hosts)
    refused = 0
    for request in REQUESTS:
        needs = needs_of(parse_request(request))
        for name, snap in hosts.items():
            e = fl.entry(name)
            why = prefilter(e.shape, e.summary, needs)
            answer = fit(snap, request)
            if why is not None:
                refused += 1
                assert not answer["fits"], (name, request, why)
    assert refused >= 8  # and it does refuse (x-full, the vm, HUGE, ...)


def test_hosts_dead_stale_or_unreadable_are_never_offered(hosts, caplog):
    fl = fleet_of(hosts, now=0.0, stale_after_s=30.0)
    offered = {c.host for c in fl.place(SHARED1, count=10, now=1.0)}
    assert "x-empty" in offered
    fl.mark_dead("x-empty")
    fl.mark_stale("x-half")
    got = {c.host for c in fl.place(SHARED1, count=10, now=1.0)}
    assert not {"x-empty", "x-half"} & got
    assert fl.place(SHARED1, count=10, now=31.0) == []  # nothing heard for 31 s
    fl.touch("epyc", 30.0)
    assert [c.host for c in fl.place(SHARED1, count=10, now=31.0)] == ["epyc"]
    # a new snapshot revives a dead host
    fl.update(dict(hosts["x-empty"], seq=2), 31.0)
    assert "x-empty" in {c.host for c in fl.place(SHARED1, count=10, now=31.0)}
    # garbage for a known host: refused, logged once, the host not offered until a good one
    caplog.set_level(logging.WARNING, "hostagent.fleet")
    bad = copy.deepcopy(hosts["x-empty"])
    bad["seq"] = 3
    bad["usage"]["cells"] = "garbage"
    for _ in range(3):
        fl.update(bad, 32.0)
    assert fl.stats["refused"] == 3
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "snapshot of host 'x-empty' refused" in lines[0], lines
    assert "x-empty" not in {c.host for c in fl.place(SHARED1, count=10, now=32.0)}
    fl.update(dict(hosts["x-empty"], seq=4), 33.0)
    assert "x-empty" in {c.host for c in fl.place(SHARED1, count=10, now=33.0)}


@pytest.mark.parametrize("garbage", [
    None, 17, "text", {}, {"host": 5}, {"host": "g", "schema": 2},
    {"host": "g", "schema": 1, "epoch": "e", "seq": 1},
    {"host": "g", "schema": 1, "epoch": "e", "seq": True, "topology": {}, "config": {},
     "usage": {}},
    {"host": "g", "schema": 1, "epoch": "e", "seq": 1, "topology": {"cells": [{}]},
     "config": {}, "usage": {"cells": []}},
    {"host": "g", "schema": 1, "epoch": "e", "seq": 1, "topology": {"cells": [], "cpus": []},
     "config": {}, "usage": {"cells": [{"id": "x"}]}},
])
def test_garbage_and_other_schemas_are_refused_and_the_index_keeps_working(hosts, garbage):
    fl = fleet_of({"x-empty": hosts["x-empty"]})
    fl.update(garbage, 0.0)
    assert fl.stats["refused"] == 1
    assert "g" not in {c.host for c in fl.place(SHARED1, count=5, now=0.0)}
    assert [c.host for c in fl.place(SHARED1, count=5, now=0.0)] == ["x-empty"]


def test_two_agents_under_one_name_are_quarantined_not_flapping(hosts, caplog):
    caplog.set_level(logging.WARNING, "hostagent.fleet")
    fl = Fleet(stale_after_s=10.0)
    a = dict(hosts["x-empty"], host="dup", epoch="A")
    b = dict(hosts["x-full"], host="dup", epoch="B")
    fl.update(a, 0.0)
    fl.update(b, 1.0)  # an agent restart: a new epoch is fine
    assert fl.offered("dup", 1.0)
    for t in range(2, 8):  # then A again, B again, ...
        fl.update(a if t % 2 == 0 else b, float(t))
        assert not fl.offered("dup", float(t))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "two agents alternate" in lines[0], lines
    assert fl.place(SHARED1, now=8.0) == []
    # one of them alone for stale_after_s: offered again
    fl.update(dict(b, seq=2), 9.0)
    assert not fl.offered("dup", 16.0)
    fl.update(dict(b, seq=3), 18.0)
    assert fl.offered("dup", 18.0)


def test_weigher_specs():
    assert parse_weigher("pack") == (("pack", 1.0),)
    assert parse_weigher("spread:2, numa:1,cache:0") == (
        ("spread", 2.0), ("numa", 1.0), ("cache", 0.0))
    for bad, msg in [("packed", "weigher 'packed': must be one of"),
                     ("pack:x", "the weight must be a number from 0 to 1000"),
                     ("pack:-1", "from 0 to 1000"), ("pack:nan", "from 0 to 1000"),
                     ("pack,pack", "given twice"), ("pack,spread", "pull opposite ways"),
                     ("numa:0", "every weight is 0"), ("x" * 300, "at most 256")]:
        with pytest.raises(RequestError, match=msg):
            parse_weigher(bad)
    fl = Fleet()
    with pytest.raises(RequestError, match="count=0"):
        fl.place(PINNED2, count=0)
    with pytest.raises(RequestError, match="vcpus"):
        fl.place({"vcpus": 0, "memory_mb": 1})


def test_memory_per_48_thread_host_with_20_guests(hosts):
    """60 hosts of the 48-thread shape with 20 guests each, distinct snapshot objects:
    the index's own memory per host (the snapshots themselves are freed)."""
    base = hosts["x-full"]
    tracemalloc.start()
    fl = Fleet()
    for i in range(60):
        fl.update(copy.deepcopy(dict(base, host=f"h{i}")), 0.0)
    current, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    per_host = current / 60
    print(f"fleet index: {per_host / 1024:.1f} KiB per host")
    assert per_host < 100 * 1024


def test_rankings_stay_exact_while_hosts_change(hosts):
    """``place`` keeps one ranking per request and weigher and re-scores only the hosts
    changed since: after every change it returns what scoring every host would."""
    import random

    from hostagent.fleet.weighers import score

    rng = random.Random(7)
    kinds = list(hosts.values())
    fl = Fleet()
    current = {}
    for i in range(30):
        current[f"h{i:02d}"] = rng.choice(kinds)
        fl.update(dict(current[f"h{i:02d}"], host=f"h{i:02d}"), 0.0)
    seq = 1
    for _ in range(15):
        for _ in range(rng.randrange(1, 4)):
            seq += 1
            h = f"h{rng.randrange(30):02d}"
            current[h] = rng.choice(kinds)
            fl.update(dict(current[h], host=h, seq=seq), 0.0)
        if rng.random() < 0.2:
            fl.mark_dead(f"h{rng.randrange(30):02d}")
        for weigher, request in (("pack", PINNED2), ("spread", PINNED2), ("pack", ISOLATE4)):
            needs = needs_of(parse_request(request))
            weights = parse_weigher(weigher)
            want = sorted(
                (-score(e.shape, e.summary, needs, weights), h) for h, e in fl.entries.items()
                if fl.offered(h, 0.0) and fit(fl.snapshot(h), request)["fits"])
            got = fl.place(request, count=3, weigher=weigher, now=0.0)
            assert [c.host for c in got] == [h for _, h in want[:3]]
    assert fl.stats["rankings_built"] == 3


def test_max_hosts_and_older_snapshots(hosts, caplog):
    caplog.set_level(logging.WARNING, "hostagent.fleet")
    fl = Fleet(max_hosts=2)
    for name in ("a", "b", "c", "c"):
        fl.update(dict(hosts["x-empty"], host=name), 0.0)
    assert fl.hosts() == ["a", "b"] and fl.stats["refused"] == 2
    assert [r.getMessage() for r in caplog.records] == [
        "snapshot of host 'c' refused: the index holds max_hosts=2 hosts"]
    fl.update(dict(hosts["x-full"], host="a", seq=5), 1.0)
    fl.update(dict(hosts["x-empty"], host="a", seq=4), 2.0)  # older, same epoch: ignored
    assert fl.entry("a").seq == 5 and fl.summary("a").free_threads == 0
    assert fl.stats["older"] == 1


@given(host=fit_hosts_strategy(), request=fit_requests_strategy())
@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
def test_prefilter_is_only_necessary_conditions(host, request):
    """On the random small hosts and requests of test_fit_property: whenever the prefilter
    refuses a host, the exact fit does not fit either."""
    try:
        req = parse_request(request)
    except RequestError:
        assume(False)
    shape = make_shape("k", host["topology"], host["config"])
    why = prefilter(shape, summarize(shape, host["usage"]), needs_of(req))
    event("refused" if why else "passed")
    if why is not None:
        assert not fit(host, req)["fits"], why
