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

``python -m hostagent.agent.demo [--seconds N]`` (what ``scripts/demo`` runs)
    Writes a config in a temporary directory (ipc endpoints there, a test-driver node
    file, the isolated CPUs — or else half the online ones — dedicated), starts
    ``hostagent run`` and ``hostagent watch`` beside it, then starts and destroys demo
    guests through the agent's ``test-domain`` request op about once a second so that
    snapshots keep arriving. It stops after ``--seconds`` (default 10) or on Ctrl-C, stops both
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
STEP_SECONDS = 1.0  # pace of the guest changes
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

def demo_config(tmp: Path, topo: HostTopology, sysfs_root: str, seconds: float) -> Path:
    """A config for the demo agent in ``tmp`` (returns its path)."""
    # dedicated: the isolated CPUs (isolcpus) if the host has any, else the upper half
    isolated = [c.id for c in topo.cpus if c.online and c.isolated]
    online = [c.id for c in topo.cpus if c.online and not c.isolated]
    half = len(online) // 2
    dedicated = isolated or (online[len(online) - half:] if half else [])
    node = tmp / "node.xml"
    node.write_text("<node><cpu><mhz>2400</mhz><model>x86_64</model></cpu>"
                    "<memory>8388608</memory></node>\n")
    res = f'dedicated_cpus = "{format_cpulist(dedicated)}"\n' if dedicated else ""
    cfg = tmp / "hostagent.toml"
    cfg.write_text(f"""# written by hostagent.agent.demo
[probe]
sysfs_root = "{sysfs_root}"
resctrl_root = "{sysfs_root.rstrip('/')}/fs/resctrl"
hugepage_poll_seconds = 2.0
udev = false

[libvirt]
uri = "test://{node}"
demo_guests = true

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
    with tempfile.TemporaryDirectory(prefix="hostagent-demo-") as d:
        tmp = Path(d)
        cfg = demo_config(tmp, topo, root, args.seconds)
        log = tmp / "agent.log"
        print(f"demo: {len(topo.cpus)} CPUs, {len(topo.cells)} NUMA cell(s) probed from "
              f"{root}; agent config {cfg}", flush=True)
        with open(log, "w") as logfh:
            agent = subprocess.Popen(_cli("run", "--config", str(cfg)), stderr=logfh,
                                     stdout=logfh, start_new_session=True)
        stream, req_ep = f"ipc://{tmp}/stream", f"ipc://{tmp}/request"
        watch = None
        watch_out: WatchOutput | None = None
        rc = 0
        old_int = signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            names = _wait_ready(req_ep, agent, request)
            print("demo: agent is up; guests: " + ", ".join(
                f"{n['name']}{'*' if n['active'] else ''}" for n in names)
                + "   (* running)", flush=True)
            watch = subprocess.Popen(
                _cli("watch", f"{stream},{req_ep}", *(["--json"] if args.json else [])),
                stdout=subprocess.PIPE, start_new_session=True)
            watch_out = WatchOutput(watch, sys.stdout, json_lines=args.json)
            _drive(req_ep, [n["name"] for n in names], args.seconds, agent, request,
                   watch_out)
        except KeyboardInterrupt:
            print("\ndemo: interrupted", flush=True)
        except HostagentError as exc:
            print(f"demo: {exc}", file=sys.stderr)
            rc = 1
        finally:
            signal.signal(signal.SIGINT, old_int)
            for p in (watch, agent):
                if p is not None and p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            for p in (watch, agent):
                if p is not None:
                    try:
                        p.wait(10)
                    except subprocess.TimeoutExpired:
                        p.kill()
                        p.wait()
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


def _drive(req_ep: str, names: list[str], seconds: float, agent: subprocess.Popen[bytes],
           request: Any, watch_out: WatchOutput) -> None:
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
        step_end = time.monotonic() + STEP_SECONDS
        name = names[step % len(names)]
        rep = request(req_ep, {"op": "test-domain", "action": "list"}, timeout=REQUEST_TIMEOUT)
        active = {d["name"]: d["active"] for d in rep.get("domains", [])}
        action = "destroy" if active.get(name) else "start"
        verb = "stopping" if action == "destroy" else "starting"
        with watch_out.held():
            shown = watch_out.last_seq
            rep = request(req_ep, {"op": "test-domain", "action": action, "name": name},
                          timeout=REQUEST_TIMEOUT)
            print(f"demo: {verb} {name}" + ("" if rep.get("ok") else f": {rep.get('error')}"),
                  flush=True)
        if rep.get("ok") and not watch_out.wait_for_seq_above(shown, WATCH_SNAPSHOT_TIMEOUT):
            raise HostagentError(f"watch showed no new snapshot within "
                                 f"{WATCH_SNAPSHOT_TIMEOUT:g} s of {verb} {name}")
        step += 1
        if time.monotonic() >= end:
            return
        time.sleep(max(0.0, min(step_end, end) - time.monotonic()))


if __name__ == "__main__":
    sys.exit(main())
