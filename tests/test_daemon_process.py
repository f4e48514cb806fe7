"""The daemon as a real process: snapshots, guests, signals, notify, requests, CURVE."""

import json
import signal
import time

import msgpack
import pytest
import zmq
from daemon_helpers import DaemonProc, guest_names, running_agent, wait_for
from libvirt_helpers import domain_xml

from hostagent import wire
from hostagent.curve import ClientCurve, make_keypair
from hostagent.subscriber import Subscriber


@pytest.fixture(scope="module")
def agent():
    with running_agent() as d:
        yield d


def test_ready_then_first_snapshot_of_the_fixture(agent):
    with agent.subscriber() as sub:
        snap = sub.wait_snapshot("testhost", timeout=10)
    assert snap["schema"] == 1 and snap["host"] == "testhost" and snap["seq"] >= 1
    assert [c["id"] for c in snap["topology"]["cells"]] == [0, 1]
    assert len(snap["topology"]["cpus"]) == 48
    assert snap["config"]["dedicated_cpus"][:3] == [2, 3, 4]
    assert snap["agent"]["libvirt"] == {"uri": agent.uri, "connected": True}
    assert sub.hosts["testhost"].epoch == snap["epoch"]


def test_heartbeats_carry_the_current_seq(agent):
    with agent.subscriber() as sub:
        sub.wait_snapshot("testhost")
        deadline = time.monotonic() + 5
        while sub.stats["heartbeats"] == 0 and time.monotonic() < deadline:
            sub.poll(0.5)
        assert sub.stats["heartbeats"] > 0
        assert sub.hosts["testhost"].heard_seq == sub.hosts["testhost"].seq


def test_starting_and_destroying_a_guest_publishes_its_usage(agent):
    xml = domain_xml("pinned", vcpus=2, memory_kib=1048576, vcpupin={0: "2", 1: "26"},
                     emulatorpin="0-1", numa_memory=("strict", "0"))
    with agent.subscriber() as sub:
        first = sub.wait_snapshot("testhost")
        rep = agent.request({"op": "test-domain", "action": "define", "xml": xml})
        assert rep["ok"], rep
        assert agent.request({"op": "test-domain", "action": "start", "name": "pinned"})["ok"]
        snap = wait_for(sub, lambda s: guest_names(s) == ["pinned"])
        assert snap["seq"] > first["seq"]
        owners = {t["cpu"]: t for t in snap["usage"]["threads"] if t["guest"]}
        assert {c: (t["vcpu"], t["emulator"]) for c, t in owners.items()} == {
            2: (0, False), 26: (1, False)}
        cell0 = snap["usage"]["cells"][0]
        assert 2 in cell0["pinned_cpus"] and 26 in cell0["pinned_cpus"]
        assert cell0["memory_used_kib"] == 1048576
        assert agent.request({"op": "test-domain", "action": "destroy", "name": "pinned"})["ok"]
        snap2 = wait_for(sub, lambda s: guest_names(s) == [])
        assert snap2["seq"] > snap["seq"]
        assert not any(t["guest"] for t in snap2["usage"]["threads"])
        assert agent.request({"op": "test-domain", "action": "undefine",
                              "name": "pinned"})["ok"]


def test_test_domain_errors_are_replies(agent):
    rep = agent.request({"op": "test-domain", "action": "start", "name": "nope"})
    assert not rep["ok"] and "nope" in rep["error"]
    rep = agent.request({"op": "test-domain", "action": "explode"})
    assert not rep["ok"] and "action='explode'" in rep["error"]
    rep = agent.request({"op": "test-domain", "action": "define", "xml": "<domain"})
    assert not rep["ok"] and rep["error"].startswith("op test-domain define:")


def test_bad_requests_get_error_replies_and_the_agent_keeps_serving(agent):
    ctx = zmq.Context.instance()
    d = ctx.socket(zmq.DEALER)
    d.linger = 0
    d.rcvtimeo = 5000
    d.connect(agent.req)
    try:
        cases = [
            (b"\x93garbage", "bad request"),
            (wire.pack({"op": 7}), "request.op = 7"),
            (wire.pack(["snapshot"]), "not a map"),
            (wire.pack({"op": "launch-missiles"}), "unknown op 'launch-missiles'"),
            (msgpack.packb({"op": "fit", "request": "x"}), "'request' must be a map"),
            (wire.pack({"op": "fit", "request": {"vcpus": "many"}}), "vcpus"),
            (wire.pack({"op": "snapshot", "pad": "x" * 70_000}), "over the limit"),
        ]
        for payload, needle in cases:
            d.send(payload)
            rep = wire.decode_reply(d.recv())
            assert not rep["ok"] and needle in rep["error"], (payload[:16], rep)
        d.rcvtimeo = 300
        d.send(b"x" * 300_000)  # over max_message_bytes: libzmq drops this peer
        with pytest.raises(zmq.Again):
            d.recv()
    finally:
        d.close()
    rep = agent.request({"op": "snapshot"})
    assert rep["ok"] and rep["kind"] == "snapshot" and rep["data"]["host"] == "testhost"
    assert agent.proc.poll() is None


def test_fit_request(agent):
    rep = agent.request({"op": "fit", "request": {
        "vcpus": 4, "memory_mb": 2048, "extra_specs": {"hw:cpu_policy": "dedicated"}}})
    assert rep["ok"], rep
    assert rep["result"]["fits"] is True
    assert rep["seq"] >= 1 and rep["epoch"]


def test_sigusr1_writes_a_valid_json_dump(agent):
    dump = agent.dir / "run" / "hostagent-dump.json"
    with agent.subscriber() as sub:  # one subscriber shows in the dump
        sub.wait_snapshot("testhost")
        agent.signal(signal.SIGUSR1)
        log = agent.wait_log("debug dump written to")
    assert str(dump) in log
    assert "Thread 0x" in log  # faulthandler's stacks of every thread
    doc = json.loads(dump.read_text())
    assert doc["host"] == "testhost" and doc["seq"] >= 1 and len(doc["epoch"]) == 16
    assert doc["subscribers"] >= 1
    assert doc["config"]["libvirt"]["uri"] == agent.uri
    assert doc["libvirt"]["connected"] is True
    assert doc["snapshot"]["seq"] == doc["seq"]
    assert doc["process"]["rss_bytes"] > 0 and "cpu_user_seconds" in doc["process"]
    assert any(k.startswith("MainThread") for k in doc["threads"])
    assert doc["udev"]["active"] is False
    assert oct(dump.stat().st_mode & 0o777) == "0o600"
    assert not list(dump.parent.glob(".hostagent-dump.*"))  # no temp file left


def test_sighup_with_a_broken_config_keeps_the_old_one(agent):
    good = agent.config.read_text()
    try:
        agent.config.write_text(good.replace('name = "testhost"', "name = [unclosed"))
        agent.signal(signal.SIGHUP)
        assert "RELOADING=1" in agent.wait_notify("RELOADING=1").split("\n")
        agent.wait_notify("READY=1")
        agent.wait_log("reload refused")
        agent.config.write_text(good.replace("coalesce_ms = 5.0", "coalesce_ms = -1"))
        agent.signal(signal.SIGHUP)
        agent.wait_notify("READY=1")
        log = agent.wait_log("publisher.coalesce_ms = -1")
        assert "previous configuration stays in force" in log
        assert agent.request({"op": "snapshot"})["ok"]
    finally:
        agent.config.write_text(good)


def test_sighup_reload_applies_a_new_resource_config(agent):
    good = agent.config.read_text()
    try:
        with agent.subscriber() as sub:
            sub.wait_snapshot("testhost")
            agent.config.write_text(good.replace('dedicated_cpus = "2-11,14-23,26-35,38-47"',
                                                 'dedicated_cpus = "2-11"'))
            agent.signal(signal.SIGHUP)
            snap = wait_for(sub, lambda s: s["config"]["dedicated_cpus"] == list(range(2, 12)))
            assert snap["usage"]["cells"][1]["dedicated_cpus"] == 0
    finally:
        agent.config.write_text(good)
        agent.signal(signal.SIGHUP)


def test_sigterm_exits_0_with_stopping_and_watchdog_pings():
    d = DaemonProc("vm-1s-nosmt", dedicated=None, env={"WATCHDOG_USEC": "100000"})
    try:
        ready = d.wait_notify("READY=1")
        assert "STATUS=seq 1" in ready
        d.wait_notify("WATCHDOG=1")
        assert d.stop() == 0
        d.wait_notify("STOPPING=1", timeout=5)
        assert "stopping" in d.log_text()
    finally:
        d.close()


def test_hugepage_counters_are_polled_and_published_on_change():
    pool = "devices/system/node/node0/hugepages/hugepages-2048kB"
    d = DaemonProc("vm-1s-nosmt", copy_tree=[pool], dedicated=None)
    try:
        d.wait_notify("READY=1")
        pool = d.sysfs / pool
        with d.subscriber() as sub:
            snap = sub.wait_snapshot("testhost")
            assert snap["topology"]["cells"][0]["hugepages"][0]["total"] == 0
            (pool / "nr_hugepages").write_text("64\n")
            (pool / "free_hugepages").write_text("60\n")
            snap = wait_for(sub, lambda s: s["topology"]["cells"][0]["hugepages"][0]["total"]
                            == 64)
            assert snap["topology"]["cells"][0]["hugepages"][0]["free"] == 60
            seq = snap["seq"]
            time.sleep(0.5)  # a few polls with nothing changed: nothing new published
            sub.poll(0.1)
            assert sub.hosts["testhost"].seq == seq
        assert d.stop() == 0
    finally:
        d.close()


def test_bad_config_and_unbindable_endpoint_fail_at_start_with_exit_2():
    d = DaemonProc("vm-1s-nosmt", start=False, dedicated=None)
    try:
        d.config.write_text(d.config.read_text().replace("heartbeat_seconds = 0.2",
                                                         "heartbeat_seconds = 0"))
        d.start()
        assert d.proc.wait(15) == 2
        assert "hostagent: " in d.log_text() and "heartbeat_seconds = 0" in d.log_text()
        text = d.config.read_text().replace("heartbeat_seconds = 0", "heartbeat_seconds = 1")
        d.config.write_text(text.replace(f'ipc://{d.dir}/s"]', 'tcp://127.0.0.1:x"]'))
        d.start()
        assert d.proc.wait(15) == 2
        assert "cannot bind stream endpoint tcp://127.0.0.1:x" in d.log_text()
        d.config.write_text(d.config.read_text().replace(
            f'sysfs_root = "{d.sysfs}"', f'sysfs_root = "{d.dir}/nosys"'))
        d.start()
        assert d.proc.wait(15) == 2
        assert f"hostagent: {d.dir}/nosys: not a directory" in d.log_text()
    finally:
        d.close()


def test_curve_agent_serves_allowed_clients_only():
    d = DaemonProc("vm-1s-nosmt", start=False, dedicated=None)
    try:
        keys, allowed = d.dir / "keys", d.dir / "allowed"
        allowed.mkdir()
        srv_pub, srv_sec = make_keypair(keys, "server")
        _, good_sec = make_keypair(allowed, "sched")
        _, bad_sec = make_keypair(keys, "intruder")
        d.config.write_text(d.config.read_text() + f"""
[curve]
enabled = true
server_secret_key = "{srv_sec}"
allowed_clients_dir = "{allowed}"
""")
        d.start()
        d.wait_notify("READY=1")
        good = ClientCurve.load(good_sec, srv_pub)
        bad = ClientCurve.load(bad_sec, srv_pub)
        with d.subscriber(curve=good) as ok, d.subscriber(curve=bad) as nope, \
                Subscriber([d.stream]) as plain:
            assert ok.wait_snapshot("testhost")["host"] == "testhost"
            assert nope.poll(0.5) == [] and plain.poll(0.1) == []
            assert nope.hosts == {} and plain.hosts == {}
            for refused in (nope, plain):  # no message counted; only refused handshakes
                assert set(refused.stats) <= {"disconnects"}
        assert d.request({"op": "snapshot"}, curve=good)["ok"]
        with pytest.raises(Exception, match="no reply"):
            d.request({"op": "snapshot"}, curve=bad, timeout=0.5)
        assert d.stop() == 0
    finally:
        d.close()
