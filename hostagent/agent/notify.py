"""The systemd notify protocol (sd_notify(3)) without dependencies.

One datagram of newline-separated ``KEY=VALUE`` lines to the AF_UNIX socket named by
``$NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract namespace). Without the
variable every call is a no-op that returns ``False``, so the daemon runs the same way
under systemd, in a terminal and in tests (which point ``NOTIFY_SOCKET`` at a socket
of their own). Send errors are logged once and never raised: a notify failure must not
stop the agent, and a receiver that does not read (its queue full) makes the send fail
instead of blocking the loop.

``watchdog_interval`` reads ``$WATCHDOG_USEC`` / ``$WATCHDOG_PID`` and returns how often
to send ``WATCHDOG=1`` (half the timeout, as sd_watchdog_enabled(3) recommends).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger("hostagent.notify")


class Notifier:
    """Sends notify messages to ``$NOTIFY_SOCKET`` (read once at construction)."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.address = _address(env.get("NOTIFY_SOCKET", ""))
        self.sent: list[str] = []  # last messages, for the debug dump
        self._warned = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, **fields: str | int) -> bool:
        """Send ``KEY=VALUE`` lines, e.g. ``send(READY=1, STATUS="publishing")``."""
        if self.address is None:
            return False
        text = "\n".join(f"{k}={_one_line(v)}" for k, v in fields.items())
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                               | socket.SOCK_NONBLOCK) as s:
                s.connect(self.address)
                s.send(text.encode())  # never blocks: a full receiver drops, not stalls
        except OSError as exc:
            if not self._warned:
                log.warning("cannot notify systemd at %r: %s", self.address, exc)
                self._warned = True
            return False
        self.sent = (self.sent + [text])[-8:]
        return True

    def ready(self, status: str) -> bool:
        return self.send(READY=1, STATUS=status)

    def status(self, status: str) -> bool:
        return self.send(STATUS=status)

    def reloading(self) -> bool:
        return self.send(RELOADING=1, STATUS="reloading configuration")

    def stopping(self) -> bool:
        return self.send(STOPPING=1, STATUS="stopping")

    def watchdog(self) -> bool:
        return self.send(WATCHDOG=1)


def _one_line(value: str | int) -> str:
    return str(value).replace("\n", " ")


def _address(raw: str) -> str | None:
    if not raw:
        return None
    if raw.startswith("@"):
        return "\0" + raw[1:]
    if raw.startswith("/"):
        return raw
    return None  # vsock: and others are not used by a host service


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half of ``$WATCHDOG_USEC``), or ``None``
    when the watchdog is off or meant for another process (``$WATCHDOG_PID``)."""
    env = os.environ if environ is None else environ
    usec = env.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    pid = env.get("WATCHDOG_PID", "")
    if pid and (not pid.isdigit() or int(pid) != os.getpid()):
        return None
    return int(usec) / 2e6
