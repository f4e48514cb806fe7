"""The demo: the agent on this machine's ``/sys`` with libvirt's ``test:///`` driver.

Two parts:

``demo_domains(topo, resources)`` / ``define_demo_guests(conn, topo, resources)``
    Guests built to fit *this* host's probed topology and resolved config: up to three
    *pinned* guests (1–2 vCPUs each on dedicated threads of one cell, emulator on the
    shared threads, memory bound to that cell, hugepage-backed when the cell's pool has
    free pages) and two *floating* guests confined to the shared threads (when there
    are any). On a 2-CPU, 1-node machine with ``dedicated_cpus = "1"`` that is one
    pinned guest and two floating guests on CPU 0.
    The daemon defines them (and starts the first of each kind) when
    ``[libvirt] demo_guests = true`` and the URI is ``test:///...``.

``python -m hostagent.agent.demo [--seconds N] [--hypervisor auto|real|test]`` (what
``scripts/demo`` runs)
    Writes a config in a temporary directory (ipc endpoints there, a test-driver node
    file, the isolated CPUs — or else half the online ones — dedicated), starts
    ``hostagent run`` and ``hostagent watch`` beside it, then starts and destroys demo
    guests about once a second so that snapshots keep arriving.

    Which hypervisor (said on the first line): with ``auto`` (the default) the real one,
    ``qemu:///system``, when it answers (``virsh``-free: one ``libvirt.open``) and the
    sysfs root is this machine's ``/sys`` (a real guest is pinned to real CPUs); else
    libvirt's ``test:///`` driver with the bundled demo guests, toggled through the
    agent's ``test-domain`` request op. On the real hypervisor the demo starts ONE small
    transient TCG guest of its own (``hostagent-demo-<hex>``: 64 MiB, 1–2 vCPUs pinned to
    the dedicated CPUs, emulator on the shared ones, no disk) and toggles it (destroy,
    create again); it destroys it on the way out, also on Ctrl-C or SIGTERM, and touches
    no other guest. It stops after ``--seconds`` (default 10) or on Ctrl-C, stops both
    processes and exits 0 (non-zero only if the agent failed).

    The demo waits on events, not on time: ``watch``'s output goes through the demo
    (``WatchOutput`` forwards each line to stdout as it comes), guests are changed only
    once ``watch`` has printed its first snapshot, and after each change the demo waits
    until ``watch`` has printed a newer snapshot (at most ``WATCH_SNAPSHOT_TIMEOUT``
    seconds) before the next one. ``--seconds`` counts from ``watch``'s first snapshot and
    at least one guest is changed, so a slow start (a loaded machine) shortens nothing.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid as _uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hostagent.cpulist import format_cpulist
from hostagent.model import HostTopology

MIB = 1024
AGENT_START_TIMEOUT = 20.0  # seconds for the agent to answer its first request
WATCH_SNAPSHOT_TIMEOUT = 30.0  # seconds for `watch` to print a (newer) snapshot
STEP_SECONDS = 1.0  # pace of the guest changes (--step-seconds)
REQUEST_TIMEOUT = 10.0  # seconds for the agent to answer a test-domain request


def _uuid_for(name: str) -> str:
    return str(_uuid.uuid5(_uuid.NAMESPACE_DNS, f"{name}.demo.hostagent"))


def _domain(name: str, vcpus: int, memory_kib: int, *, pins: list[int] | None = None,
            cpuset: str | None = None, emulator: str | None = None, node: int | None = None,
            page_kib: int | None = None) -> str:
    tune = ""
    if pins:
        tune = "".join(f"<vcpupin vcpu='{i}' cpuset='{c}'/>" for i, c in enumerate(pins))
        if emulator:
            tune += f"<emulatorpin cpuset='{emulator}'/>"
        tune = f"<cputune>{tune}</cputune>"
    numa = f"<numatune><memory mode='strict' nodeset='{node}'/></numatune>" \
        if node is not None else ""
    backing = (f"<memoryBacking><hugepages><page size='{page_kib}' unit='KiB'/></hugepages>"
               f"</memoryBacking>") if page_kib else ""
    cs = f" cpuset='{cpuset}'" if cpuset else ""
    return (f"<domain type='test'><name>{name}</name><uuid>{_uuid_for(name)}</uuid>"
            f"<memory unit='KiB'>{memory_kib}</memory>"
            f"<currentMemory unit='KiB'>{memory_kib}</currentMemory>{backing}"
            f"<vcpu placement='static'{cs}>{vcpus}</vcpu>{tune}{numa}"
            f"<os><type arch='x86_64'>hvm</type></os></domain>")


def demo_domains(topo: HostTopology, resources: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``[(name, xml)]``: pinned guests first, then floating ones (see module docstring)."""
    dedicated = set(resources.get("dedicated_cpus", []))
    shared = sorted(resources.get("shared_cpus", []))
    shared_text = format_cpulist(shared) if shared else None
    out: list[tuple[str, str]] = []
    for cell in topo.cells:
        threads = [c for c in cell.cpus if c in dedicated]
        mem = 512 * MIB if cell.memory_kib >= 4 * 512 * MIB else max(cell.memory_kib // 8, 64 * MIB)
        while threads and len([n for n, _ in out if n.startswith("demo-pinned")]) < 3:
            take, threads = threads[:2], threads[2:]
            page = None
            for pool in cell.hugepages:
                if pool.free * pool.size_kib >= mem and pool.size_kib <= mem:
                    page = pool.size_kib
                    break
            n = len(out) + 1
            out.append((f"demo-pinned-{n}", _domain(
                f"demo-pinned-{n}", len(take), mem, pins=take, emulator=shared_text,
                node=cell.id, page_kib=page)))
    total = sum(c.memory_kib for c in topo.cells)
    mem = 256 * MIB if total >= 16 * 256 * MIB else max(total // 32, 32 * MIB)
    # Floating guests are confined to the shared threads (as Nova does); on a host with a
    # single shared thread that is a one-thread shared set, which the tracker counts as
    # shared vCPUs there (not as a stray pin).
    if shared:
        for i in (1, 2):
            name = f"demo-floating-{i}"
            cpuset = shared_text if dedicated else None
            out.append((name, _domain(name, min(2, len(shared)), mem, cpuset=cpuset)))
    return out


def define_demo_guests(conn: Any, topo: HostTopology, resources: Mapping[str, Any]) -> list[str]:
    """Define every demo guest in ``conn`` and start the first pinned and the first
    floating one. Returns the names defined."""
    names = []
    started = set()
    for name, xml in demo_domains(topo, resources):
        dom = conn.defineXML(xml)
        kind = name.rsplit("-", 1)[0]
        if kind not in started:
            dom.create()
            started.add(kind)
        names.append(name)
    return names


# --- the scripted demo -----------------------------------------------------------------

REAL_URI = "qemu:///system"
REAL_GUEST_MEMORY_MIB = 64
REAL_GUEST_MAX_VCPUS = 2
QEMU_BINARY = "/usr/bin/qemu-system-x86_64"


def demo_cpus(topo: HostTopology) -> tuple[list[int], list[int]]:
    """(dedicated, shared) CPUs of the demo: the isolated CPUs (isolcpus) if the host has
    any, else the upper half of the online ones; shared: the other online CPUs."""
    isolated = [c.id for c in topo.cpus if c.online and c.isolated]
    online = [c.id for c in topo.cpus if c.online and not c.isolated]
    half = len(online) // 2
    dedicated = isolated or (online[len(online) - half:] if half else [])
    return dedicated, [c for c in online if c not in dedicated]


def demo_config(tmp: Path, topo: HostTopology, sysfs_root: str, seconds: float,
                uri: str | None = None) -> Path:
    """A config for the demo agent in ``tmp`` (returns its path): libvirt ``uri``, or
    (None) a test-driver node file in ``tmp`` with the demo guests."""
    dedicated, _ = demo_cpus(topo)
    node = tmp / "node.xml"
    node.write_text("<node><cpu><mhz>2400</mhz><model>x86_64</model></cpu>"
                    "<memory>8388608</memory></node>\n")
    demo_guests = "true" if uri is None else "false"
    uri = uri or f"test://{node}"
    res = f'dedicated_cpus = "{format_cpulist(dedicated)}"\n' if dedicated else ""
    cfg = tmp / "hostagent.toml"
    cfg.write_text(f"""# written by hostagent.agent.demo
[probe]
sysfs_root = "{sysfs_root}"
resctrl_root = "{sysfs_root.rstrip('/')}/fs/resctrl"
hugepage_poll_seconds = 2.0
udev = false

[libvirt]
uri = "{uri}"
demo_guests = {demo_guests}

[resources]
{res}
[publisher]
endpoints = ["ipc://{tmp}/stream"]
request_endpoints = ["ipc://{tmp}/request"]
coalesce_ms = 50.0
heartbeat_seconds = 1.0

[agent]
runtime_dir = "{tmp}/run"
log_level = "info"
""")
    return cfg


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "hostagent.cli", *args]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hostagent.agent.demo", description=(
        "Run the agent on this machine's /sys with libvirt's test:/// driver and demo "
        "guests, and `hostagent watch` beside it."))
    parser.add_argument("--seconds", type=float, default=10.0,
                        help="how long to run (default 10)")
    parser.add_argument("--sysfs-root", default="/sys", help="sysfs tree (default /sys)")
    parser.add_argument("--json", action="store_true", help="watch --json")
    parser.add_argument("--step-seconds", type=float, default=STEP_SECONDS,
                        help=f"at most one guest change this often (default {STEP_SECONDS:g})")
    parser.add_argument("--hypervisor", choices=("auto", "real", "test"), default="auto",
                        help=f"auto (default): {REAL_URI} when it answers and the sysfs "
                        "root is /sys, else libvirt's test:/// driver")
    args = parser.parse_args(argv)

    from hostagent.errors import HostagentError
    from hostagent.probe.host import probe_host
    from hostagent.subscriber import request

    try:
        root = args.sysfs_root
        topo = probe_host(root, os.path.join(root, "fs", "resctrl"))
    except HostagentError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 2
    why_not = real_unavailable(root) if args.hypervisor != "test" else "--hypervisor test"
    if args.hypervisor == "real" and why_not is not None:
        print(f"demo: --hypervisor real: {why_not}", file=sys.stderr)
        return 2
    real = why_not is None
    with tempfile.TemporaryDirectory(prefix="hostagent-demo-") as d:
        tmp = Path(d)
        cfg = demo_config(tmp, topo, root, args.seconds, REAL_URI if real else None)
        log = tmp / "agent.log"
        print(f"demo: {len(topo.cpus)} CPUs, {len(topo.cells)} NUMA cell(s) probed from "
              f"{root}; agent config {cfg}", flush=True)
        if real:
            print(f"demo: using the real hypervisor {REAL_URI} (libvirtd answers): one "
                  "small TCG guest of its own, destroyed on exit", flush=True)
        else:
            print(f"demo: using libvirt's test:/// driver ({REAL_URI} not used: {why_not})",
                  flush=True)
        with open(log, "w") as logfh:
            agent = subprocess.Popen(_cli("run", "--config", str(cfg)), stderr=logfh,
                                     stdout=logfh, start_new_session=True)
        stream, req_ep = f"ipc://{tmp}/stream", f"ipc://{tmp}/request"
        watch = None
        watch_out: WatchOutput | None = None
        guests: Any = None
        rc = 0
        old_int = signal.signal(signal.SIGINT, signal.default_int_handler)
        old_term = signal.signal(signal.SIGTERM, _interrupt)
        try:
            guests = _guests(real, req_ep, agent, request, topo)
            watch = subprocess.Popen(
                _cli("watch", f"{stream},{req_ep}", *(["--json"] if args.json else [])),
                stdout=subprocess.PIPE, start_new_session=True)
            watch_out = WatchOutput(watch, sys.stdout, json_lines=args.json)
            _drive(guests, args.seconds, agent, watch_out, args.step_seconds)
        except KeyboardInterrupt:
            print("\ndemo: interrupted", flush=True)
        except HostagentError as exc:
            print(f"demo: {exc}", file=sys.stderr)
            rc = 1
        finally:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # the clean-up is not cut short
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            if isinstance(guests, RealGuest):
                gone = guests.close()
                print(f"demo: guest {guests.name} {gone}", flush=True)
            signal.signal(signal.SIGINT, old_int)
            signal.signal(signal.SIGTERM, old_term)
            _stop(watch, agent)
            if watch_out is not None:
                watch_out.close()
            if agent.returncode not in (0, None):
                rc = rc or 1
                print(f"demo: the agent exited with {agent.returncode}; its log:",
                      file=sys.stderr)
            if rc:
                sys.stderr.write(log.read_text())
        print(f"demo: done (agent exit {agent.returncode})", flush=True)
        return rc


class WatchOutput:
    """Forwards the stdout of ``hostagent watch`` to ``out`` line by line (from a thread)
    and remembers the ``seq`` of the last snapshot line, so that the demo can wait until
    ``watch`` has shown a snapshot (``wait_for_seq_above``). While the demo holds
    ``held()`` no line is forwarded: its own line about a change comes before the
    snapshots that show it."""

    def __init__(self, proc: subprocess.Popen[bytes], out: Any, *, json_lines: bool) -> None:
        self._proc = proc
        self._out = out
        self._json = json_lines
        self._changed = threading.Condition()
        self.last_seq: int | None = None
        self.ended = False
        self._thread = threading.Thread(target=self._forward, name="watch-output", daemon=True)
        self._thread.start()

    def _seq_of(self, line: str) -> int | None:
        """The snapshot seq a line of ``watch`` shows (``None``: not a snapshot line)."""
        if self._json:
            import json

            try:
                seq = json.loads(line).get("seq")
            except (ValueError, AttributeError):
                return None
            return seq if isinstance(seq, int) else None
        # "HOST seq N  ..." (not "HOST seq N: skipped, ...", nor "HOST: agent restarted")
        words = line.split(maxsplit=3)
        if len(words) == 4 and words[1] == "seq" and words[2].isdigit():
            return int(words[2])
        return None

    def _forward(self) -> None:
        assert self._proc.stdout is not None
        try:
            for raw in self._proc.stdout:
                line = raw.decode(errors="replace")
                seq = self._seq_of(line)
                with self._changed:
                    self._out.write(line)
                    self._out.flush()
                    if seq is not None:
                        self.last_seq = seq
                        self._changed.notify_all()
        finally:
            with self._changed:
                self.ended = True
                self._changed.notify_all()

    def wait_for_seq_above(self, seq: int | None, timeout: float) -> bool:
        """Wait until ``watch`` has printed a snapshot newer than ``seq`` (any snapshot
        when ``seq`` is None); False if it has not within ``timeout`` s or has exited."""
        def shown() -> bool:
            return self.last_seq is not None and (seq is None or self.last_seq > seq)

        with self._changed:
            self._changed.wait_for(lambda: shown() or self.ended, timeout)
            return shown()

    def held(self) -> threading.Condition:
        """A context manager: no line is forwarded while inside it."""
        return self._changed

    def close(self) -> None:
        """Wait for the last lines of an exited ``watch`` to be forwarded."""
        self._thread.join(10)


def _guests(real: bool, req_ep: str, agent: subprocess.Popen[bytes], request: Any,
            topo: HostTopology) -> RealGuest | TestDriverGuests:
    """Once the agent is up: the guests the demo toggles (says which)."""
    if real:
        _wait_up(req_ep, agent, request)
        guest = RealGuest(REAL_URI, topo)
        print(f"demo: agent is up; guest {guest.name} ({guest.describe()}) will be "
              "started and destroyed in turn", flush=True)
        return guest
    names = _wait_ready(req_ep, agent, request)
    print("demo: agent is up; guests: " + ", ".join(
        f"{n['name']}{'*' if n['active'] else ''}" for n in names) + "   (* running)",
        flush=True)
    return TestDriverGuests(req_ep, [n["name"] for n in names], request)


def _stop(*procs: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM each process still running, then wait (10 s each, then SIGKILL)."""
    for p in procs:
        if p is not None and p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        if p is not None:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _interrupt(signum: int, frame: Any) -> None:
    """SIGTERM: stop as Ctrl-C does (the guest is destroyed on the way out)."""
    raise KeyboardInterrupt


def real_unavailable(sysfs_root: str) -> str | None:
    """Why the demo cannot use the real hypervisor here, or None when it can."""
    if os.path.realpath(sysfs_root) != "/sys":
        return f"--sysfs-root {sysfs_root} is not this machine's /sys"
    if not os.path.exists(QEMU_BINARY):
        return f"{QEMU_BINARY} is not installed (scripts/setup-libvirtd)"
    try:
        import libvirt
    except ImportError:
        return "libvirt-python is not installed"
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    try:
        conn = libvirt.open(REAL_URI)
    except libvirt.libvirtError as exc:
        return f"libvirtd does not answer ({exc.get_error_message()}; scripts/setup-libvirtd)"
    conn.close()
    return None


def real_guest_xml(name: str, uuid: str, pins: list[int], emulator: list[int]) -> str:
    """A transient TCG guest: 64 MiB, ``len(pins)`` vCPUs pinned one each, no disk."""
    tune = "".join(f"<vcpupin vcpu='{i}' cpuset='{c}'/>" for i, c in enumerate(pins))
    tune += f"<emulatorpin cpuset='{format_cpulist(emulator)}'/>"
    return (f"<domain type='qemu'><name>{name}</name><uuid>{uuid}</uuid>"
            f"<memory unit='MiB'>{REAL_GUEST_MEMORY_MIB}</memory>"
            f"<vcpu placement='static'>{len(pins)}</vcpu><cputune>{tune}</cputune>"
            "<os><type arch='x86_64' machine='pc'>hvm</type></os>"
            "<on_poweroff>destroy</on_poweroff><devices>"
            f"<emulator>{QEMU_BINARY}</emulator><video><model type='none'/></video>"
            "<memballoon model='none'/></devices></domain>")


class RealGuest:
    """The demo's one guest on the real hypervisor: started and destroyed in turn
    (transient: a destroyed guest is gone from libvirt; ``close()`` leaves none)."""

    def __init__(self, uri: str, topo: HostTopology) -> None:
        import libvirt

        dedicated, shared = demo_cpus(topo)
        online = [c.id for c in topo.cpus if c.online]
        pins = (dedicated or online)[:REAL_GUEST_MAX_VCPUS]
        self.pins, self.emulator = pins, shared or pins
        self.name = f"hostagent-demo-{_uuid.uuid4().hex[:8]}"
        self.xml = real_guest_xml(self.name, str(_uuid.uuid4()), pins, self.emulator)
        self.conn = libvirt.open(uri)
        self.dom: Any = None

    def describe(self) -> str:
        return (f"TCG, {REAL_GUEST_MEMORY_MIB} MiB, {len(self.pins)} vCPU(s) pinned to CPU "
                f"{format_cpulist(self.pins)}, emulator on {format_cpulist(self.emulator)}, "
                "no disk")

    def change(self, step: int) -> tuple[str, str | None]:
        """Start the guest if it is not running, else destroy it: (what, error)."""
        import libvirt

        try:
            if self.dom is not None and self.dom.isActive():
                self.dom.destroy()
                self.dom = None
                return f"stopping {self.name}", None
            self.dom = self.conn.createXML(self.xml, 0)
            return f"starting {self.name}", None
        except libvirt.libvirtError as exc:
            return f"changing {self.name}", exc.get_error_message()

    def close(self) -> str:
        """Destroy the guest if it runs; what became of it."""
        import libvirt

        try:
            try:
                dom = self.conn.lookupByName(self.name)
            except libvirt.libvirtError:
                return "not running (nothing to destroy)"
            dom.destroy()
            return "destroyed"
        except libvirt.libvirtError as exc:
            return f"could not be destroyed: {exc.get_error_message()}"
        finally:
            self.conn.close()


class TestDriverGuests:
    """The bundled demo guests of the test:/// driver, toggled through ``test-domain``."""

    def __init__(self, req_ep: str, names: list[str], request: Any) -> None:
        self.req_ep, self.names, self.request = req_ep, names, request

    def change(self, step: int) -> tuple[str, str | None]:
        name = self.names[step % len(self.names)]
        rep = self.request(self.req_ep, {"op": "test-domain", "action": "list"},
                           timeout=REQUEST_TIMEOUT)
        active = {d["name"]: d["active"] for d in rep.get("domains", [])}
        action = "destroy" if active.get(name) else "start"
        verb = "stopping" if action == "destroy" else "starting"
        rep = self.request(self.req_ep, {"op": "test-domain", "action": action, "name": name},
                           timeout=REQUEST_TIMEOUT)
        return f"{verb} {name}", None if rep.get("ok") else str(rep.get("error"))


def _wait_up(req_ep: str, agent: subprocess.Popen[bytes], request: Any) -> None:
    """Until the agent answers a snapshot request (bounded: ``AGENT_START_TIMEOUT``)."""
    from hostagent.errors import HostagentError

    deadline = time.monotonic() + AGENT_START_TIMEOUT
    while True:
        if agent.poll() is not None:
            raise HostagentError(f"the agent exited with {agent.returncode} while starting")
        try:
            if request(req_ep, {"op": "snapshot"}, timeout=0.5):
                return
        except HostagentError:
            pass
        if time.monotonic() > deadline:
            raise HostagentError(f"the agent did not come up within {AGENT_START_TIMEOUT:g} s")
        time.sleep(0.2)


def _wait_ready(req_ep: str, agent: subprocess.Popen[bytes], request: Any) -> list[dict]:
    from hostagent.errors import HostagentError

    deadline = time.monotonic() + AGENT_START_TIMEOUT
    while True:
        if agent.poll() is not None:
            raise HostagentError(f"the agent exited with {agent.returncode} while starting")
        try:
            rep = request(req_ep, {"op": "test-domain", "action": "list"}, timeout=0.5)
            if rep.get("ok") and rep["domains"]:
                return sorted(rep["domains"], key=lambda d: d["name"])
        except HostagentError:
            pass
        if time.monotonic() > deadline:
            raise HostagentError(f"the agent did not come up within {AGENT_START_TIMEOUT:g} s")
        time.sleep(0.2)


def _drive(guests: Any, seconds: float, agent: subprocess.Popen[bytes],
           watch_out: WatchOutput, step_seconds: float = STEP_SECONDS) -> None:
    """Once ``watch`` has shown its first snapshot, toggle demo guests about once a second
    until ``seconds`` have passed (at least one), each time waiting until ``watch`` has
    shown the change."""
    from hostagent.errors import HostagentError

    if not watch_out.wait_for_seq_above(None, WATCH_SNAPSHOT_TIMEOUT):
        raise HostagentError(f"watch showed no snapshot within {WATCH_SNAPSHOT_TIMEOUT:g} s")
    end = time.monotonic() + seconds
    step = 0
    while True:
        if agent.poll() is not None:
            raise HostagentError(f"the agent exited with {agent.returncode}")
        step_end = time.monotonic() + step_seconds
        with watch_out.held():
            shown = watch_out.last_seq
            what, error = guests.change(step)
            print(f"demo: {what}" + (f": {error}" if error else ""), flush=True)
        if error is None and not watch_out.wait_for_seq_above(shown, WATCH_SNAPSHOT_TIMEOUT):
            raise HostagentError(f"watch showed no new snapshot within "
                                 f"{WATCH_SNAPSHOT_TIMEOUT:g} s of {what}")
        step += 1
        if time.monotonic() >= end:
            return
        time.sleep(max(0.0, min(step_end, end) - time.monotonic()))


if __name__ == "__main__":
    sys.exit(main())
