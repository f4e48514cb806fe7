"""The Prometheus endpoint of a real agent process: real HTTP GETs, parsed with
prometheus_client's text parser, against the snapshot the agent publishes."""

from __future__ import annotations

import re
import signal
import socket
import time
import urllib.request
from typing import Any

import pytest
import zmq
from daemon_helpers import DaemonProc
from libvirt_helpers import domain_xml
from prometheus_client.parser import text_string_to_metric_families

from hostagent.agent import metrics

METRICS_ON = '\n[metrics]\nlisten = "127.0.0.1:0"\n'

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=20) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def value(s: Samples, name: str, **labels: str) -> float:
    return s[(name, tuple(sorted(labels.items())))]


def scrape_until(url: str, pred: Any, timeout: float = 20.0) -> Samples:
    """Scrape until ``pred(samples)`` holds (scrapes are cached for up to 1 s)."""
    deadline = time.monotonic() + timeout
    while True:
        s = scrape(url)
        if pred(s):
            return s
        if time.monotonic() > deadline:
            raise AssertionError("the metrics never matched")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def agent():
    d = DaemonProc(extra=METRICS_ON)
    try:
        d.wait_notify("READY=1")
        d.url = re.search(r"metrics on (http://\S+)", d.log_text()).group(1)
        yield d
        assert d.stop() == 0, d.log_text()
    finally:
        d.close()


def latest(agent: DaemonProc) -> dict[str, Any]:
    rep = agent.request({"op": "snapshot"})
    assert rep["ok"], rep
    return rep["data"]


def test_metrics_equal_the_published_snapshot(agent):
    snap = latest(agent)
    s = scrape_until(agent.url, lambda s: s.get(("hostagent_snapshot_seq", ())) == snap["seq"])
    assert value(s, "hostagent_info", version="0.1.0", host="testhost",
                 epoch=snap["epoch"]) == 1
    assert value(s, "hostagent_libvirt_connected") == 1
    assert value(s, "hostagent_guests") == len(snap["usage"]["guests"])
    for cell in snap["usage"]["cells"]:
        c = str(cell["id"])
        assert value(s, "hostagent_cell_dedicated_threads", cell=c) == cell["dedicated_cpus"]
        assert value(s, "hostagent_cell_dedicated_threads_free", cell=c) == cell["free_pcpus"]
        assert value(s, "hostagent_cell_cores_free", cell=c) == cell["free_cores"]
        assert value(s, "hostagent_cell_memory_free_bytes", cell=c,
                     source="tracker") == cell["memory_free_kib"] * 1024
        for pool in cell["hugepages"]:
            size = str(pool["size_kib"] * 1024)
            assert value(s, "hostagent_hugepages_total", cell=c, size_bytes=size) == \
                pool["total"]
            assert value(s, "hostagent_hugepages_free", cell=c, size_bytes=size,
                         source="tracker") == pool["free"]
    for cell in snap["topology"]["cells"]:
        c = str(cell["id"])
        assert value(s, "hostagent_cell_memory_free_bytes", cell=c,
                     source="kernel") == cell["memory_free_kib"] * 1024
        for pool in cell["hugepages"]:
            assert value(s, "hostagent_hugepages_free", cell=c,
                         size_bytes=str(pool["size_kib"] * 1024), source="kernel") == \
                pool["free"]
    assert snap["usage"]["caches"]  # xeon-2s-cat has CAT
    for cache in snap["usage"]["caches"]:
        labels = dict(resource=cache["resource"], level=str(cache["level"]),
                      type=cache["type"], cache_id=str(cache["id"]))
        assert value(s, "hostagent_cache_ways_free", **labels) == cache["free_ways"]
        assert value(s, "hostagent_cache_ways", **labels) == 11  # cbm_mask 7ff
    kinds = [c["kind"] for c in snap["usage"]["conflicts"]]
    for kind in metrics.CONFLICT_KINDS:
        assert value(s, "hostagent_conflicts", kind=kind) == kinds.count(kind)


def test_a_guest_started_takes_its_threads_off_the_free_metric(agent):
    before = scrape(agent.url)
    free0 = value(before, "hostagent_cell_dedicated_threads_free", cell="0")
    guests = value(before, "hostagent_guests")
    xml = domain_xml("pinned", vcpus=2, memory_kib=1048576, vcpupin={0: "2", 1: "26"},
                     emulatorpin="0-1", numa_memory=("strict", "0"))
    assert agent.request({"op": "test-domain", "action": "define", "xml": xml})["ok"]
    assert agent.request({"op": "test-domain", "action": "start", "name": "pinned"})["ok"]
    s = scrape_until(agent.url, lambda s: value(s, "hostagent_guests") == guests + 1)
    assert value(s, "hostagent_cell_dedicated_threads_free", cell="0") == free0 - 2
    assert value(s, "hostagent_cell_memory_used_bytes", cell="0") == 1048576 * 1024
    assert agent.request({"op": "test-domain", "action": "destroy", "name": "pinned"})["ok"]
    assert agent.request({"op": "test-domain", "action": "undefine", "name": "pinned"})["ok"]
    s = scrape_until(agent.url, lambda s: value(s, "hostagent_guests") == guests)
    assert value(s, "hostagent_cell_dedicated_threads_free", cell="0") == free0
    assert value(s, "hostagent_snapshots_published_total") >= \
        value(before, "hostagent_snapshots_published_total") + 2


def test_requests_and_bad_requests_are_counted(agent):
    before = scrape(agent.url)
    ctx = zmq.Context.instance()
    dealer = ctx.socket(zmq.DEALER)
    dealer.linger = 0
    dealer.rcvtimeo = 10000
    dealer.connect(agent.req)
    try:
        dealer.send(b"\x93garbage")
        assert b"bad request" in dealer.recv()
    finally:
        dealer.close()
    latest(agent)
    bad = value(before, "hostagent_bad_requests_total")
    reqs = value(before, "hostagent_requests_total")
    s = scrape_until(agent.url, lambda s: value(s, "hostagent_bad_requests_total") == bad + 1)
    assert value(s, "hostagent_requests_total") >= reqs + 2


def test_idle_connections_do_not_stop_a_scrape(agent):
    host, port = re.match(r"http://([\d.]+):(\d+)/", agent.url).groups()
    idle = [socket.create_connection((host, int(port)), timeout=20)
            for _ in range(metrics.MAX_CONNECTIONS + 2)]
    try:
        s = scrape(agent.url)
        assert value(s, "hostagent_libvirt_connected") == 1
        assert idle[0].recv(1) == b""  # the oldest idle connection was closed for it
        s = scrape_until(agent.url, lambda s: value(
            s, "hostagent_metrics_connections_dropped_total", reason="evicted") >= 2)
    finally:
        for sock in idle:
            sock.close()


def test_reload_keeps_the_metrics_listener_and_counts(agent):
    before = value(scrape(agent.url), "hostagent_reloads_total")
    text = agent.config.read_text()
    agent.config.write_text(text.replace('listen = "127.0.0.1:0"', 'listen = "127.0.0.1:1"'))
    try:
        agent.signal(signal.SIGHUP)
        agent.wait_log("[metrics] takes effect at restart")
        s = scrape_until(agent.url, lambda s: value(s, "hostagent_reloads_total") == before + 1)
        assert value(s, "hostagent_reloads_refused_total") == 0
    finally:
        agent.config.write_text(text)


def test_metrics_are_off_without_the_option():
    d = DaemonProc()
    try:
        d.wait_notify("READY=1")
        assert "metrics on" not in d.log_text()
        assert d.stop() == 0
    finally:
        d.close()


def test_an_address_in_use_stops_the_agent_with_exit_2():
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    d = DaemonProc(extra=f'\n[metrics]\nlisten = "127.0.0.1:{port}"\n')
    try:
        assert d.proc.wait(30) == 2
        assert f"hostagent: cannot listen for metrics on 127.0.0.1:{port}: " in d.log_text()
    finally:
        taken.close()
        d.close()


def test_a_remote_address_without_allow_remote_is_refused_at_start():
    d = DaemonProc(extra='\n[metrics]\nlisten = "0.0.0.0:9464"\n')
    try:
        assert d.proc.wait(30) == 2
        line = d.log_text().strip()
        assert line.startswith("hostagent: ") and "metrics.listen = '0.0.0.0:9464'" in line
        assert "set metrics.allow_remote = true" in line
    finally:
        d.close()
