"""Applying reservations to a resctrl mount: lock, mkdir, write, attach, release, carve.

Every change runs under ``flock(LOCK_EX)`` on the resctrl root directory for the whole
read–plan–mkdir–write sequence, the protocol the kernel documentation recommends to
tools sharing ``/sys/fs/resctrl`` (libvirt does the same): two processes can never
plan from the same free ways. Reads that change nothing (``--dry-run``, ``free``) take
``LOCK_SH``. The lock is released when the directory fd is closed. The wait for it is
bounded (``LOCK_TIMEOUT_S``, ``--lock-timeout``): the holder, found in ``/proc/locks``,
is named once the wait lasts ``LOCK_NOTICE_AFTER_S``, and again in the error at the end.

Groups we create are namespaced: the directory is ``hostagent-<name>`` (``PREFIX``);
``release`` only ever removes a directory of that namespace. A name given with the
prefix already is taken as is. Names: 1 to 64 characters from ``A-Z a-z 0-9 _ . : + -``,
no leading dot, no ``..``, no ``/``.

``reserve``: lock → probe → remove an incomplete leftover of the name → plan
(``hostagent.resctrl.plan_reservation``) → if the group exists and already holds
exactly the plan (and the CPUs/tasks asked for), nothing is written → else ``mkdir``
(new group) → one write of the whole schemata → ``cpus_list`` → ``tasks`` (one PID per
write). Any failure after ``mkdir`` removes the group again and reports the kernel's
``info/last_cmd_status``; a group that existed before gets its previous schemata back
instead, and the message says what the file reads afterwards (``_put_back``).

A ``reserve`` killed part way leaves a directory of our namespace that
``find_leftovers`` reports (``free`` prints it): ``incomplete`` (no schemata file or
no line for a resource: a plain directory right after ``mkdir``, or a truncated file)
or ``unused`` (no CPUs and no tasks: on the kernel right after ``mkdir``, when the
group holds the kernel's initial masks, or after the schemata write). ``release``
removes either; the next ``reserve`` of that name removes an incomplete one that has
no CPUs and no tasks, and updates any other in place.

Plain directories (fixture trees, captured copies) work too, with three differences
noted where they matter: the kernel's validation of what is written does not run (the
planner only produces masks the kernel accepts: ``hostagent.resctrl.validate_mask``);
``mkdir`` makes an empty directory, not a group with its files; and ``rmdir`` of a
group fails with ENOTEMPTY because the files are real, so we then remove the files
first. The kernel never answers ENOTEMPTY for a group directory.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
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
from hostagent.resctrl_cbm import parse_mask

__all__ = [
    "LOCK_TIMEOUT_MAX_S",
    "LOCK_TIMEOUT_S",
    "Leftover",
    "PREFIX",
    "ReserveResult",
    "ResctrlApplyError",
    "carve",
    "find_leftovers",
    "group_dir_name",
    "last_cmd_status",
    "lock_holders",
    "lock_timeout_arg",
    "locked",
    "read_topology",
    "release",
    "reserve",
]

PREFIX = "hostagent-"
NAME_MAX = 64
QUOTE_MAX = 300  # characters of a file's text quoted in an error message
LOCK_TIMEOUT_S = 10.0  # how long a command waits for the resctrl lock (--lock-timeout)
LOCK_TIMEOUT_MAX_S = 3600.0  # the longest --lock-timeout accepted
LOCK_NOTICE_AFTER_S = 0.5  # a wait this long is reported once, naming the holder
LOCK_POLL_MIN_S = 0.01  # first pause between two tries of the lock; it doubles up to
LOCK_POLL_MAX_S = 0.2  # this pause
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


def lock_timeout_arg(text: str | None) -> float:
    """``--lock-timeout`` in seconds (``LOCK_TIMEOUT_S`` when not given); ``RequestError``
    unless it is a number from 0 to ``LOCK_TIMEOUT_MAX_S``."""
    if text is None:
        return LOCK_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 <= value <= LOCK_TIMEOUT_MAX_S:  # NaN fails too
        raise RequestError(
            f"--lock-timeout {text!r}: give a number of seconds from 0 to "
            f"{LOCK_TIMEOUT_MAX_S:g}"
        )
    return value


def lock_holders(path: str | os.PathLike[str]) -> list[int]:
    """Process ids holding a ``flock`` on ``path``, from ``/proc/locks``; ``[]`` when
    none or when they cannot be known (``flock`` itself has no owner to ask)."""
    try:
        st = os.stat(path)
        with open("/proc/locks") as f:
            text = f.read()
    except OSError:
        return []
    inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    pids: list[int] = []
    for line in text.splitlines():
        # "1: FLOCK  ADVISORY  WRITE 7367 fe:00:2156713 0 EOF"; a waiter: "1: -> FLOCK ..."
        fields = line.split()
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == inode:
            pid = int(fields[4]) if fields[4].isdigit() else 0  # -1: not in our namespace
            if pid > 0 and pid not in pids:
                pids.append(pid)
    return pids


def _holders(path: str) -> str:
    """``pid 1234 (libvirtd)`` for the lock's holders, or ``another process``."""
    named = []
    for pid in lock_holders(path):
        comm = _read_text(f"/proc/{pid}/comm")
        named.append(f"{pid} ({comm.strip()})" if comm and comm.strip() else str(pid))
    if not named:
        return "another process"
    return ("pid " if len(named) == 1 else "pids ") + ", ".join(named)


def _flock_within(
    fd: int, root: str, exclusive: bool, timeout: float,
    on_wait: Callable[[str], None] | None,
) -> None:
    """Take the lock on ``fd``, trying again until ``timeout`` seconds have passed.

    Once the wait has lasted ``LOCK_NOTICE_AFTER_S`` (if that is within the timeout),
    ``on_wait`` is called once with a line naming the holder. After the timeout, a
    ``HostagentError`` names the root and the holder: nothing was done.
    """
    op = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
    start = time.monotonic()
    deadline = start + timeout
    notice_at = start + LOCK_NOTICE_AFTER_S
    notify = on_wait is not None and notice_at <= deadline
    pause = LOCK_POLL_MIN_S
    while True:
        try:
            fcntl.flock(fd, op)
            return
        except BlockingIOError:
            pass
        except OSError as exc:
            raise HostagentError(f"{root}: cannot lock ({exc.strerror})") from None
        now = time.monotonic()
        if notify and now >= notice_at:
            assert on_wait is not None
            on_wait(f"waiting for the resctrl lock on {root}, held by {_holders(root)} "
                    f"(at most {timeout:g} s, --lock-timeout)")
            notify = False
        if now >= deadline:
            raise HostagentError(
                f"{root}: the resctrl lock is held by {_holders(root)} and was not let go "
                f"within {timeout:g} s (--lock-timeout); nothing was done"
            )
        wake = min(deadline, notice_at) if notify else deadline
        time.sleep(max(0.0, min(pause, wake - now)))
        pause = min(pause * 2, LOCK_POLL_MAX_S)


@contextmanager
def locked(
    resctrl_root: str | os.PathLike[str],
    exclusive: bool = True,
    *,
    timeout: float = LOCK_TIMEOUT_S,
    on_wait: Callable[[str], None] | None = None,
) -> Iterator[int]:
    """``flock`` on the resctrl root directory for the duration of the block.

    Waits at most ``timeout`` seconds for another holder (``HostagentError`` after
    that); ``on_wait`` gets one line naming the holder when the wait lasts
    ``LOCK_NOTICE_AFTER_S``.
    """
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
            _flock_within(fd, root, exclusive, timeout, on_wait)
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
    cleaned: str | None = None  # an incomplete leftover of this name that was removed

    def to_dict(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "group": self.group,
            "path": self.path,
            "cpus": None if self.cpus is None else list(self.cpus),
            "tasks": None if self.tasks is None else list(self.tasks),
            "cleaned": self.cleaned,
            "plan": self.plan.to_dict(),
        }


@dataclass(frozen=True)
class Leftover:
    """A directory of our namespace as a stopped ``reserve`` leaves it.

    ``state``: ``incomplete`` (no usable schemata: it holds no ways; only seen on plain
    directories, where the group's files do not come with the ``mkdir``) or ``unused``
    (a group with no CPUs and no tasks: what a ``reserve`` stopped after ``mkdir`` or
    after the schemata write leaves on the kernel, and also what a ``reserve`` without
    ``--cpus``/``--tasks`` makes on purpose).
    """

    group: str
    path: str
    state: str
    detail: str

    def to_dict(self) -> dict[str, str]:
        return {"group": self.group, "path": self.path, "state": self.state,
                "detail": self.detail}


def _leftover(name: str, path: str, topo: HostTopology) -> Leftover | None:
    """What is wrong with our directory ``name``, or None for a complete group in use."""
    rc = topo.resctrl
    assert rc is not None
    grp = rc.group(name)
    if grp is None:
        return Leftover(name, path, "incomplete",
                        "it has no schemata file (a reserve stopped after its mkdir)")
    missing = [r.name for r in rc.resources if r.name not in grp.schemata]
    if missing:
        return Leftover(
            name, path, "incomplete",
            f"its schemata has no {missing[0]} line (a reserve stopped or failed while "
            "writing it)",
        )
    if grp.cpus or grp.tasks:
        return None
    alone = []
    for res in rc.resources:
        for cid, text in sorted(grp.schemata[res.name].items()):
            others = 0
            for g in rc.groups:
                if g.name != name:
                    others |= parse_mask(g.schemata.get(res.name, {}).get(cid, "0"))
            if parse_mask(text) & ~others:
                alone.append(f"{res.name}:{cid}={text}")
    held = (f"it alone holds {', '.join(alone)}" if alone
            else "it holds no ways alone but uses a CLOSID")
    return Leftover(
        name, path, "unused",
        f"{held} but has no CPUs and no tasks (a reserve stopped before attaching them, "
        "or one made without --cpus/--tasks)",
    )


def find_leftovers(resctrl_root: str | os.PathLike[str], topo: HostTopology) -> list[Leftover]:
    """Directories of our namespace (``hostagent-*``, real directories only) that are
    incomplete or unused; ``topo`` is the probe of the same root, read under the lock."""
    root = os.fspath(resctrl_root)
    if topo.resctrl is None:
        return []
    try:
        with os.scandir(root) as it:
            names = sorted(e.name for e in it
                           if e.name.startswith(PREFIX) and e.is_dir(follow_symlinks=False))
    except OSError:
        return []
    found = (_leftover(n, os.path.join(root, n), topo) for n in names)
    return [f for f in found if f is not None]


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
    *,
    lock_timeout: float = LOCK_TIMEOUT_S,
    on_wait: Callable[[str], None] | None = None,
) -> ReserveResult:
    """Reserve ``spec_text`` for group ``hostagent-<group>`` and attach ``cpus``/``tasks``.

    An incomplete leftover of the same name (``Leftover``) with no CPUs and no tasks is
    removed first and named in ``cleaned``; any other group of that name is updated in
    place.
    Raises ``RequestError`` for a bad name, spec, CPU list or PID and for a request that
    does not fit; ``ResctrlApplyError`` when a write fails (the group is gone again);
    ``HostagentError`` when the lock is not had within ``lock_timeout`` seconds.
    """
    name = group_dir_name(group)
    spec = parse_reservation(spec_text)
    cpu_ids = _cpus_arg(cpus)
    pids = _tasks_arg(tasks)
    root = os.fspath(resctrl_root)
    path = os.path.join(root, name)
    with locked(root, exclusive=not dry_run, timeout=lock_timeout, on_wait=on_wait):
        topo = read_topology(root, sysfs_root)
        cleaned = None
        if not dry_run and os.path.isdir(path) and not os.path.islink(path):
            found = _leftover(name, path, topo)
            grp = topo.resctrl.group(name) if topo.resctrl else None
            in_use = grp is not None and bool(grp.cpus or grp.tasks)
            if found is not None and found.state == "incomplete" and not in_use:
                try:
                    _rmdir_group(path)
                except OSError as exc:
                    raise _fail(root, "removing", path, exc,
                                f"the incomplete {name} is still there") from None
                cleaned = f"{path} was incomplete: {found.detail}; removed"
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
        return ReserveResult(action, name, path, plan, cpu_ids, pids, cleaned)


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


def release(
    resctrl_root: str | os.PathLike[str],
    group: str,
    *,
    lock_timeout: float = LOCK_TIMEOUT_S,
    on_wait: Callable[[str], None] | None = None,
) -> bool:
    """Remove group ``hostagent-<group>`` (complete or a leftover); False when it was not
    there. The kernel moves its tasks and CPUs back to the default group."""
    name = group_dir_name(group)
    root = os.fspath(resctrl_root)
    path = os.path.join(root, name)
    with locked(root, timeout=lock_timeout, on_wait=on_wait):
        if not os.path.isdir(path):
            return False
        try:
            _rmdir_group(path)
        except OSError as exc:
            raise _fail(root, "removing", path, exc, "the group is still there") from None
    return True


def carved_schemata(current: str, lines: Mapping[str, Mapping[int, str]]) -> str:
    """``current`` (a schemata file's text) with the line of each resource in ``lines``
    replaced by ``RES:id=mask;...``: the replacement keeps the line's own padding (the
    kernel aligns the names) and ending; every other line, blank ones and the end of the
    file included, is kept byte for byte. A resource the file does not list is added at
    the end."""
    wanted = {res: ";".join(f"{cid}={m}" for cid, m in sorted(ids.items()))
              for res, ids in lines.items()}
    out = []
    done: set[str] = set()
    for line in current.splitlines(keepends=True):
        body = line.rstrip("\r\n")
        name, sep, _ = body.partition(":")
        res = name.strip()
        if sep and res in wanted:
            pad = name[:len(name) - len(name.lstrip())]
            line = f"{pad}{res}:{wanted[res]}{line[len(body):]}"
            done.add(res)
        out.append(line)
    missing = [f"{res}:{value}\n" for res, value in wanted.items() if res not in done]
    if missing and out and not out[-1].endswith("\n"):
        out[-1] += "\n"
    return "".join(out + missing)


def carve(
    resctrl_root: str | os.PathLike[str],
    sysfs_root: str | os.PathLike[str],
    ways: int,
    cache_id: int | None = None,
    *,
    level: int = 3,
    dry_run: bool = False,
    lock_timeout: float = LOCK_TIMEOUT_S,
    on_wait: Callable[[str], None] | None = None,
) -> CarvePlan:
    """Shrink the default group (``hostagent.resctrl.plan_carve``) and write its schemata.

    The root ``schemata`` is rewritten whole (``carved_schemata``): the lines we change,
    and every other line (MB, SMBA, other levels) byte for byte as the kernel printed it,
    so nothing else changes on the kernel or in a plain-directory tree.
    """
    root = os.fspath(resctrl_root)
    with locked(root, exclusive=not dry_run, timeout=lock_timeout, on_wait=on_wait):
        topo = read_topology(root, sysfs_root)
        plan = plan_carve(topo, ways, cache_id=cache_id, level=level)
        if dry_run or not plan.changed:
            return plan
        target = os.path.join(root, "schemata")
        try:
            with open(target, encoding="utf-8", newline="") as fh:  # line ends as they are
                current = fh.read()
        except OSError as exc:
            raise _fail(root, "reading", target, exc, "nothing was changed") from None
        text = carved_schemata(current, plan.schemata)
        try:
            _write(target, text)
        except OSError as exc:
            status = last_cmd_status(root)
            outcome = _put_back(target, current, "the default group", "write it back by hand")
            raise _fail(root, "writing", target, exc, outcome, status) from None
    return plan
