"""Applying reservations to a resctrl mount: lock, mkdir, write, attach, release, carve.

Every change runs under ``flock(LOCK_EX)`` on the resctrl root directory for the whole
read–plan–mkdir–write sequence, the protocol the kernel documentation recommends to
tools sharing ``/sys/fs/resctrl`` (libvirt does the same): two processes can never
plan from the same free ways. Reads that change nothing (``--dry-run``, ``free``) take
``LOCK_SH``. The lock is released when the directory fd is closed.

Groups we create are namespaced: the directory is ``hostagent-<name>`` (``PREFIX``);
``release`` only ever removes a directory of that namespace. A name given with the
prefix already is taken as is. Names: 1 to 64 characters from ``A-Z a-z 0-9 _ . : + -``,
no leading dot, no ``..``, no ``/``.

``reserve``: probe → plan (``hostagent.resctrl.plan_reservation``) → if the group
exists and already holds exactly the plan (and the CPUs/tasks asked for), nothing is
written → else ``mkdir`` (new group) → one write of the whole schemata → ``cpus_list``
→ ``tasks`` (one PID per write). Any failure after ``mkdir`` removes the group again
and reports the kernel's ``info/last_cmd_status``; a group that existed before keeps
(or gets back) its previous schemata instead. On the kernel a schemata write is applied
all or nothing, so nothing is left half-written.

Plain directories (fixture trees, captured copies) work too, with two differences noted
where they matter: the kernel's validation of what is written does not run (the planner
only produces masks the kernel accepts: ``hostagent.resctrl.validate_mask``), and
``rmdir`` of a group fails with ENOTEMPTY because the files are real, so we then remove
the files first. The kernel never answers ENOTEMPTY for a group directory.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hostagent.cpulist import format_cpulist, parse_cpulist
from hostagent.errors import HostagentError, RequestError
from hostagent.model import HostTopology
from hostagent.resctrl import (
    CarvePlan,
    GroupPlan,
    parse_reservation,
    plan_carve,
    plan_reservation,
)

__all__ = [
    "PREFIX",
    "ReserveResult",
    "ResctrlApplyError",
    "carve",
    "group_dir_name",
    "last_cmd_status",
    "locked",
    "read_topology",
    "release",
    "reserve",
]

PREFIX = "hostagent-"
NAME_MAX = 64
QUOTE_MAX = 300  # characters of a file's text quoted in an error message
_NAME_RE = re.compile(r"[A-Za-z0-9_.:+-]+")

# Test hooks (set in a child process only): called with the plan between planning and
# mkdir, to widen the race window; and a switch that turns the lock off to prove the
# race is real. Not part of the API.
_after_plan_hook: Callable[[GroupPlan], None] | None = None
_LOCKING = True


class ResctrlApplyError(HostagentError):
    """Writing to resctrl failed. ``status`` is ``info/last_cmd_status`` (or None)."""

    def __init__(self, message: str, *, path: str, status: str | None) -> None:
        self.path = path
        self.status = status
        super().__init__(message)


def group_dir_name(name: str) -> str:
    """``rt1`` → ``hostagent-rt1`` (``hostagent-rt1`` stays); ``RequestError`` if bad."""
    raw = name
    if name.startswith(PREFIX):
        name = name[len(PREFIX):]
    where = f"group name {raw!r}"
    if not name:
        raise RequestError(f"{where}: empty (give e.g. 'rt1'; the group becomes {PREFIX}rt1)")
    if "/" in name:
        raise RequestError(f"{where}: must not contain '/'")
    if ".." in name:
        raise RequestError(f"{where}: must not contain '..'")
    if name.startswith("."):
        raise RequestError(f"{where}: must not start with '.'")
    if len(name) > NAME_MAX:
        raise RequestError(f"{where}: longer than {NAME_MAX} characters")
    if not _NAME_RE.fullmatch(name):
        bad = next(ch for ch in name if not _NAME_RE.fullmatch(ch))
        raise RequestError(
            f"{where}: character {bad!r} is not allowed (use A-Z a-z 0-9 _ . : + -)"
        )
    return PREFIX + name


def last_cmd_status(resctrl_root: str | os.PathLike[str]) -> str | None:
    """The kernel's ``info/last_cmd_status`` (what it said about the last command)."""
    try:
        return Path(resctrl_root, "info", "last_cmd_status").read_text().strip() or None
    except OSError:
        return None


@contextmanager
def locked(resctrl_root: str | os.PathLike[str], exclusive: bool = True) -> Iterator[int]:
    """``flock`` on the resctrl root directory for the duration of the block."""
    root = os.fspath(resctrl_root)
    try:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise HostagentError(
            f"{root}: no such directory (is resctrl mounted? "
            "mount -t resctrl resctrl /sys/fs/resctrl)"
        ) from None
    except OSError as exc:
        raise HostagentError(f"{root}: cannot open to lock ({exc.strerror})") from None
    try:
        if _LOCKING:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            except OSError as exc:
                raise HostagentError(f"{root}: cannot lock ({exc.strerror})") from None
        yield fd
    finally:
        os.close(fd)  # closing the only fd of this open file description drops the lock


def read_topology(
    resctrl_root: str | os.PathLike[str], sysfs_root: str | os.PathLike[str]
) -> HostTopology:
    """``probe_host`` with resctrl required (``RequestError`` when not mounted)."""
    from hostagent.probe.host import probe_host

    topo = probe_host(sysfs_root, resctrl_root)
    if topo.resctrl is None:
        raise RequestError(
            f"{os.fspath(resctrl_root)}: resctrl is not mounted here (no info/ directory); "
            "mount -t resctrl resctrl /sys/fs/resctrl"
        )
    return topo


@dataclass(frozen=True)
class ReserveResult:
    """What ``reserve`` did. ``action``: created, updated, unchanged or dry-run."""

    action: str
    group: str
    path: str
    plan: GroupPlan
    cpus: tuple[int, ...] | None
    tasks: tuple[int, ...] | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "group": self.group,
            "path": self.path,
            "cpus": None if self.cpus is None else list(self.cpus),
            "tasks": None if self.tasks is None else list(self.tasks),
            "plan": self.plan.to_dict(),
        }


def _cpus_arg(cpus: str | Sequence[int] | None) -> tuple[int, ...] | None:
    if cpus is None:
        return None
    if isinstance(cpus, str):
        try:
            return parse_cpulist(cpus)
        except ValueError as exc:
            raise RequestError(f"--cpus: {exc}") from None
    return tuple(sorted(set(int(c) for c in cpus)))


def _tasks_arg(tasks: str | Sequence[int] | None) -> tuple[int, ...] | None:
    if tasks is None:
        return None
    if isinstance(tasks, str):
        parts = [p.strip() for p in tasks.replace(" ", ",").split(",") if p.strip()]
        if not parts or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise RequestError(f"--tasks {tasks!r}: give process ids such as 1234,1240")
        pids = [int(p) for p in parts]
    else:
        pids = [int(p) for p in tasks]
    for pid in pids:
        if pid <= 0 or not os.path.exists(f"/proc/{pid}"):
            raise RequestError(f"--tasks: there is no process with id {pid}")
    return tuple(dict.fromkeys(pids))


def _write(path: str, text: str, *, append: bool = False) -> None:
    """One ``write()`` of ``text`` (kernfs handles each write as one command)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_APPEND if append else os.O_TRUNC)
    fd = os.open(path, flags, 0o644)
    try:
        data = text.encode()
        if os.write(fd, data) != len(data):
            raise OSError(errno.EIO, "short write")
    finally:
        os.close(fd)


def _rmdir_group(path: str) -> None:
    try:
        os.rmdir(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        if exc.errno != errno.ENOTEMPTY:
            raise
        shutil.rmtree(path)  # plain directory tree only (see the module docstring)


def _read_tasks(path: str) -> set[int]:
    try:
        text = Path(path, "tasks").read_text()
    except OSError:
        return set()
    return {int(t) for t in text.split() if t.isdigit()}


def _same(plan: GroupPlan, topo: HostTopology) -> bool:
    assert topo.resctrl is not None
    grp = topo.resctrl.group(plan.group)
    if grp is None:
        return False
    for res, ids in plan.schemata.items():
        if dict(grp.schemata.get(res, {})) != dict(ids):
            return False
    return all(grp.mb.get(d) == v for d, v in plan.mb.items())


def _fail(
    root: str, what: str, path: str, exc: OSError, outcome: str, status: str | None = None
) -> ResctrlApplyError:
    """The error for a failed write: the OS error, the kernel's word, what became of it.

    Read ``status`` before any clean-up: every command (``rmdir`` too) resets it."""
    if status is None:
        status = last_cmd_status(root)
    msg = f"{what} {path} failed: {exc.strerror or exc}"
    if status and status != "ok":
        msg += f"; info/last_cmd_status says: {status}"
    return ResctrlApplyError(f"{msg}; {outcome}", path=path, status=status)


def reserve(
    resctrl_root: str | os.PathLike[str],
    sysfs_root: str | os.PathLike[str],
    group: str,
    spec_text: str,
    cpus: str | Sequence[int] | None = None,
    tasks: str | Sequence[int] | None = None,
    dry_run: bool = False,
) -> ReserveResult:
    """Reserve ``spec_text`` for group ``hostagent-<group>`` and attach ``cpus``/``tasks``.

    Raises ``RequestError`` for a bad name, spec, CPU list or PID and for a request that
    does not fit; ``ResctrlApplyError`` when a write fails (the group is gone again).
    """
    name = group_dir_name(group)
    spec = parse_reservation(spec_text)
    cpu_ids = _cpus_arg(cpus)
    pids = _tasks_arg(tasks)
    root = os.fspath(resctrl_root)
    path = os.path.join(root, name)
    with locked(root, exclusive=not dry_run):
        topo = read_topology(root, sysfs_root)
        plan = plan_reservation(topo, spec, group=name, cpus=cpu_ids or ())
        result = ReserveResult("dry-run", name, path, plan, cpu_ids, pids)
        if dry_run:
            return result
        if _after_plan_hook is not None:
            _after_plan_hook(plan)
        assert topo.resctrl is not None
        existing = topo.resctrl.group(name)
        if existing is not None:
            cpus_ok = cpu_ids is None or tuple(existing.cpus) == cpu_ids
            tasks_ok = pids is None or set(pids) <= _read_tasks(path)
            if _same(plan, topo) and cpus_ok and tasks_ok:
                return ReserveResult("unchanged", name, path, plan, cpu_ids, pids)
        created = False
        previous: str | None = None
        if existing is None:
            try:
                os.mkdir(path)
            except OSError as exc:
                raise _fail(root, "creating", path, exc, "nothing was created") from None
            created = True
        else:
            previous = _read_text(os.path.join(path, "schemata"))
        target = os.path.join(path, "schemata")
        cpus_written = False
        moved: list[int] = []
        try:
            _write(target, plan.text)
            if cpu_ids is not None:
                target = os.path.join(path, "cpus_list")
                _write(target, format_cpulist(cpu_ids) + "\n")
                cpus_written = True
            if pids is not None:
                target = os.path.join(path, "tasks")
                for pid in pids:
                    _write(target, f"{pid}\n", append=True)
                    moved.append(pid)
        except OSError as exc:
            status = last_cmd_status(root)
            if created:
                try:
                    _rmdir_group(path)
                    outcome = f"group {name} removed"
                except OSError as rm_exc:
                    outcome = f"could not remove group {name}: {rm_exc.strerror}"
            else:
                outcome = _put_back(
                    os.path.join(path, "schemata"), previous, f"group {name}",
                    "reserve it again or release it",
                )
                if cpus_written:
                    outcome += f"; its CPUs were already set to {format_cpulist(cpu_ids or ())}"
                if moved:
                    outcome += "; tasks already moved into it stay there: " + ",".join(
                        map(str, moved))
            raise _fail(root, "writing", target, exc, outcome, status) from None
        action = "created" if created else "updated"
        return ReserveResult(action, name, path, plan, cpu_ids, pids)


def _normal_schemata(text: str) -> str:
    """A schemata file as read, in a form that can be written back and compared: one
    line per resource, names and values without the kernel's padding (``MB:0= 30``)."""
    out = []
    for line in text.splitlines():
        name, sep, rest = line.partition(":")
        if not line.strip():
            continue
        if not sep:
            out.append(line.strip())
            continue
        items = []
        for item in rest.split(";"):
            key, eq, value = item.partition("=")
            if item.strip():
                items.append(f"{key.strip()}={value.strip()}" if eq else item.strip())
        out.append(f"{name.strip()}:" + ";".join(items))
    return "".join(line + "\n" for line in out)


def _read_text(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError):
        return None


def _quote(text: str | None) -> str:
    """A file's text for a one-line message (``repr``, at most ``QUOTE_MAX`` characters)."""
    if text is None:
        return "nothing (it cannot be read)"
    if len(text) > QUOTE_MAX:
        return repr(text[:QUOTE_MAX]) + "..."
    return repr(text)


def _put_back(path: str, previous: str | None, who: str, advice: str) -> str:
    """After a failed write to the schemata file ``path``: make it hold ``previous``
    again if it does not, and say what is true afterwards.

    What is said is read back from the file, never assumed: the kernel's file ignores
    the truncating open and refuses a bad write whole, but a plain file (a fixture
    copy) is emptied by the open, and a write back can fail too.
    """
    now = _read_text(path)
    if previous is None:
        return (f"{who}: its previous schemata could not be read, so it was not written "
                f"back; {path} now reads {_quote(now)}; {advice}")
    want = _normal_schemata(previous)
    if now is not None and _normal_schemata(now) == want:
        return f"{who} keeps its previous schemata"
    error = None
    try:
        _write(path, want)
    except OSError as exc:
        error = exc.strerror or str(exc)
    now = _read_text(path)
    if now is not None and _normal_schemata(now) == want:
        return f"{who} keeps its previous schemata (written back)"
    what = (f"writing its previous schemata back failed too ({error})" if error
            else "its previous schemata was written back but reads differently")
    return (f"{who}: {what}; {path} now reads {_quote(now)} (before: {_quote(previous)}); "
            f"{advice}")


def release(resctrl_root: str | os.PathLike[str], group: str) -> bool:
    """Remove group ``hostagent-<group>``; False when it was not there. The kernel moves
    its tasks and CPUs back to the default group."""
    name = group_dir_name(group)
    root = os.fspath(resctrl_root)
    path = os.path.join(root, name)
    with locked(root):
        if not os.path.isdir(path):
            return False
        try:
            _rmdir_group(path)
        except OSError as exc:
            raise _fail(root, "removing", path, exc, "the group is still there") from None
    return True


def carve(
    resctrl_root: str | os.PathLike[str],
    sysfs_root: str | os.PathLike[str],
    ways: int,
    cache_id: int | None = None,
    *,
    level: int = 3,
    dry_run: bool = False,
) -> CarvePlan:
    """Shrink the default group (``hostagent.resctrl.plan_carve``) and write its schemata.

    The root ``schemata`` is rewritten whole: the lines we change, and every other line
    (MB, SMBA, other levels) as the kernel printed it, so nothing else changes on the
    kernel or in a plain-directory tree.
    """
    root = os.fspath(resctrl_root)
    with locked(root, exclusive=not dry_run):
        topo = read_topology(root, sysfs_root)
        plan = plan_carve(topo, ways, cache_id=cache_id, level=level)
        if dry_run or not plan.changed:
            return plan
        target = os.path.join(root, "schemata")
        try:
            current = Path(target).read_text()
        except OSError as exc:
            raise _fail(root, "reading", target, exc, "nothing was changed") from None
        new_lines = {
            res: f"{res}:" + ";".join(f"{cid}={m}" for cid, m in sorted(ids.items()))
            for res, ids in plan.schemata.items()
        }
        out = []
        for line in current.splitlines():
            line = line.strip()
            if not line:
                continue
            res = line.partition(":")[0].strip()
            out.append(new_lines.pop(res, line))
        out.extend(new_lines.values())
        try:
            _write(target, "".join(line + "\n" for line in out))
        except OSError as exc:
            status = last_cmd_status(root)
            outcome = _put_back(target, current, "the default group", "write it back by hand")
            raise _fail(root, "writing", target, exc, outcome, status) from None
    return plan
