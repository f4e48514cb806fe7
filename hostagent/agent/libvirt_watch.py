"""Follow libvirt: domain events → re-read that guest; reconnect; periodic full resync.

Threads. ``LibvirtWatcher`` lives on the daemon's asyncio loop, but **no libvirt call runs
on the loop thread**: a libvirtd that hangs (SIGSTOPped, deadlocked, a socket that
accepts and never answers) would otherwise stall publishing, requests and signals.

- One *worker* thread per connection (``libvirt-conn-N``, a daemon thread) owns the
  connection: it opens it, registers the callbacks, sets keepalive and makes every call
  on it (reads, ``isAlive``, the ``test-domain`` op, the demo guests), one job at a time,
  in order. The loop submits a job and awaits an asyncio future that the worker settles
  with ``call_soon_threadsafe``. libvirt-python releases the GIL inside every C call,
  so a blocked call blocks only its worker.
- libvirt's own default event loop (``virEventRegisterDefaultImpl``) runs on one
  process-wide daemon thread ``libvirt-events`` (registered once per process, before the
  first ``open``). Callbacks (domain events, the close callback) run there — or on a
  worker — and only read the domain's uuid and name (held locally, no RPC) before
  posting to the loop with ``call_soon_threadsafe``.

Time limit. Each libvirt step of a job — open, registering the callbacks, ``isAlive``,
``listAllDomains``, the read of one domain (``state``/``isActive``/``XMLDesc``), one
``test-domain`` action — must return within ``call_timeout_seconds`` (a full resync of
many domains is many steps, each timed on its own). When one does not, the connection
is declared lost (logged with the step that hung and the thread), its worker is
*abandoned* — it may stay blocked in C forever; being a daemon thread it never delays
the process's exit — and a new worker with a new connection is tried with backoff. When
the thread's call returns at last, it closes its connection and exits. At most
``MAX_ABANDONED_THREADS`` abandoned threads may be alive in the process; at that bound
no new connection is tried until one of them exits (checked every
``reconnect_max_seconds``).

Keepalive (remote drivers): ``setKeepAlive(KEEPALIVE_INTERVAL_SECONDS,
KEEPALIVE_COUNT)``: libvirt pings an idle connection and closes it after
``KEEPALIVE_COUNT`` unanswered pings (about interval × (count + 1) = 20 s); blocked calls
then fail and the close callback reports the loss even when the agent makes no call.

Events (all hints — the domain is re-read, never patched from the event):
- LIFECYCLE (defined, started, stopped, suspended, resumed, undefined, ...),
- TUNABLE (``cputune.vcpupin*``, ``emulatorpin``, ...), DEVICE_ADDED, DEVICE_REMOVED,
  DEVICE_REMOVAL_FAILED.
Each marks the domain's uuid *pending* and wakes the reader task, which reads every
pending domain in one worker job (events arriving together cost one read per domain),
keeps the results and calls ``on_change()``. The daemon then calls ``apply(tracker)``,
which only moves results already read into the tracker (it never waits on libvirt): an
inactive or vanished domain is removed.

Thread check (``[libvirt] thread_check_seconds``; default ``THREAD_CHECK_SECONDS`` for
``qemu…`` URIs, off for others; 0 = off): after each ``apply`` that changed guests, after
``set_intruder_scope`` and every ``thread_check_seconds``,
``hostagent.guests.intruders.check_threads`` reads, on a thread of the loop's default executor
(kernel reads, no libvirt call: not on the worker, not on the loop), the running guests'
QEMU threads and real affinities (``qemu…`` URIs only) and the host tasks allowed on
dedicated threads (with a scope). A result that differs from the last is handed to the
tracker at the next ``apply`` (``tracker.set_threads``: ``guests[].threads`` and
``affinity_drift`` conflicts; ``tracker.set_intruders``: ``intruders`` and the
``host_tasks_on_dedicated`` conflict).

Connection loss — the close callback (remote drivers), any libvirt error on a call, a
step over the time limit, or a failed ``isAlive()`` check every ``check_seconds``
(drivers without a close callback): the watcher drops the connection, calls
``on_change()`` (the snapshot says ``libvirt.connected: false`` and keeps the last known
guests), and reconnects with exponential backoff (``RECONNECT_FIRST_SECONDS`` doubling
up to ``reconnect_max_seconds``). After every (re)connect all callbacks are registered
again and a full resync (``read_guests``) is read; ``connected`` becomes true when that
resync has been applied. A full resync also runs every ``resync_seconds``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Any, TypeVar

from hostagent.config import DEFAULT_THREAD_CHECK_SECONDS
from hostagent.guests.intruders import IntruderScope, check_threads
from hostagent.guests.source import GuestRecord, LibvirtUnavailable, read_guest, read_guests

log = logging.getLogger("hostagent.libvirt")

T = TypeVar("T")

LIFECYCLE_NAMES = ("defined", "undefined", "started", "suspended", "resumed", "stopped",
                   "shutdown", "pmsuspended", "crashed")
DEFAULT_CALL_TIMEOUT_SECONDS = 10.0
KEEPALIVE_INTERVAL_SECONDS = 5  # libvirt pings an idle remote connection this often
KEEPALIVE_COUNT = 3  # ... and closes it after this many unanswered pings
MAX_ABANDONED_THREADS = 4  # workers stuck in a call, alive at once, per process
RECONNECT_FIRST_SECONDS = 0.5  # first reconnect delay; doubles up to reconnect_max_seconds
FIRST_SYNC_WAIT_SECONDS = 2.0  # start-up: the first snapshot waits this long for libvirt
CLOSE_WAIT_SECONDS = 1.0  # close(): how long an idle worker is given to close its connection
# the running guests' threads (hostagent.guests.threads) and the host's intruders
# (hostagent.guests.intruders) are re-checked after each applied guest change and this
# often by default; guests' threads only for QEMU URIs (qemu:///...: QEMU processes)
THREAD_CHECK_SECONDS = DEFAULT_THREAD_CHECK_SECONDS
NO_THREAD_CHECK: dict[str, Any] = {"guests": {}, "intruders": None}  # what "off" hands over
_VIR_ERR_NO_DOMAIN = 42
_CLOSE_REASONS = {0: "error", 1: "end of file", 2: "keepalive timeout", 3: "closed by client"}

_events_lock = threading.Lock()
_events_thread: threading.Thread | None = None
_worker_numbers = itertools.count(1)
_retired: list[_Worker] = []  # every retired worker whose thread may still be alive


def ensure_event_impl() -> None:
    """Register libvirt's default event loop and run it on the daemon thread
    ``libvirt-events`` (once per process; later calls do nothing)."""
    global _events_thread
    with _events_lock:
        if _events_thread is not None:
            return
        import libvirt

        libvirt.virEventRegisterDefaultImpl()
        _events_thread = threading.Thread(target=_run_events, name="libvirt-events",
                                          daemon=True)
        _events_thread.start()


def _run_events() -> None:
    import libvirt

    failures = 0
    while True:
        try:
            ok = libvirt.virEventRunDefaultImpl() >= 0
        except Exception:
            ok = False
            if failures == 0:  # logged once, not ten times a second
                log.exception("libvirt event loop iteration failed")
        if not ok:
            failures += 1
            time.sleep(0.1)


def abandoned_threads() -> list[_Worker]:
    """Retired workers whose thread is still alive (stuck in a call, or closing)."""
    _retired[:] = [w for w in _retired if w.thread.is_alive()]
    return list(_retired)


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


def _settle(fut: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    if fut.done():
        return  # timed out, cancelled or failed by a retire meanwhile
    if exc is None:
        fut.set_result(result)
    else:
        fut.set_exception(exc)


def _consume(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()  # retrieved: no "exception was never retrieved" noise


class _Worker:
    """One daemon thread owning one libvirt connection; runs jobs ``fn(worker)`` in order.

    ``call``/``call_since`` name the libvirt step running now (set by the thread,
    read by the loop's stall check). ``retired`` (set by the loop): the thread finishes
    its current job, skips the rest, closes the connection and exits."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.name = f"libvirt-conn-{next(_worker_numbers)}"
        self.jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.conn: Any = None
        self.callback_ids: list[int] = []
        self.call: str | None = None
        self.call_since: float | None = None
        self.retired = False
        self.finished = threading.Event()
        self.outstanding: set[asyncio.Future[Any]] = set()  # loop side
        self.thread = threading.Thread(target=self._run, name=self.name, daemon=True)

    def submit(self, what: str, fn: Callable[[_Worker], Any]) -> asyncio.Future[Any]:
        """(loop thread) Queue ``fn(worker)``; the future gets its result or exception."""
        fut = self.loop.create_future()
        self.outstanding.add(fut)
        fut.add_done_callback(self.outstanding.discard)
        fut.add_done_callback(_consume)
        self.jobs.put((what, fn, fut))
        return fut

    def step(self, what: str) -> None:
        """(worker thread) A libvirt step begins: its own time limit starts now."""
        self.call, self.call_since = what, time.monotonic()

    def open(self, opener: Callable[[str], Any], uri: str) -> None:
        conn = opener(uri)
        if conn is None:
            raise RuntimeError(f"cannot connect to libvirt at {uri}")
        self.conn = conn

    def _run(self) -> None:
        try:
            while True:
                job = self.jobs.get()
                if job is None or self.retired:
                    break
                what, fn, fut = job
                self.step(what)
                try:
                    result, exc = fn(self), None
                except Exception as e:
                    result, exc = None, e
                self.call = self.call_since = None
                try:
                    self.loop.call_soon_threadsafe(_settle, fut, result, exc)
                except RuntimeError:
                    break  # the loop is closed: nobody is waiting any more
            self._close()
        finally:
            self.call = self.call_since = None
            self.finished.set()

    def _close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is None:
            return
        self.step("close")
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


def _read_domains(w: _Worker, uuids: list[str]) -> list[tuple[str, GuestRecord | None]]:
    """(worker thread) Each uuid's record; None for a domain that no longer exists."""
    import libvirt

    out: list[tuple[str, GuestRecord | None]] = []
    for uuid in uuids:
        w.step(f"read domain {uuid}")
        try:
            rec = read_guest(w.conn.lookupByUUIDString(uuid))
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == _VIR_ERR_NO_DOMAIN:
                out.append((uuid, None))  # undefined (transient domains vanish when stopped)
                continue
            raise
        out.append((uuid, rec))
    return out


class LibvirtWatcher:
    """Owns the daemon's libvirt connection (through its worker thread). Use its methods
    from the loop thread; the libvirt callbacks may run on any thread."""

    def __init__(self, uri: str, on_change: Callable[[], None], *,
                 resync_seconds: float = 60.0, reconnect_max_seconds: float = 30.0,
                 check_seconds: float = 2.0,
                 call_timeout_seconds: float = DEFAULT_CALL_TIMEOUT_SECONDS,
                 opener: Callable[[str], Any] = _open,
                 on_connect: Callable[[Any], None] | None = None,
                 thread_check_seconds: float | None = None) -> None:
        self.uri = uri
        # 0 = off; default THREAD_CHECK_SECONDS for qemu URIs, off for others (test:///)
        self.thread_check_seconds = (
            thread_check_seconds if thread_check_seconds is not None
            else THREAD_CHECK_SECONDS if uri.startswith("qemu") else 0.0)
        self.on_change = on_change
        self.resync_seconds = resync_seconds
        self.reconnect_max = reconnect_max_seconds
        self.check_seconds = check_seconds
        self.call_timeout = call_timeout_seconds
        self.opener = opener
        self.on_connect = on_connect  # runs on the worker thread with the connection
        self.pending: set[str] = set()
        self.full_resync = True
        self.generation = 0  # successful connects
        self.connected_since: float | None = None
        self.last_error: str | None = None
        self.events: deque[dict[str, Any]] = deque(maxlen=32)
        self.counters: Counter[str] = Counter()
        self.events_received = 0  # events handed to the loop (counted after posting)
        self._worker: _Worker | None = None  # current: connecting or connected
        self._up = False  # the current worker's connection is open, callbacks registered
        self._synced = 0  # generation whose full resync has been applied
        self._ready_full: tuple[int, list[GuestRecord]] | None = None
        self._ready: dict[str, GuestRecord | None] = {}
        self._reading = False
        self._wake = asyncio.Event()
        self._down = asyncio.Event()
        self._first_attempt = asyncio.Event()
        self._limited = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._stall_handle: asyncio.TimerHandle | None = None
        self._check_task: asyncio.Task[Any] | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._specs: dict[str, Any] = {}  # running guests' GuestSpec, as last applied
        self._thread_hints: dict[str, int] = {}  # uuid → QEMU pid (the check thread's)
        self._threads_last: dict[str, Any] = dict(NO_THREAD_CHECK)
        self._threads_ready: dict[str, Any] | None = None
        self._thread_wake = asyncio.Event()
        self._thread_task: asyncio.Task[Any] | None = None
        self.intruder_scope: IntruderScope | None = None  # set_intruder_scope

    # --- connection --------------------------------------------------------------------

    @property
    def conn(self) -> Any:
        """The open connection (owned by the worker thread), or None."""
        return self._worker.conn if self._up and self._worker is not None else None

    @property
    def connected(self) -> bool:
        """Connected, and the full resync read since connecting has been applied."""
        return self._up and self._synced == self.generation

    @property
    def idle(self) -> bool:
        """Nothing to read and no read in flight."""
        return not self._reading and not self.pending and not (self._up and self.full_resync)

    def start(self) -> None:
        """Start connecting (on the worker thread), the reader and the timers. Returns at
        once; ``wait_synced`` waits for the first outcome."""
        ensure_event_impl()
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._tasks = [asyncio.ensure_future(c) for c in (
            self._connection_loop(), self._reader_loop(), self._periodic_resync(),
            self._periodic_check())]
        self.set_thread_check_seconds(self.thread_check_seconds)

    def set_thread_check_seconds(self, seconds: float) -> None:
        """(loop) The thread check's period; 0 stops it and clears its results from the
        tracker at the next ``apply``. A change takes effect at once (a check runs now)."""
        self.thread_check_seconds = seconds
        running = self._thread_task is not None and not self._thread_task.done()
        if seconds > 0:
            if not running and self._loop is not None:
                self._thread_task = asyncio.ensure_future(self._thread_check_loop())
            self._thread_wake.set()
        elif running:
            assert self._thread_task is not None
            self._thread_task.cancel()
            self._threads_last = dict(NO_THREAD_CHECK)
            self._threads_ready = dict(NO_THREAD_CHECK)
            self.on_change()

    def set_intruder_scope(self, scope: IntruderScope | None) -> None:
        """(loop) What the intruder scan looks for (the daemon sets it at each probe and
        reload); a change is checked at once."""
        if scope != self.intruder_scope:
            self.intruder_scope = scope
            self._thread_wake.set()

    async def wait_synced(self, timeout: float) -> bool:
        """Wait at most ``timeout`` s for the first outcome: a full resync read, or a
        failed or timed-out connect. Whether one came."""
        try:
            await asyncio.wait_for(self._first_attempt.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def _connection_loop(self) -> None:
        delay = RECONNECT_FIRST_SECONDS
        while True:
            stuck = abandoned_threads()
            if len(stuck) >= MAX_ABANDONED_THREADS:
                if not self._limited:
                    self._limited = True
                    self._error(
                        f"{len(stuck)} libvirt threads are stuck in calls that did not "
                        f"return (limit MAX_ABANDONED_THREADS={MAX_ABANDONED_THREADS}): no "
                        "new libvirt connection until one returns; checking every "
                        f"{self.reconnect_max:g} s")
                self._first_attempt.set()
                await asyncio.sleep(self.reconnect_max)
                continue
            self._limited = False
            if await self._connect():
                delay = RECONNECT_FIRST_SECONDS
                await self._down.wait()
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.reconnect_max)

    async def _connect(self) -> bool:
        assert self._loop is not None
        w = _Worker(self._loop)
        self._worker, self._up = w, False
        self.counters["connect_attempts"] += 1
        w.thread.start()
        step = "open"
        try:
            await self._call(w, "open", lambda w: w.open(self.opener, self.uri))
            step = "register callbacks"
            await self._call(w, step, self._register)
        except Exception as exc:
            text = _err_text(exc)
            self._lose(w, text if step == "open" else f"{step}: {text}")
            self._first_attempt.set()
            return False
        self._up = True
        self._down.clear()
        self.generation += 1
        self.connected_since = time.time()
        self.full_resync = True
        self.counters["connects"] += 1
        log.info("connected to libvirt at %s (connection %d, thread %s)", self.uri,
                 self.generation, w.name)
        if self.on_connect is not None:
            on_connect = self.on_connect
            try:
                await self._call(w, "on-connect", lambda w: on_connect(w.conn))
            except Exception as exc:
                if w is not self._worker:
                    return True  # lost meanwhile (logged): the loop reconnects
                self._error(f"on-connect step failed: {_err_text(exc)}")
        self._wake.set()
        return True

    def _register(self, w: _Worker) -> None:
        """(worker thread) Every callback, with the worker as the opaque value."""
        import libvirt

        conn = w.conn
        for ev, cb in ((libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self.on_lifecycle),
                       (libvirt.VIR_DOMAIN_EVENT_ID_TUNABLE, self.on_tunable),
                       (libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_ADDED, self.on_device_added),
                       (libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED, self.on_device_removed),
                       (libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVAL_FAILED,
                        self.on_device_removed)):
            w.callback_ids.append(conn.domainEventRegisterAny(None, ev, cb, w))
        try:
            conn.registerCloseCallback(self.on_close, w)
        except libvirt.libvirtError:
            pass  # drivers without a persistent connection: isAlive checks
        try:
            conn.setKeepAlive(KEEPALIVE_INTERVAL_SECONDS, KEEPALIVE_COUNT)
        except libvirt.libvirtError:
            pass  # not supported by in-process drivers (test:///)

    async def _call(self, w: _Worker, what: str, fn: Callable[[_Worker], T]) -> T:
        if w.retired:
            raise LibvirtUnavailable("libvirt connection lost")
        fut = w.submit(what, fn)
        self._arm_stall_check()
        result: T = await fut
        return result

    async def call(self, what: str, fn: Callable[[Any], T]) -> T:
        """``fn(conn)`` on the worker thread, under the time limit. ``LibvirtUnavailable``
        when not connected or when a step does not return in time; errors of ``fn``
        propagate."""
        w = self._worker
        if w is None or not self._up:
            raise LibvirtUnavailable(f"libvirt is not connected ({self.uri})")
        return await self._call(w, what, lambda w: fn(w.conn))

    def _arm_stall_check(self, delay: float | None = None) -> None:
        if self._stall_handle is not None or self._loop is None:
            return
        wait = self.call_timeout if delay is None else delay
        self._stall_handle = self._loop.call_later(wait, self._stall_check)

    def _stall_check(self) -> None:
        """(loop) Has the current worker's step run past the time limit?"""
        self._stall_handle = None
        w = self._worker
        if w is None or not w.outstanding:
            return
        since, what = w.call_since, w.call
        now = time.monotonic()
        if since is not None and now - since >= self.call_timeout:
            self.counters["call_timeouts"] += 1
            n = len(abandoned_threads()) + 1
            self._lose(w, f"call {what} did not return within {self.call_timeout:g} s; "
                          f"thread {w.name} abandoned ({n} abandoned, limit "
                          f"{MAX_ABANDONED_THREADS})")
            return
        self._arm_stall_check(self.call_timeout if since is None
                              else max(0.01, since + self.call_timeout - now))

    def _retire(self, w: _Worker, exc: BaseException) -> None:
        w.retired = True
        for fut in list(w.outstanding):
            if not fut.done():
                fut.set_exception(exc)
        w.jobs.put(None)
        _retired.append(w)

    def _lose(self, w: _Worker | None, why: str) -> None:
        """Drop worker ``w`` if it is the current one: report, and (if it was connected)
        publish the loss and let the connection loop reconnect."""
        if w is None or w is not self._worker:
            return
        was_up = self._up
        self._worker, self._up = None, False
        self.connected_since = None
        self._retire(w, LibvirtUnavailable(f"libvirt connection lost: {why}"))
        if was_up:
            self.counters["disconnects"] += 1
            self._error(f"libvirt connection lost: {why}")
            self._down.set()
            self._first_attempt.set()
            self.on_change()
        else:
            self._error(f"cannot connect to libvirt at {self.uri}: {why}")

    def lost(self, why: str) -> None:
        """The connection is unusable: drop it, report, reconnect in the background."""
        if self._up:
            self._lose(self._worker, why)

    def on_close(self, conn: Any, reason: int, opaque: Any) -> None:
        """libvirt's close callback (remote drivers; any thread)."""
        why = f"closed ({_CLOSE_REASONS.get(reason, reason)})"
        self._post(self._closed_by_libvirt, opaque, why)

    def _closed_by_libvirt(self, w: Any, why: str) -> None:
        if self._up and (w is None or w is self._worker):
            self._lose(self._worker, why)

    async def _periodic_check(self) -> None:
        while True:
            await asyncio.sleep(self.check_seconds)
            self.check()

    def check(self) -> None:
        """``isAlive()`` on the worker (in the background); a failure starts a reconnect."""
        if not self._up or (self._check_task is not None and not self._check_task.done()):
            return
        self._check_task = asyncio.ensure_future(self._check_once(self._worker))

    async def _check_once(self, w: _Worker | None) -> None:
        if w is None:
            return
        try:
            alive = await self._call(w, "isAlive", lambda w: w.conn.isAlive())
        except Exception as exc:
            self._lose(w, _err_text(exc))
            return
        if not alive:
            self._lose(w, "isAlive() is false")

    async def _periodic_resync(self) -> None:
        while True:
            await asyncio.sleep(self.resync_seconds)
            self.request_resync()

    def request_resync(self) -> None:
        """Read every domain again (in the background)."""
        self.full_resync = True
        self.counters["resyncs_requested"] += 1
        self._wake.set()

    # --- events (any thread) -----------------------------------------------------------

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn(*args)`` on the loop: now if this is the loop thread, else posted."""
        loop = self._loop
        if loop is None:
            return
        if threading.get_ident() == self._loop_thread:
            fn(*args)
            return
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:
            pass  # the loop is closed: the agent is gone

    def _event(self, w: Any, dom: Any, kind: str, detail: Any) -> None:
        try:
            uuid = dom.UUIDString().lower()  # held in the virDomain: no RPC
            name = dom.name()
        except Exception as exc:
            self._post(self._unreadable, w, kind, _err_text(exc))
        else:
            self._post(self._note, w, kind, uuid, name, detail)
        self.events_received += 1

    def _current(self, w: Any) -> bool:
        return w is None or w is self._worker  # None: called directly (tests)

    def _unreadable(self, w: Any, kind: str, text: str) -> None:
        if not self._current(w):
            return
        log.warning("%s event for an unreadable domain: %s", kind, text)
        self.full_resync = True
        self._wake.set()

    def _note(self, w: Any, kind: str, uuid: str, name: str, detail: Any) -> None:
        if not self._current(w):
            self.counters["stale_events"] += 1
            return
        self.counters[f"event_{kind.split(':')[0]}"] += 1
        self.events.append({"time": time.time(), "domain": name, "uuid": uuid,
                            "event": kind, "detail": detail})
        self.pending.add(uuid)
        self._wake.set()

    def _ignored(self, w: Any, key: str) -> None:
        if self._current(w):
            self.counters[key] += 1

    def on_lifecycle(self, conn: Any, dom: Any, event: int, detail: int, opaque: Any) -> None:
        try:
            name = LIFECYCLE_NAMES[event] if 0 <= event < len(LIFECYCLE_NAMES) else str(event)
            self._event(opaque, dom, f"lifecycle:{name}", detail)
        except Exception:
            log.exception("lifecycle callback failed")

    def on_tunable(self, conn: Any, dom: Any, params: dict[str, Any], opaque: Any) -> None:
        try:
            keys = sorted(params) if isinstance(params, dict) else []
            if keys and not any(k.startswith("cputune.") for k in keys):
                self._post(self._ignored, opaque, "event_tunable_ignored")
                return  # blkdeviotune.* and the like: nothing the tracker reads
            self._event(opaque, dom, "tunable", keys)
        except Exception:
            log.exception("tunable callback failed")

    def on_device_added(self, conn: Any, dom: Any, alias: str, opaque: Any) -> None:
        try:
            self._event(opaque, dom, "device-added", alias)
        except Exception:
            log.exception("device callback failed")

    def on_device_removed(self, conn: Any, dom: Any, alias: str, opaque: Any) -> None:
        try:
            self._event(opaque, dom, "device-removed", alias)
        except Exception:
            log.exception("device callback failed")

    # --- reading -----------------------------------------------------------------------

    async def _reader_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._up and (self.full_resync or self.pending):
                self._reading = True
                try:
                    if self.full_resync:
                        await self._read_all(self._worker)
                    else:
                        await self._read_pending(self._worker)
                finally:
                    self._reading = False

    async def _read_all(self, w: _Worker | None) -> None:
        if w is None:
            return
        gen = self.generation
        self.full_resync = False
        self.pending.clear()  # the listing covers them; later events are read after it

        def job(w: _Worker) -> list[GuestRecord]:
            return read_guests(w.conn, progress=lambda s: w.step(f"{s} (full resync)"))

        try:
            records = await self._call(w, "full resync", job)
        except Exception as exc:
            self.full_resync = True
            self._lose(w, _err_text(exc))
            self._first_attempt.set()
            return
        self._ready_full, self._ready = (gen, records), {}  # supersedes earlier reads
        self.counters["full_resyncs"] += 1
        self._first_attempt.set()
        self.on_change()

    async def _read_pending(self, w: _Worker | None) -> None:
        if w is None:
            return
        uuids = sorted(self.pending)
        self.pending = set()
        try:
            out = await self._call(w, f"read {len(uuids)} domains",
                                   lambda w: _read_domains(w, uuids))
        except Exception as exc:
            self.pending |= set(uuids)
            self._lose(w, _err_text(exc))
            return
        self._ready.update(out)
        self.counters["domain_reads"] += sum(1 for _, rec in out if rec is not None)
        self.on_change()

    def apply(self, tracker: Any) -> bool:
        """Move the results read so far into ``tracker`` (a full resync first, then
        single domains, in the order read). Never calls libvirt. Whether anything was
        applied. Guests already in the tracker stay while libvirt is unreachable."""
        changed = False
        if self._ready_full is not None:
            gen, records = self._ready_full
            self._ready_full = None
            tracker.replace_all(records)
            self._synced = gen
            changed = True
        if self._ready:
            ready, self._ready = self._ready, {}
            for uuid, rec in ready.items():
                if rec is not None and rec.active:
                    tracker.update(rec)
                else:
                    tracker.remove(uuid)
            changed = True
        if self.thread_check_seconds > 0 and changed:
            self._specs = {u: r.spec for u, r in tracker.records.items()
                           if r.active and r.spec is not None}
            self._thread_wake.set()
        if self._threads_ready is not None:
            tracker.set_threads(self._threads_ready["guests"])
            tracker.set_intruders(self._threads_ready["intruders"])
            self._threads_ready = None
            changed = True
        return changed

    async def _thread_check_loop(self) -> None:
        """Check the running guests' threads and the host's intruders (kernel reads on a
        thread of the default executor, never libvirt) after each applied change and
        every ``thread_check_seconds``; a result that differs from the last goes to the
        tracker at the next ``apply``."""
        while True:
            try:
                await asyncio.wait_for(self._thread_wake.wait(), self.thread_check_seconds)
            except TimeoutError:
                pass
            self._thread_wake.clear()
            specs = dict(self._specs)
            try:
                result = await asyncio.to_thread(
                    check_threads, specs, self._thread_hints, self.intruder_scope,
                    guests=self.uri.startswith("qemu"))
            except Exception:
                log.exception("guest thread check failed")
                continue
            self.counters["thread_checks"] += 1
            if result != self._threads_last:
                self._threads_last = self._threads_ready = result
                self.on_change()

    # --- state -------------------------------------------------------------------------

    def _error(self, text: str) -> None:
        self.last_error = text
        self.counters["errors"] += 1
        log.warning("%s", text)

    def state(self) -> dict[str, Any]:
        now = time.monotonic()

        def busy(w: _Worker) -> dict[str, Any]:
            since = w.call_since
            return {"thread": w.name, "call": w.call,
                    "seconds": None if since is None else round(now - since, 3)}

        w = self._worker
        return {"uri": self.uri, "connected": self.connected,
                "connected_since": self.connected_since, "connections": self.generation,
                "call_timeout_seconds": self.call_timeout,
                "worker": None if w is None else busy(w),
                "abandoned_threads": [busy(a) for a in abandoned_threads()],
                "pending": sorted(self.pending), "full_resync_due": self.full_resync,
                "last_error": self.last_error, "counters": dict(self.counters),
                "events_received": self.events_received,
                "last_events": list(self.events)}

    async def close(self) -> None:
        """Stop the tasks and retire the worker. Never waits on a busy worker; an idle
        one gets ``CLOSE_WAIT_SECONDS`` to close its connection."""
        tasks = [*self._tasks, *(t for t in (self._check_task, self._thread_task) if t)]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._stall_handle is not None:
            self._stall_handle.cancel()
            self._stall_handle = None
        w, self._worker, self._up = self._worker, None, False
        self.connected_since = None
        if w is None:
            return
        busy = w.call is not None
        self._retire(w, LibvirtUnavailable("libvirt watcher closed"))
        if busy:
            return
        deadline = time.monotonic() + CLOSE_WAIT_SECONDS
        while not w.finished.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
