"""LibvirtWatcher: real test:/// lifecycle events, tunable/device handlers, reconnect.

The watcher reads on its worker thread and ``apply`` only moves what was read into the
tracker, so the tests ``settle()`` (wait until nothing is left to read, then apply)."""

import asyncio
import tempfile
import threading
import time
from pathlib import Path

from libvirt_helpers import domain_xml, probe_fixture, write_node
from loop_helpers import run, until

from hostagent.agent.libvirt_watch import LibvirtWatcher, ensure_event_impl
from hostagent.config import Config, resolve_resources
from hostagent.tracker import UsageTracker

TOPO = probe_fixture("vm-1s-nosmt")
RESOURCES = resolve_resources(
    Config().resources.__class__(dedicated_cpus=(2, 3)), TOPO)


class Watch:
    """A watcher on a fresh custom test:/// node, with a tracker and a change counter."""

    def __init__(self, **kw):
        ensure_event_impl()
        self.dir = Path(tempfile.mkdtemp(prefix="lvw-"))
        self.uri = write_node(self.dir, TOPO)
        self.changes = 0
        self.tracker = UsageTracker(TOPO, RESOURCES)
        self.w = LibvirtWatcher(self.uri, self._changed, **kw)

    def _changed(self):
        self.changes += 1

    def apply(self):
        return self.w.apply(self.tracker)

    async def start(self):
        """Start and wait for the connection and its first full resync (applied)."""
        self.w.start()
        await until(lambda: self.w.conn is not None and self.w.idle)
        return self.apply()

    async def settle(self):
        """Wait until every pending read is done, then apply; whether anything changed."""
        await until(lambda: self.w.idle)
        return self.apply()

    def names(self):
        return sorted(r.name for r in self.tracker.records.values())


class FakeDom:
    """Shaped like the virDomain libvirt passes to callbacks."""

    def __init__(self, dom):
        self._dom = dom

    def UUIDString(self):
        return self._dom.UUIDString()

    def name(self):
        return self._dom.name()


def hold_until_posted(w, n):
    """Block the loop until libvirt's event thread has posted ``n`` events in all, so
    that the loop handles them in one step (bounded)."""
    deadline = time.monotonic() + 10
    while w.events_received < n and time.monotonic() < deadline:
        time.sleep(0.001)


def test_lifecycle_events_from_the_test_driver_update_one_guest():
    async def main():
        t = Watch()
        assert await t.start()  # first apply: full resync
        assert t.w.connected and t.changes == 1
        assert t.names() == [] and t.w.counters["full_resyncs"] == 1
        conn = t.w.conn  # owned by the worker; libvirt is thread-safe, tests call it here
        dom = conn.defineXML(domain_xml("g1", vcpus=2, vcpupin={0: "2", 1: "3"}))
        await until(lambda: t.w.counters["event_lifecycle"] == 1)  # defined
        assert await t.settle() and t.names() == []  # defined, not running: holds nothing
        dom.create()
        await until(lambda: t.w.counters["event_lifecycle"] == 2)
        assert [e["event"] for e in t.w.events] == ["lifecycle:defined", "lifecycle:started"]
        assert await t.settle() and t.names() == ["g1"]
        assert t.w.counters["domain_reads"] == 2 and t.w.counters["full_resyncs"] == 1
        usage = t.tracker.usage()
        assert {th["cpu"]: th["vcpu"] for th in usage["threads"] if th["guest"]} == {2: 0, 3: 1}
        received = t.w.events_received
        dom.suspend()
        dom.resume()
        hold_until_posted(t.w, received + 2)
        await until(lambda: t.w.counters["event_lifecycle"] == 4)
        await t.settle()
        assert t.w.counters["domain_reads"] == 3  # two events, one read
        dom.destroy()
        await until(lambda: t.w.counters["event_lifecycle"] == 5)
        await t.settle()
        assert t.names() == []
        dom.undefine()
        await until(lambda: t.w.counters["event_lifecycle"] == 6)
        await t.settle()  # vanished domain: removed, no error
        assert t.w.connected and t.w.last_error is None
        await t.w.close()
    run(main())


def test_tunable_and_device_handlers_reread_the_guest():
    async def main():
        t = Watch()
        await t.start()
        dom = t.w.conn.defineXML(domain_xml("g2", vcpus=2, vcpupin={0: "2", 1: "3"}))
        dom.create()
        await until(lambda: t.w.counters["event_lifecycle"] == 2)
        await t.settle()
        dom.pinVcpu(0, (True, False, False, False))  # the test driver emits no TUNABLE
        t.w.on_tunable(t.w.conn, FakeDom(dom), {"cputune.vcpupin0": "0"}, None)
        assert t.w.pending == {dom.UUIDString()}
        await t.settle()
        rec = t.tracker.records[dom.UUIDString()]
        assert rec.spec is not None
        usage = t.tracker.usage()
        assert usage["guests"][0]["pinning"] == {"0": 0, "1": 3}  # re-read, not patched
        assert "pin_not_dedicated" in [c["kind"] for c in usage["conflicts"]]
        n = t.changes
        t.w.on_tunable(t.w.conn, FakeDom(dom), {"blkdeviotune.total_bytes_sec": 5}, None)
        assert t.changes == n and not t.w.pending  # nothing the tracker reads
        t.w.on_device_added(t.w.conn, FakeDom(dom), "hostdev0", None)
        t.w.on_device_removed(t.w.conn, FakeDom(dom), "hostdev0", None)
        assert t.w.pending == {dom.UUIDString()}
        assert [e["event"] for e in t.w.events][-2:] == ["device-added", "device-removed"]
        assert t.w.events[-1]["detail"] == "hostdev0"
        assert await t.settle()
        assert not t.w.pending and t.changes == n + 1  # two events, one read, one change

        class Broken:
            def UUIDString(self):
                raise RuntimeError("gone")

        t.w.on_tunable(t.w.conn, Broken(), {"cputune.emulatorpin": "0"}, None)
        assert t.w.full_resync  # unreadable domain in an event: resync everything
        t.w.on_lifecycle(t.w.conn, None, 2, 0, None)  # a crashing callback never raises
        await t.w.close()
    run(main())


def test_reconnect_after_the_connection_is_closed_under_the_watcher():
    async def main():
        t = Watch(check_seconds=0.02, reconnect_max_seconds=0.1)
        await t.start()
        first = t.w.conn
        dom = first.defineXML(domain_xml("g3", vcpus=1, vcpupin={0: "2"}))
        dom.create()
        await until(lambda: t.w.counters["event_lifecycle"] == 2)
        await t.settle()
        assert t.names() == ["g3"]
        first.close()  # under the watcher
        await until(lambda: t.w.counters["disconnects"] == 1, timeout=5)
        assert "libvirt connection lost" in t.w.last_error and not t.w.connected
        await until(lambda: t.w.conn is not None and t.w.generation == 2, timeout=5)
        assert t.w.conn is not first and not t.w.connected  # until the resync is applied
        # a custom test:/// file starts fresh on every open: the resync finds no guests
        assert await t.settle() and t.names() == [] and t.w.connected
        assert t.w.counters["full_resyncs"] == 2
        # callbacks were registered again on the new connection
        dom = t.w.conn.defineXML(domain_xml("g4", vcpus=1, vcpupin={0: "3"}))
        dom.create()
        await until(lambda: "g4" in [e["domain"] for e in t.w.events])
        await t.settle()
        assert t.names() == ["g4"]
        await t.w.close()
    run(main())


def test_error_during_a_read_starts_a_reconnect_and_keeps_known_guests():
    async def main():
        t = Watch(reconnect_max_seconds=0.1, check_seconds=60)
        await t.start()
        dom = t.w.conn.defineXML(domain_xml("g5", vcpus=1, vcpupin={0: "2"}))
        dom.create()
        await until(lambda: t.w.counters["event_lifecycle"] == 2)
        await t.settle()
        assert t.names() == ["g5"]
        t.w.conn.close()
        t.w.on_device_added(None, FakeDom(dom), "net0", None)  # a read of g5 is due
        await until(lambda: t.w.counters["disconnects"] == 1)  # the read fails: lost
        assert not t.apply()
        assert not t.w.connected and t.names() == ["g5"]  # last known guests stay
        assert "libvirt connection lost" in t.w.last_error
        await until(lambda: t.w.conn is not None and t.w.idle, timeout=5)
        assert await t.settle() and t.w.connected
        await t.w.close()
    run(main())


def test_unreachable_uri_retries_in_the_background():
    async def main():
        changes = []
        attempts = []

        def opener(uri):  # never a real connection to a non-local address
            attempts.append(uri)
            raise OSError("connection refused")

        w = LibvirtWatcher("qemu+tcp://192.0.2.1/system", lambda: changes.append(1),
                           reconnect_max_seconds=0.1, opener=opener)
        w.start()
        assert await w.wait_synced(5)  # the first attempt failed
        assert not w.connected and "connection refused" in w.last_error
        await until(lambda: len(attempts) >= 3, timeout=5)
        assert w.counters["errors"] >= 3 and changes == []
        await w.close()
    run(main())


def test_periodic_resync_requests_a_full_read():
    async def main():
        t = Watch(resync_seconds=0.02)
        await t.start()
        await until(lambda: t.w.counters["resyncs_requested"] >= 2)
        await until(lambda: t.w.counters["full_resyncs"] >= 2)
        assert t.apply()
        await t.w.close()
    run(main())


def test_event_impl_is_one_thread_that_serves_any_loop():
    """libvirt's default event loop runs on one thread for the process (it can be
    registered once): a watcher on another asyncio loop still gets test:/// events."""
    ensure_event_impl()
    ensure_event_impl()
    assert [t.name for t in threading.enumerate()].count("libvirt-events") == 1

    async def main():
        t = Watch()
        await t.start()
        t.w.conn.defineXML(domain_xml("g6", vcpus=1, vcpupin={0: "2"})).create()
        deadline = time.monotonic() + 5
        while t.w.counters["event_lifecycle"] < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await t.w.close()
        return t.w.counters["event_lifecycle"]

    other = asyncio.new_event_loop()
    try:
        assert other.run_until_complete(asyncio.wait_for(main(), 20)) == 2
    finally:
        other.close()
