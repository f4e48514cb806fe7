"""Putting a running guest's vCPU threads (or its emulator threads) into a resctrl group.

A cache reservation is per vCPU: the group's ``tasks`` file must hold that vCPU's
thread id (QEMU runs each vCPU on its own thread; ``hostagent.guests.threads`` finds
them). The group must exist with its schemata first (``hostagent.resctrl_fs.reserve``):
schemata before tasks, so a thread never runs one moment in a group without its masks.

``attach_threads(root, group, targets)``, under the resctrl lock (``LOCK_EX``, as every
change): the group must be complete (its ``schemata`` has a line), each thread's current
control group is read (the ``tasks`` files of the root and of every group), then each tid
is written to ``<group>/tasks``, **one tid per write** (the kernel reads one id per
write on older kernels; a later id in the same write would be lost with an error about
the first). A tid already in the group is not written again.

A tid that exited before its write: the kernel answers ``ESRCH`` and
``info/last_cmd_status`` says ``No task <tid>``; we check ``/proc/<pid>/task/<tid>`` just
before each write too (a plain directory has no kernel to refuse). Then everything this
call moved is moved back, each tid to the group it was in before (one write to that
group's ``tasks``; a tid that exited meanwhile is gone from every group, nothing to do),
and the message says what the group's ``tasks`` reads afterwards (read back, never
assumed). Nothing is half-written: either every target is in the group, or none this
call moved is.

On a real kernel a thread that exits leaves its group by itself: nothing is written when a
guest stops. Monitoring groups (``mon_groups``) are not tracked: a tid moved back returns
to the control group only.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hostagent import resctrl_fs
from hostagent.errors import RequestError
from hostagent.guests.threads import PROC_ROOT, GuestThread

__all__ = ["AttachResult", "ThreadTarget", "attach_threads", "select_threads",
           "task_groups", "guest_threads"]

#: directories of the resctrl root that are not control groups
NOT_GROUPS = ("info", "mon_groups", "mon_data")
MAX_TASK_FILE_BYTES = 1 << 22  # bytes of one ``tasks`` file read (4 MiB: ~500k ids)


@dataclass(frozen=True)
class ThreadTarget:
    """One thread to move: ``label`` says what it is (``vCPU 0 of web``, ``emulator``)."""

    label: str
    tid: int


@dataclass(frozen=True)
class AttachResult:
    group: str
    path: str
    moved: tuple[ThreadTarget, ...]  # written to the group's tasks by this call
    already: tuple[ThreadTarget, ...]  # in the group before: not written again

    def to_dict(self) -> dict[str, Any]:
        return {"group": self.group,
                "moved": [{"thread": t.label, "tid": t.tid} for t in self.moved],
                "already": [{"thread": t.label, "tid": t.tid} for t in self.already]}


def select_threads(guest: str, threads: Sequence[GuestThread], vcpus: Sequence[int] = (),
                   emulator: bool = False) -> list[ThreadTarget]:
    """The threads of ``guest`` to move: each vCPU of ``vcpus`` (its one ``CPU N/...``
    thread) and, with ``emulator``, every emulator thread. ``RequestError`` names a vCPU
    the guest has no thread for."""
    by_vcpu = {t.vcpu: t for t in threads if t.vcpu is not None}
    out: list[ThreadTarget] = []
    for v in sorted(set(vcpus)):
        t = by_vcpu.get(v)
        if t is None:
            have = ", ".join(map(str, sorted(by_vcpu))) or "none"
            raise RequestError(f"guest {guest} has no thread for vCPU {v} "
                               f"(its vCPU threads: {have})")
        out.append(ThreadTarget(f"vCPU {v} of {guest}", t.tid))
    if emulator:
        emu = [t for t in threads if t.emulator]
        if not emu:
            raise RequestError(f"guest {guest} has no emulator thread")
        out += [ThreadTarget(f"emulator thread {t.name!r} of {guest}", t.tid) for t in emu]
    if not out:
        raise RequestError(f"guest {guest}: give the vCPUs (--vcpus) or --emulator")
    return out


def _tids(path: str) -> set[int]:
    try:
        with open(path, "rb") as fh:
            text = fh.read(MAX_TASK_FILE_BYTES).decode(errors="replace")
    except OSError:
        return set()
    return {int(t) for t in text.split() if t.isdigit()}


def task_groups(resctrl_root: str | os.PathLike[str]) -> dict[int, str]:
    """tid → the control group listing it (``""`` = the default group), read from the
    ``tasks`` file of the root and of each group directory."""
    root = os.fspath(resctrl_root)
    out = {tid: "" for tid in _tids(os.path.join(root, "tasks"))}
    try:
        names = sorted(os.listdir(root))
    except OSError:
        return out
    for name in names:
        path = os.path.join(root, name)
        if name in NOT_GROUPS or not os.path.isdir(path) or os.path.islink(path):
            continue
        for tid in _tids(os.path.join(path, "tasks")):
            out[tid] = name
    return out


def _alive(tid: int, pid: int | None, proc: Path) -> bool:
    base = proc / str(pid) / "task" / str(tid) if pid is not None else proc / str(tid)
    return base.exists()


def _group_name(group: str) -> str:
    return "the default group" if group == "" else f"group {group}"


def attach_threads(
    resctrl_root: str | os.PathLike[str],
    group: str,
    targets: Sequence[ThreadTarget],
    *,
    pid: int | None = None,
    proc: Path = PROC_ROOT,
    lock_timeout: float = resctrl_fs.LOCK_TIMEOUT_S,
    on_wait: Callable[[str], None] | None = None,
) -> AttachResult:
    """Move each of ``targets`` into group ``hostagent-<group>`` (see the module
    docstring). ``pid``: the QEMU process whose threads they are (checked under
    ``/proc/<pid>/task``). ``RequestError`` for a missing or incomplete group;
    ``ResctrlApplyError`` when a write fails (everything moved is moved back first)."""
    name = resctrl_fs.group_dir_name(group)
    root = os.fspath(resctrl_root)
    path = os.path.join(root, name)
    tasks = os.path.join(path, "tasks")
    with resctrl_fs.locked(root, exclusive=True, timeout=lock_timeout, on_wait=on_wait):
        if not os.path.isdir(path) or os.path.islink(path):
            raise RequestError(f"{path}: no such group; reserve it first "
                               f"('hostagent resctrl reserve {group} SPEC'); no thread "
                               "was moved")
        schemata = resctrl_fs._read_text(os.path.join(path, "schemata"))
        if not schemata or ":" not in schemata:
            raise RequestError(f"{path}/schemata: the group has no schemata yet "
                               f"(read {resctrl_fs._quote(schemata)}); its masks are "
                               "written before any thread goes in: reserve it again; no "
                               "thread was moved")
        before = task_groups(root)
        moved: list[ThreadTarget] = []
        already: list[ThreadTarget] = []
        for t in targets:
            if before.get(t.tid) == name:
                already.append(t)
                continue
            try:
                if not _alive(t.tid, pid, proc):
                    raise OSError(errno.ESRCH, os.strerror(errno.ESRCH))
                resctrl_fs._write(tasks, f"{t.tid}\n", append=True)
            except OSError as exc:
                status = resctrl_fs.last_cmd_status(root)
                why = (f" ({t.label}, tid {t.tid}: the thread exited before the write; "
                       "the guest stopped or the vCPU was unplugged)"
                       if exc.errno == errno.ESRCH else f" ({t.label}, tid {t.tid})")
                outcome = _move_back(root, name, moved, before, pid, proc)
                msg = f"writing {tasks} failed: {exc.strerror or exc}{why}"
                if status and status != "ok":
                    msg += f"; info/last_cmd_status says: {status}"
                raise resctrl_fs.ResctrlApplyError(f"{msg}; {outcome}", path=tasks,
                                                   status=status) from None
            moved.append(t)
    return AttachResult(name, path, tuple(moved), tuple(already))


def _move_back(root: str, name: str, moved: Sequence[ThreadTarget], before: dict[int, str],
               pid: int | None, proc: Path) -> str:
    """Undo: each tid of ``moved`` back to the group it was in (``before``); what the
    group's ``tasks`` reads afterwards is read back and said."""
    if not moved:
        return "no thread had been moved"
    said: list[str] = []
    for t in reversed(moved):
        prev = before.get(t.tid, "")
        prev_tasks = os.path.join(root, prev, "tasks") if prev else os.path.join(root, "tasks")
        try:
            if not _alive(t.tid, pid, proc):
                said.append(f"{t.label} (tid {t.tid}) exited too")
                continue
            resctrl_fs._write(prev_tasks, f"{t.tid}\n", append=True)
            said.append(f"{t.label} (tid {t.tid}) moved back to {_group_name(prev)}")
        except OSError as exc:
            if exc.errno == errno.ESRCH:
                said.append(f"{t.label} (tid {t.tid}) exited too")
            else:
                said.append(f"moving {t.label} (tid {t.tid}) back to {_group_name(prev)} "
                            f"failed ({exc.strerror or exc})")
    # the kernel lists live tasks only: an exited tid still in a plain file is not "left"
    left = sorted(t for t in _tids(os.path.join(root, name, "tasks")) & {m.tid for m in moved}
                  if _alive(t, pid, proc))
    out = "rolled back: " + "; ".join(said)
    if left:
        out += (f"; {os.path.join(root, name, 'tasks')} still lists tid "
                f"{', '.join(map(str, left))}")
    return out


def guest_threads(uri: str, guest: str) -> tuple[str, int, list[GuestThread]]:
    """(name, QEMU pid, threads) of the running guest ``guest`` (name or uuid) on
    libvirt ``uri``; ``RequestError`` when it is unknown, not running, or its QEMU
    process is not found."""
    import libvirt

    from hostagent.guests.threads import find_qemu_pid, read_threads

    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    try:
        conn = libvirt.openReadOnly(uri)
    except libvirt.libvirtError as exc:
        raise RequestError(f"--guest {guest}: cannot connect to {uri}: "
                           f"{exc.get_error_message()}") from None
    try:
        try:
            dom = conn.lookupByName(guest)
        except libvirt.libvirtError:
            try:
                dom = conn.lookupByUUIDString(guest)
            except libvirt.libvirtError:
                raise RequestError(f"--guest {guest}: no such guest on {uri}") from None
        name, uuid = dom.name(), dom.UUIDString()
        if not dom.isActive():
            raise RequestError(f"--guest {name}: the guest is not running; its threads "
                               "exist only while it runs")
    finally:
        conn.close()
    pid = find_qemu_pid(uuid)
    threads = None if pid is None else read_threads(pid)
    if pid is None or threads is None:
        raise RequestError(f"--guest {name}: no QEMU process with -uuid {uuid} (the guest "
                           "stopped, or it is not a QEMU guest)")
    return name, pid, threads
