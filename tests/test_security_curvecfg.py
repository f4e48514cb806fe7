"""Hardening of CURVE keys and reloads: secret key modes, bad allowed-client key files,
removed keys cutting live sessions, empty config files, heartbeat period on reload.

Real ZeroMQ CURVE sockets on ipc endpoints in tmp dirs and real daemon processes.
"""

import asyncio
import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import zmq
import zmq.asyncio
from daemon_helpers import DaemonProc, guest_names, wait_for
from libvirt_helpers import domain_xml
from zmq_helpers import run, running_publisher, snapshot_data, source

from hostagent import wire
from hostagent.config import load_config
from hostagent.curve import ClientCurve, ServerCurve, load_keys, make_keypair, start_authenticator
from hostagent.errors import ConfigError, HostagentError
from hostagent.subscriber import AsyncSubscriber, Subscriber, async_request

ROOT = Path(__file__).resolve().parent.parent


def cli(*args, timeout=30):
    return subprocess.run([sys.executable, "-m", "hostagent.cli", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


# --- 6. secret key file modes ----------------------------------------------------------

@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o700 | 0o010])
def test_secret_key_accessible_to_group_or_others_is_refused(tmp_path, mode):
    pub, sec = make_keypair(tmp_path / "k", "srv")
    os.chmod(sec, mode)
    with pytest.raises(ConfigError) as err:
        ServerCurve.load(str(sec), str(tmp_path))
    assert str(err.value) == (f"{sec}: mode {mode:04o}: a secret key must not be readable "
                              "or writable by group or others (chmod 600)")
    with pytest.raises(ConfigError, match=f"mode {mode:04o}"):
        ClientCurve.load(sec, pub)  # a subscriber's secret key: the same rule


def test_secret_key_owner_only_modes_are_accepted(tmp_path):
    pub, sec = make_keypair(tmp_path / "k", "srv")
    for mode in (0o600, 0o400):
        os.chmod(sec, mode)
        assert load_keys(sec, need_secret=True)[1] is not None
    os.chmod(pub, 0o644)  # a public key may be world-readable
    assert load_keys(pub, need_secret=False)[1] is None


def test_keys_writes_the_secret_0600_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        pub, sec = make_keypair(tmp_path / "k", "srv")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(sec).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(pub).st_mode) == 0o644


def test_watch_refuses_a_world_readable_client_secret_key(tmp_path):
    srv_pub, _ = make_keypair(tmp_path / "k", "srv")
    _, cli_sec = make_keypair(tmp_path / "k", "sched")
    os.chmod(cli_sec, 0o644)
    r = cli("watch", f"ipc://{tmp_path}/none", "--count", "1", "--client-key", str(cli_sec),
            "--server-key", str(srv_pub))
    assert r.returncode == 2
    assert r.stderr.strip() == (f"hostagent: {cli_sec}: mode 0644: a secret key must not be "
                                "readable or writable by group or others (chmod 600)")


def test_agent_refuses_to_start_with_a_world_readable_server_key():
    d = DaemonProc("vm-1s-nosmt", start=False, dedicated=None)
    try:
        _, srv_sec, allowed, _ = _curve_setup(d, clients=())
        os.chmod(srv_sec, 0o644)
        d.start()
        assert d.proc.wait(15) == 2
        assert f"hostagent: {srv_sec}: mode 0644: a secret key" in d.log_text()
    finally:
        d.close()


# --- 7. bad files in the allowed-clients directory -------------------------------------

def _write_bad_key_files(allowed: Path) -> list[Path]:
    """One file per kind of bad ``*.key``; returns their paths."""
    bad = [allowed / "broken.key", allowed / "short.key", allowed / "notz85.key",
           allowed / "huge.key", allowed / "adir.key"]
    bad[0].write_text("hello, I am not a certificate\n")
    bad[1].write_text('metadata\ncurve\n    public-key = "abc"\n')
    bad[2].write_text('curve\n    public-key = "' + "~" * 40 + '"\n')
    bad[3].write_text("#" * (1 << 20) + "\n")
    bad[4].mkdir()
    return bad


def test_bad_allowed_key_files_are_skipped_with_a_warning_naming_each(tmp_path, caplog):
    from hostagent.curve import load_allowed_keys

    allowed = tmp_path / "allowed"
    allowed.mkdir()
    good, _ = make_keypair(allowed, "good")
    (allowed / "good.key_secret").unlink()
    bad = _write_bad_key_files(allowed)
    (allowed / "README").write_text("not a key file: ignored\n")
    caplog.set_level(logging.WARNING, logger="hostagent.curve")
    keys = load_allowed_keys(allowed)
    assert keys.keys == frozenset({load_keys(good, need_secret=False)[0]})
    assert [m.split(":")[0] for m in sorted(keys.skipped)] == sorted(str(p) for p in bad)
    warned = [r.getMessage() for r in caplog.records]
    for path in bad:
        assert any(m.startswith(f"{path}: ") and "skipped" in m for m in warned), warned
    assert any("not a ZeroMQ certificate" in m for m in warned)
    assert any("over the limit" in m for m in warned)
    assert any("not a regular file" in m for m in warned)
    with pytest.raises(ConfigError, match="allowed-clients directory does not exist"):
        load_allowed_keys(tmp_path / "none")


def test_a_fifo_named_key_does_not_hang_the_loader(tmp_path):
    from hostagent.curve import load_allowed_keys

    allowed = tmp_path / "allowed"
    allowed.mkdir()
    os.mkfifo(allowed / "pipe.key")
    out = []
    t = threading.Thread(target=lambda: out.append(load_allowed_keys(allowed)), daemon=True)
    t.start()
    t.join(20)
    assert out, "load_allowed_keys blocked on a FIFO"
    assert out[0].keys == frozenset() and "not a regular file" in out[0].skipped[0]


def test_one_bad_key_file_does_not_lock_out_the_good_clients(tmp_path):
    keys, allowed = tmp_path / "keys", tmp_path / "allowed"
    allowed.mkdir()
    srv_pub, srv_sec = make_keypair(keys, "server")
    _, one_sec = make_keypair(allowed, "one")
    _, two_sec = make_keypair(allowed, "two")
    _, intruder_sec = make_keypair(keys, "intruder")
    for p in allowed.glob("*.key_secret"):
        p.rename(keys / p.name)
    (allowed / "broken.key").write_text("garbage\n")
    server = ServerCurve.load(str(srv_sec), str(allowed))
    one = ClientCurve.load(keys / one_sec.name, srv_pub)
    two = ClientCurve.load(keys / two_sec.name, srv_pub)
    intruder = ClientCurve.load(intruder_sec, srv_pub)

    async def main():
        ctx = zmq.asyncio.Context()
        auth = start_authenticator(ctx, str(allowed))
        try:
            async with running_publisher(tmp_path, curve=server, ctx=ctx) as pub:
                await pub.publish(snapshot_data(7))
                subs = [AsyncSubscriber([source(tmp_path)], curve=c, ctx=ctx)
                        for c in (one, two, intruder)]
                for s in subs[:2]:
                    assert (await s.wait_snapshot("h1", timeout=10))["usage"] == {"n": 7}
                assert await subs[2].poll(0.3) == [] and subs[2].hosts == {}
                rep = await async_request(f"ipc://{tmp_path}/request", {"op": "snapshot"},
                                          curve=two, ctx=ctx)
                assert rep["ok"]
                for s in subs:
                    s.close()
            assert len(auth.keys) == 2
        finally:
            auth.stop()
            ctx.destroy(linger=0)
    run(main())


# --- 8. a removed key cuts the live session (in process) --------------------------------

async def _drain(sub, seconds):
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        await sub.poll(left)


def test_removed_key_loses_its_stream_and_request_connections(tmp_path):
    from hostagent.curve import load_allowed_keys

    keys, allowed = tmp_path / "keys", tmp_path / "allowed"
    allowed.mkdir()
    srv_pub, srv_sec = make_keypair(keys, "server")
    kept_pub, kept_sec = make_keypair(allowed, "kept")
    gone_pub, gone_sec = make_keypair(allowed, "gone")
    server = ServerCurve.load(str(srv_sec), str(allowed))
    kept = ClientCurve.load(kept_sec, srv_pub)
    gone = ClientCurve.load(gone_sec, srv_pub)

    async def main():
        ctx = zmq.asyncio.Context()
        auth = start_authenticator(ctx, str(allowed))
        dealer = ctx.socket(zmq.DEALER)  # the removed client's live request connection
        dealer.linger = 0
        gone.apply(dealer)
        dealer.connect(f"ipc://{tmp_path}/request")
        try:
            async with running_publisher(tmp_path, curve=server, ctx=ctx,
                                         heartbeat_seconds=0.05) as pub:
                await pub.publish(snapshot_data(1))
                a = AsyncSubscriber([source(tmp_path)], curve=kept, ctx=ctx)
                b = AsyncSubscriber([source(tmp_path)], curve=gone, ctx=ctx)
                for s in (a, b):
                    await s.wait_snapshot("h1", timeout=10)
                await dealer.send(wire.pack({"op": "snapshot"}))
                assert wire.decode_reply(await asyncio.wait_for(dealer.recv(), 10))["ok"]

                gone_pub.unlink()
                removed = auth.replace(load_allowed_keys(allowed))
                assert removed == frozenset({load_keys(gone_pub.parent / "gone.key_secret",
                                                       need_secret=True)[0]})
                assert auth.keys == frozenset({load_keys(kept_pub, need_secret=False)[0]})
                unsubscribes = pub.stats["unsubscribes"]
                await pub.drop_connections()
                assert pub.stats["connection_drops"] == 1
                # the cut takes effect in ZeroMQ's I/O thread: once both clients' pipes
                # are gone (their unsubscriptions read), nothing more reaches b
                end = time.monotonic() + 10
                while pub.stats["unsubscribes"] < unsubscribes + 2:
                    assert time.monotonic() < end, dict(pub.stats)
                    await asyncio.sleep(0.01)

                # the kept client reconnects by itself and gets what is published next
                await pub.publish(snapshot_data(2))
                snap = await _until_usage(a, 2)
                seq_after = snap["seq"]
                await _drain(b, 0.3)  # anything in flight at the cut is read here
                heard = b.stats["heartbeats"]
                await pub.publish(snapshot_data(3))
                await _until_usage(a, 3)
                beats = a.stats["heartbeats"]
                while a.stats["heartbeats"] < beats + 5:  # a keeps hearing; b must not
                    await a.poll(0.05)
                    await b.poll(0)
                await _drain(b, 0.2)
                assert b.latest("h1")["seq"] < seq_after
                assert b.stats["heartbeats"] == heard
                # its request connection was cut too: the same socket gets no reply (or
                # has no connection left to send on)
                try:
                    await dealer.send(wire.pack({"op": "snapshot"}), zmq.NOBLOCK)
                except zmq.Again:
                    pass
                else:
                    with pytest.raises(asyncio.TimeoutError):
                        await asyncio.wait_for(dealer.recv(), 1.0)
                rep = await async_request(f"ipc://{tmp_path}/request", {"op": "snapshot"},
                                          curve=kept, ctx=ctx)
                assert rep["ok"]
                with pytest.raises(HostagentError, match="no reply"):
                    await async_request(f"ipc://{tmp_path}/request", {"op": "snapshot"},
                                        curve=gone, ctx=ctx, timeout=0.5)
                # the cut pipes' unsubscriptions were counted: only the kept client is left
                end = time.monotonic() + 10
                while pub.subscribers != 1:
                    assert time.monotonic() < end, pub.subscribers
                    await asyncio.sleep(0.02)
                for s in (a, b):
                    s.close()
        finally:
            dealer.close(linger=0)
            auth.stop()
            ctx.destroy(linger=0)
    run(main(), timeout=60)


async def _until_usage(sub, n, timeout=10.0):
    end = time.monotonic() + timeout
    while True:
        snap = sub.latest("h1")
        if snap is not None and snap["usage"] == {"n": n}:
            return snap
        left = end - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no snapshot with usage n={n}")
        await sub.poll(left)


def test_adding_a_key_drops_nobody(tmp_path):
    from hostagent.curve import load_allowed_keys

    allowed = tmp_path / "allowed"
    allowed.mkdir()
    make_keypair(allowed, "a")
    before = load_allowed_keys(allowed)
    make_keypair(allowed, "b")

    async def main():
        ctx = zmq.asyncio.Context()
        auth = start_authenticator(ctx, str(allowed))
        try:
            auth.replace(before)
            assert auth.replace(load_allowed_keys(allowed)) == frozenset()
            assert len(auth.keys) == 2
        finally:
            auth.stop()
            ctx.destroy(linger=0)
    run(main())


# --- real daemon processes --------------------------------------------------------------

def _curve_setup(d: DaemonProc, clients=("sched",)):
    """Keys for the agent and ``clients`` in ``d.dir``; ``[curve]`` added to the config."""
    keys, allowed = d.dir / "keys", d.dir / "allowed"
    allowed.mkdir()
    srv_pub, srv_sec = make_keypair(keys, "server")
    secrets = {}
    for name in clients:
        make_keypair(allowed, name)
        secrets[name] = keys / f"{name}.key_secret"
        (allowed / f"{name}.key_secret").rename(secrets[name])
    d.config.write_text(d.config.read_text() + f"""
[curve]
enabled = true
server_secret_key = "{srv_sec}"
allowed_clients_dir = "{allowed}"
""")
    return srv_pub, srv_sec, allowed, secrets


def _dump(d: DaemonProc) -> dict:
    import json

    path = d.dir / "run" / "hostagent-dump.json"
    before = path.stat().st_mtime_ns if path.exists() else None
    n = d.log_text().count("debug dump written to")
    d.signal(signal.SIGUSR1)
    deadline = time.monotonic() + 10
    while d.log_text().count("debug dump written to") == n:
        assert time.monotonic() < deadline, d.log_text()
        time.sleep(0.02)
    assert path.stat().st_mtime_ns != before
    return json.loads(path.read_text())


def _reload(d: DaemonProc) -> None:
    """SIGHUP and wait until that reload is over (its READY=1)."""
    d.signal(signal.SIGHUP)
    d.wait_notify("RELOADING=1")
    d.wait_notify("READY=1")


def test_reload_skips_a_bad_key_file_and_refuses_a_missing_directory():
    d = DaemonProc(start=False)
    try:
        srv_pub, _, allowed, secrets = _curve_setup(d, clients=("sched",))
        good = d.config.read_text()
        d.start()
        d.wait_notify("READY=1")
        client = ClientCurve.load(secrets["sched"], srv_pub)
        with d.subscriber(curve=client) as sub:
            sub.wait_snapshot("testhost", timeout=10)
            # a broken key file and a config change in one reload: the file is skipped
            # with a warning, everything else (the good key, the new config) applies
            (allowed / "broken.key").write_text("garbage\n")
            d.config.write_text(good.replace('dedicated_cpus = "2-11,14-23,26-35,38-47"',
                                             'dedicated_cpus = "2-11"'))
            _reload(d)
            snap = wait_for(sub, lambda s: s["config"]["dedicated_cpus"] == list(range(2, 12)))
            log = d.wait_log("configuration reloaded from")
            assert f"{allowed}/broken.key: not a ZeroMQ certificate" in log
            assert "skipped" in log and "Traceback" not in log
            assert any(e["where"] == "curve" and e["message"].startswith(
                f"{allowed}/broken.key: ") for e in _dump(d)["errors"])
            assert d.request({"op": "snapshot"}, curve=client)["ok"]

            # the directory gone: the whole reload is refused, nothing of it applies
            os.rename(allowed, d.dir / "elsewhere")
            d.config.write_text(good)
            _reload(d)
            log = d.wait_log("reload refused")
            assert f"{allowed}: allowed-clients directory does not exist" in log
            assert "Traceback" not in log
            doc = _dump(d)
            assert doc["counters"]["reloads"] == 1 and doc["counters"]["reloads_refused"] == 1
            assert doc["publisher"]["counters"].get("connection_drops", 0) == 0
            assert doc["config"]["resources"]["dedicated_cpus"] == list(range(2, 12))
            assert doc["snapshot"]["seq"] == snap["seq"]
            # the previous key set is still in force: the client is served
            assert d.request({"op": "snapshot"}, curve=client)["ok"]
        assert d.stop() == 0
    finally:
        d.close()


def test_removing_a_key_and_sighup_cuts_that_client_off():
    d = DaemonProc("vm-1s-nosmt", start=False, dedicated="1", heartbeat=0.1)
    try:
        srv_pub, _, allowed, secrets = _curve_setup(d, clients=("kept", "gone"))
        d.start()
        d.wait_notify("READY=1")
        kept = ClientCurve.load(secrets["kept"], srv_pub)
        gone = ClientCurve.load(secrets["gone"], srv_pub)
        ctx = zmq.Context()
        dealer = ctx.socket(zmq.DEALER)  # the removed client's live request connection
        dealer.linger = 0
        gone.apply(dealer)
        dealer.connect(d.req)
        try:
            with d.subscriber(curve=kept) as a, Subscriber([d.stream], curve=gone) as b:
                a.wait_snapshot("testhost", timeout=10)
                b.wait_snapshot("testhost", timeout=10)
                dealer.send(wire.pack({"op": "snapshot"}))
                assert dealer.poll(10_000) and wire.decode_reply(dealer.recv())["ok"]

                (allowed / "gone.key").unlink()
                _reload(d)
                d.wait_log("configuration reloaded from")
                xml = domain_xml("g1", vcpus=1, vcpupin={0: "1"})
                assert d.request({"op": "test-domain", "action": "create", "xml": xml},
                                 curve=kept)["ok"]
                deadline = time.monotonic() + 15
                while guest_names(a.latest("testhost") or {"usage": {"guests": []}}) != ["g1"]:
                    assert time.monotonic() < deadline, "kept client did not see the guest"
                    a.poll(0.2)
                    b.poll(0)
                end = time.monotonic() + 0.3
                while time.monotonic() < end:  # anything in flight at the cut is read
                    b.poll(0.05)
                heard = b.stats["heartbeats"]
                beats = a.stats["heartbeats"]
                deadline = time.monotonic() + 15
                while a.stats["heartbeats"] < beats + 5:  # kept hears 5 more; gone nothing
                    assert time.monotonic() < deadline, "kept client stopped hearing"
                    a.poll(0.5)
                    b.poll(0)
                b.poll(0.2)
                assert guest_names(b.latest("testhost")) == []
                assert b.stats["heartbeats"] == heard
                try:  # no reply on the cut connection (or no connection to send on)
                    dealer.send(wire.pack({"op": "snapshot"}), zmq.NOBLOCK)
                except zmq.Again:
                    pass
                else:
                    assert dealer.poll(1000) == 0
                assert "reload: 1 allowed CURVE client keys, 1 removed" in d.log_text()
        finally:
            dealer.close(linger=0)
            ctx.term()
        assert d.stop() == 0
    finally:
        d.close()


def test_an_endpoint_that_cannot_be_bound_again_stops_the_agent_with_exit_2():
    d = DaemonProc("vm-1s-nosmt", start=False, dedicated=None)
    try:
        _curve_setup(d, clients=("a", "b"))
        (d.dir / "sock").mkdir()
        d.config.write_text(d.config.read_text().replace(f'"ipc://{d.dir}/s"',
                                                         f'"ipc://{d.dir}/sock/s"'))
        d.start()
        d.wait_notify("READY=1")
        (d.dir / "allowed" / "b.key").unlink()
        shutil.rmtree(d.dir / "sock")  # the stream endpoint cannot be bound again
        d.signal(signal.SIGHUP)
        assert d.proc.wait(15) == 2
        log = d.log_text()
        assert f"hostagent: cannot bind stream endpoint ipc://{d.dir}/sock/s again: " in log
        assert "Traceback" not in log
    finally:
        d.close()


def test_probe_udev_is_restart_only():
    import dataclasses

    from hostagent.agent.daemon import merge_reload

    old = load_config(None)
    new = dataclasses.replace(old, probe=dataclasses.replace(old.probe, udev=False,
                                                             hugepage_poll_seconds=1.0))
    merged, notes = merge_reload(old, new)
    assert merged.probe.udev is True and merged.probe.hugepage_poll_seconds == 1.0
    assert notes == ["probe.udev takes effect at restart"]


# --- 10. empty config files ------------------------------------------------------------

@pytest.mark.parametrize("text", ["", "\n", "  \n\t\n"])
def test_empty_config_file_is_refused(tmp_path, text):
    path = tmp_path / "hostagent.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == (f"{path}: the config file is empty (a truncated file?); "
                              "write at least one comment to run on the defaults")


def test_comment_only_config_file_means_the_defaults(tmp_path):
    path = tmp_path / "hostagent.toml"
    path.write_text("# every option at its default\n")
    assert load_config(path).libvirt.uri == "qemu:///system"


def test_empty_config_at_start_exits_2(tmp_path):
    path = tmp_path / "hostagent.toml"
    path.write_text("")
    r = cli("run", "--config", str(path))
    assert r.returncode == 2
    assert r.stderr.strip().startswith(f"hostagent: {path}: the config file is empty")


def test_truncated_config_on_sighup_is_refused_and_the_old_one_stays():
    d = DaemonProc()
    try:
        d.wait_notify("READY=1")
        with d.subscriber() as sub:
            first = sub.wait_snapshot("testhost", timeout=10)
            assert first["config"]["dedicated_cpus"][:3] == [2, 3, 4]
            d.config.write_text("")
            _reload(d)
            log = d.wait_log("reload refused")
            assert (f"reload refused, the previous configuration stays in force: "
                    f"{d.config}: the config file is empty") in log
            doc = _dump(d)
            assert doc["counters"]["reloads"] == 0 and doc["counters"]["reloads_refused"] == 1
            assert doc["config"]["libvirt"]["uri"] == d.uri
            assert doc["config"]["agent"]["runtime_dir"] == f"{d.dir}/run"
            snap = d.request({"op": "snapshot"})["data"]
            assert snap["seq"] == first["seq"]
            assert snap["config"]["dedicated_cpus"] == first["config"]["dedicated_cpus"]
            assert snap["agent"]["libvirt"] == {"uri": d.uri, "connected": True}
        assert d.stop() == 0
    finally:
        d.close()


# --- 11. heartbeat_seconds on reload ---------------------------------------------------

def test_heartbeat_period_change_takes_effect_on_reload():
    d = DaemonProc("vm-1s-nosmt", dedicated=None, heartbeat=3600)
    try:
        d.wait_notify("READY=1")
        with d.subscriber() as sub:
            sub.wait_snapshot("testhost", timeout=10)
            assert sub.stats["heartbeats"] == 0
            d.config.write_text(d.config.read_text().replace("heartbeat_seconds = 3600",
                                                             "heartbeat_seconds = 0.05"))
            _reload(d)
            deadline = time.monotonic() + 20
            while sub.stats["heartbeats"] < 5:
                assert time.monotonic() < deadline, (sub.stats, d.log_text())
                sub.poll(1)
        assert d.stop() == 0
    finally:
        d.close()


def test_publisher_heartbeat_period_is_read_again_when_cfg_is_replaced(tmp_path):
    import dataclasses

    async def main():
        async with running_publisher(tmp_path, heartbeat_seconds=3600) as pub:
            await pub.publish(snapshot_data())
            sub = AsyncSubscriber([source(tmp_path)], ctx=pub.ctx)
            await sub.wait_snapshot("h1", timeout=10)
            pub.cfg = dataclasses.replace(pub.cfg, heartbeat_seconds=0.05)
            while sub.stats["heartbeats"] < 5:
                await sub.poll(0.05)
            sub.close()
    run(main(), timeout=30)
