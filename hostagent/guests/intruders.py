"""Intruders: host tasks whose CPU affinity lets them run on a dedicated thread.

A real-time guest owns its dedicated threads; any other task the kernel may schedule
there steals time from it. A *host task* is a thread of any process that is not a
running guest's QEMU process, and not a per-CPU kernel thread (a kernel thread whose
affinity is one CPU: ``ksoftirqd/N``, ``kworker/N:M``, ``migration/N``, ``cpuhp/N``; they
must run there). Kernel threads that serve one guest's QEMU (``vhost-<pid>``,
``kvm-pit/<pid>``) count as that guest's. A zombie thread-group leader is skipped (it never
runs again).

Kernel reads, one function per source (tolerant: a process or thread that exits between
the listing and the read is skipped, never an exception, never a false intruder):

- ``list_pids(proc)``: the numeric entries of ``/proc``;
- ``read_stat(pid, proc)``: ``/proc/<pid>/stat`` → name, state, flags (``PF_KTHREAD``);
- ``list_tids(pid, proc)``: ``/proc/<pid>/task``;
- ``task_affinity(tid)``: ``sched_getaffinity(tid)`` (what ``Cpus_allowed_list`` says,
  restricted to the active CPUs; a system call, no file: measured 7x faster than reading
  each ``status`` and 50x faster than psutil, see bench/drift.py);
- ``read_task_comm(pid, tid, proc)``: ``/proc/<pid>/task/<tid>/comm``, for the named
  offenders only.

``scan_intruders(scope, guest_pids)`` counts, per online dedicated thread, the host tasks
allowed there, and which of them are *conflicting* under ``scope.conflict``:

- ``"pinned"`` (the default): a task allowed on a dedicated thread that the kernel isolates
  (``isolcpus=``: ``/sys/devices/system/cpu/isolated``), or whose affinity is narrower than
  every online CPU (someone chose its CPUs and left a dedicated one in). A task with the
  default affinity (every online CPU) on a host that does not isolate its dedicated
  threads is counted, not a conflict: on such a host every task is allowed everywhere,
  and flagging them all would say nothing;
- ``"all"``: every host task allowed on a dedicated thread (hosts that keep those threads
  free by other means, e.g. cpusets or systemd ``AllowedCPUs=``);
- ``"off"``: counted only.

Memory is bounded whatever the number of tasks: counters per dedicated thread and the
``MAX_INTRUDERS_REPORTED`` worst conflicting tasks (fewest non-dedicated CPUs allowed
first, then fewest CPUs, then pid, tid).
"""

from __future__ import annotations

import heapq
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hostagent.guests.threads import PROC_ROOT, check_guests

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator, Mapping

    from hostagent.guests.xml import GuestSpec
    from hostagent.model import HostTopology

PF_KTHREAD = 0x00200000  # include/linux/sched.h: the task is a kernel thread
MAX_INTRUDERS_REPORTED = 10  # conflicting host tasks named in host_tasks_on_dedicated
MAX_STAT_BYTES = 4096  # bytes of /proc/<pid>/stat read (about 300 in practice)
# kernel threads that serve one guest's QEMU process (pid in the name)
GUEST_KERNEL_THREAD = re.compile(r"(?:vhost-|kvm-pit/)(\d+)")


@dataclass(frozen=True)
class IntruderScope:
    """What the scan looks for: the online dedicated threads, which of them the kernel
    isolates, how many CPUs are online, and the conflict mode."""

    dedicated: frozenset[int]
    isolated: frozenset[int]  # dedicated threads in the kernel's isolated list
    online_count: int
    conflict: str = "pinned"

    @classmethod
    def for_host(cls, topo: HostTopology, resources: Mapping[str, Any],
                 conflict: str = "pinned") -> IntruderScope:
        """The scope for a probed host and its resolved resources (``resolve_resources``)."""
        online = {c.id for c in topo.cpus if c.online}
        dedicated = frozenset(set(resources.get("dedicated_cpus", ())) & online)
        isolated = frozenset(c.id for c in topo.cpus if c.isolated and c.id in dedicated)
        return cls(dedicated, isolated, len(online), conflict)


@dataclass(frozen=True)
class ProcStat:
    """The fields of ``/proc/<pid>/stat`` the scan needs."""

    comm: str
    state: str
    flags: int

    @property
    def kernel_thread(self) -> bool:
        return bool(self.flags & PF_KTHREAD)


def list_pids(proc: Path = PROC_ROOT) -> list[int]:
    """Every process id in ``proc`` (empty when it cannot be listed)."""
    try:
        return [int(n) for n in os.listdir(proc) if n.isdigit()]
    except OSError:
        return []


def read_stat(pid: int, proc: Path = PROC_ROOT) -> ProcStat | None:
    """``/proc/<pid>/stat``: name, state and flags; None when gone or unparsable. The name
    is between the first ``(`` and the last ``)`` (it may hold both, and spaces)."""
    try:
        with open(f"{proc}/{pid}/stat", "rb") as fh:
            data = fh.read(MAX_STAT_BYTES)
    except OSError:
        return None
    start, end = data.find(b"("), data.rfind(b")")
    fields = data[end + 2:].split()
    if start < 0 or end < start or len(fields) < 7:
        return None
    try:
        flags = int(fields[6])
    except ValueError:
        return None
    return ProcStat(data[start + 1:end].decode(errors="replace"),
                    fields[0].decode(errors="replace"), flags)


def list_tids(pid: int, proc: Path = PROC_ROOT) -> list[int] | None:
    """The thread ids of process ``pid`` (``/proc/<pid>/task``); None when gone."""
    try:
        return [int(n) for n in os.listdir(f"{proc}/{pid}/task") if n.isdigit()]
    except OSError:
        return None


def task_affinity(tid: int) -> set[int] | None:
    """The CPUs thread ``tid`` may run on (``sched_getaffinity``); None when it is gone."""
    try:
        return os.sched_getaffinity(tid)
    except OSError:  # ESRCH: exited since the listing
        return None


def read_task_comm(pid: int, tid: int, proc: Path = PROC_ROOT) -> str | None:
    """``/proc/<pid>/task/<tid>/comm`` (the thread's name); None when gone."""
    try:
        with open(f"{proc}/{pid}/task/{tid}/comm", "rb") as fh:
            return fh.read(64).decode(errors="replace").rstrip("\n")
    except OSError:
        return None


def _conflicting(scope: IntruderScope, allowed: set[int], hit: set[int]) -> bool:
    if scope.conflict == "all":
        return True
    if scope.conflict == "off":
        return False
    return bool(hit & scope.isolated) or len(allowed) < scope.online_count


def host_processes(guest_pids: Iterable[int] = (), *, proc: Path = PROC_ROOT
                   ) -> Iterator[tuple[int, ProcStat, list[int]]]:
    """``(pid, stat, tids)`` of every process that is not a guest's (its QEMU process, or
    a kernel thread serving it); a zombie leader's own tid is left out (it never runs
    again; its other threads may). Vanished processes are skipped."""
    guests = set(guest_pids)
    for pid in list_pids(proc):
        if pid in guests:
            continue
        st = read_stat(pid, proc)
        if st is None:
            continue
        if st.kernel_thread:
            m = GUEST_KERNEL_THREAD.fullmatch(st.comm)
            if m and int(m.group(1)) in guests:
                continue
            tids: list[int] | None = [pid]  # a kernel thread is a thread group of one
        else:
            tids = list_tids(pid, proc)
        if tids and st.state in ("Z", "X"):
            tids = [t for t in tids if t != pid]
        if tids:
            yield pid, st, tids


def host_tasks(guest_pids: Iterable[int] = (), *,
               proc: Path = PROC_ROOT) -> Iterator[tuple[int, int, ProcStat]]:
    """``(pid, tid, stat of the process)`` of every thread of ``host_processes``."""
    for pid, st, tids in host_processes(guest_pids, proc=proc):
        for tid in tids:
            yield pid, tid, st


def scan_intruders(scope: IntruderScope, guest_pids: Iterable[int] = (), *,
                   proc: Path = PROC_ROOT) -> dict[str, Any]:
    """One scan of every task. ``{"tasks", "conflicting", "cpus": [{"cpu", "tasks",
    "conflicting"}] (each online dedicated thread), "worst": [{"pid", "tid", "comm",
    "cpus"}] (at most MAX_INTRUDERS_REPORTED conflicting tasks, worst first; ``cpus`` =
    the dedicated threads it may run on)}``. No dedicated thread: nothing is read."""
    counts: Counter[frozenset[int]] = Counter()  # dedicated threads reached → tasks
    flagged: Counter[frozenset[int]] = Counter()
    # the worst so far, as a heap of negated ranks: worst[0] is the least bad kept
    worst: list[tuple[int, int, int, int, str, tuple[int, ...]]] = []
    bound = MAX_INTRUDERS_REPORTED
    tasks = conflicting = 0
    dedicated = scope.dedicated
    for pid, st, tids in host_processes(guest_pids, proc=proc) if dedicated else ():
        kernel = st.kernel_thread
        for tid in tids:
            allowed = task_affinity(tid)
            if allowed is None:
                continue
            hit = allowed & dedicated
            if not hit or (kernel and len(allowed) == 1):
                continue  # not on a dedicated thread, or a per-CPU kernel thread
            key = frozenset(hit)
            tasks += 1
            counts[key] += 1
            if not _conflicting(scope, allowed, hit):
                continue
            conflicting += 1
            flagged[key] += 1
            rank = (len(hit) - len(allowed), -len(allowed), -pid, -tid)
            if len(worst) < bound:
                heapq.heappush(worst, (*rank, st.comm, tuple(sorted(hit))))
            elif rank > worst[0][:4]:
                heapq.heapreplace(worst, (*rank, st.comm, tuple(sorted(hit))))
    per_cpu: Counter[int] = Counter()
    per_cpu_flagged: Counter[int] = Counter()
    for key, n in counts.items():
        for cpu in key:
            per_cpu[cpu] += n
    for key, n in flagged.items():
        for cpu in key:
            per_cpu_flagged[cpu] += n
    named = []
    for *_rank, comm, cpus in sorted(worst, reverse=True):
        pid, tid = -_rank[2], -_rank[3]
        named.append({"pid": pid, "tid": tid,
                      "comm": read_task_comm(pid, tid, proc) or comm, "cpus": list(cpus)})
    return {"tasks": tasks, "conflicting": conflicting,
            "cpus": [{"cpu": c, "tasks": per_cpu[c], "conflicting": per_cpu_flagged[c]}
                     for c in sorted(dedicated)],
            "worst": named}


def check_threads(specs: Mapping[str, GuestSpec], hints: dict[str, int],
                  scope: IntruderScope | None, *, guests: bool = True,
                  proc: Path = PROC_ROOT) -> dict[str, Any]:
    """One whole check: ``{"guests": check_guests(...) (``{}`` unless ``guests``),
    "intruders": scan_intruders(...) (None without a scope)}``. The running guests' QEMU
    processes found are not host tasks. Kernel reads only; runs off the event loop."""
    checked = check_guests(dict(specs), hints, proc=proc) if guests else {}
    pids = [g["pid"] for g in checked.values() if g["pid"] is not None]
    intruders = None if scope is None else scan_intruders(scope, pids, proc=proc)
    return {"guests": checked, "intruders": intruders}
