"""The agent's loop in-process: udev hotplug (a pyudev-shaped monitor), coalescing,
publish-only-on-change, reload merging, hugepage re-read and journal log prefixes."""

import asyncio
import dataclasses
import os
import shutil
import tempfile
import time
from pathlib import Path

from daemon_helpers import config_text
from fixture_trees import copy_of, need_fixture
from libvirt_helpers import domain_xml, probe_fixture, write_node
from loop_helpers import LOOP, run, until

from hostagent.agent.daemon import Agent, merge_reload, read_hugepages, stderr_is_journal
from hostagent.agent.udev_watch import UdevWatch
from hostagent.config import load_config
from hostagent.subscriber import AsyncSubscriber


class FakeDevice:
    """Shaped like pyudev.Device for what the watcher reads."""

    def __init__(self, action, subsystem, sys_name, seq=1):
        self.action, self.subsystem, self.sys_name = action, subsystem, sys_name
        self.sys_path = f"/sys/devices/system/{subsystem}/{sys_name}"
        self.sequence_number = seq


class FakeMonitor:
    """Shaped like pyudev.Monitor: a pipe whose read end is the fd (as pyudev's own
    test suite's FakeMonitor); ``poll(0)`` returns queued devices, then None."""

    def __init__(self):
        self.r, self.w = os.pipe()
        os.set_blocking(self.r, False)
        self.queue = []
        self.filters = []
        self.started = False
        self.fail_next = False

    def filter_by(self, subsystem):
        self.filters.append(subsystem)

    def start(self):
        self.started = True

    def fileno(self):
        return self.r

    def trigger(self, *devices):
        self.queue.extend(devices)
        os.write(self.w, b"x")

    def poll(self, timeout=None):
        try:
            os.read(self.r, 4096)
        except BlockingIOError:
            pass
        if self.fail_next:
            self.fail_next = False
            raise OSError("No buffer space available")
        return self.queue.pop(0) if self.queue else None


# the files set_cpu3_online writes (for copy_of)
CPU3_ONLINE_FILES = ("devices/system/cpu/cpu3/online", "devices/system/cpu/online",
                     "devices/system/cpu/offline", "devices/system/node/node0/cpulist")


def set_cpu3_online(sysfs: Path, online: bool) -> None:
    """What the kernel changes when CPU 3 of vm-1s-nosmt goes offline or online
    (``CPU3_ONLINE_FILES``)."""
    cpu = sysfs / "devices/system/cpu"
    (cpu / "cpu3/online").write_text("1\n" if online else "0\n")
    (cpu / "online").write_text("0-3\n" if online else "0-2\n")
    (cpu / "offline").write_text("\n" if online else "3\n")
    (sysfs / "devices/system/node/node0/cpulist").write_text("0-3\n" if online else "0-2\n")


class InProc:
    """The agent in this process; ``copy``: the paths of the tree the test changes (a
    fixture_trees.copy_of), True for all of it."""

    def __init__(self, fixture="vm-1s-nosmt", dedicated=None, copy=(), **cfg):
        self.dir = Path(tempfile.mkdtemp(prefix="hai-"))
        self.sysfs = need_fixture(fixture)
        if copy is True:
            self.sysfs = copy_of(fixture, self.dir)
        elif copy:  # a tree the test changes
            self.sysfs = copy_of(fixture, self.dir, *copy)
        self.uri = write_node(self.dir, probe_fixture(fixture))
        self.config = self.dir / "hostagent.toml"
        text = config_text(self.dir, self.sysfs, self.uri, dedicated=dedicated, **cfg)
        self.config.write_text(text.replace("udev = false", "udev = true"))
        self.monitor = FakeMonitor()
        self.agent = Agent(str(self.config), environ={}, udev_monitor=self.monitor)
        self.task = None

    async def start(self):
        self.task = asyncio.ensure_future(self.agent.run())
        await until(lambda: self.agent.publisher is not None and self.agent.publisher.seq >= 1)
        self.sub = AsyncSubscriber([f"ipc://{self.dir}/s,ipc://{self.dir}/r"])
        await self.sub.wait_snapshot("testhost")

    async def snapshot_where(self, pred, timeout=5.0):
        deadline = LOOP.time() + timeout
        while True:
            snap = self.sub.latest("testhost")
            if snap is not None and pred(snap):
                return snap
            if LOOP.time() > deadline:
                raise AssertionError("no matching snapshot")
            await self.sub.poll(0.05)

    async def stop(self):
        self.sub.close()
        self.agent.stop()
        assert await self.task == 0
        shutil.rmtree(self.dir, ignore_errors=True)


def test_udev_cpu_offline_triggers_a_debounced_reprobe():
    async def main():
        p = InProc(copy=CPU3_ONLINE_FILES)
        await p.start()
        a = p.agent
        assert p.monitor.started and p.monitor.filters == ["cpu", "memory", "node"]
        assert a.udev.active
        set_cpu3_online(p.sysfs, False)
        before = a.counters["reprobes"]
        p.monitor.trigger(FakeDevice("offline", "cpu", "cpu3", 10),
                          FakeDevice("add", "net", "eth0", 11),
                          FakeDevice("bind", "cpu", "cpu3", 12))
        snap = await p.snapshot_where(
            lambda s: not s["topology"]["cpus"][3]["online"])
        assert 3 not in snap["config"]["online_cpus"]
        assert a.counters["reprobes"] == before + 1  # three devices, one re-probe
        state = a.udev.state()
        assert state["counters"] == {"cpu_offline": 1, "ignored": 2}
        assert state["last_events"][-1]["sys_name"] == "cpu3"
        # several events inside the debounce window: still one re-probe
        set_cpu3_online(p.sysfs, True)
        for i in range(5):
            p.monitor.trigger(FakeDevice("online", "cpu", "cpu3", 20 + i))
            await asyncio.sleep(0.01)
        await p.snapshot_where(lambda s: s["topology"]["cpus"][3]["online"])
        assert a.counters["reprobes"] == before + 2
        # a monitor error (netlink overrun) is a re-probe too
        p.monitor.fail_next = True
        p.monitor.trigger()
        await until(lambda: a.counters["reprobes"] == before + 3)
        assert a.udev.counters["errors"] == 1
        await p.stop()
    run(main())


def test_events_together_make_one_snapshot_and_no_change_publishes_nothing():
    async def main():
        p = InProc("xeon-2s-cat", dedicated="2-11,14-23,26-35,38-47")
        await p.start()
        a = p.agent
        conn = a.watcher.conn
        sent = a.publisher.stats["snapshots"]
        received = a.watcher.events_received
        for i, cpu in enumerate((2, 3, 4)):  # six events in one loop step
            conn.defineXML(domain_xml(f"g{i}", vcpus=1, vcpupin={0: str(cpu)})).create()
        # libvirt's event thread hands them to the loop: wait (holding the loop) until
        # all six are posted, so that they are handled in one loop step
        deadline = time.monotonic() + 10
        while a.watcher.events_received < received + 6 and time.monotonic() < deadline:
            time.sleep(0.001)
        snap = await p.snapshot_where(lambda s: len(s["usage"]["guests"]) == 3)
        assert a.publisher.stats["snapshots"] == sent + 1
        assert a.watcher.counters["event_lifecycle"] == 6
        seq = snap["seq"]
        a.watcher.request_resync()  # a full re-read that finds the same guests
        await until(lambda: a.watcher.counters["full_resyncs"] == 2)
        await until(lambda: not a._flushing and a._flush_handle is None)
        assert a.publisher.seq == seq and a.counters["unchanged_flushes"] >= 1
        await p.stop()
    run(main())


def test_libvirt_loss_is_published_and_guests_are_kept():
    async def main():
        p = InProc("xeon-2s-cat", dedicated="2-11,14-23,26-35,38-47")
        await p.start()
        a = p.agent
        a.watcher.check_seconds = 0.02
        a.watcher.conn.defineXML(domain_xml("keep", vcpus=1, vcpupin={0: "5"})).create()
        await p.snapshot_where(lambda s: len(s["usage"]["guests"]) == 1)
        a.watcher.conn.close()
        a.watcher.check()
        snap = await p.snapshot_where(lambda s: not s["agent"]["libvirt"]["connected"])
        assert [g["name"] for g in snap["usage"]["guests"]] == ["keep"]
        # the reconnect opens a fresh custom test:/// node: no guests, connected again
        snap = await p.snapshot_where(lambda s: s["agent"]["libvirt"]["connected"], 5)
        assert snap["usage"]["guests"] == []
        await p.stop()
    run(main())


def test_merge_reload_keeps_restart_only_settings(tmp_path):
    d = Path(tempfile.mkdtemp(prefix="hr-"))
    old = load_config(None)
    new = dataclasses.replace(
        old, host=dataclasses.replace(old.host, name="other"),
        publisher=dataclasses.replace(old.publisher, endpoints=("ipc:///x",), coalesce_ms=9),
        curve=dataclasses.replace(old.curve, enabled=True, allowed_clients_dir=str(d)))
    merged, notes = merge_reload(old, new)
    assert merged.host == old.host and merged.publisher.endpoints == old.publisher.endpoints
    assert merged.publisher.coalesce_ms == 9 and merged.curve.enabled is False
    assert merged.curve.allowed_clients_dir == str(d)
    assert sorted(notes) == ["[host] name 'other' takes effect at restart",
                             "curve.enabled takes effect at restart",
                             "publisher.endpoints takes effect at restart"]


def test_read_hugepages_rereads_only_the_counters(tmp_path):
    pool = "devices/system/node/node1/hugepages/hugepages-1048576kB"
    root = copy_of("xeon-2s-cat", tmp_path, f"{pool}/free_hugepages")
    topo = probe_fixture("xeon-2s-cat")
    assert read_hugepages(str(root), topo) is topo  # nothing changed: same object
    (root / pool / "free_hugepages").write_text("3\n")
    new = read_hugepages(str(root), topo)
    assert new.cells[0] is topo.cells[0]
    assert [(h.size_kib, h.free) for h in new.cells[1].hugepages] == [(2048, 2048),
                                                                      (1048576, 3)]
    assert new.cpus is topo.cpus


def test_journal_prefix_only_when_stderr_is_the_journal():
    st = os.fstat(2)
    assert stderr_is_journal({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
    assert not stderr_is_journal({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"})
    assert not stderr_is_journal({})
    import logging

    from hostagent.agent.daemon import _SyslogPrefix

    rec = logging.LogRecord("hostagent", logging.WARNING, __file__, 1, "a\nb", None, None)
    assert _SyslogPrefix("%(name)s: %(message)s").format(rec) == "<4>hostagent: a\n<4>b"


def test_udev_unavailable_is_not_fatal():
    class NoUdev:
        def filter_by(self, s):
            raise OSError("netlink: permission denied")

    w = UdevWatch(lambda d: None, monitor=NoUdev())
    assert not w.start(LOOP)
    assert not w.state()["active"] and "permission denied" in w.state()["unavailable_reason"]
