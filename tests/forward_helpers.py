"""Test helper: a ``hostagent forward`` process (``ForwardProc``) on ipc endpoints."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hostagent.forward import DUMP_NAME

ROOT = Path(__file__).resolve().parent.parent


class ForwardProc:
    """A ``hostagent forward`` process on ipc endpoints in a short tmp dir."""

    def __init__(self, upstream: list[str], *, extra: str = "", curve: str = "") -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="hf-"))
        self.stream = f"ipc://{self.dir}/fwd"
        self.config = self.dir / "forward.toml"
        self.config.write_text(
            "[forward]\n"
            f"endpoints = [\"{self.stream}\"]\n"
            f"upstream = {json.dumps(upstream)}\n"
            f"runtime_dir = \"{self.dir}/run\"\nlog_level = \"debug\"\n{extra}\n{curve}")
        self.log = self.dir / "forward.log"
        self.notify_path = str(self.dir / "notify")
        self.notify_sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify_sock.bind(self.notify_path)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {**os.environ, "NOTIFY_SOCKET": self.notify_path}
        with open(self.log, "ab") as fh:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "hostagent.cli", "forward", "--config",
                 str(self.config)], stdout=fh, stderr=fh, env=env, cwd=ROOT)
        self.notify_sock.settimeout(15)
        try:
            msg = self.notify_sock.recv(4096).decode()
        except TimeoutError:
            raise AssertionError(f"forwarder not ready:\n{self.log_text()}") from None
        assert "READY=1" in msg.split("\n"), msg

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(15)

    def dump(self) -> dict:
        path = self.dir / "run" / DUMP_NAME
        before = path.stat().st_mtime_ns if path.exists() else None
        assert self.proc is not None
        self.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if path.exists() and path.stat().st_mtime_ns != before:
                return json.loads(path.read_text())
            time.sleep(0.02)
        raise AssertionError(f"no dump:\n{self.log_text()}")

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.notify_sock.close()
