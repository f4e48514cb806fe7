"""Follow libvirt: domain events → re-read that guest; reconnect; periodic full resync.

``LibvirtWatcher`` lives on the daemon's asyncio loop. The event implementation is
``libvirtaio`` (registered once per process, before the first ``open``), so libvirt's
callbacks run on the loop thread. Every libvirt call of the watcher also runs on the
loop thread: libvirtaio's handle/timer updates are not thread-safe, and libvirt calls
them from whichever thread makes an API call. A domain read (``XMLDesc``) takes about a
millisecond.

Events (all hints — the domain is re-read, never patched from the event):
- LIFECYCLE (defined, started, stopped, suspended, resumed, undefined, ...),
- TUNABLE (``cputune.vcpupin*``, ``emulatorpin``, ...), DEVICE_ADDED, DEVICE_REMOVED,
  DEVICE_REMOVAL_FAILED.
Each marks the domain's uuid *pending* and calls ``on_change()``; the daemon coalesces
and then calls ``apply(tracker)``, which re-reads each pending domain once (an inactive
or vanished domain is removed from the tracker). Events arriving together therefore
cost one read per domain.

Connection loss — the close callback (remote drivers), or any libvirt error on a call,
or a failed ``isAlive()`` check every ``check_seconds`` (drivers without a close
callback, e.g. ``test:///``): the watcher drops the connection, calls ``on_change()``
(the snapshot says ``libvirt.connected: false`` and keeps the last known guests), and
reconnects with exponential backoff (0.5 s doubling up to ``reconnect_max_seconds``).
After every (re)connect all callbacks are registered again and the next ``apply`` is a
full resync (``read_guests``). A full resync also runs every ``resync_seconds``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

from hostagent.guests.source import read_guest, read_guests

log = logging.getLogger("hostagent.libvirt")

LIFECYCLE_NAMES = ("defined", "undefined", "started", "suspended", "resumed", "stopped",
                   "shutdown", "pmsuspended", "crashed")
_VIR_ERR_NO_DOMAIN = 42
_impl: Any = None


def ensure_event_impl(loop: asyncio.AbstractEventLoop) -> Any:
    """Register libvirtaio on ``loop`` (once per process; it cannot be changed later)."""
    global _impl
    import libvirtaio

    if _impl is None:
        _impl = libvirtaio.virEventRegisterAsyncIOImpl(loop=loop)
    elif _impl.loop is not loop:
        raise RuntimeError("libvirt's event loop is already bound to another asyncio loop")
    return _impl


def _open(uri: str) -> Any:
    """Read-write for ``test:///`` (demo and test guests are defined through it), read-only
    otherwise: the agent only reads domains."""
    import libvirt

    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    conn = libvirt.open(uri) if uri.startswith("test:///") else libvirt.openReadOnly(uri)
    if conn is None:
        raise RuntimeError(f"cannot connect to libvirt at {uri}")
    return conn


def _err_text(exc: BaseException) -> str:
    get = getattr(exc, "get_error_message", None)
    return str((get() if get else None) or exc).strip()


class LibvirtWatcher:
    """Owns the libvirt connection of the daemon. Use from the loop thread only."""

    def __init__(self, uri: str, on_change: Callable[[], None], *,
                 resync_seconds: float = 60.0, reconnect_max_seconds: float = 30.0,
                 check_seconds: float = 2.0, opener: Callable[[str], Any] = _open,
                 on_connect: Callable[[Any], None] | None = None) -> None:
        self.uri = uri
        self.on_change = on_change
        self.resync_seconds = resync_seconds
        self.reconnect_max = reconnect_max_seconds
        self.check_seconds = check_seconds
        self.opener = opener
        self.on_connect = on_connect
        self.conn: Any = None
        self.callback_ids: list[int] = []
        self.pending: set[str] = set()
        self.full_resync = True
        self.generation = 0  # successful connects
        self.connected_since: float | None = None
        self.last_error: str | None = None
        self.events: deque[dict[str, Any]] = deque(maxlen=32)
        self.counters: Counter[str] = Counter()
        self._tasks: list[asyncio.Task[Any]] = []
        self._reconnect: asyncio.Task[Any] | None = None
        self._closed = False

    # --- connection --------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self.conn is not None

    def start(self) -> None:
        """Connect now if possible (else in the background) and start the timers."""
        if not self.connect():
            self._schedule_reconnect()
        self._tasks = [asyncio.ensure_future(self._periodic_resync()),
                       asyncio.ensure_future(self._periodic_check())]

    def connect(self) -> bool:
        try:
            conn = self.opener(self.uri)
        except Exception as exc:
            self._error(f"cannot connect to libvirt at {self.uri}: {_err_text(exc)}")
            return False
        self.conn = conn
        try:
            self._register(conn)
        except Exception as exc:
            self._error(f"cannot register libvirt callbacks: {_err_text(exc)}")
            self._drop()
            return False
        self.generation += 1
        self.connected_since = time.time()
        self.full_resync = True
        self.counters["connects"] += 1
        log.info("connected to libvirt at %s (connection %d)", self.uri, self.generation)
        if self.on_connect is not None:
            try:
                self.on_connect(conn)
            except Exception as exc:
                self._error(f"on-connect step failed: {_err_text(exc)}")
        self.on_change()
        return True

    def _register(self, conn: Any) -> None:
        import libvirt

        self.callback_ids = []
        for ev, cb in ((libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self.on_lifecycle),
                       (libvirt.VIR_DOMAIN_EVENT_ID_TUNABLE, self.on_tunable),
                       (libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_ADDED, self.on_device_added),
                       (libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED, self.on_device_removed),
                       (libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVAL_FAILED,
                        self.on_device_removed)):
            self.callback_ids.append(conn.domainEventRegisterAny(None, ev, cb, None))
        try:
            conn.registerCloseCallback(self.on_close, None)
        except libvirt.libvirtError:
            pass  # drivers without a persistent connection (test:///): isAlive checks
        try:
            conn.setKeepAlive(5, 3)
        except libvirt.libvirtError:
            pass  # not supported by in-process drivers

    def _drop(self) -> None:
        conn, self.conn = self.conn, None
        self.connected_since = None
        if conn is None:
            return
        for cid in self.callback_ids:
            try:
                conn.domainEventDeregisterAny(cid)
            except Exception:
                pass  # a dead connection cannot deregister; it is dropped anyway
        self.callback_ids = []
        try:
            conn.unregisterCloseCallback()
        except Exception:
            pass
        try:
            conn.close()
        except Exception:
            pass

    def lost(self, why: str) -> None:
        """The connection is unusable: drop it, report, reconnect in the background."""
        if self.conn is None:
            return
        self.counters["disconnects"] += 1
        self._error(f"libvirt connection lost: {why}")
        self._drop()
        self.on_change()
        self._schedule_reconnect()

    def _schedule_reconnect(self) -> None:
        if self._closed or (self._reconnect is not None and not self._reconnect.done()):
            return
        self._reconnect = asyncio.ensure_future(self._reconnect_loop())

    async def _reconnect_loop(self) -> None:
        delay = 0.5
        while not self._closed and self.conn is None:
            await asyncio.sleep(delay)
            if self.connect():
                return
            delay = min(delay * 2, self.reconnect_max)

    def on_close(self, conn: Any, reason: int, opaque: Any) -> None:
        """libvirt's close callback (remote drivers): reconnect from the loop."""
        names = {0: "error", 1: "end of file", 2: "keepalive timeout", 3: "closed by client"}
        try:
            asyncio.get_running_loop().call_soon(self.lost, f"closed ({names.get(reason, reason)})")
        except Exception:
            log.exception("close callback failed")

    async def _periodic_check(self) -> None:
        while True:
            await asyncio.sleep(self.check_seconds)
            self.check()

    def check(self) -> None:
        """``isAlive()`` on the connection; a failure starts a reconnect."""
        if self.conn is None:
            return
        try:
            alive = self.conn.isAlive()
        except Exception as exc:
            self.lost(_err_text(exc))
            return
        if not alive:
            self.lost("isAlive() is false")

    async def _periodic_resync(self) -> None:
        while True:
            await asyncio.sleep(self.resync_seconds)
            self.request_resync()

    def request_resync(self) -> None:
        self.full_resync = True
        self.counters["resyncs_requested"] += 1
        self.on_change()

    # --- events ------------------------------------------------------------------------

    def _note(self, dom: Any, kind: str, detail: Any = None) -> None:
        try:
            uuid = dom.UUIDString().lower()
            name = dom.name()
        except Exception as exc:
            log.warning("%s event for an unreadable domain: %s", kind, _err_text(exc))
            self.full_resync = True
            self.on_change()
            return
        self.counters[f"event_{kind.split(':')[0]}"] += 1
        self.events.append({"time": time.time(), "domain": name, "uuid": uuid,
                            "event": kind, "detail": detail})
        self.pending.add(uuid)
        self.on_change()

    def on_lifecycle(self, conn: Any, dom: Any, event: int, detail: int, opaque: Any) -> None:
        try:
            name = LIFECYCLE_NAMES[event] if 0 <= event < len(LIFECYCLE_NAMES) else str(event)
            self._note(dom, f"lifecycle:{name}", detail)
        except Exception:
            log.exception("lifecycle callback failed")

    def on_tunable(self, conn: Any, dom: Any, params: dict[str, Any], opaque: Any) -> None:
        try:
            keys = sorted(params) if isinstance(params, dict) else []
            if keys and not any(k.startswith("cputune.") for k in keys):
                self.counters["event_tunable_ignored"] += 1
                return  # blkdeviotune.* and the like: nothing the tracker reads
            self._note(dom, "tunable", keys)
        except Exception:
            log.exception("tunable callback failed")

    def on_device_added(self, conn: Any, dom: Any, alias: str, opaque: Any) -> None:
        try:
            self._note(dom, "device-added", alias)
        except Exception:
            log.exception("device callback failed")

    def on_device_removed(self, conn: Any, dom: Any, alias: str, opaque: Any) -> None:
        try:
            self._note(dom, "device-removed", alias)
        except Exception:
            log.exception("device callback failed")

    # --- reading -----------------------------------------------------------------------

    def apply(self, tracker: Any) -> bool:
        """Bring ``tracker`` up to date: full resync if one is due, else re-read each
        pending domain. Returns whether anything was read. Connection errors start a
        reconnect; guests already in the tracker stay as they were."""
        if self.conn is None:
            return False
        import libvirt

        if self.full_resync:
            try:
                records = read_guests(self.conn)
            except Exception as exc:
                self.lost(_err_text(exc))
                return False
            tracker.replace_all(records)
            self.full_resync = False
            self.pending.clear()
            self.counters["full_resyncs"] += 1
            return True
        if not self.pending:
            return False
        pending, self.pending = self.pending, set()
        for uuid in sorted(pending):
            try:
                dom = self.conn.lookupByUUIDString(uuid)
                rec = read_guest(dom)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == _VIR_ERR_NO_DOMAIN:
                    tracker.remove(uuid)  # undefined (transient domains vanish when stopped)
                    continue
                self.pending |= pending
                self.lost(_err_text(exc))
                return False
            except Exception as exc:
                self.pending |= pending
                self.lost(_err_text(exc))
                return False
            if rec.active:
                tracker.update(rec)
            else:
                tracker.remove(uuid)
            self.counters["domain_reads"] += 1
        return True

    # --- state -------------------------------------------------------------------------

    def _error(self, text: str) -> None:
        self.last_error = text
        self.counters["errors"] += 1
        log.warning("%s", text)

    def state(self) -> dict[str, Any]:
        return {"uri": self.uri, "connected": self.connected,
                "connected_since": self.connected_since, "connections": self.generation,
                "pending": sorted(self.pending), "full_resync_due": self.full_resync,
                "last_error": self.last_error, "counters": dict(self.counters),
                "last_events": list(self.events)}

    async def close(self) -> None:
        self._closed = True
        tasks = [*self._tasks, *([self._reconnect] if self._reconnect else [])]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._drop()
