"""A libvirt that hangs never stalls the agent: every libvirt call runs on the watcher's
worker thread and is bounded by ``[libvirt] call_timeout_seconds``.

Real components: a real daemon process against a unix socket that accepts and never
answers (libvirt's own remote driver client talks to it; no libvirtd needed), and the
in-process agent over libvirt's test:/// driver behind ``HangingConn``, a connection whose
RPC-like calls block while a gate is closed (a SIGSTOPped libvirtd, which cannot run
here). Every wait is bounded; nothing asserts on durations.
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
import time
from pathlib import Path

from daemon_helpers import DaemonProc, config_text, wait_for


class NeverAnswers:
    """A unix socket server that accepts every connection and never sends a byte."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(self.path)
        self.srv.listen(16)
        self.srv.settimeout(0.2)
        self.accepted: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.srv.accept()
            except (TimeoutError, OSError):
                continue
            self.accepted.append(conn)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for c in self.accepted:
            c.close()
        self.srv.close()


def hung_daemon(call_timeout: float | None, reconnect_max: float = 0.2,
                start: bool = True) -> tuple[DaemonProc, NeverAnswers]:
    """A daemon (not yet started with ``start=False``) whose libvirt URI is a
    ``NeverAnswers`` socket; ``call_timeout`` None leaves the default."""
    d = DaemonProc(start=False)
    server = NeverAnswers(d.dir / "libvirt-sock")
    uri = f"qemu+unix:///system?socket={server.path}"
    text = config_text(d.dir, d.sysfs, uri)
    lines = f"reconnect_max_seconds = {reconnect_max}\n"
    if call_timeout is not None:
        lines += f"call_timeout_seconds = {call_timeout}\n"
    d.config.write_text(text.replace("resync_seconds = 60.0\n", f"resync_seconds = 60.0\n{lines}"))
    d.uri = uri
    if start:
        d.start()
    return d, server


def test_start_up_against_a_libvirt_socket_that_never_answers():
    d, server = hung_daemon(call_timeout=0.5)
    try:
        d.wait_notify("READY=1", timeout=30)
        with d.subscriber() as sub:
            snap = wait_for(sub, lambda s: True, timeout=15)
            assert snap["agent"]["libvirt"] == {"uri": d.uri, "connected": False}
            assert snap["usage"]["guests"] == []
            rep = d.request({"op": "snapshot"})
            assert rep["ok"] and rep["data"]["agent"]["libvirt"]["connected"] is False
            heard = sub.stats["heartbeats"]
            deadline = time.monotonic() + 10
            while sub.stats["heartbeats"] == heard and time.monotonic() < deadline:
                sub.poll(0.5)
            assert sub.stats["heartbeats"] > heard
        log = d.wait_log("call open did not return within 0.5 s", timeout=15)
        assert "libvirt-conn-1" in log
        # every open hangs: after MAX_ABANDONED_THREADS stuck threads no new connection
        d.wait_log("no new libvirt connection until one returns", timeout=30)
        assert 1 <= len(server.accepted) <= 4
        rep = d.request({"op": "snapshot"})  # still answering
        assert rep["ok"]
        assert d.stop(timeout=15) == 0, d.log_text()
        assert "stopping" in d.log_text()
    finally:
        d.close()
        server.close()


def test_sighup_and_sigterm_while_libvirt_open_hangs_with_the_default_timeout():
    d, server = hung_daemon(call_timeout=None)  # default 10 s: the open is still hanging
    try:
        d.wait_notify("READY=1", timeout=30)
        assert len(server.accepted) == 1
        d.signal(signal.SIGHUP)
        d.wait_notify("READY=1", timeout=15)  # the reload finished while the open hangs
        d.wait_log("configuration reloaded", timeout=15)
        rep = d.request({"op": "snapshot"})
        assert rep["ok"] and rep["data"]["agent"]["libvirt"]["connected"] is False
        assert d.stop(timeout=15) == 0, d.log_text()
    finally:
        d.close()
        server.close()


# --- a hang in the middle of a run (in-process agent) ------------------------------------

HANG_LIMIT_SECONDS = 60.0  # a gate never blocks longer: a broken agent fails, not hangs
LOCAL_CALLS = {"isAlive", "UUIDString", "UUID", "name"}  # answered without an RPC


class Gate:
    """While closed, every RPC-like call of a ``HangingConn`` blocks at ``wait``."""

    def __init__(self) -> None:
        self._open = threading.Event()
        self._open.set()
        self._lock = threading.Lock()
        self.blocked = 0  # calls waiting now
        self.calls: list[str] = []  # every call that had to wait
        self.delay = 0.0  # while open: every RPC-like call takes this long (a slow libvirtd)
        self.delayed = 0

    def close(self) -> None:
        self._open.clear()

    def open(self) -> None:
        self._open.set()

    def wait(self, what: str) -> None:
        if self._open.is_set():
            if self.delay:
                self.delayed += 1
                time.sleep(self.delay)
            return
        with self._lock:
            self.blocked += 1
            self.calls.append(what)
        try:
            if not self._open.wait(HANG_LIMIT_SECONDS):
                raise RuntimeError(f"{what}: the test never opened the gate")
        finally:
            with self._lock:
                self.blocked -= 1


class HangingConn:
    """A real libvirt object (``virConnect`` of the test:/// driver, or a ``virDomain`` it
    returned) whose methods wait at the gate first, as calls to a SIGSTOPped libvirtd do;
    the local ones (``LOCAL_CALLS``) never wait. Domains it returns are wrapped too."""

    def __init__(self, real: object, gate: Gate) -> None:
        self._real = real
        self._gate = gate

    def __getattr__(self, name: str) -> object:
        attr = getattr(self._real, name)
        if not callable(attr):
            return attr

        def call(*args: object, **kw: object) -> object:
            if name not in LOCAL_CALLS:
                self._gate.wait(name)
            return self._wrap(attr(*args, **kw))

        return call

    def _wrap(self, value: object) -> object:
        import libvirt

        if isinstance(value, libvirt.virDomain):
            return HangingConn(value, self._gate)
        if isinstance(value, list):
            return [self._wrap(v) for v in value]
        return value


class HungAgent:
    """The agent in-process on xeon-2s-cat, its libvirt a test:/// node holding one
    running guest ``keep`` (every open sees it), opened through a ``HangingConn``."""

    def __init__(self, call_timeout: float, reconnect_max: float = 0.1) -> None:
        import tempfile

        from libvirt_helpers import domain_xml, open_test, probe_fixture, write_node

        from hostagent.agent.daemon import Agent

        self.dir = Path(tempfile.mkdtemp(prefix="hah-"))
        sysfs = Path(__file__).resolve().parent.parent / "fixtures/sysfs/xeon-2s-cat/sys"
        uri = write_node(self.dir, probe_fixture("xeon-2s-cat"),
                         [domain_xml("keep", vcpus=1, vcpupin={0: "5"}, running=True)])
        text = config_text(self.dir, sysfs, uri, heartbeat=0.1).replace(
            "resync_seconds = 60.0\n",
            f"resync_seconds = 60.0\ncall_timeout_seconds = {call_timeout}\n"
            f"reconnect_max_seconds = {reconnect_max}\n")
        (self.dir / "hostagent.toml").write_text(text)
        self.gate = Gate()
        self.opens = 0

        def opener(u: str) -> HangingConn:
            self.opens += 1
            self.gate.wait("open")
            return HangingConn(open_test(u), self.gate)

        self.agent = Agent(str(self.dir / "hostagent.toml"), environ={},
                           libvirt_opener=opener)
        self.req = f"ipc://{self.dir}/r"
        self.task: object = None

    async def start(self) -> None:
        import asyncio

        from loop_helpers import until

        from hostagent.subscriber import AsyncSubscriber

        self.task = asyncio.ensure_future(self.agent.run())
        await until(lambda: self.agent.publisher is not None and self.agent.publisher.seq >= 1,
                    timeout=15)
        self.sub = AsyncSubscriber([f"ipc://{self.dir}/s,{self.req}"])
        await self.snapshot_where(lambda s: s["agent"]["libvirt"]["connected"])

    async def snapshot_where(self, pred: object, timeout: float = 15.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            snap = self.sub.latest("testhost")
            if snap is not None and pred(snap):  # type: ignore[operator]
                return snap
            if time.monotonic() > deadline:
                raise AssertionError(f"no matching snapshot; last {snap and snap['agent']}")
            await self.sub.poll(0.05)

    async def heartbeats_continue(self) -> None:
        seen = self.sub.stats["heartbeats"]
        deadline = time.monotonic() + 10
        while self.sub.stats["heartbeats"] <= seen + 2:
            assert time.monotonic() < deadline, "no heartbeats while libvirt hangs"
            await self.sub.poll(0.1)


def names(snap: dict) -> list[str]:
    return sorted(g["name"] for g in snap["usage"]["guests"])


def test_a_hang_mid_run_is_bounded_and_the_agent_keeps_serving_and_recovers():
    import asyncio
    import os
    import shutil

    from loop_helpers import run, until

    from hostagent.agent.libvirt_watch import MAX_ABANDONED_THREADS, abandoned_threads
    from hostagent.subscriber import async_request

    p = HungAgent(call_timeout=0.5)
    logged: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: logged.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("hostagent.libvirt").addHandler(handler)

    async def main() -> None:
        await p.start()
        a = p.agent
        snap = await p.snapshot_where(lambda s: names(s) == ["keep"])
        assert snap["agent"]["libvirt"]["connected"]
        await until(lambda: signal.getsignal(signal.SIGHUP) not in (signal.SIG_DFL, None))
        # libvirtd stops answering; SIGHUP asks for a full resync, whose listing hangs
        p.gate.close()
        os.kill(os.getpid(), signal.SIGHUP)
        await until(lambda: a.counters["reloads"] == 1, timeout=10)  # SIGHUP did not stall
        snap = await p.snapshot_where(lambda s: not s["agent"]["libvirt"]["connected"])
        assert names(snap) == ["keep"]  # the last known guests are kept
        assert any("libvirt connection lost: call listAllDomains (full resync) did not "
                   "return within 0.5 s; thread libvirt-conn-" in m for m in logged)
        assert "listAllDomains" in p.gate.calls
        rep = await async_request(p.req, {"op": "snapshot"}, timeout=5)
        assert rep["ok"] and rep["data"]["agent"]["libvirt"]["connected"] is False
        rep = await async_request(p.req, {"op": "test-domain", "action": "list"}, timeout=5)
        assert not rep["ok"] and "not connected" in rep["error"]
        await p.heartbeats_continue()
        # every reconnect hangs in open as well: the abandoned threads stop at the bound
        await until(lambda: "no new libvirt connection until one returns" in
                    (a.watcher.last_error or ""), timeout=30)
        assert len(abandoned_threads()) == MAX_ABANDONED_THREADS
        opens = p.opens
        await p.heartbeats_continue()
        assert p.opens == opens and len(abandoned_threads()) == MAX_ABANDONED_THREADS
        state = a.watcher.state()
        assert len(state["abandoned_threads"]) == MAX_ABANDONED_THREADS
        assert all(t["call"] for t in state["abandoned_threads"])
        # libvirtd answers again: the stuck calls return, their threads close and exit,
        # the agent reconnects and resyncs
        p.gate.open()
        snap = await p.snapshot_where(lambda s: s["agent"]["libvirt"]["connected"])
        assert names(snap) == ["keep"]
        await until(lambda: not abandoned_threads(), timeout=10)
        # a test-domain request whose call hangs gets an error reply after the limit
        p.gate.close()
        rep = await async_request(p.req, {"op": "test-domain", "action": "list"}, timeout=10)
        assert not rep["ok"], rep
        assert "call test-domain list did not return within 0.5 s" in rep["error"]
        # SIGTERM (stop) while a call hangs: the agent stops without waiting for it
        await until(lambda: p.gate.blocked >= 1)
        a.stop()
        assert await asyncio.wait_for(p.task, 10) == 0

    try:
        run(main(), timeout=90)
    finally:
        logging.getLogger("hostagent.libvirt").removeHandler(handler)
        p.gate.open()
        p.sub.close()
        shutil.rmtree(p.dir, ignore_errors=True)
    deadline = time.monotonic() + 10
    while abandoned_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not abandoned_threads()  # released: nothing left for later tests


def test_call_timeout_is_validated():
    import pytest

    from hostagent.config import config_from_dict
    from hostagent.errors import ConfigError

    assert config_from_dict({}).libvirt.call_timeout_seconds == 10.0
    with pytest.raises(ConfigError, match="call_timeout_seconds"):
        config_from_dict({"libvirt": {"call_timeout_seconds": 0}})


def test_sigterm_during_the_start_up_wait_for_libvirt_exits_0():
    d, server = hung_daemon(call_timeout=None)
    try:
        deadline = time.monotonic() + 30
        while not server.accepted:  # the agent is opening: its first snapshot waits
            assert time.monotonic() < deadline and d.proc.poll() is None, d.log_text()
            time.sleep(0.01)
        assert d.stop(timeout=15) == 0, d.log_text()
    finally:
        d.close()
        server.close()


def test_a_slow_full_resync_is_timed_per_step_not_as_a_whole():
    """31 calls of 0.1 s (listing + 3 per domain × 10) take longer than the 2 s limit in
    all, but each step (the listing, one domain) stays far below it: no timeout."""
    import asyncio
    import tempfile

    from libvirt_helpers import domain_xml, open_test, probe_fixture, write_node
    from loop_helpers import run, until

    from hostagent.agent.libvirt_watch import LibvirtWatcher

    async def main() -> None:
        d = Path(tempfile.mkdtemp(prefix="hsl-"))
        uri = write_node(d, probe_fixture("vm-1s-nosmt"),
                         [domain_xml(f"g{i}", vcpus=1, running=True) for i in range(10)])
        gate = Gate()
        w = LibvirtWatcher(uri, lambda: None, call_timeout_seconds=2.0,
                           opener=lambda u: HangingConn(open_test(u), gate))
        w.start()
        await until(lambda: w.conn is not None and w.idle, timeout=20)
        gate.delay = 0.1
        w.request_resync()
        await until(lambda: w.counters["full_resyncs"] == 2 and w.idle, timeout=60)
        gate.delay = 0.0
        assert gate.delayed >= 21  # > 2 s of calls in one resync
        assert w.counters["call_timeouts"] == 0 and w.generation == 1 and w.last_error is None
        await w.close()
        await asyncio.sleep(0)

    run(main(), timeout=90)


def test_one_shot_snapshot_against_a_libvirt_that_never_answers_exits_2(tmp_path):
    """``hostagent snapshot`` bounds its libvirt calls too: one line naming the URI, the
    step and the limit, exit 2, no traceback; a bad --libvirt-timeout is refused."""
    import subprocess
    import sys

    from libvirt_helpers import FIXTURES

    sock = tmp_path / "libvirt-sock"
    server = NeverAnswers(sock)
    uri = f"qemu+unix:///system?socket={sock}"
    sysfs = FIXTURES / "xeon-2s-cat" / "sys"
    try:
        run = subprocess.run(
            [sys.executable, "-m", "hostagent.cli", "snapshot", "--sysfs-root", str(sysfs),
             "--libvirt", uri, "--libvirt-timeout", "0.5"],
            capture_output=True, text=True, timeout=120)
        assert run.returncode == 2, run.stderr
        assert run.stderr.startswith(f"hostagent: libvirt at {uri}: open did not return "
                                     "within 0.5 s"), run.stderr
        assert "Traceback" not in run.stderr and server.accepted
        for bad in ("0", "-1", "x", "nan", "1e9"):
            run = subprocess.run(
                [sys.executable, "-m", "hostagent.cli", "snapshot", "--sysfs-root",
                 str(sysfs), "--libvirt", uri, "--libvirt-timeout", bad],
                capture_output=True, text=True, timeout=120)
            assert run.returncode == 2 and "--libvirt-timeout" in run.stderr, run.stderr
    finally:
        server.close()
