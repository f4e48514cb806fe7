"""Intruders and the thread check against a real libvirtd and real QEMU (TCG) guests.

Same rules as ``tests/test_real_libvirt.py`` (whose guest helpers this reuses): fails when
``CI=true`` and ``qemu:///system`` cannot be reached, skipped with the reason elsewhere;
every guest has a unique ``hatest-`` name and is destroyed in a ``finally``; every wait is
bounded; nothing asserts on durations. One guest serves the module: each test leaves it as
it found it, the last one destroys it.

The dedicated thread is this machine's last CPU. A guest's vCPU 1 is pinned there: its
QEMU thread is allowed only on a dedicated thread, the worst a host task could be, and
must never be reported as an intruder (it is the guest's), while a plain ``sleep``
pinned there is.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import test_real_libvirt as real
from daemon_helpers import DaemonProc, config_text, wait_for

CHECK_SECONDS = 0.5  # the agent's thread_check_seconds here (the default is 10)


@pytest.fixture(scope="module")
def reachable() -> None:
    """Fail (CI=true) or skip (elsewhere) when the real libvirtd cannot be reached."""
    reason = real._unreachable_reason()
    if reason is not None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true and the real hypervisor is unavailable: {reason}")
        pytest.skip(reason)
    import libvirt

    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)


@pytest.fixture(scope="module")
def two_cpus(reachable: None) -> list[int]:
    cpus = real._host_cpus()
    if len(cpus) < 2:
        pytest.skip("a shared CPU and a dedicated one need two CPUs")
    return cpus


@pytest.fixture(scope="module")
def guest(two_cpus: list[int]) -> Iterator[real.Guest]:
    """A running TCG guest: vCPU 0 on every CPU, vCPU 1 on the dedicated (last) one; one
    for the module (a start costs seconds on a loaded machine), the last test destroys
    it."""
    import libvirt

    conn = libvirt.open(real.URI)
    everywhere = f"{two_cpus[0]}-{two_cpus[-1]}"
    g = real.Guest(conn, {0: everywhere, 1: two_cpus[-1]}, everywhere)
    try:
        yield g
    finally:
        g.close()
        conn.close()


@contextmanager
def sleeper(cpu: int) -> Iterator[subprocess.Popen[bytes]]:
    p = subprocess.Popen(["sleep", "300"])
    try:
        os.sched_setaffinity(p.pid, {cpu})
        yield p
    finally:
        p.kill()
        p.wait()


def _intruder_tids(usage: dict[str, Any]) -> set[int]:
    return {t["tid"] for c in usage["conflicts"] if c["kind"] == "host_tasks_on_dedicated"
            for t in c["tasks"]}


def _drifts(usage: dict[str, Any], uuid: str) -> list[dict[str, Any]]:
    return [c for c in usage["conflicts"]
            if c["kind"] == "affinity_drift" and uuid in c["guests"]]


def _vcpu_tids(guest: dict[str, Any] | None) -> dict[int, int]:
    return {t["vcpu"]: t["tid"] for t in (guest or {}).get("threads", [])
            if t["vcpu"] is not None}


def test_one_shot_snapshot_has_real_threads_drift_and_intruders_never_the_guest(
        guest, two_cpus, tmp_path):
    """``hostagent snapshot`` against ``qemu:///system``: one check when it runs."""
    cfg = tmp_path / "h.toml"
    cfg.write_text(f'[libvirt]\nuri = "{real.URI}"\n'
                   f'[resources]\ndedicated_cpus = "{two_cpus[-1]}"\n')
    uuid = guest.dom.UUIDString()

    def snapshot() -> dict[str, Any]:
        r = subprocess.run([sys.executable, "-m", "hostagent.cli", "snapshot", "--config",
                            str(cfg), "--json"], capture_output=True, text=True,
                           timeout=real.REACH_TIMEOUT_SECONDS + 30)
        assert r.returncode == 0, r.stderr
        usage: dict[str, Any] = json.loads(r.stdout)["usage"]
        return usage

    with sleeper(two_cpus[-1]) as pinned:
        usage = snapshot()
        g = next(x for x in usage["guests"] if x["uuid"] == uuid)
        vcpus = _vcpu_tids(g)
        assert sorted(vcpus) == [0, 1] and g["pid"] is not None
        assert _drifts(usage, uuid) == []
        named = _intruder_tids(usage)
        assert pinned.pid in named
        assert not named & {t["tid"] for t in g["threads"]}  # vCPU 1: the guest's own
        assert usage["intruders"][0]["cpu"] == two_cpus[-1]
        os.sched_setaffinity(vcpus[0], {two_cpus[0]})  # behind libvirt's back
        try:
            [c] = _drifts(snapshot(), uuid)
            assert (c["vcpu"], c["tid"], c["actual"]) == (0, vcpus[0], [two_cpus[0]])
        finally:
            os.sched_setaffinity(vcpus[0], set(two_cpus))
        assert _drifts(snapshot(), uuid) == []


@pytest.fixture(scope="module")
def agent(reachable: None) -> Iterator[DaemonProc]:
    """``hostagent run`` on this machine's /sys and ``qemu:///system``, checking every
    ``CHECK_SECONDS``, the last CPU dedicated."""
    d = DaemonProc(start=False)
    try:
        d.sysfs = Path("/sys")
        d.config.write_text(config_text(d.dir, d.sysfs, real.URI,
                                        dedicated=str(real._host_cpus()[-1]),
                                        libvirt=f"thread_check_seconds = {CHECK_SECONDS}\n"))
        d.start()
        d.wait_notify("READY=1", timeout=real.REACH_TIMEOUT_SECONDS)
        yield d
        assert d.stop() == 0, d.log_text()
    finally:
        d.close()


def test_agent_with_a_short_period_sees_drift_and_intruders_and_both_clear(agent, guest,
                                                                           two_cpus):
    """Within one short period: a plain process pinned to the dedicated thread is named
    (the guest's vCPU pinned there is not), and a vCPU narrowed behind libvirt's back is
    drift; both clear when undone. (> 2 s: a real guest and several periods.)"""
    uuid = guest.dom.UUIDString()
    wait = real.GUEST_TIMEOUT_SECONDS
    with agent.subscriber() as sub:
        snap = wait_for(sub, lambda s: len(_vcpu_tids(real._guest(s, guest.name))) == 2,
                        timeout=wait)
        guest_tids = {t["tid"] for t in real._guest(snap, guest.name)["threads"]}
        vcpu0 = _vcpu_tids(real._guest(snap, guest.name))[0]
        with sleeper(two_cpus[-1]) as pinned:
            snap = wait_for(sub, lambda s: pinned.pid in _intruder_tids(s["usage"]),
                            timeout=wait)
            assert not _intruder_tids(snap["usage"]) & guest_tids
        wait_for(sub, lambda s: pinned.pid not in _intruder_tids(s["usage"]), timeout=wait)
        os.sched_setaffinity(vcpu0, {two_cpus[0]})
        try:
            wait_for(sub, lambda s: _drifts(s["usage"], uuid), timeout=wait)
        finally:
            os.sched_setaffinity(vcpu0, set(two_cpus))
        wait_for(sub, lambda s: not _drifts(s["usage"], uuid), timeout=wait)


def test_guest_qemu_vanishes_between_finding_it_and_reading_its_threads(guest, two_cpus,
                                                                        monkeypatch):
    """The guest is destroyed (its QEMU process gone from /proc) after its pid was found
    and before its threads are read: ``pid`` null, no threads, no drift, no exception; and
    the intruder scan of the same check runs on."""
    from hostagent.guests import threads as threads_mod
    from hostagent.guests.intruders import IntruderScope, check_threads
    from hostagent.guests.xml import parse_domain

    uuid = guest.dom.UUIDString()
    spec = parse_domain(guest.dom.XMLDesc(0))
    scope = IntruderScope(frozenset({two_cpus[-1]}), frozenset(), len(two_cpus))
    hints: dict[str, int] = {}
    first = check_threads({uuid: spec}, hints, scope)
    pid = first["guests"][uuid]["pid"]
    assert pid is not None and hints == {uuid: pid}
    assert len(first["guests"][uuid]["threads"]) >= 3 and first["guests"][uuid]["drift"] == []
    real_read = threads_mod.read_threads

    def destroyed_first(p: int, **kw: Any) -> Any:
        guest.destroy()
        deadline = time.monotonic() + real.GUEST_TIMEOUT_SECONDS
        while Path(f"/proc/{p}/task").exists():  # gone, reaped by the subreaper
            assert time.monotonic() < deadline, f"QEMU {p} still in /proc"
            time.sleep(0.02)
        return real_read(p, **kw)

    monkeypatch.setattr(threads_mod, "read_threads", destroyed_first)
    after = check_threads({uuid: spec}, hints, scope)
    assert after["guests"] == {uuid: {"pid": None, "threads": [], "drift": []}}
    assert hints == {}
    assert after["intruders"] is not None and after["intruders"]["cpus"][0]["cpu"] == \
        two_cpus[-1]
