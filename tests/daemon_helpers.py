"""Test helpers: run ``hostagent run`` as a real process on a fixture tree and test:///.

``DaemonProc(fixture)`` writes a config (fixture sysfs tree, a custom test-driver node file,
ipc endpoints in a short tmp dir, short heartbeat and coalescing), binds a fake
``NOTIFY_SOCKET`` (a real AF_UNIX datagram socket) and starts the daemon. ``notify()``
returns the next notify datagram; ``request()`` talks to the request endpoint;
``subscriber()`` opens a real SUB; ``stop()`` sends SIGTERM and returns the exit code.
The agent reads the committed fixture tree, or with ``copy_tree`` a tree of its own:
``copy_tree=("devices/...", ...)`` makes only those paths the test's (fixture_trees.copy_of),
``copy_tree=True`` copies the whole tree.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from fixture_trees import copy_of, need_fixture
from libvirt_helpers import domain_xml, probe_fixture, write_node

from hostagent.subscriber import Subscriber, request

ROOT = Path(__file__).resolve().parent.parent

# xeon-2s-cat: CPUs 0,1,12,13,24,25,36,37 are the housekeeping threads, the rest isolated
XEON_DEDICATED = "2-11,14-23,26-35,38-47"


def config_text(d: Path, sysfs: Path, uri: str, *, dedicated: str | None = XEON_DEDICATED,
                heartbeat: float = 0.2, hugepage_poll: float = 0.2, curve: str = "",
                extra: str = "", libvirt: str = "", resources: str = "") -> str:
    """A config for a test agent; ``libvirt`` and ``resources`` are extra lines for those
    tables, ``extra`` is appended (further tables)."""
    res = (f'dedicated_cpus = "{dedicated}"\n' if dedicated else "") + resources
    return f"""[host]
name = "testhost"

[probe]
sysfs_root = "{sysfs}"
resctrl_root = "{sysfs}/fs/resctrl"
hugepage_poll_seconds = {hugepage_poll}
udev = false

[libvirt]
uri = "{uri}"
resync_seconds = 60.0
{libvirt}
[resources]
{res}
[publisher]
endpoints = ["ipc://{d}/s"]
request_endpoints = ["ipc://{d}/r"]
coalesce_ms = 5.0
heartbeat_seconds = {heartbeat}
max_message_bytes = 262144

[agent]
runtime_dir = "{d}/run"
log_level = "debug"
{curve}{extra}"""


class DaemonProc:
    def __init__(self, fixture: str = "xeon-2s-cat", *,
                 copy_tree: bool | Sequence[str] = False, env: dict[str, str] | None = None,
                 start: bool = True, **cfg: Any) -> None:
        src = need_fixture(fixture)
        self.dir = Path(tempfile.mkdtemp(prefix="ha-"))  # short: ipc paths are limited
        if copy_tree is True:
            self.sysfs = copy_of(fixture, self.dir)
        elif copy_tree:
            self.sysfs = copy_of(fixture, self.dir, *copy_tree)
        else:
            self.sysfs = src
        self.topo = probe_fixture(fixture)
        self.uri = write_node(self.dir, self.topo)
        self.config = self.dir / "hostagent.toml"
        self.config.write_text(config_text(self.dir, self.sysfs, self.uri, **cfg))
        self.stream = f"ipc://{self.dir}/s"
        self.req = f"ipc://{self.dir}/r"
        self.log = self.dir / "agent.log"
        self.notify_path = str(self.dir / "notify")
        self.notify_sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify_sock.bind(self.notify_path)
        self.env = {**os.environ, "NOTIFY_SOCKET": self.notify_path, **(env or {})}
        self.env.pop("JOURNAL_STREAM", None)
        self.proc: subprocess.Popen[bytes] | None = None
        if start:
            self.start()

    def start(self) -> None:
        with open(self.log, "ab") as fh:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "hostagent.cli", "run", "--config", str(self.config)],
                stdout=fh, stderr=fh, env=self.env, cwd=ROOT)

    def notify(self, timeout: float = 15.0) -> str:
        self.notify_sock.settimeout(timeout)
        try:
            return self.notify_sock.recv(4096).decode()
        except TimeoutError:
            raise AssertionError(f"no notify message; agent log:\n{self.log_text()}") from None

    def wait_notify(self, key: str, timeout: float = 15.0) -> str:
        """The next notify message containing ``key`` (e.g. ``READY=1``)."""
        deadline = time.monotonic() + timeout
        while True:
            msg = self.notify(max(0.1, deadline - time.monotonic()))
            if key in msg.split("\n"):
                return msg
            if time.monotonic() > deadline:
                raise AssertionError(f"no {key}; agent log:\n{self.log_text()}")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_log(self, needle: str, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log_text()
            if needle in text:
                return text
            time.sleep(0.02)
        raise AssertionError(f"{needle!r} not in the agent log:\n{self.log_text()}")

    def request(self, req: dict[str, Any], timeout: float = 5.0, **kw: Any) -> dict[str, Any]:
        return request(self.req, req, timeout=timeout, **kw)

    def subscriber(self, **kw: Any) -> Subscriber:
        return Subscriber([f"{self.stream},{self.req}"], **kw)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 15.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"agent did not stop; log:\n{self.log_text()}") from None

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.notify_sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def wait_for(sub: Subscriber, pred: Any, timeout: float = 10.0) -> dict[str, Any]:
    """Poll ``sub`` until the held snapshot of testhost satisfies ``pred``; return it."""
    deadline = time.monotonic() + timeout
    while True:
        snap = sub.latest("testhost")
        if snap is not None and pred(snap):
            return snap
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no matching snapshot; last seq "
                                 f"{None if snap is None else snap['seq']}")
        sub.poll(left)


def guest_names(snap: dict[str, Any]) -> list[str]:
    return sorted(g["name"] for g in snap["usage"]["guests"])


@contextlib.contextmanager
def running_agent(fixture: str = "xeon-2s-cat", *, ready_timeout: float = 15.0,
                  **kw: Any) -> Iterator[DaemonProc]:
    """A started agent, past READY=1; when the block ends normally, SIGTERM must stop it
    with exit code 0. Its directory is removed in every case."""
    d = DaemonProc(fixture, **kw)
    try:
        d.wait_notify("READY=1", timeout=ready_timeout)
        yield d
        assert d.stop() == 0, d.log_text()
    finally:
        d.close()


def start_web_guest(d: DaemonProc) -> None:
    """Create the pinned guest "web" (vCPUs on 2 and 26, emulator on 0-1, memory strict on
    cell 0) through the test-domain op and wait until a snapshot lists a guest."""
    xml = domain_xml("web", vcpus=2, vcpupin={0: "2", 1: "26"}, emulatorpin="0-1",
                     numa_memory=("strict", "0"))
    assert d.request({"op": "test-domain", "action": "create", "xml": xml})["ok"]
    with d.subscriber() as sub:
        while not (sub.latest("testhost") or {}).get("usage", {}).get("guests"):
            sub.poll(2)
