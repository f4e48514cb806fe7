"""``hostagent forward`` (issue 15 item 4): real agent processes -> a real forwarder
process -> real subscribers, over ipc. Late joiners get every host's latest snapshot
through the forwarder (XPUB_VERBOSE carries their subscription to every agent), a
forwarder restart is healed, bad input from an agent is dropped and counted.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from daemon_helpers import DaemonProc
from forward_helpers import ForwardProc
from libvirt_helpers import domain_xml

from hostagent import wire
from hostagent.curve import ClientCurve, make_keypair
from hostagent.errors import ConfigError
from hostagent.forward import forward_config_from_dict
from hostagent.subscriber import Subscriber

ROOT = Path(__file__).resolve().parent.parent
HOSTS = ("fa", "fb", "fc")


def named_agent(name: str, fixture: str = "vm-1s-nosmt", **kw) -> DaemonProc:
    d = DaemonProc(fixture, start=False, dedicated=None, **kw)
    d.config.write_text(d.config.read_text().replace('name = "testhost"', f'name = "{name}"'))
    return d


@pytest.fixture(scope="module")
def agents():
    """Three agents (hosts fa, fb, fc), started once for the module's tests."""
    ds = [named_agent(h) for h in HOSTS]
    try:
        for d in ds:
            d.start()
        for d in ds:
            d.wait_notify("READY=1")
        yield ds
        for d in ds:
            assert d.stop() == 0, d.log_text()
    finally:
        for d in ds:
            d.close()


def wait_hosts(sub: Subscriber, pred, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred(sub):
        left = deadline - time.monotonic()
        assert left > 0, f"timed out; held {[(h, s.seq) for h, s in sub.hosts.items()]}"
        sub.poll(min(left, 0.5))


def guests(snap: dict) -> list[str]:
    return sorted(g["name"] for g in snap["usage"]["guests"])


def all_held(sub: Subscriber) -> bool:
    return all(sub.latest(h) is not None for h in HOSTS)


def test_three_agents_two_subscribers_late_joiner_watch_and_dump(agents, tmp_path):
    """Three agents -> forwarder -> two subscribers; the second joins late and gets every
    host's latest without any change being made; ``watch`` through the forwarder shows
    every host; an agent sending a non-stream message is dropped and counted. (> 2 s:
    three agent processes and a forwarder.)"""
    import zmq

    ctx = zmq.Context.instance()
    rogue = ctx.socket(zmq.XPUB)  # an "agent" that sends garbage
    rogue.linger = 0
    rogue_ep = f"ipc://{tmp_path}/rogue"
    rogue.bind(rogue_ep)
    fwd = ForwardProc([d.stream for d in agents] + [rogue_ep])
    try:
        fwd.start()
        with Subscriber([fwd.stream]) as first:
            wait_hosts(first, all_held)
            held = {h: first.hosts[h].seq for h in HOSTS}
            assert rogue.poll(5000)  # the forwarder passed the subscription up
            assert rogue.recv() == b"\x01" + wire.TOPIC_PREFIX
            rogue.send_multipart([b"hostagent.fa.", b"x", b"y"])  # 3 frames
            rogue.send_multipart([b"hostagent.no-dot", b"x"])  # not hostagent.<host>.
            # the late joiner: nothing changed on the agents, yet it gets all three
            with Subscriber([fwd.stream]) as late:
                wait_hosts(late, all_held)
                for h in HOSTS:
                    assert late.hosts[h].seq == held[h]
                    assert late.latest(h)["host"] == h
            r = subprocess.run(
                [sys.executable, "-m", "hostagent.cli", "watch", fwd.stream, "--json",
                 "--count", "3", "--seconds", "30"], capture_output=True, text=True,
                timeout=60, cwd=ROOT)
            assert r.returncode == 0, r.stderr
            assert sorted(json.loads(line)["host"] for line in r.stdout.splitlines()) == \
                sorted(HOSTS)
            first.poll(0.3)  # the welcome re-publishes: duplicates for the first one
            assert first.stats["duplicates"] >= 3 and first.stats["bad_messages"] == 0
        doc = fwd.dump()
        counters = doc["forward"]["counters"]
        assert counters["bad_messages"] == 2, counters
        assert counters["messages_out"] >= 9 and counters["bytes_out"] > 0
        assert counters["messages_in"] == counters["messages_out"] + 2
        assert counters["subscribes"] >= 3
        assert doc["forward"]["endpoints"]["subscribers"] == [fwd.stream]
        assert "forward" in doc and doc["process"]["pid"] == fwd.proc.pid
        assert fwd.stop() == 0, fwd.log_text()
        assert "message from an agent dropped" in fwd.log_text()
    finally:
        rogue.close(linger=0)
        fwd.close()


def test_forwarder_restart_is_healed(agents):
    """The forwarder stops, one agent publishes twice meanwhile, the forwarder starts
    again on the same endpoint: the subscriber reconnects by itself, gets that host's
    newest snapshot (counting the gap) and keeps the other hosts. (> 2 s: agent and
    forwarder processes, a reconnect.)"""
    fwd = ForwardProc([d.stream for d in agents])
    try:
        fwd.start()
        with Subscriber([fwd.stream], dead_after=60) as sub:
            wait_hosts(sub, all_held)
            before = sub.hosts["fa"].seq
            assert fwd.stop() == 0
            for name in ("g1", "g2"):  # two snapshots the subscriber never sees
                xml = domain_xml(name, vcpus=1)
                assert agents[0].request({"op": "test-domain", "action": "create",
                                          "xml": xml})["ok"]
                deadline = time.monotonic() + 10
                while name not in guests(agents[0].request({"op": "snapshot"})["data"]):
                    assert time.monotonic() < deadline
                    time.sleep(0.02)
            newest = agents[0].request({"op": "snapshot"})["seq"]
            assert newest >= before + 2
            fwd.start()
            wait_hosts(sub, lambda s: s.hosts["fa"].seq == newest)
            assert guests(sub.latest("fa")) == ["g1", "g2"]
            assert sub.stats["gaps"] >= 1 and sub.stats["bad_messages"] == 0
            assert all(sub.alive(h) for h in HOSTS)
        assert fwd.stop() == 0
        for name in ("g1", "g2"):
            assert agents[0].request({"op": "test-domain", "action": "destroy",
                                      "name": name})["ok"]
    finally:
        fwd.close()


def test_curve_on_both_sides(tmp_path):
    """CURVE agent -> CURVE forwarder -> CURVE subscriber: an allowed subscriber gets the
    host, one with another key and a plain one get nothing. (> 2 s: an agent process.)"""
    keys, allowed, fwd_allowed = tmp_path / "k", tmp_path / "a", tmp_path / "fa"
    allowed.mkdir()
    fwd_allowed.mkdir()
    agent_pub, agent_sec = make_keypair(keys, "agent")
    fwd_pub, fwd_sec = make_keypair(keys, "forward")
    (allowed / "forward.key").write_bytes(fwd_pub.read_bytes())  # the agent lets it in
    _, sched_sec = make_keypair(fwd_allowed, "sched")
    _, intruder_sec = make_keypair(keys, "intruder")
    d = named_agent("fcurve")
    d.config.write_text(d.config.read_text() + f"""
[curve]
enabled = true
server_secret_key = "{agent_sec}"
allowed_clients_dir = "{allowed}"
""")
    fwd = ForwardProc([d.stream], curve=f"""[curve]
enabled = true
server_secret_key = "{fwd_sec}"
allowed_clients_dir = "{fwd_allowed}"
client_secret_key = "{fwd_sec}"
agent_public_key = "{agent_pub}"
""")
    try:
        d.start()
        d.wait_notify("READY=1")
        fwd.start()
        good = ClientCurve.load(sched_sec, fwd_pub)
        bad = ClientCurve.load(intruder_sec, fwd_pub)
        with Subscriber([fwd.stream], curve=good) as ok, \
                Subscriber([fwd.stream], curve=bad) as nope, Subscriber([fwd.stream]) as plain:
            assert ok.wait_snapshot("fcurve", timeout=20)["host"] == "fcurve"
            assert nope.poll(0.3) == [] and plain.poll(0.1) == []
            assert nope.hosts == {} and plain.hosts == {}
        assert fwd.stop() == 0
        assert d.stop() == 0
    finally:
        fwd.close()
        d.close()


def test_config_is_validated(tmp_path):
    def bad(data: dict, needle: str) -> None:
        with pytest.raises(ConfigError, match=needle):
            forward_config_from_dict(data, "f.toml")

    ok = {"forward": {"upstream": ["ipc:///tmp/x"]}}
    assert forward_config_from_dict(ok).upstream[0].endpoint == "ipc:///tmp/x"
    bad({"forward": {}}, r"f.toml: forward.upstream = \[\]: nothing to forward")
    bad({"forward": {"upstream": ["x"]}}, r"forward.upstream = 'x': endpoints must start")
    bad({"forward": {"upstream": ["ipc:///x"], "send_hwm": 0}},
        r"forward.send_hwm = 0: must be >= 1")
    bad({"forward": {"upstream": ["ipc:///x"], "hwm": 1}}, r"forward.hwm = 1: unknown option")
    bad({"forward": {"upstream": ["ipc:///x"], "endpoints": ["tcp://0.0.0.0:6520"]}},
        "binds tcp beyond loopback without CURVE")
    bad({"forward": {"listen": ["ipc:///x"]}, "curve": {"enabled": True}},
        "agents connecting to the forwarder cannot use CURVE")
    bad({"forward": {"upstream": [{"endpoint": "ipc:///x", "key": "k"}]}},
        "an entry is an endpoint string or a table")
    bad({"fwd": {}}, r"unknown table \[fwd\]")
    cfg = tmp_path / "f.toml"
    cfg.write_text("[forward]\nupstream = []\n")
    r = subprocess.run([sys.executable, "-m", "hostagent.cli", "forward", "--config",
                        str(cfg)], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 2
    assert r.stderr.startswith(f"hostagent: {cfg}: forward.upstream = []: nothing to "
                               "forward"), r.stderr


def test_shipped_example_config_is_the_defaults():
    """etc/forward.toml lists every option at its default."""
    from hostagent.forward import ForwardConfig, load_forward_config

    cfg = load_forward_config(ROOT / "etc" / "forward.toml")
    d = ForwardConfig()
    for key in ("endpoints", "listen", "send_hwm", "recv_hwm", "max_message_bytes",
                "insecure", "runtime_dir", "log_level", "curve"):
        assert getattr(cfg, key) == getattr(d, key), key


def test_agents_that_connect_to_the_forwarder(tmp_path):
    """``[publisher] forward_to``: the agent's XPUB connects to the forwarder's
    ``listen``; a subscriber of the forwarder (joining after the agent) gets the host;
    the options are validated. (> 2 s: an agent process.)"""
    from hostagent.config import config_from_dict

    listen = f"ipc://{tmp_path}/listen"
    fwd = ForwardProc([], extra=f'listen = ["{listen}"]')
    fwd.config.write_text(fwd.config.read_text().replace("upstream = []\n", ""))
    d = named_agent("fconn")
    d.config.write_text(d.config.read_text().replace(
        "max_message_bytes = 262144\n", f'max_message_bytes = 262144\nforward_to = ["{listen}"]\n'))
    try:
        fwd.start()
        d.start()
        d.wait_notify("READY=1")
        with Subscriber([fwd.stream]) as sub:
            assert sub.wait_snapshot("fconn", timeout=20)["host"] == "fconn"
        assert fwd.dump()["forward"]["endpoints"]["agents"] == [listen]
        assert fwd.stop() == 0 and d.stop() == 0
    finally:
        fwd.close()
        d.close()
    with pytest.raises(ConfigError, match="publisher.forward_to .*cannot be used with "
                       r"\[curve\] enabled"):
        config_from_dict({"publisher": {"forward_to": ["ipc:///x"]}, "curve": {"enabled": True}})
    with pytest.raises(ConfigError, match="tcp beyond loopback without CURVE"):
        config_from_dict({"publisher": {"forward_to": ["tcp://10.1.1.1:6521"]}})
