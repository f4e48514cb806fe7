"""The agent against a real libvirtd (``qemu:///system``) and real QEMU (TCG) guests.

Needs libvirtd running (``scripts/setup-libvirtd``, which ``scripts/test`` calls first).
When ``qemu:///system`` cannot be reached, every test here FAILS when ``CI=true`` (a CI run
must not silently skip the real hypervisor) and is skipped with the reason otherwise.

Each test starts its own transient guest (``<domain type='qemu'>``: TCG, 2 vCPUs, 64 MiB, no
disk) with a unique name, pinned to this machine's own CPUs, and destroys it in a
``finally`` (libvirtd is machine-wide: only what a test started is touched). One real
``hostagent run`` per module reads the machine's own ``/sys`` (the pins must be CPUs of the
probed host) and follows ``qemu:///system``; the tests check what it publishes through a
real subscriber. One test stops the machine's libvirtd (SIGTERM; its guests keep running) and
starts it again with scripts/setup-libvirtd, so each test opens its own connection. Every
wait is bounded; nothing asserts on durations.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from daemon_helpers import DaemonProc, config_text, guest_names, wait_for

URI = "qemu:///system"
QEMU = "/usr/bin/qemu-system-x86_64"
REACH_TIMEOUT_SECONDS = 60.0  # the first connection probes QEMU's capabilities (~6 s)
GUEST_TIMEOUT_SECONDS = 60.0  # a TCG guest starts in 1-3 s; generous for a loaded machine
GUEST_MEMORY_MIB = 64
GUEST_PREFIX = "hatest-"
ROOT = Path(__file__).resolve().parent.parent


def _host_cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def _unreachable_reason() -> str | None:
    """Why ``qemu:///system`` cannot be used here, or None when it answers."""
    if not Path(QEMU).exists():
        return f"{QEMU} is not installed (run scripts/setup-libvirtd)"
    try:
        out = subprocess.run(["virsh", "-c", URI, "version"], capture_output=True, text=True,
                             timeout=REACH_TIMEOUT_SECONDS)
    except FileNotFoundError:
        return "virsh is not installed (run scripts/setup-libvirtd)"
    except subprocess.TimeoutExpired:
        return f"virsh -c {URI} version did not answer within {REACH_TIMEOUT_SECONDS:.0f} s"
    if out.returncode != 0:
        return (f"libvirtd is not reachable on {URI} (run scripts/setup-libvirtd): "
                f"{out.stderr.strip()}")
    return None


@pytest.fixture(scope="module")
def reachable() -> None:
    """Fail (CI=true) or skip (elsewhere) when the real libvirtd cannot be reached."""
    reason = _unreachable_reason()
    if reason is not None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true and the real hypervisor is unavailable: {reason}")
        pytest.skip(reason)
    import libvirt

    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)


@pytest.fixture
def conn(reachable: None) -> Iterator[Any]:
    """A read-write connection to the real libvirtd, per test (one test restarts it)."""
    import libvirt

    c = libvirt.open(URI)
    try:
        yield c
    finally:
        c.close()


def guest_xml(name: str, vcpupin: dict[int, int | str], emulatorpin: str) -> str:
    pins = "".join(f"<vcpupin vcpu='{v}' cpuset='{c}'/>" for v, c in vcpupin.items())
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <uuid>{uuid.uuid4()}</uuid>
  <memory unit='MiB'>{GUEST_MEMORY_MIB}</memory>
  <vcpu placement='static'>{len(vcpupin)}</vcpu>
  <cputune>{pins}<emulatorpin cpuset='{emulatorpin}'/></cputune>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <on_poweroff>destroy</on_poweroff>
  <devices>
    <emulator>{QEMU}</emulator>
    <video><model type='none'/></video>
    <memballoon model='none'/>
  </devices>
</domain>
"""


class Guest:
    """A transient TCG guest with a unique name, destroyed by ``close()`` (idempotent)."""

    def __init__(self, conn: Any, vcpupin: dict[int, int | str], emulatorpin: str) -> None:
        self.name = f"{GUEST_PREFIX}{uuid.uuid4().hex[:10]}"
        self.xml = guest_xml(self.name, vcpupin, emulatorpin)
        self.dom = conn.createXML(self.xml, 0)

    def destroy(self) -> None:
        import libvirt

        try:
            self.dom.destroy()
        except libvirt.libvirtError:
            if self.dom.isActive():
                raise

    def close(self) -> None:
        import libvirt

        try:
            if self.dom.isActive():
                self.dom.destroy()
            return
        except libvirt.libvirtError:
            pass  # gone (a transient guest is undefined when it stops), or the connection
        try:  # was to a libvirtd that has been restarted since: look it up again
            c = libvirt.open(URI)
        except libvirt.libvirtError:
            return
        try:
            c.lookupByName(self.name).destroy()
        except libvirt.libvirtError:
            pass
        finally:
            c.close()


@pytest.fixture
def new_guest(conn: Any) -> Iterator[Any]:
    made: list[Guest] = []

    def make(vcpupin: dict[int, int | str], emulatorpin: str) -> Guest:
        g = Guest(conn, vcpupin, emulatorpin)
        made.append(g)
        return g

    try:
        yield make
    finally:
        for g in made:
            g.close()


@pytest.fixture(scope="module")
def agent(reachable: None) -> Iterator[DaemonProc]:
    """``hostagent run`` on this machine's /sys, following the real libvirtd."""
    cpus = _host_cpus()
    d = DaemonProc(start=False)
    try:
        d.uri = URI
        d.sysfs = Path("/sys")
        # a short thread-check period: the drift test waits for one check, not 10 s
        d.config.write_text(config_text(d.dir, d.sysfs, URI,
                                        dedicated=",".join(map(str, cpus)),
                                        libvirt="thread_check_seconds = 0.5\n"))
        d.start()
        d.wait_notify("READY=1", timeout=REACH_TIMEOUT_SECONDS)
        yield d
        assert d.stop() == 0, d.log_text()
    finally:
        d.close()


def _pins(cpus: list[int]) -> dict[int, int]:
    """vCPU 0 on the first CPU, vCPU 1 on the last (the same CPU on a 1-CPU machine)."""
    return {0: cpus[0], 1: cpus[-1]}


def _guest(snap: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((g for g in snap["usage"]["guests"] if g["name"] == name), None)


def _vcpu_owners(snap: dict[str, Any], name: str) -> dict[int, set[int]]:
    """vCPU → the CPUs whose ``usage.threads`` entry names that vCPU of guest ``name``.

    libvirtd is machine-wide: a guest this test did not start (another session's, one left
    behind by a killed run) may pin the same CPUs. Such a CPU's entry names one of the two
    guests, and a ``dedicated_overlap`` conflict names both; for it the vCPU pinned there
    comes from the guest's ``pinning``."""
    guest = _guest(snap, name)
    if guest is None:
        return {}
    shared = {c for k in snap["usage"]["conflicts"] if k["kind"] == "dedicated_overlap"
              and guest["uuid"] in k["guests"] for c in k.get("cpus", [])}
    owners: dict[int, set[int]] = {}
    for t in snap["usage"]["threads"]:
        if t["cpu"] in shared:
            for v, cpu in guest["pinning"].items():
                if cpu == t["cpu"]:
                    owners.setdefault(int(v), set()).add(t["cpu"])
        elif t.get("guest") == guest["uuid"] and t.get("vcpu") is not None:
            owners.setdefault(t["vcpu"], set()).add(t["cpu"])
    return owners


def test_agent_is_connected_to_the_real_libvirtd(agent):
    with agent.subscriber() as sub:
        snap = wait_for(sub, lambda s: s["agent"]["libvirt"]["connected"],
                        timeout=REACH_TIMEOUT_SECONDS)
    assert snap["agent"]["libvirt"] == {"uri": URI, "connected": True}
    assert [c["id"] for c in snap["topology"]["cpus"]] == _host_cpus()


def test_started_guest_appears_with_threads_and_cell_then_destroy_removes_it(agent,
                                                                             new_guest):
    cpus = _host_cpus()
    with agent.subscriber() as sub:
        sub.wait_snapshot("testhost", timeout=REACH_TIMEOUT_SECONDS)
        g = new_guest(_pins(cpus), f"{cpus[0]}-{cpus[-1]}")
        snap = wait_for(sub, lambda s: _guest(s, g.name) is not None,
                        timeout=GUEST_TIMEOUT_SECONDS)
        guest = _guest(snap, g.name)
        assert guest["uuid"] == g.dom.UUIDString() and guest["state"] == "running"
        assert guest["vcpus"] == 2 and guest["memory_kib"] == GUEST_MEMORY_MIB * 1024
        assert guest["pinning"] == {"0": cpus[0], "1": cpus[-1]}
        assert guest["emulator_cpus"] == sorted({cpus[0], cpus[-1]})
        assert [(c["guest_cell"], c["vcpus"]) for c in guest["cells"]] == [(0, 2)]
        assert _vcpu_owners(snap, g.name) == {0: {cpus[0]}, 1: {cpus[-1]}}
        cell0 = snap["usage"]["cells"][0]
        assert set(_pins(cpus).values()) <= set(cell0["pinned_cpus"])
        g.destroy()
        snap2 = wait_for(sub, lambda s: _guest(s, g.name) is None,
                         timeout=GUEST_TIMEOUT_SECONDS)
        assert g.name not in guest_names(snap2)
        assert not any(t.get("guest") == guest["uuid"] for t in snap2["usage"]["threads"])


def test_live_vcpupin_is_a_tunable_event_and_the_snapshot_shows_the_new_pin(agent,
                                                                            new_guest):
    cpus = _host_cpus()
    with agent.subscriber() as sub:
        sub.wait_snapshot("testhost", timeout=REACH_TIMEOUT_SECONDS)
        g = new_guest(_pins(cpus), f"{cpus[0]}-{cpus[-1]}")
        wait_for(sub, lambda s: _vcpu_owners(s, g.name) == {0: {cpus[0]}, 1: {cpus[-1]}},
                 timeout=GUEST_TIMEOUT_SECONDS)
        # the pins swap, live: libvirtd emits VIR_DOMAIN_EVENT_ID_TUNABLE for each
        width = max(cpus) + 1
        g.dom.pinVcpu(0, tuple(c == cpus[-1] for c in range(width)))
        g.dom.pinVcpu(1, tuple(c == cpus[0] for c in range(width)))
        snap = wait_for(sub, lambda s: _vcpu_owners(s, g.name) == {0: {cpus[-1]},
                                                                   1: {cpus[0]}},
                        timeout=GUEST_TIMEOUT_SECONDS)
        assert _guest(snap, g.name)["pinning"] == {"0": cpus[-1], "1": cpus[0]}
    events = [e for e in _debug_dump(agent)["libvirt"]["last_events"]
              if e["domain"] == g.name]
    assert "tunable" in [e["event"] for e in events], events
    tunable = next(e for e in events if e["event"] == "tunable")
    assert any(k.startswith("cputune.vcpupin") for k in tunable["detail"]), tunable


def _debug_dump(agent: DaemonProc) -> dict[str, Any]:
    """The agent's SIGUSR1 debug dump (written atomically: waiting for the file is enough)."""
    dump = agent.dir / "run" / "hostagent-dump.json"
    dump.unlink(missing_ok=True)
    agent.signal(signal.SIGUSR1)
    deadline = time.monotonic() + GUEST_TIMEOUT_SECONDS
    while not dump.exists():
        assert time.monotonic() < deadline, f"no debug dump; log:\n{agent.log_text()[-3000:]}"
        time.sleep(0.05)
    return json.loads(dump.read_text())


def test_setup_libvirtd_run_again_says_each_step_and_leaves_the_daemons_alone(conn):
    pids = {n: Path(f"/run/{n}.pid").read_text().strip() for n in ("virtlogd", "libvirtd")}
    r = subprocess.run([str(ROOT / "scripts" / "setup-libvirtd")], capture_output=True,
                       text=True, timeout=REACH_TIMEOUT_SECONDS + 30)
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    kvm = ("setup-libvirtd: /dev/kvm: group kvm, mode 0660, libvirt-qemu a member (present)"
           if Path("/dev/kvm").exists() else
           "setup-libvirtd: /dev/kvm absent (guests run with TCG only)")
    hugetlbfs = next(ln.split()[1] for ln in Path("/proc/mounts").read_text().splitlines()
                     if ln.split()[2] == "hugetlbfs")
    pages = int(Path("/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages").read_text())
    assert lines[:9] == [
        "setup-libvirtd: Debian packages present (libvirt-daemon libvirt-daemon-driver-qemu "
        "qemu-system-x86 libvirt-clients)",
        "setup-libvirtd: group libvirt-qemu present",
        "setup-libvirtd: user libvirt-qemu present",
        "setup-libvirtd: /var/log/libvirt/qemu present",
        kvm,
        f"setup-libvirtd: hugepages: {pages} 2 MiB pages (at least 64) present",
        f"setup-libvirtd: hugetlbfs mounted ({hugetlbfs})",
        f"setup-libvirtd: virtlogd running (pid {pids['virtlogd']})",
        f"setup-libvirtd: libvirtd running (pid {pids['libvirtd']})",
    ], r.stderr
    assert lines[9].startswith("setup-libvirtd: waiting for virsh -c qemu:///system version")
    assert lines[10].startswith("setup-libvirtd: libvirtd answers on qemu:///system"), r.stderr
    assert len(lines) == 11, r.stderr
    assert conn.getVersion() > 0  # the module's connection survived: nothing restarted


def test_real_vcpu_threads_and_a_repin_behind_libvirts_back_is_drift(conn, new_guest):
    """vCPU 0 may run on every CPU (``vcpupin 0-1``); ``sched_setaffinity`` narrows its real
    thread to one CPU. (Widening cannot drift here: libvirt also puts each vCPU thread in
    a cpuset cgroup of its pin, and the kernel intersects the affinity with it.)"""
    from hostagent.guests.threads import affinity_drift, find_qemu_pid, read_threads
    from hostagent.guests.xml import parse_domain

    cpus = _host_cpus()
    if len(cpus) < 2:
        pytest.skip("a drift needs two CPUs to narrow a vCPU's affinity")
    everywhere = f"{cpus[0]}-{cpus[-1]}"
    g = new_guest({0: everywhere, 1: cpus[-1]}, everywhere)
    spec = parse_domain(g.dom.XMLDesc(0))
    pid = find_qemu_pid(g.dom.UUIDString())
    assert pid is not None
    threads = read_threads(pid)
    vcpus = {t.vcpu: t for t in threads if t.vcpu is not None}
    assert {v: t.cpus for v, t in vcpus.items()} == {0: tuple(cpus), 1: (cpus[-1],)}
    assert all(t.name == f"CPU {v}/TCG" for v, t in vcpus.items())
    assert any(t.tid == pid and t.emulator for t in threads)
    assert affinity_drift(spec, threads) == []
    os.sched_setaffinity(vcpus[0].tid, {cpus[0]})  # behind libvirt's back
    try:
        assert affinity_drift(spec, read_threads(pid)) == [
            {"tid": vcpus[0].tid, "name": "CPU 0/TCG", "vcpu": 0, "declared": cpus,
             "actual": [cpus[0]]}]
    finally:
        os.sched_setaffinity(vcpus[0].tid, set(cpus))
    assert affinity_drift(spec, read_threads(pid)) == []
    g.destroy()
    gone = find_qemu_pid(g.dom.UUIDString(), hint=pid)
    assert gone is None, gone


def _drifts(snap: dict[str, Any], uuid: str) -> list[dict[str, Any]]:
    return [c for c in snap["usage"]["conflicts"]
            if c["kind"] == "affinity_drift" and uuid in c["guests"]]


def test_agent_reports_real_threads_and_affinity_drift_until_undone(agent, new_guest):
    """Through the running agent: ``usage.guests[].threads`` with the real tids, and an
    ``affinity_drift`` conflict within one check period after ``sched_setaffinity``
    narrows vCPU 0 behind libvirt's back; it clears when the affinity is restored."""
    cpus = _host_cpus()
    if len(cpus) < 2:
        pytest.skip("a drift needs two CPUs to narrow a vCPU's affinity")
    everywhere = f"{cpus[0]}-{cpus[-1]}"
    with agent.subscriber() as sub:
        sub.wait_snapshot("testhost", timeout=REACH_TIMEOUT_SECONDS)
        g = new_guest({0: everywhere, 1: cpus[-1]}, everywhere)
        uuid = g.dom.UUIDString()

        def vcpu_threads(s: dict[str, Any]) -> dict[int, dict[str, Any]]:
            guest = _guest(s, g.name)
            return {t["vcpu"]: t for t in (guest or {}).get("threads", [])
                    if t["vcpu"] is not None}

        snap = wait_for(sub, lambda s: len(vcpu_threads(s)) == 2,
                        timeout=GUEST_TIMEOUT_SECONDS)
        threads = vcpu_threads(snap)
        assert {v: t["cpus"] for v, t in threads.items()} == {0: cpus, 1: [cpus[-1]]}
        assert {v: t["name"] for v, t in threads.items()} == {0: "CPU 0/TCG", 1: "CPU 1/TCG"}
        pid = _guest(snap, g.name)["pid"]
        assert all(Path(f"/proc/{pid}/task/{t['tid']}").exists() for t in threads.values())
        assert _drifts(snap, uuid) == []
        tid = threads[0]["tid"]
        os.sched_setaffinity(tid, {cpus[0]})  # behind libvirt's back
        try:
            snap = wait_for(sub, lambda s: _drifts(s, uuid), timeout=GUEST_TIMEOUT_SECONDS)
            [c] = _drifts(snap, uuid)
            assert (c["vcpu"], c["tid"], c["declared"], c["actual"]) == (0, tid, cpus,
                                                                         [cpus[0]])
            assert c["detail"].startswith(f"{g.name}: vCPU 0 (tid {tid}) runs on {cpus[0]}")
        finally:
            os.sched_setaffinity(tid, set(cpus))
        wait_for(sub, lambda s: not _drifts(s, uuid) and len(vcpu_threads(s)) == 2,
                 timeout=GUEST_TIMEOUT_SECONDS)


def _pid_alive(pid: int) -> bool:
    """Running and not a zombie; a process reaped between the two reads is not alive (the
    read of its ``stat`` then fails with ESRCH or ENOENT)."""
    try:
        os.kill(pid, 0)
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][:1] != "Z"
    except (ProcessLookupError, FileNotFoundError):
        return False


def test_libvirtd_killed_and_restarted_keeps_guests_then_reconnects_and_resyncs(agent,
                                                                                new_guest):
    """SIGTERM to the machine's libvirtd (its QEMU guests keep running): the snapshot says
    ``connected: false`` and keeps the guest; scripts/setup-libvirtd starts libvirtd again,
    the agent reconnects and resyncs (the guest is still there, its threads too)."""
    cpus = _host_cpus()
    with agent.subscriber() as sub:
        sub.wait_snapshot("testhost", timeout=REACH_TIMEOUT_SECONDS)
        g = new_guest(_pins(cpus), f"{cpus[0]}-{cpus[-1]}")
        wait_for(sub, lambda s: _guest(s, g.name) is not None, timeout=GUEST_TIMEOUT_SECONDS)
        pid = int(Path("/run/libvirtd.pid").read_text())
        os.kill(pid, signal.SIGTERM)
        try:
            deadline = time.monotonic() + GUEST_TIMEOUT_SECONDS
            while _pid_alive(pid):
                assert time.monotonic() < deadline, "libvirtd did not stop on SIGTERM"
                time.sleep(0.1)
            down = wait_for(sub, lambda s: not s["agent"]["libvirt"]["connected"],
                            timeout=GUEST_TIMEOUT_SECONDS)
            assert _guest(down, g.name) is not None  # kept while libvirt is unreachable
        finally:
            r = subprocess.run([str(ROOT / "scripts" / "setup-libvirtd")],
                               capture_output=True, text=True,
                               timeout=REACH_TIMEOUT_SECONDS + 30)
            assert r.returncode == 0, r.stderr
        assert "setup-libvirtd: starting libvirtd -d" in r.stderr, r.stderr
        up = wait_for(sub, lambda s: s["agent"]["libvirt"]["connected"]
                      and _guest(s, g.name) is not None, timeout=REACH_TIMEOUT_SECONDS)
        assert _vcpu_owners(up, g.name) == {0: {cpus[0]}, 1: {cpus[-1]}}
        # the new libvirtd knows the guest (it re-attached to the running QEMU)
        import libvirt

        c2 = libvirt.open(URI)
        try:
            assert c2.lookupByName(g.name).isActive()
            c2.lookupByName(g.name).destroy()
        finally:
            c2.close()
        wait_for(sub, lambda s: _guest(s, g.name) is None, timeout=GUEST_TIMEOUT_SECONDS)
