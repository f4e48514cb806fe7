"""Intruders (``hostagent.guests.intruders``): host tasks allowed on dedicated threads.

Real processes and threads on this machine (``sleep`` children pinned with
``os.sched_setaffinity``, threads of this process), the real ``/proc``; a tree shaped
like ``/proc`` only for what cannot be made here (kernel threads serving a guest, a
garbage ``stat``). The races (a process or thread exiting between the listing and the
read) are real exits, placed between the two reads by wrapping the module's read
functions. Then the tracker's ``usage.intruders`` and ``host_tasks_on_dedicated``, the
config options, ``hostagent snapshot`` (one check) and a real daemon (a short period).

The dedicated thread is this process's last allowed CPU; "online" is this process's
affinity (a child with the default affinity is then not narrowed).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from daemon_helpers import DaemonProc, config_text, wait_for

from hostagent.config import (
    DEFAULT_THREAD_CHECK_SECONDS,
    LibvirtConfig,
    config_from_dict,
    thread_check_period,
)
from hostagent.errors import ConfigError
from hostagent.guests import intruders as intr
from hostagent.guests.intruders import (
    MAX_INTRUDERS_REPORTED,
    PF_KTHREAD,
    IntruderScope,
    host_tasks,
    read_stat,
    scan_intruders,
)

CPUS = sorted(os.sched_getaffinity(0))
DEDICATED = CPUS[-1]
WAIT_SECONDS = 30.0  # generous: the machine may be loaded
needs_two_cpus = pytest.mark.skipif(len(CPUS) < 2, reason="a task narrower than every "
                                    "CPU and a dedicated thread need two CPUs")


def scope(conflict: str = "pinned", isolated: bool = False) -> IntruderScope:
    ded = frozenset({DEDICATED})
    return IntruderScope(ded, ded if isolated else frozenset(), len(CPUS), conflict)


@contextmanager
def sleeper(cpus: set[int] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """A ``sleep`` child, pinned to ``cpus`` when given; killed and reaped at the end."""
    p = subprocess.Popen(["sleep", "300"])
    try:
        if cpus is not None:
            os.sched_setaffinity(p.pid, cpus)
        yield p
    finally:
        p.kill()
        p.wait()


def named(scan: dict[str, Any]) -> set[int]:
    return {t["tid"] for t in scan["worst"]}


@pytest.fixture
def report_all(monkeypatch: pytest.MonkeyPatch) -> None:
    """Name every conflicting task (other tests on this machine may pin tasks too)."""
    monkeypatch.setattr(intr, "MAX_INTRUDERS_REPORTED", 1 << 20)


@needs_two_cpus
def test_pinned_onto_a_dedicated_thread_is_a_conflict_the_default_affinity_is_counted(
        report_all):
    with sleeper({DEDICATED}) as pinned, sleeper() as default:
        scan = scan_intruders(scope())
        assert pinned.pid in named(scan) and default.pid not in named(scan)
        [entry] = [t for t in scan["worst"] if t["tid"] == pinned.pid]
        assert entry == {"pid": pinned.pid, "tid": pinned.pid, "comm": "sleep",
                         "cpus": [DEDICATED]}
        assert scan["cpus"] == [{"cpu": DEDICATED, "tasks": scan["tasks"],
                                 "conflicting": scan["conflicting"]}]
        assert scan["tasks"] > scan["conflicting"] >= 1  # the default one is counted
        # the kernel isolates the dedicated thread: every task allowed there conflicts
        isolated = scan_intruders(scope(isolated=True))
        assert {pinned.pid, default.pid} <= named(isolated)
        every = scan_intruders(scope("all"))
        assert {pinned.pid, default.pid} <= named(every)
        assert every["conflicting"] == every["tasks"]
        off = scan_intruders(scope("off"))
        assert off["conflicting"] == 0 and off["worst"] == [] and off["tasks"] >= 2
        # a guest's QEMU process is not a host task
        assert pinned.pid not in named(scan_intruders(scope(), [pinned.pid]))
    assert scan_intruders(IntruderScope(frozenset(), frozenset(), len(CPUS), "all")) == {
        "tasks": 0, "conflicting": 0, "cpus": [], "worst": []}


def test_the_worst_come_first_and_their_number_is_bounded(tmp_path, monkeypatch):
    """15 tasks on a ``/proc``-shaped tree with given affinities (the syscall answers from
    a table): the ``MAX_INTRUDERS_REPORTED`` worst, fewest non-dedicated CPUs first, then
    fewest CPUs, then pid; the counts cover all of them."""
    assert MAX_INTRUDERS_REPORTED == 10
    affinity = {}
    for i in range(15):
        pid = 1000 + i
        (tmp_path / str(pid) / "task" / str(pid)).mkdir(parents=True)
        (tmp_path / str(pid) / "stat").write_text(_stat(pid, f"t{i}"))
        affinity[pid] = [{2}, {2, 3}, {0, 2}, {0, 1, 2, 3}, {0, 1, 2}][i % 5]
    monkeypatch.setattr(intr, "task_affinity", lambda tid: set(affinity[tid]))
    wide = IntruderScope(frozenset({2, 3}), frozenset(), 4, "all")
    scan = scan_intruders(wide, proc=tmp_path)
    assert (scan["tasks"], scan["conflicting"]) == (15, 15)
    assert scan["cpus"] == [{"cpu": 2, "tasks": 15, "conflicting": 15},
                            {"cpu": 3, "tasks": 6, "conflicting": 6}]
    assert [t["pid"] for t in scan["worst"]] == [1000, 1005, 1010, 1001, 1006, 1011,
                                                 1002, 1007, 1012, 1004]
    assert scan["worst"][0] == {"pid": 1000, "tid": 1000, "comm": "t0", "cpus": [2]}
    assert scan["worst"][3]["cpus"] == [2, 3]
    pinned = scan_intruders(IntruderScope(frozenset({2, 3}), frozenset(), 4), proc=tmp_path)
    assert pinned["conflicting"] == 12  # {0,1,2,3} is every online CPU: counted only


def test_per_cpu_kernel_threads_are_not_intruders_other_kernel_threads_are(report_all):
    everywhere = IntruderScope(frozenset(CPUS), frozenset(), len(CPUS), "all")
    scan = scan_intruders(everywhere)
    kernel = {}
    for pid, _tid, st in host_tasks():
        aff = intr.task_affinity(pid)
        if st.kernel_thread and aff is not None:
            kernel[pid] = (st.comm, len(aff))
    per_cpu = {p for p, (_c, n) in kernel.items() if n == 1}
    unbound = {p for p, (_c, n) in kernel.items() if n > 1}
    if not kernel:
        pytest.skip("no kernel threads visible in /proc here (a pid namespace)")
    assert per_cpu, kernel  # ksoftirqd/N, migration/N, cpuhp/N ...
    assert not per_cpu & named(scan)
    # unbound kernel threads (kthreadd, rcu_preempt, kworker/u...) are host tasks;
    # kthreadd (pid 2) never exits, the others may come and go meanwhile
    assert unbound & {2} <= named(scan)


def test_race_a_process_exits_between_the_listing_and_each_read(monkeypatch, report_all):
    """Real exits (kill, reap) placed between the listing of /proc and the stat read,
    between the stat read and the task listing, and before the affinity read."""
    for step in ("read_stat", "list_tids", "task_affinity"):
        real = getattr(intr, step)
        with sleeper({DEDICATED}) as child:
            assert child.pid in named(scan_intruders(scope()))  # found while alive

            def exits_first(*args: Any, _real: Any = real, _child: Any = child) -> Any:
                if args[0] == _child.pid and _child.poll() is None:
                    _child.kill()
                    _child.wait()  # reaped: /proc/<pid> and the tid are gone
                return _real(*args)

            monkeypatch.setattr(intr, step, exits_first)
            scan = scan_intruders(scope())
            assert child.returncode == -signal.SIGKILL, step  # it did exit mid-scan
            assert child.pid not in named(scan), step
            monkeypatch.setattr(intr, step, real)


def test_race_a_thread_exits_between_the_listing_and_the_affinity_read(monkeypatch,
                                                                        report_all):
    stop = threading.Event()
    t = threading.Thread(target=stop.wait, name="short-lived", daemon=True)
    t.start()
    tid = t.native_id
    assert tid is not None
    os.sched_setaffinity(tid, {DEDICATED})
    assert tid in named(scan_intruders(scope()))  # pinned: a conflicting intruder
    real = intr.task_affinity

    def exits_first(t_id: int) -> set[int] | None:
        if t_id == tid and t.is_alive():
            stop.set()
            t.join(WAIT_SECONDS)
            assert not t.is_alive()
            # join() returns when Python's thread state is released, a moment before
            # the kernel thread itself is gone: wait for the kernel's word too.
            gone_by = time.monotonic() + WAIT_SECONDS
            while Path(f"/proc/self/task/{tid}").exists():
                assert time.monotonic() < gone_by, f"thread {tid} still in /proc"
                time.sleep(0.01)
        return real(t_id)

    monkeypatch.setattr(intr, "task_affinity", exits_first)
    scan = scan_intruders(scope())
    assert not t.is_alive() and tid not in named(scan)


def test_a_zombie_is_not_an_intruder(report_all):
    p = subprocess.Popen(["sleep", "0.05"])
    try:
        os.sched_setaffinity(p.pid, {DEDICATED})
    except OSError:
        pass  # exited already: the zombie check below still holds
    deadline = time.monotonic() + WAIT_SECONDS
    while (st := read_stat(p.pid)) is not None and st.state != "Z":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    try:
        assert st is not None and st.state == "Z"
        assert os.sched_getaffinity(p.pid) is not None  # a zombie still has an affinity
        assert p.pid not in named(scan_intruders(scope("all")))
    finally:
        p.wait()


def _stat(pid: int, comm: str, state: str = "S", flags: int = 0) -> str:
    return f"{pid} ({comm}) {state} 1 {pid} {pid} 0 -1 {flags} 0 0 0 0 1 0 0 0 20 0 1 0\n"


def test_host_tasks_on_a_proc_shaped_tree_guest_kernel_threads_zombies_garbage(tmp_path):
    """What cannot be made here: kernel threads serving a guest (``vhost-<qemu pid>``), a
    name with ``) (`` in it, a garbage ``stat``, a zombie leader with a live thread."""
    def proc(pid: int, stat: str, tids: tuple[int, ...] = ()) -> None:
        d = tmp_path / str(pid)
        (d / "task").mkdir(parents=True)
        (d / "stat").write_text(stat)
        for t in tids or (pid,):
            (d / "task" / str(t)).mkdir()

    proc(100, _stat(100, "qemu-system-x86"), (100, 101, 102))  # the guest
    proc(200, _stat(200, "vhost-100", flags=PF_KTHREAD))  # serves the guest
    proc(201, _stat(201, "kvm-pit/100", flags=PF_KTHREAD))
    proc(202, _stat(202, "vhost-999", flags=PF_KTHREAD), (202, 203))  # not a guest's
    proc(300, _stat(300, "odd) (name", "S"), (300, 301))
    proc(400, _stat(400, "dead", "Z"), (400, 401))  # a zombie leader, one live thread
    proc(500, "500 (garbage) S x y\n")
    proc(501, "no parenthesis at all\n")
    proc(502, _stat(502, "flags", flags=0).replace(" 0 -1 0 ", " 0 -1 zz "))
    (tmp_path / "self").mkdir()
    (tmp_path / "600").mkdir()  # gone between the listing and the reads
    found = sorted((pid, tid, st.comm) for pid, tid, st in host_tasks([100], proc=tmp_path))
    assert found == [(202, 202, "vhost-999"), (300, 300, "odd) (name"),
                     (300, 301, "odd) (name"), (400, 401, "dead")]
    assert read_stat(999, tmp_path) is None
    assert intr.list_pids(tmp_path / "missing") == []


def test_tracker_adds_intruders_and_the_conflict_and_clears_it():
    from libvirt_helpers import probe_fixture

    from hostagent.tracker import UsageTracker

    tracker = UsageTracker(probe_fixture("xeon-2s-cat"), {"dedicated_cpus": [2, 3]})
    plain = tracker.usage()
    assert "intruders" not in plain
    worst = [{"pid": 7, "tid": 8, "comm": "stress", "cpus": [3]},
             {"pid": 9, "tid": 9, "comm": "irqbalance", "cpus": [2, 3]}]
    tracker.set_intruders({"tasks": 40, "conflicting": 12, "worst": worst,
                           "cpus": [{"cpu": 2, "tasks": 39, "conflicting": 11},
                                    {"cpu": 3, "tasks": 40, "conflicting": 12}]})
    usage = tracker.usage()
    assert usage["intruders"] == [{"cpu": 2, "tasks": 39, "conflicting": 11},
                                  {"cpu": 3, "tasks": 40, "conflicting": 12}]
    [c] = [c for c in usage["conflicts"] if c["kind"] == "host_tasks_on_dedicated"]
    assert c == {"kind": "host_tasks_on_dedicated", "guests": [], "cpus": [2, 3],
                 "count": 12, "tasks": worst,
                 "detail": "12 host tasks may run on dedicated threads 2-3: stress (pid 7, "
                           "tid 8) on 3, irqbalance (pid 9, tid 9) on 2-3 and 10 more"}
    assert "intruders" not in plain  # the earlier usage was not modified
    tracker.set_intruders({"tasks": 40, "conflicting": 0, "worst": [],
                           "cpus": [{"cpu": 2, "tasks": 39, "conflicting": 0},
                                    {"cpu": 3, "tasks": 40, "conflicting": 0}]})
    usage = tracker.usage()
    assert usage["intruders"][1] == {"cpu": 3, "tasks": 40, "conflicting": 0}
    assert not [c for c in usage["conflicts"] if c["kind"] == "host_tasks_on_dedicated"]
    tracker.set_intruders(None)
    assert "intruders" not in tracker.usage()


@pytest.mark.parametrize(("table", "key", "value", "why"), [
    ("libvirt", "thread_check_seconds", 0.05, "must be 0 (off) or between 0.1 and 86400"),
    ("libvirt", "thread_check_seconds", -1, "must be 0 (off) or between 0.1 and 86400"),
    ("libvirt", "thread_check_seconds", 1e9, "must be 0 (off) or between 0.1 and 86400"),
    ("libvirt", "thread_check_seconds", "10", "must be a number"),
    ("libvirt", "thread_check_seconds", True, "must be a number"),
    ("resources", "host_tasks_conflict", "some", "must be one of pinned, all, off"),
])
def test_bad_thread_check_options_name_the_key_and_value(table, key, value, why):
    with pytest.raises(ConfigError) as exc:
        config_from_dict({table: {key: value}}, "h.toml")
    assert str(exc.value) == f"h.toml: {table}.{key} = {value!r}: {why}" + (
        " seconds" if key == "thread_check_seconds" and "between" in why else "")


def test_thread_check_period_defaults_and_values():
    assert thread_check_period(LibvirtConfig()) == DEFAULT_THREAD_CHECK_SECONDS == 10
    assert thread_check_period(LibvirtConfig(uri="test:///default")) == 0
    assert thread_check_period(LibvirtConfig(uri="test:///default",
                                             thread_check_seconds=0.5)) == 0.5
    cfg = config_from_dict({"libvirt": {"thread_check_seconds": 0},
                            "resources": {"host_tasks_conflict": "all"}})
    assert thread_check_period(cfg.libvirt) == 0
    assert cfg.resources.host_tasks_conflict == "all"


def _snapshot(tmp_path: Path, check: str, *args: str) -> subprocess.CompletedProcess[str]:
    cfg = tmp_path / "h.toml"
    cfg.write_text(f'[libvirt]\nuri = "test:///default"\n{check}\n'
                   f'[resources]\ndedicated_cpus = "{DEDICATED}"\n')
    return subprocess.run([sys.executable, "-m", "hostagent.cli", "snapshot", "--config",
                           str(cfg), *args], capture_output=True, text=True, timeout=120)


def test_snapshot_one_shot_reports_intruders_when_the_check_is_on(tmp_path):
    with sleeper({DEDICATED}) as pinned:
        r = _snapshot(tmp_path, "thread_check_seconds = 5", "--json")
        assert r.returncode == 0, r.stderr
        usage = json.loads(r.stdout)["usage"]
        [entry] = usage["intruders"]
        assert entry["cpu"] == DEDICATED and entry["tasks"] >= entry["conflicting"] >= 1
        [c] = [c for c in usage["conflicts"] if c["kind"] == "host_tasks_on_dedicated"]
        assert {"pid": pinned.pid, "tid": pinned.pid, "comm": "sleep",
                "cpus": [DEDICATED]} in c["tasks"]
        assert "threads" not in usage["guests"][0]  # test:/// guests: no QEMU process
        text = _snapshot(tmp_path, "thread_check_seconds = 5")
        assert text.returncode == 0, text.stderr
        assert "host tasks allowed on dedicated threads:" in text.stdout
        assert f"sleep (pid {pinned.pid}, tid {pinned.pid}) on {DEDICATED}" in text.stdout
    off = _snapshot(tmp_path, "", "--json")  # test:/// and no period: off
    assert off.returncode == 0, off.stderr
    assert "intruders" not in json.loads(off.stdout)["usage"]
    bad = _snapshot(tmp_path, "thread_check_seconds = 0.01")
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr == (f"hostagent: {tmp_path / 'h.toml'}: libvirt.thread_check_seconds "
                          "= 0.01: must be 0 (off) or between 0.1 and 86400 seconds\n")


def _tasks_named(snap: dict[str, Any]) -> set[int]:
    return {t["tid"] for c in snap["usage"]["conflicts"]
            if c["kind"] == "host_tasks_on_dedicated" for t in c["tasks"]}


def test_daemon_sees_a_pinned_process_within_a_period_it_clears_reload_turns_it_off():
    """A real ``hostagent run`` (this machine's /sys, ``test:///``, a 0.2 s period): a
    process pinned to the dedicated thread is named within a period and no more once it
    exits; a reload with ``thread_check_seconds = 0`` removes ``usage.intruders``.
    (> 2 s: a real daemon and several check periods.)"""
    d = DaemonProc(start=False)
    try:
        d.sysfs = Path("/sys")
        text = config_text(d.dir, d.sysfs, "test:///default", dedicated=str(DEDICATED),
                           libvirt="thread_check_seconds = 0.2\n")
        d.config.write_text(text)
        d.start()
        d.wait_notify("READY=1", timeout=WAIT_SECONDS)
        with d.subscriber() as sub:
            wait_for(sub, lambda s: "intruders" in s["usage"], timeout=WAIT_SECONDS)
            with sleeper({DEDICATED}) as pinned:
                snap = wait_for(sub, lambda s: pinned.pid in _tasks_named(s),
                                timeout=WAIT_SECONDS)
                assert snap["usage"]["intruders"][0]["cpu"] == DEDICATED
            wait_for(sub, lambda s: pinned.pid not in _tasks_named(s), timeout=WAIT_SECONDS)
            d.config.write_text(text.replace("thread_check_seconds = 0.2",
                                             "thread_check_seconds = 0"))
            d.signal(signal.SIGHUP)
            wait_for(sub, lambda s: "intruders" not in s["usage"], timeout=WAIT_SECONDS)
        assert d.stop() == 0, d.log_text()
    finally:
        d.close()


def test_race_a_guest_reader_thread_exits_between_the_listing_and_its_reads(monkeypatch):
    """``read_threads`` (the guests' part) on a real process, this one: a real thread
    exits after ``task/`` was listed and before its ``comm`` and ``status`` are read."""
    from hostagent.guests import threads as threads_mod

    stop = threading.Event()
    t = threading.Thread(target=stop.wait, name="short-lived", daemon=True)
    t.start()
    tid = t.native_id
    listed = threads_mod.read_threads(os.getpid())
    assert listed is not None and tid in {x.tid for x in listed}  # read while alive
    real_comm = threads_mod._comm

    def exits_first(proc: Path, pid: int, t_id: int | None = None) -> str | None:
        if t_id == tid and t.is_alive():
            stop.set()
            t.join(WAIT_SECONDS)
            assert not t.is_alive()
        return real_comm(proc, pid, t_id)

    monkeypatch.setattr(threads_mod, "_comm", exits_first)
    after = threads_mod.read_threads(os.getpid())
    assert not t.is_alive()
    assert after is not None and tid not in {x.tid for x in after}
    assert os.getpid() in {x.tid for x in after}
