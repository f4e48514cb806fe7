"""CPU, memory and NUMA node hotplug through udev, on the daemon's asyncio loop.

A pyudev ``Monitor`` (source ``udev``, filtered in the kernel to the ``cpu``, ``memory``
and ``node`` subsystems) is started non-blocking and put on the loop with
``loop.add_reader``; the reader drains every queued device. Devices whose action is
``add``, ``remove``, ``online``, ``offline`` or ``change`` are counted per
(subsystem, action) and reported to ``on_event(device)``; the daemon debounces them
into one re-probe (a memory hot-add emits one event per 128 MiB block). A monitor
error (a netlink buffer overrun in an event storm) is counted and reported as
``on_event(None)``: "something was lost, re-probe".

Hugepage pools and resctrl emit no uevents; the daemon polls those. Without udev
(a container, no libudev, ``probe.udev = false``) ``start`` logs why and the agent runs
on without hotplug events.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable
from typing import Any

log = logging.getLogger("hostagent.udev")

SUBSYSTEMS = ("cpu", "memory", "node")
ACTIONS = frozenset({"add", "remove", "online", "offline", "change"})


class UdevWatch:
    """Feeds hotplug devices to ``on_event``. ``monitor`` may be anything shaped like
    ``pyudev.Monitor`` (``fileno()``, ``poll(timeout)``, ``start()``, ``filter_by()``)."""

    def __init__(self, on_event: Callable[[Any], None], *, monitor: Any = None) -> None:
        self.on_event = on_event
        self.monitor = monitor
        self.counters: Counter[str] = Counter()
        self.last: list[dict[str, Any]] = []
        self.active = False
        self.reason: str | None = None
        self._fd: int | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> bool:
        try:
            if self.monitor is None:
                import pyudev

                self.monitor = pyudev.Monitor.from_netlink(pyudev.Context(), source="udev")
            for sub in SUBSYSTEMS:
                self.monitor.filter_by(sub)
            self.monitor.start()
            self._fd = self.monitor.fileno()
            loop.add_reader(self._fd, self.drain)
        except Exception as exc:  # ImportError, OSError from libudev/netlink
            self.reason = f"{type(exc).__name__}: {exc}"
            log.warning("udev hotplug events unavailable (%s); topology is re-read "
                        "only on SIGHUP", self.reason)
            return False
        self.active = True
        return True

    def drain(self) -> None:
        """Read every queued device (called by the loop when the fd is readable)."""
        while True:
            try:
                device = self.monitor.poll(0)
            except Exception as exc:  # EnvironmentError: events were lost
                self.counters["errors"] += 1
                log.warning("udev monitor error: %s; re-probing", exc)
                self.on_event(None)
                return
            if device is None:
                return
            self.handle(device)

    def handle(self, device: Any) -> None:
        action = getattr(device, "action", None)
        subsystem = getattr(device, "subsystem", None)
        if subsystem not in SUBSYSTEMS or action not in ACTIONS:
            self.counters["ignored"] += 1
            return
        self.counters[f"{subsystem}_{action}"] += 1
        self.last = (self.last + [{"action": action, "subsystem": subsystem,
                                   "sys_name": getattr(device, "sys_name", None),
                                   "seqnum": getattr(device, "sequence_number", None)}])[-16:]
        log.debug("udev %s %s %s", action, subsystem, getattr(device, "sys_name", "?"))
        self.on_event(device)

    def stop(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._fd is not None:
            loop.remove_reader(self._fd)
            self._fd = None
        self.active = False

    def state(self) -> dict[str, Any]:
        return {"active": self.active, "unavailable_reason": self.reason,
                "counters": dict(self.counters), "last_events": self.last}
