"""The cost of the thread check (guests' drift + host intruders), and the agent's idle CPU.

    .venv/bin/python bench/drift.py [--tasks 2000] [--guest-threads 50]
        [--guests auto|real|standin] [--repeat 30] [--idle-seconds 30]

1. Host tasks: this many threads on the machine in all (``/proc/*/task``): one process
   with many sleeping threads and several smaller ones are started to reach the number.
2. Guest threads: about this many QEMU threads — real TCG guests under the machine's
   libvirtd (``qemu:///system``, ``--guests real``; ``auto`` = real when reachable), else
   stand-ins: processes whose ``comm`` is ``qemu-system-x86``, whose command line holds
   ``-uuid <uuid>`` and whose threads are named ``CPU <n>/TCG`` (what the check reads).
3. One full check (``hostagent.guests.intruders.check_threads``: every guest's QEMU
   threads and drift, then every host task's affinity against the dedicated thread, in
   the worst mode ``all``: every intruder conflicts), ``--repeat`` times; against the
   same read done other ways, in the same run:

   - the same scan reading each task's ``/proc/<pid>/task/<tid>/status``
     (``Cpus_allowed_list``) instead of ``sched_getaffinity``;
   - psutil (``process_iter``, ``threads()``, ``Process(tid).cpu_affinity()``);
   - the named peer ``grep Cpus_allowed_list /proc/*/task/*/status`` (one process start,
     then the same read of every task's status; procps's ``ps`` has no
     ``cpus_allowed_list`` column on Debian 12), and ``taskset -ap PID`` over every
     process (what an operator's script would run).

4. Idle CPU of a real ``hostagent run`` (this machine's /sys, the last CPU dedicated,
   ``qemu:///system`` when reachable, else ``test:///default`` with the period set)
   measured from ``/proc/<pid>/stat`` (utime + stime) over ``--idle-seconds``, with the
   check every 10 s (the default), every 1 s, and off; the peer: the ``grep`` above run
   every 10 s (its CPU per run / 10 s).

Goals: one check < 20 ms with 2,000 tasks and 50 guest threads; idle CPU < 0.5 %.
Everything started is stopped at the end (real guests destroyed).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid as uuidlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from hostagent.cpulist import parse_cpulist  # noqa: E402
from hostagent.guests import intruders as intr  # noqa: E402
from hostagent.guests.intruders import IntruderScope, check_threads  # noqa: E402
from hostagent.guests.threads import check_guests  # noqa: E402
from hostagent.guests.xml import parse_domain  # noqa: E402

URI = "qemu:///system"
QEMU = "/usr/bin/qemu-system-x86_64"
CLK_TCK = os.sysconf("SC_CLK_TCK")
THREADS_PER_HOLDER = 400  # sleeping threads per helper process (64 KiB stacks)
STANDIN_VCPUS = 8  # "CPU n/TCG" threads per stand-in QEMU (plus 2 emulator threads)

HOLDER = """
import sys, threading, time
threading.stack_size(64 * 1024)
for _ in range(int(sys.argv[1])):
    threading.Thread(target=time.sleep, args=(86400,), daemon=True).start()
print("ok", flush=True)
time.sleep(86400)
"""

STANDIN = """
import os, sys, threading, time
threading.stack_size(64 * 1024)
n = int(sys.argv[1])
ready = threading.Barrier(n + 1)
def vcpu(i):
    with open(f"/proc/self/task/{threading.get_native_id()}/comm", "w") as fh:
        fh.write(f"CPU {i}/TCG")
    ready.wait()
    time.sleep(86400)
for i in range(n):
    threading.Thread(target=vcpu, args=(i,), daemon=True).start()
threading.Thread(target=time.sleep, args=(86400,), daemon=True).start()  # call_rcu-like
ready.wait()
print("ok", flush=True)
time.sleep(86400)
"""


def task_count() -> int:
    n = 0
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                n += len(os.listdir(f"/proc/{pid}/task"))
            except OSError:
                pass
    return n


def start_ok(cmd: list[str]) -> subprocess.Popen[str]:
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "ok", cmd
    return p


def spawn_tasks(target: int, procs: list[subprocess.Popen[str]]) -> None:
    """Start holder processes until the machine has ``target`` tasks (about)."""
    missing = target - task_count()
    while missing > 0:
        n = min(THREADS_PER_HOLDER, missing - 1) if missing > 1 else 0
        procs.append(start_ok([sys.executable, "-c", HOLDER, str(max(0, n))]))
        missing -= n + 1


def guest_xml(name: str, uid: str, cpus: list[int]) -> str:
    pins = "".join(f"<vcpupin vcpu='{v}' cpuset='{cpus[-1]}'/>" for v in range(2))
    return f"""<domain type='qemu'><name>{name}</name><uuid>{uid}</uuid>
  <memory unit='MiB'>64</memory><vcpu placement='static'>2</vcpu>
  <cputune>{pins}<emulatorpin cpuset='{cpus[0]}-{cpus[-1]}'/></cputune>
  <os><type arch='x86_64' machine='pc'>hvm</type></os><on_poweroff>destroy</on_poweroff>
  <devices><emulator>{QEMU}</emulator><video><model type='none'/></video>
  <memballoon model='none'/></devices></domain>"""


def reachable() -> bool:
    try:
        return subprocess.run(["virsh", "-c", URI, "version"], capture_output=True,
                              timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


class Guests:
    """Real TCG guests or stand-in processes with about ``threads`` QEMU threads."""

    def __init__(self, kind: str, threads: int, cpus: list[int], tmp: Path) -> None:
        self.kind, self.specs, self.procs, self.doms = kind, {}, [], []
        self.conn: Any = None
        if kind == "real":
            import libvirt

            libvirt.registerErrorHandler(lambda _c, _e: None, None)
            self.conn = libvirt.open(URI)
            while self.threads() < threads:
                uid = str(uuidlib.uuid4())
                xml = guest_xml(f"hatest-bench-{uid[:8]}", uid, cpus)
                self.doms.append(self.conn.createXML(xml, 0))
                self.specs[uid] = parse_domain(xml)
            return
        exe = tmp / "qemu-system-x86_64"  # comm "qemu-system-x86", as a real QEMU's
        exe.symlink_to(sys.executable)
        while sum(STANDIN_VCPUS + 2 for _ in self.procs) < threads:
            uid = str(uuidlib.uuid4())
            self.procs.append(start_ok([str(exe), "-c", STANDIN, str(STANDIN_VCPUS),
                                        "-uuid", uid]))
            pins = "".join(f"<vcpupin vcpu='{v}' cpuset='{cpus[0]}-{cpus[-1]}'/>"
                           for v in range(STANDIN_VCPUS))
            self.specs[uid] = parse_domain(
                f"<domain type='qemu'><name>s{uid[:8]}</name><uuid>{uid}</uuid>"
                f"<memory unit='MiB'>64</memory><vcpu>{STANDIN_VCPUS}</vcpu>"
                f"<cputune>{pins}</cputune></domain>")

    def threads(self) -> int:
        n = 0
        for uid in self.specs:
            pid = check_guests({uid: self.specs[uid]}, {})[uid]["pid"]
            n += len(os.listdir(f"/proc/{pid}/task")) if pid else 0
        return n

    def close(self) -> None:
        """Destroy the real guests on a fresh connection (the first one may have been
        dropped while idle), by name; stop the stand-ins."""
        if self.doms:
            import libvirt

            names = [d.name() for d in self.doms]
            conn = libvirt.open(URI)
            try:
                for name in names:
                    try:
                        conn.lookupByName(name).destroy()
                    except libvirt.libvirtError as exc:
                        print(f"drift: could not destroy {name}: {exc}", file=sys.stderr)
            finally:
                conn.close()
        if self.conn is not None:
            try:
                self.conn.close()
            except Exception:  # noqa: BLE001 - a dropped connection
                pass
        for p in self.procs:
            p.kill()
            p.wait()


def timed(fn: Callable[[], Any], repeat: int) -> tuple[list[float], list[float]]:
    """Wall and CPU (this thread's) milliseconds of each of ``repeat`` runs."""
    fn()  # warm: imports, dentries
    wall, cpu = [], []
    for _ in range(repeat):
        c, t = time.thread_time(), time.perf_counter()
        fn()
        wall.append((time.perf_counter() - t) * 1000)
        cpu.append((time.thread_time() - c) * 1000)
    return wall, cpu


def status_scan(scope: IntruderScope) -> int:
    """The same scan, each task's affinity from its ``status`` file."""
    n = 0
    for pid, tid, _st in intr.host_tasks():
        try:
            with open(f"/proc/{pid}/task/{tid}/status", "rb") as fh:
                data = fh.read()
        except OSError:
            continue
        i = data.find(b"Cpus_allowed_list:")
        if i >= 0:
            line = data[i + 18:data.index(b"\n", i)].decode()
            if set(parse_cpulist(line)) & scope.dedicated:
                n += 1
    return n


def psutil_scan(scope: IntruderScope) -> int:
    import psutil

    n = 0
    for p in psutil.process_iter():
        try:
            threads = p.threads()
        except psutil.Error:
            continue
        for t in threads:
            try:
                if set(psutil.Process(t.id).cpu_affinity()) & scope.dedicated:
                    n += 1
            except psutil.Error:
                pass
    return n


# the named peer: one process that reads every task's allowed CPUs from /proc
PEER = ["sh", "-c", "grep -s Cpus_allowed_list /proc/[0-9]*/task/[0-9]*/status"]
PEER_NAME = "grep Cpus_allowed_list /proc/*/task/*/status"


def peer() -> None:
    subprocess.run(PEER, stdout=subprocess.DEVNULL, check=False)  # 2: a task went away


def taskset_all() -> None:
    """``taskset -ap <pid>`` for every process (what an operator's script would run)."""
    for pid in intr.list_pids():
        subprocess.run(["taskset", "-ap", str(pid)], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, check=False)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime


def dump(d: Any) -> dict[str, Any]:
    """The agent's SIGUSR1 debug dump (written atomically)."""
    import json
    import signal

    path = d.dir / "run" / "hostagent-dump.json"
    path.unlink(missing_ok=True)
    d.signal(signal.SIGUSR1)
    deadline = time.monotonic() + 30
    while not path.exists():
        assert time.monotonic() < deadline, "no debug dump"
        time.sleep(0.02)
    doc: dict[str, Any] = json.loads(path.read_text())
    return doc


def idle_cpu(uri: str, period: float, seconds: float,
             cpus: list[int]) -> tuple[float, int, int]:
    """% of one CPU a real ``hostagent run`` uses over ``seconds`` after it is ready, the
    thread checks it ran and the snapshots it published meanwhile (the dumps' own CPU is
    outside the window)."""
    from daemon_helpers import DaemonProc, config_text

    d = DaemonProc(start=False)
    try:
        d.sysfs = Path("/sys")
        text = config_text(d.dir, d.sysfs, uri, dedicated=str(cpus[-1]), heartbeat=1.0,
                           hugepage_poll=5.0, libvirt=f"thread_check_seconds = {period}\n")
        d.config.write_text(text.replace('log_level = "debug"', 'log_level = "info"'))
        d.start()
        d.wait_notify("READY=1", timeout=120)
        time.sleep(2)  # past the start-up work
        assert d.proc is not None
        first = dump(d)
        before = cpu_seconds(d.proc.pid)
        t = time.monotonic()
        time.sleep(seconds)
        used = cpu_seconds(d.proc.pid) - before
        took = time.monotonic() - t
        last = dump(d)
        checks = (last["libvirt"]["counters"].get("thread_checks", 0)
                  - first["libvirt"]["counters"].get("thread_checks", 0))
        return 100 * used / took, checks, last["seq"] - first["seq"]
    finally:
        d.stop()
        d.close()


def peer_cpu_per_run(repeat: int) -> float:
    """CPU seconds (user + system) of one ``ps -eLo ...`` run, as its children times."""
    before = os.times()
    for _ in range(repeat):
        peer()
    after = os.times()
    return ((after.children_user - before.children_user)
            + (after.children_system - before.children_system)) / repeat


def row(name: str, runs: tuple[list[float], list[float]], *, children: bool = False) -> str:
    """One table row: wall median, p95, min; the CPU median (for a command run through
    ``subprocess``, this thread's CPU is not the command's: shown as ``–``)."""
    ms, cpu = runs
    q = statistics.quantiles(ms, n=20) if len(ms) > 1 else ms * 19
    cpu_text = "–" if children else f"{statistics.median(cpu):.1f}"
    return (f"| {name} | {statistics.median(ms):.1f} | {q[18]:.1f} | {min(ms):.1f} "
            f"| {cpu_text} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", type=int, default=2000)
    ap.add_argument("--guest-threads", type=int, default=50)
    ap.add_argument("--guests", choices=("auto", "real", "standin"), default="auto")
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--idle-seconds", type=float, default=30.0)
    args = ap.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    live = reachable()
    kind = "real" if args.guests == "real" or (args.guests == "auto" and live) else "standin"
    procs: list[subprocess.Popen[str]] = []
    with tempfile.TemporaryDirectory(prefix="hadrift-") as tmp:
        guests = Guests(kind, args.guest_threads, cpus, Path(tmp))
        try:
            spawn_tasks(args.tasks, procs)
            scope = IntruderScope(frozenset({cpus[-1]}), frozenset(), len(cpus), "all")
            hints: dict[str, int] = {}
            result = check_threads(guests.specs, hints, scope)
            gthreads = sum(len(g["threads"]) for g in result["guests"].values())
            print(f"{os.cpu_count()} CPUs, {task_count()} tasks, {len(guests.specs)} "
                  f"{kind} guests with {gthreads} QEMU threads, "
                  f"{result['intruders']['tasks']} host tasks on the dedicated CPU "
                  f"{cpus[-1]}, {args.repeat} runs\n")
            print("| one full check | median ms | p95 ms | min ms | CPU ms (median) |")
            print("|---|---|---|---|---|")
            print(row("hostagent check_threads (guests + intruders)",
                      timed(lambda: check_threads(guests.specs, hints, scope),
                            args.repeat)))
            print(row("  of which guests' threads and drift",
                      timed(lambda: check_guests(guests.specs, hints), args.repeat)))
            print(row("  of which the intruder scan",
                      timed(lambda: intr.scan_intruders(scope, hints.values()),
                            args.repeat)))
            print(row("the scan reading each task's status file",
                      timed(lambda: status_scan(scope), args.repeat)))
            print(row("psutil (process_iter, threads, cpu_affinity)",
                      timed(lambda: psutil_scan(scope), max(3, args.repeat // 5))))
            print(row(f"peer: {PEER_NAME} (one process)", timed(peer, args.repeat),
                      children=True))
            print(row("peer: taskset -ap PID for every process", timed(taskset_all, 3),
                      children=True))
            per_run = peer_cpu_per_run(max(3, args.repeat // 3))
            print(f"\nidle CPU over {args.idle_seconds:g} s of hostagent run (heartbeat 1 s, "
                  "hugepage poll 5 s), % of one CPU; checks and snapshots in the window "
                  "(on qemu:///system every guest event anywhere on the machine also "
                  "triggers a check):\n")
            print("| libvirt | thread check | idle CPU % | checks | snapshots published |")
            print("|---|---|---|---|---|")
            for uri in ([URI] if live else []) + ["test:///default"]:
                for period in (10.0, 1.0, 0.0):
                    what = f"every {period:g} s" if period else "off"
                    pct, checks, published = idle_cpu(uri, period, args.idle_seconds, cpus)
                    print(f"| {uri} | {what} | {pct:.2f} | {checks} | {published} |")
            print(f"| peer: {PEER_NAME} every 10 s ({per_run * 1000:.1f} ms CPU a run) "
                  f"| | {100 * per_run / 10:.2f} | | |")
        finally:
            for p in procs:
                p.kill()
                p.wait()
            guests.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
