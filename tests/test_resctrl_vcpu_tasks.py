"""Per-vCPU cache groups on real thread ids: ``hostagent resctrl reserve --guest`` and
``hostagent.resctrl_tasks.attach_threads`` put a real TCG guest's vCPU (or emulator)
threads into a reservation's group on a resctrl COPY (fixture ``xeon-2s-cat``).

The guest is real (libvirtd + QEMU, see tests/test_real_libvirt.py: fails in CI, skipped
elsewhere when ``qemu:///system`` is unreachable); the thread ids written are its real
ones. A plain directory has no kernel behind ``tasks``, so where the kernel's behaviour
matters (a write MOVES a task out of the group that held it; a tid that does not exist
is refused with ``ESRCH`` and ``info/last_cmd_status`` ``No task <tid>``) the tests put
``kernel_tasks`` in place of ``resctrl_fs._write``, shaped like the kernel's
``rdtgroup_tasks_write``. One guest serves the module's read-only tests; the test that
stops a guest mid-apply starts its own.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from real_libvirt import require_libvirtd
from test_real_libvirt import URI, Guest, _host_cpus
from test_resctrl_fs import tree

from hostagent import resctrl_fs
from hostagent.cli import main
from hostagent.errors import RequestError
from hostagent.guests.threads import find_qemu_pid, read_threads
from hostagent.resctrl_fs import ResctrlApplyError, reserve
from hostagent.resctrl_tasks import ThreadTarget, attach_threads, select_threads, task_groups

# the machine's one real libvirtd: these tests run in the real-libvirt group, one after
# another and never beside a test that restarts libvirtd (tests/conftest.py)
pytestmark = pytest.mark.real_libvirtd

SPEC = "type=both,size=2304k,cache-id=1"
WAIT_SECONDS = 60.0


def _tasks(root: str, group: str = "") -> list[int]:
    path = Path(root, group, "tasks") if group else Path(root, "tasks")
    return [int(t) for t in path.read_text().split()]


def kernel_tasks(monkeypatch: pytest.MonkeyPatch, root: str, before_write: Any = None) -> None:
    """``resctrl_fs._write`` for ``tasks`` files shaped like the kernel: a tid that does
    not exist → ESRCH and ``No task <tid>``; otherwise the tid leaves every other group's
    ``tasks`` and joins this one. ``before_write(tid)`` runs first (to stop a guest)."""
    real = resctrl_fs._write
    status = Path(root, "info", "last_cmd_status")

    def write(path: str, text: str, *, append: bool = False) -> None:
        if os.path.basename(path) != "tasks":
            return real(path, text, append=append)
        tid = int(text)
        if before_write is not None:
            before_write(tid)
        if not Path(f"/proc/{tid}").exists():
            status.write_text(f"No task {tid}\n")
            raise OSError(errno.ESRCH, os.strerror(errno.ESRCH))
        for f in [Path(root, "tasks"), *Path(root).glob("*/tasks")]:
            ids = [t for t in f.read_text().split() if int(t) != tid]
            f.write_text("".join(f"{t}\n" for t in ids))
        with open(path, "a") as fh:
            fh.write(f"{tid}\n")
        status.write_text("ok\n")

    monkeypatch.setattr(resctrl_fs, "_write", write)


def _start(conn: Any) -> Guest:
    cpus = _host_cpus()
    return Guest(conn, {0: cpus[0], 1: cpus[-1]}, f"{cpus[0]}-{cpus[-1]}")


def _threads(g: Guest) -> tuple[int, list[Any]]:
    """The guest's QEMU pid and threads, once both vCPU threads are there (bounded)."""
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        pid = find_qemu_pid(g.dom.UUIDString())
        threads = read_threads(pid) if pid is not None else None
        if threads and len([t for t in threads if t.vcpu is not None]) == 2:
            return pid, threads
        assert time.monotonic() < deadline, "the guest's vCPU threads did not appear"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def libvirtd() -> None:
    require_libvirtd()


@pytest.fixture(scope="module")
def guest(libvirtd: None) -> Any:
    """One running TCG guest for the tests that only read its threads."""
    import libvirt

    conn = libvirt.open(URI)
    g = _start(conn)
    try:
        yield g
    finally:
        g.close()
        conn.close()


def _vcpu_tid(threads: list[Any], vcpu: int) -> int:
    return next(t.tid for t in threads if t.vcpu == vcpu)


def test_reserve_with_guest_moves_its_real_vcpu_and_emulator_threads_in(tmp_path, capsys,
                                                                       guest):
    resctrl, sysfs = tree(tmp_path, "xeon-2s-cat")
    pid, threads = _threads(guest)
    emulator = sorted(t.tid for t in threads if t.emulator)
    assert pid in emulator
    argv = ["resctrl", "reserve", "rt1", SPEC, "--guest", guest.name, "--vcpus", "1",
            "--emulator", "--resctrl-root", resctrl, "--sysfs-root", sysfs]
    assert main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"group hostagent-rt1: created ({resctrl}/hostagent-rt1)"
    tid1 = _vcpu_tid(threads, 1)
    assert f"thread: vCPU 1 of {guest.name} (tid {tid1}) moved in" in out
    assert sum(line.startswith("thread: emulator thread") for line in out) == len(emulator)
    # schemata before tasks: the group holds its masks, and the tids one per line
    assert Path(resctrl, "hostagent-rt1", "schemata").read_text() == "L3:0=7c0;1=004\n"
    assert sorted(_tasks(resctrl, "hostagent-rt1")) == sorted([tid1, *emulator])
    assert task_groups(resctrl)[tid1] == "hostagent-rt1"
    # the same again: nothing is written, every thread is already in
    assert main([*argv, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["action"] == "unchanged" and doc["threads"]["moved"] == []
    assert {t["tid"] for t in doc["threads"]["already"]} == {tid1, *emulator}
    assert sorted(_tasks(resctrl, "hostagent-rt1")) == sorted([tid1, *emulator])


def test_bad_guest_requests_change_nothing(tmp_path, capsys, guest):
    resctrl, sysfs = tree(tmp_path, "xeon-2s-cat")
    roots = ["--resctrl-root", resctrl, "--sysfs-root", sysfs]
    cases = [
        (["--guest", guest.name, "--vcpus", "5"],
         f"hostagent: guest {guest.name} has no thread for vCPU 5 (its vCPU threads: 0, 1)"),
        (["--guest", "hatest-no-such-guest", "--vcpus", "0"],
         f"hostagent: --guest hatest-no-such-guest: no such guest on {URI}"),
        (["--guest", guest.name],
         f"hostagent: --guest {guest.name}: give --vcpus LIST and/or --emulator"),
        (["--vcpus", "0"], "hostagent: --vcpus and --emulator go with --guest NAME"),
        (["--guest", guest.name, "--vcpus", "1-0"],
         "hostagent: --vcpus: not a CPU list: '1-0' (range 1-0 runs backwards)"),
    ]
    for extra, message in cases:
        code = main(["resctrl", "reserve", "rt1", SPEC, *extra, *roots])
        out, err = capsys.readouterr()
        assert (code, out, err) == (2, "", message + "\n"), extra
        assert not Path(resctrl, "hostagent-rt1").exists()


def test_attach_refuses_a_missing_group_or_one_without_schemata(tmp_path, guest):
    resctrl, _ = tree(tmp_path, "xeon-2s-cat")
    pid, threads = _threads(guest)
    targets = select_threads(guest.name, threads, [0])
    with pytest.raises(RequestError, match=r"hostagent-rt1: no such group; reserve it "
                       r"first \('hostagent resctrl reserve rt1 SPEC'\); no thread was moved"):
        attach_threads(resctrl, "rt1", targets, pid=pid)
    Path(resctrl, "hostagent-rt1").mkdir()  # a reserve killed right after its mkdir
    with pytest.raises(RequestError, match=r"hostagent-rt1/schemata: the group has no "
                       r"schemata yet \(read nothing \(it cannot be read\)\); its masks are "
                       r"written before any thread goes in"):
        attach_threads(resctrl, "rt1", targets, pid=pid)
    assert not Path(resctrl, "hostagent-rt1", "tasks").exists()


def test_a_thread_that_exited_before_its_write_rolls_back_to_the_previous_groups(
        tmp_path, monkeypatch, guest):
    resctrl, sysfs = tree(tmp_path, "xeon-2s-cat")
    kernel_tasks(monkeypatch, resctrl)
    reserve(resctrl, sysfs, "rt1", SPEC)
    pid, threads = _threads(guest)
    tid0, tid1 = _vcpu_tid(threads, 0), _vcpu_tid(threads, 1)
    resctrl_fs._write(os.path.join(resctrl, "batch", "tasks"), f"{tid1}\n", append=True)
    gone = subprocess.Popen(["true"])
    gone.wait()  # a thread id that has exited
    targets = [ThreadTarget(f"vCPU 0 of {guest.name}", tid0),
               ThreadTarget(f"vCPU 1 of {guest.name}", tid1),
               ThreadTarget("vCPU 2 of ghost", gone.pid)]
    with pytest.raises(ResctrlApplyError) as err:
        attach_threads(resctrl, "rt1", targets)
    tasks = f"{resctrl}/hostagent-rt1/tasks"
    assert str(err.value) == (
        f"writing {tasks} failed: No such process (vCPU 2 of ghost, tid {gone.pid}: the "
        "thread exited before the write; the guest stopped or the vCPU was unplugged); "
        f"rolled back: vCPU 1 of {guest.name} (tid {tid1}) moved back to group batch; "
        f"vCPU 0 of {guest.name} (tid {tid0}) moved back to the default group")
    assert err.value.path == tasks
    assert _tasks(resctrl, "hostagent-rt1") == []
    groups = task_groups(resctrl)
    assert (groups[tid0], groups[tid1]) == ("", "batch")


def test_guest_stopping_mid_apply_is_refused_by_the_kernel_and_rolled_back(
        tmp_path, monkeypatch, libvirtd):
    """Starts its own guest (~2-7 s to boot a TCG guest here) and destroys it between the
    check of vCPU 1's thread and its write: the kernel's ESRCH path."""
    import libvirt

    resctrl, sysfs = tree(tmp_path, "xeon-2s-cat")
    conn = libvirt.open(URI)
    g = _start(conn)
    try:
        pid, threads = _threads(g)
        tid0, tid1 = _vcpu_tid(threads, 0), _vcpu_tid(threads, 1)

        def stop_guest_at_vcpu1(tid: int) -> None:
            if tid != tid1:
                return
            g.destroy()
            deadline = time.monotonic() + WAIT_SECONDS
            while Path(f"/proc/{tid1}").exists():
                assert time.monotonic() < deadline, "the guest's threads did not exit"
                time.sleep(0.05)

        kernel_tasks(monkeypatch, resctrl, stop_guest_at_vcpu1)
        argv = ["resctrl", "reserve", "rt1", SPEC, "--guest", g.name, "--vcpus", "0-1",
                "--resctrl-root", resctrl, "--sysfs-root", sysfs]
        with pytest.raises(ResctrlApplyError) as err:
            from hostagent.cli_parser import build_parser
            from hostagent.commands.resctrl import run_reserve

            run_reserve(build_parser("resctrl").parse_args(argv))
    finally:
        g.close()
        conn.close()
    assert str(err.value) == (
        f"writing {resctrl}/hostagent-rt1/tasks failed: No such process (vCPU 1 of {g.name}, "
        f"tid {tid1}: the thread exited before the write; the guest stopped or the vCPU was "
        f"unplugged); info/last_cmd_status says: No task {tid1}; rolled back: vCPU 0 of "
        f"{g.name} (tid {tid0}) exited too; group hostagent-rt1 removed again (this command "
        "created it)")
    assert not Path(resctrl, "hostagent-rt1").exists()
