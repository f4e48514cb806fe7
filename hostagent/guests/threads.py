"""What the kernel really does with a running guest's threads: its QEMU process, each
thread's id, name and actual CPU affinity, and where that differs from the domain XML.

Kernel reads only (``/proc``, or a copy of its shape for tests); no libvirt call. The
tracker stays pure: these results are data handed to it.

- ``find_qemu_pid(uuid)``: the QEMU process of the guest with that uuid (libvirt starts
  QEMU with ``-uuid <uuid>``); a ``hint`` pid (the last one found) is checked first, so a
  scan of every process runs only when the guest is new or restarted. Only processes
  whose ``comm`` starts with ``qemu-system`` have their command line read.
- ``read_threads(pid)``: every thread of that process with its name (``comm``) and its
  actual affinity (``Cpus_allowed_list`` of ``/proc/<pid>/task/<tid>/status``, what
  ``sched_getaffinity`` returns). vCPU threads are named ``CPU <n>/TCG`` or ``CPU <n>/KVM``
  by QEMU; other QEMU threads are the emulator's (I/O threads named ``IO iothread<n>`` are
  neither: they have their own pin). Kernel threads in QEMU's thread group (e.g.
  ``kvm-nx-lpage-re`` with KVM) are neither either.
- ``affinity_drift(spec, threads)``: each vCPU or emulator thread whose actual affinity
  is not the XML's (``vcpupin``/``<vcpu cpuset>``, ``emulatorpin``/``<vcpu cpuset>``);
  nothing is reported for a thread the XML does not pin.

Races are normal (a guest stops, a thread exits between the listing and the read): a
vanished process is ``None``, a vanished thread is left out; never an exception, never a
false drift. At most ``MAX_GUEST_THREADS`` threads are read per process.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hostagent.cpulist import CpuListError, parse_cpulist
from hostagent.guests.xml import GuestSpec

PROC_ROOT = Path("/proc")
QEMU_COMM_PREFIX = "qemu-system"
VCPU_THREAD_NAME = re.compile(r"CPU (\d+)/(?:TCG|KVM)")
IOTHREAD_NAME = re.compile(r"IO iothread\d+")
KERNEL_THREAD_NAMES = ("kvm-nx-lpage-re", "kvm-pit")  # kernel threads in QEMU's group
MAX_GUEST_THREADS = 4096  # threads read per QEMU process (a guest has vCPUs + a few)
MAX_CMDLINE_BYTES = 1 << 20  # bytes of a QEMU command line read to find ``-uuid``
MAX_STATUS_BYTES = 1 << 16  # bytes of a thread's status file read


@dataclass(frozen=True)
class GuestThread:
    """One thread of a QEMU process: id, name, actual affinity and what it is."""

    tid: int
    name: str
    cpus: tuple[int, ...]
    vcpu: int | None  # the vCPU it runs, from its name; None for every other thread
    emulator: bool  # a QEMU thread that is neither a vCPU, an I/O thread nor a kernel one

    def as_dict(self) -> dict[str, Any]:
        return {"tid": self.tid, "name": self.name, "vcpu": self.vcpu,
                "emulator": self.emulator, "cpus": list(self.cpus)}


def _read(path: Path, limit: int) -> bytes | None:
    try:
        with open(path, "rb") as fh:
            return fh.read(limit)
    except OSError:  # gone (ENOENT, ESRCH) or not ours to read: the race is normal
        return None


def _comm(proc: Path, pid: int, tid: int | None = None) -> str | None:
    base = proc / str(pid) if tid is None else proc / str(pid) / "task" / str(tid)
    data = _read(base / "comm", 64)
    return None if data is None else data.decode(errors="replace").rstrip("\n")


def _is_guest_qemu(proc: Path, pid: int, uuid: str) -> bool:
    comm = _comm(proc, pid)
    if comm is None or not comm.startswith(QEMU_COMM_PREFIX):
        return False
    data = _read(proc / str(pid) / "cmdline", MAX_CMDLINE_BYTES)
    if not data:
        return False
    args = data.split(b"\0")
    want = uuid.lower().encode()
    return any(a == b"-uuid" and i + 1 < len(args) and args[i + 1].lower() == want
               for i, a in enumerate(args))


def find_qemu_pid(uuid: str, *, proc: Path = PROC_ROOT, hint: int | None = None) -> int | None:
    """The pid of the QEMU process started with ``-uuid <uuid>``, or None."""
    if hint is not None and _is_guest_qemu(proc, hint, uuid):
        return hint
    try:
        names = [n for n in (e.name for e in proc.iterdir()) if n.isdigit()]
    except OSError:
        return None
    for n in names:
        if _is_guest_qemu(proc, int(n), uuid):
            return int(n)
    return None


def _affinity(status: bytes) -> tuple[int, ...] | None:
    for line in status.decode(errors="replace").splitlines():
        if line.startswith("Cpus_allowed_list:"):
            try:
                return parse_cpulist(line.split(":", 1)[1])
            except CpuListError:
                return None
    return None


def _kind(name: str) -> tuple[int | None, bool]:
    m = VCPU_THREAD_NAME.fullmatch(name)
    if m:
        return int(m.group(1)), False
    if IOTHREAD_NAME.fullmatch(name) or name in KERNEL_THREAD_NAMES:
        return None, False
    return None, True


def read_threads(pid: int, *, proc: Path = PROC_ROOT) -> list[GuestThread] | None:
    """Every thread of process ``pid`` (by tid) with its actual affinity; None if gone."""
    try:
        tids = sorted(int(e.name) for e in (proc / str(pid) / "task").iterdir()
                      if e.name.isdigit())
    except OSError:
        return None
    out: list[GuestThread] = []
    for tid in tids[:MAX_GUEST_THREADS]:
        name = _comm(proc, pid, tid)
        status = _read(proc / str(pid) / "task" / str(tid) / "status", MAX_STATUS_BYTES)
        cpus = None if status is None else _affinity(status)
        if name is None or cpus is None:
            continue  # the thread exited between the listing and the read
        vcpu, emulator = _kind(name)
        out.append(GuestThread(tid, name, cpus, vcpu, emulator))
    return out


def affinity_drift(spec: GuestSpec, threads: list[GuestThread]) -> list[dict[str, Any]]:
    """Threads whose actual affinity differs from the XML's, as
    ``{"tid", "name", "vcpu" (None for the emulator), "declared", "actual"}``."""
    out: list[dict[str, Any]] = []
    emulator = spec.emulator_affinity()
    for t in threads:
        if t.vcpu is not None:
            declared = spec.vcpu_affinity(t.vcpu)
        elif t.emulator:
            declared = emulator
        else:
            continue
        if declared is not None and set(declared) != set(t.cpus):
            out.append({"tid": t.tid, "name": t.name, "vcpu": t.vcpu,
                        "declared": sorted(declared), "actual": list(t.cpus)})
    return out


def check_guests(specs: dict[str, GuestSpec], hints: dict[str, int], *,
                 proc: Path = PROC_ROOT) -> dict[str, dict[str, Any]]:
    """One check of every running guest: uuid → ``{"pid", "threads", "drift"}`` (``pid``
    None and empty lists when its QEMU process is not found). ``hints`` (uuid → the pid
    found last time) is updated in place. Kernel reads only; runs off the event loop."""
    out: dict[str, dict[str, Any]] = {}
    for uuid, spec in sorted(specs.items()):
        pid = find_qemu_pid(uuid, proc=proc, hint=hints.get(uuid))
        threads = None if pid is None else read_threads(pid, proc=proc)
        if pid is None or threads is None:
            hints.pop(uuid, None)
            out[uuid] = {"pid": None, "threads": [], "drift": []}
            continue
        hints[uuid] = pid
        out[uuid] = {"pid": pid, "threads": [t.as_dict() for t in threads],
                     "drift": affinity_drift(spec, threads)}
    for uuid in set(hints) - set(specs):
        del hints[uuid]
    return out
