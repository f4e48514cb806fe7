"""``scripts/demo`` (``python -m hostagent.agent.demo``) on the real hypervisor: one small TCG
guest of its own on ``qemu:///system``, pinned to this machine's CPUs, toggled while
``hostagent watch`` shows the snapshots, and destroyed on the way out — when the time is
up and on Ctrl-C. The ``test:///`` path is tests/test_daemon_cli.py::test_demo_runs_and_exits_0
(which also checks the demo says why it did not use the real hypervisor).

The real-hypervisor tests need libvirtd: they fail when ``CI=true`` and are skipped with the
reason elsewhere (tests/test_real_libvirt.py). Each runs a whole demo (agent, watch, one
guest booted at least once: ~5-10 s here).
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from real_libvirt import require_libvirtd

# the machine's one real libvirtd: these tests run in the real-libvirt group, one after
# another and never beside a test that restarts libvirtd (tests/conftest.py)
pytestmark = pytest.mark.real_libvirtd

ROOT = Path(__file__).resolve().parent.parent
URI = "qemu:///system"
WAIT_SECONDS = 90.0  # for a line of the demo; generous for a loaded machine
DEMO = [sys.executable, "-m", "hostagent.agent.demo"]


def _guest_exists(name: str) -> bool:
    import libvirt

    conn = libvirt.open(URI)
    try:
        conn.lookupByName(name)
        return True
    except libvirt.libvirtError:
        return False
    finally:
        conn.close()


def _guest_name(out: str) -> str:
    m = re.search(r"^demo: agent is up; guest (hostagent-demo-[0-9a-f]{8}) \(TCG, 64 MiB, "
                  r"[12] vCPU\(s\) pinned to CPU [0-9,-]+, emulator on [0-9,-]+, no disk\)",
                  out, re.M)
    assert m, out
    return m.group(1)


def test_real_demo_runs_its_own_guest_and_leaves_none_behind():
    """A whole demo (agent, watch, its guest booted and destroyed: ~3-6 s here): the
    behaviour is the end of a real demo."""
    require_libvirtd()
    r = subprocess.run([*DEMO, "--seconds", "1", "--hypervisor", "real"], capture_output=True,
                       text=True, timeout=240, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert ("demo: using the real hypervisor qemu:///system (libvirtd answers): one small "
            "TCG guest of its own, destroyed on exit") in r.stdout
    name = _guest_name(r.stdout)
    lines = r.stdout.splitlines()
    assert f"demo: starting {name}" in lines
    started = lines.index(f"demo: starting {name}")
    assert any(re.match(r"\S+ seq \d+  ", ln) for ln in lines[started + 1:]), r.stdout
    assert "demo: done (agent exit 0)" in lines
    assert not _guest_exists(name)


def test_real_demo_destroys_its_guest_on_ctrl_c():
    """A whole demo up to its first running guest, then Ctrl-C (~2-6 s here)."""
    require_libvirtd()
    # one change only (the next one would come after 600 s): Ctrl-C while the guest runs
    proc = subprocess.Popen([*DEMO, "--seconds", "600", "--step-seconds", "600",
                             "--hypervisor", "real"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(ln) for ln in proc.stdout],
                              daemon=True)
    reader.start()
    seen: list[str] = []

    def until(pattern: str) -> str:
        deadline = time.monotonic() + WAIT_SECONDS
        while True:
            try:
                ln = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no line matching {pattern!r}: {''.join(seen)}") from None
            seen.append(ln)
            if re.search(pattern, ln):
                return ln
            assert time.monotonic() < deadline, "".join(seen)

    try:
        until(r"^demo: starting hostagent-demo-")
        until(r"^\S+ seq \d+  ")  # watch shows the running guest
        name = _guest_name("".join(seen))
        assert _guest_exists(name)
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        assert proc.wait(timeout=WAIT_SECONDS) == 0, "".join(seen)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(10)
    while not lines.empty():
        seen.append(lines.get())
    out = "".join(seen)
    assert "demo: interrupted" in out and f"demo: guest {name} destroyed" in out, out
    assert "demo: done (agent exit 0)" in out
    assert not _guest_exists(name)


def test_real_demo_needs_this_machines_sysfs():
    r = subprocess.run([*DEMO, "--hypervisor", "real", "--sysfs-root",
                        str(ROOT / "fixtures/sysfs/xeon-2s-cat/sys")], capture_output=True,
                       text=True, timeout=120, cwd=ROOT, env={**os.environ})
    assert r.returncode == 2
    assert r.stderr == (f"demo: --hypervisor real: --sysfs-root "
                        f"{ROOT / 'fixtures/sysfs/xeon-2s-cat/sys'} is not this machine's "
                        "/sys\n")
