"""The agent daemon (``hostagent run``): one asyncio loop owns everything.

What runs on the loop:
- the ``Publisher`` (XPUB stream, heartbeats, welcome re-publish, ROUTER requests);
- the ``LibvirtWatcher`` (reconnect, periodic resync, applying what was read); its
  libvirt calls run on its worker thread and libvirt's events on libvirt's own event
  thread (``libvirt_watch``), so a hung libvirtd never stalls the loop;
- udev hotplug (``UdevWatch`` on ``loop.add_reader``) → debounced re-probe;
- the hugepage poller (counters re-read every ``hugepage_poll_seconds``);
- signals: SIGTERM/SIGINT stop, SIGHUP reload, SIGUSR1 debug dump (+ thread stacks
  from ``faulthandler``, which works even if the loop is stuck);
- systemd notify: READY after the first snapshot is out, STATUS, WATCHDOG from the
  loop (so a stuck loop trips the watchdog), RELOADING, STOPPING.

Changes (libvirt events, hotplug, hugepage counters, reloads) call ``mark_dirty``.
Coalescing is a rate limit with a leading edge: the first change after a quiet period
is published on the next loop iteration (everything that arrived in that iteration
goes into the same snapshot); changes within ``coalesce_ms`` of the last publish wait
for the window to end and go out together. A rebuilt snapshot whose content
(topology, config, usage, agent status) equals the last one is not published.

The snapshot is the schema-v1 document plus one added top-level key,
``agent: {version, libvirt: {uri, connected}}``: while libvirt is unreachable the last
known guests are kept and ``connected`` is false.

Extension points: ops registered on the publisher's registry, and ``connect_hooks`` run
on each new libvirt connection. With a ``test:///`` URI, ``hostagent.agent.test_driver`` uses
them for the ``test-domain`` op and the demo guests; with any other URI neither exists.

Claims (``hostagent.agent.claim_desk``, docs/claims.md): the request endpoint also answers
``{op: "claim" | "release" | "claims"}``; the tracker is a ``claims.ClaimTracker``, so
outstanding claims count in the snapshot's usage like guests, and a guest booted from a
claim consumes it as its record arrives.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import faulthandler
import gc
import logging
import os
import secrets
import signal
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hostagent import __version__
from hostagent.agent.notify import Notifier, watchdog_interval
from hostagent.config import Config, load_config, resolve_resources, thread_check_period
from hostagent.errors import HostagentError, ProbeError
from hostagent.model import HostTopology, replace, topology_to_dict

if TYPE_CHECKING:  # imported where they are used (metrics only when [metrics] is on)
    import zmq.asyncio

    from hostagent.agent.claim_desk import ClaimDesk
    from hostagent.agent.libvirt_watch import LibvirtWatcher
    from hostagent.agent.metrics import AgentReadings, MetricsServer
    from hostagent.agent.udev_watch import UdevWatch
    from hostagent.agent.vcpu_groups import VcpuGroups
    from hostagent.claims import ClaimTracker
    from hostagent.curve import ClientAuthenticator
    from hostagent.guests.intruders import IntruderScope
    from hostagent.publisher import Publisher

log = logging.getLogger("hostagent")

UDEV_DEBOUNCE_SECONDS = 0.2
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}


# --- logging ---------------------------------------------------------------------------

class _SyslogPrefix(logging.Formatter):
    """``<N>name: message`` — journald takes N as the priority (sd-daemon(3))."""

    PRIO = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
            logging.CRITICAL: 2}

    def format(self, record: logging.LogRecord) -> str:
        prio = self.PRIO.get(record.levelno, 6)
        text = super().format(record)
        return "\n".join(f"<{prio}>{line}" for line in text.splitlines())


def stderr_is_journal(environ: Mapping[str, str] | None = None) -> bool:
    """``$JOURNAL_STREAM`` (``dev:inode``) names our stderr (systemd.exec(5))."""
    env = os.environ if environ is None else environ
    value = env.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(x) for x in value.split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def setup_logging(level: str, environ: Mapping[str, str] | None = None) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if stderr_is_journal(environ):
        handler.setFormatter(_SyslogPrefix("%(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter(
            "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    set_level(level)


def set_level(level: str) -> None:
    logging.getLogger().setLevel(_LEVELS.get(level, logging.INFO))
    # pyzmq's ZAP handler logs every CURVE handshake at debug level
    logging.getLogger("zmq.auth").setLevel(max(_LEVELS.get(level, logging.INFO),
                                               logging.INFO))


# --- hugepages -------------------------------------------------------------------------

def read_hugepages(sysfs_root: str, topo: HostTopology) -> HostTopology:
    """``topo`` with every cell's hugepage counters re-read (nothing else)."""
    from hostagent.probe.hugepages import read_pools
    from hostagent.probe.reader import FileReader

    root = sysfs_root.rstrip("/")
    reader = FileReader()
    node_dir = f"{root}/devices/system/node"
    per_node = os.path.isdir(node_dir) and any(
        n.startswith("node") and n[4:].isdigit() for n in os.listdir(node_dir))
    cells = []
    for cell in topo.cells:
        d = f"{node_dir}/node{cell.id}/hugepages" if per_node else f"{root}/kernel/mm/hugepages"
        pools = read_pools(reader, d)
        same = pools == cell.hugepages
        cells.append(cell if same else replace(cell, hugepages=pools))
    if all(a is b for a, b in zip(cells, topo.cells, strict=True)):
        return topo
    return replace(topo, cells=tuple(cells))


# --- configuration reload --------------------------------------------------------------

def merge_reload(old: Config, new: Config) -> tuple[Config, list[str]]:
    """The config in force after a reload, and notes on what needs a restart.

    Reloadable: ``[resources]``, ``[probe]`` (but ``udev``), ``[libvirt]``, ``[fit]``,
    ``[agent]``, ``[resctrl]``, the publisher's ``coalesce_ms`` and ``heartbeat_seconds``, the CURVE
    allowed-clients directory. Restart-only (kept as they were, with a warning):
    ``[host] name``, ``[probe] udev``, the publisher's endpoints, ``send_hwm``,
    ``max_message_bytes``, ``insecure``, ``forward_to``, ``[curve] enabled`` and
    ``server_secret_key``, ``[metrics]``.
    """
    notes = []
    if new.host != old.host:
        notes.append(f"[host] name {new.host.name!r} takes effect at restart")
    probe = new.probe
    if probe.udev != old.probe.udev:
        notes.append("probe.udev takes effect at restart")
        probe = dataclasses.replace(probe, udev=old.probe.udev)
    pub = new.publisher
    for key in ("endpoints", "request_endpoints", "send_hwm", "max_message_bytes",
                "insecure", "forward_to"):
        if getattr(pub, key) != getattr(old.publisher, key):
            notes.append(f"publisher.{key} takes effect at restart")
            pub = dataclasses.replace(pub, **{key: getattr(old.publisher, key)})
    curve = new.curve
    for key in ("enabled", "server_secret_key"):
        if getattr(curve, key) != getattr(old.curve, key):
            notes.append(f"curve.{key} takes effect at restart")
            curve = dataclasses.replace(curve, **{key: getattr(old.curve, key)})
    if new.metrics != old.metrics:
        notes.append("[metrics] takes effect at restart")
    merged = dataclasses.replace(new, host=old.host, probe=probe, publisher=pub, curve=curve,
                                 metrics=old.metrics)
    return merged, notes


def config_document(cfg: Config) -> dict[str, Any]:
    """The config as plain JSON-able data (for the debug dump)."""
    doc = dataclasses.asdict(cfg)
    doc["host_name"] = cfg.host_name
    return doc


# --- the agent -------------------------------------------------------------------------

class Agent:
    """One running agent. ``Agent(path)`` loads the config (``ConfigError``);
    ``await agent.run()`` runs until SIGTERM/SIGINT (or ``stop()``) and returns 0."""

    def __init__(self, config_path: str | None, *,
                 environ: Mapping[str, str] | None = None, udev_monitor: Any = None,
                 libvirt_opener: Callable[[str], Any] | None = None) -> None:
        self.config_path = config_path
        self._udev_monitor = udev_monitor  # tests: an object shaped like pyudev.Monitor
        self._libvirt_opener = libvirt_opener  # tests: uri -> a virConnect-shaped object
        # run on the watcher's worker thread with each new libvirt connection
        self.connect_hooks: list[Callable[[Any], None]] = []
        self.config = load_config(config_path)
        self.env = dict(os.environ if environ is None else environ)
        self.epoch = secrets.token_hex(8)
        self.notifier = Notifier(self.env)
        self.errors: deque[dict[str, Any]] = deque(maxlen=64)
        self.error_counts: Counter[str] = Counter()  # every recorded error, by where
        self.metrics: MetricsServer | None = None  # the Prometheus endpoint, when on
        self.started = time.time()
        self.topo: HostTopology | None = None
        self.topology_doc: dict[str, Any] = {}
        self.resources: dict[str, Any] = {}
        self.tracker: ClaimTracker | None = None
        self.publisher: Publisher | None = None
        self.watcher: LibvirtWatcher | None = None
        self.udev: UdevWatch | None = None
        self.auth: ClientAuthenticator | None = None
        self.claim_desk: ClaimDesk | None = None
        self.ctx: zmq.asyncio.Context | None = None
        self.exit_error: HostagentError | None = None  # ends run() with this error
        self.counters: dict[str, int] = {"reprobes": 0, "hugepage_polls": 0,
                                         "hugepage_changes": 0, "reloads": 0,
                                         "reloads_refused": 0, "dumps": 0,
                                         "flushes": 0, "unchanged_flushes": 0}
        self.last_dump: str | None = None
        self._last_content: Any = None
        self._last_publish = -1e9
        self._last_status = -1e9
        self._reload_refused: str | None = None  # in STATUS= until a reload succeeds
        self._memo: dict[str, Any] = {}
        self._memo_key: tuple[str, str] | None = None
        self._hugepage_error: str | None = None  # the poll's error, logged once until it ends
        self._fit_view: tuple[Any, Any] | None = None  # (snapshot, fit.prepare(snapshot))
        self._dirty = False
        self._flushing = False
        self._flush_handle: asyncio.Handle | None = None
        self._udev_handle: asyncio.Handle | None = None
        self._bg: set[asyncio.Task[Any]] = set()
        self._reload_lock: asyncio.Lock | None = None
        self._stop: asyncio.Event | None = None
        self.vcpu_groups: VcpuGroups | None = None  # [resctrl] vcpu_groups, when any
        self._vg_threads: Any = None  # the tracker's thread check last handed to it
        self._vg_wake: asyncio.Event | None = None

    # --- host and snapshot -------------------------------------------------------------

    def _probe(self, cfg: Config) -> HostTopology:
        """Probe with a memo of the files that cannot change while the host runs (cache
        and core ids...), so hotplug re-probes read only what can change."""
        from hostagent.probe.host import FileReader, probe_host

        key = (cfg.probe.sysfs_root, cfg.probe.resctrl_root)
        if self._memo_key != key:
            self._memo_key, self._memo = key, {}
        return probe_host(*key, reader=FileReader(static=self._memo))

    @staticmethod
    def _log_roots(topo: HostTopology, cfg: Config, when: str) -> None:
        """One line: the roots probed, and the resctrl resources read or that none is
        mounted (then cache ways and bandwidth are not tracked)."""
        sysfs, resctrl = cfg.probe.sysfs_root, cfg.probe.resctrl_root
        rc = topo.resctrl
        if rc is None:
            log.info("%s: sysfs root %s; no resctrl mounted at %s: cache ways and memory "
                     "bandwidth are not tracked", when, sysfs, resctrl)
            return
        names = [r.name for r in rc.resources] + (["MB"] if rc.mb is not None else [])
        log.info("%s: sysfs root %s, resctrl root %s (%s)", when, sysfs, resctrl,
                 ", ".join(names) or "no cache or MB resource")

    def _set_host(self, topo: HostTopology, cfg: Config) -> None:
        from hostagent.claims import ClaimTracker

        self.topo = topo
        self.topology_doc = topology_to_dict(topo)
        self.resources = resolve_resources(cfg.resources, topo)
        if self.tracker is None:
            self.tracker = ClaimTracker(topo, self.resources)
        else:
            self.tracker.set_host(topo, self.resources)
        if self.watcher is not None:
            self.watcher.set_intruder_scope(self._intruder_scope())

    def _intruder_scope(self) -> IntruderScope:
        """What the thread check's intruder scan looks for on this host and config."""
        from hostagent.guests.intruders import IntruderScope

        return IntruderScope.for_host(self.topo, self.resources,
                                      self.config.resources.host_tasks_conflict)

    def _agent_doc(self) -> dict[str, Any]:
        w = self.watcher
        doc: dict[str, Any] = {"version": __version__,
                               "libvirt": {"uri": self.config.libvirt.uri,
                                           "connected": bool(w is not None and w.connected)}}
        if self.config.publisher.advertise_request:
            doc["request_endpoint"] = self.config.publisher.advertise_request
        return doc

    def mark_dirty(self) -> None:
        """Something changed: publish soon (see the module docstring for the timing)."""
        self._dirty = True
        if self._flush_handle is not None or self._flushing or self._stop is None:
            return
        window = self.config.publisher.coalesce_ms / 1000.0
        delay = max(0.0, self._last_publish + window - time.monotonic())
        loop = asyncio.get_running_loop()
        self._flush_handle = loop.call_later(delay, self._start_flush)

    def _start_flush(self) -> None:
        self._flush_handle = None
        self._spawn(self.flush())

    async def flush(self) -> bool:
        """Apply pending libvirt changes and publish if the content changed."""
        if self._flushing:
            self._dirty = True
            return False
        self._flushing = True
        try:
            self._dirty = False
            self.counters["flushes"] += 1
            if self.watcher is not None:
                self.watcher.apply(self.tracker)
            if self.vcpu_groups is not None and self.tracker.threads is not self._vg_threads:
                self._vg_threads = self.tracker.threads
                self._vg_wake.set()
            usage = self.tracker.usage()
            agent = self._agent_doc()
            # the usage is compared as its msgpack bytes (cheaper than comparing the
            # dicts), packed by the publisher's cache, which then sends those bytes
            pub = self.publisher
            usage_raw = pub.pack_part("usage", usage)
            content = (self.topology_doc, self.resources, usage_raw, agent)
            if content == self._last_content:
                self.counters["unchanged_flushes"] += 1
                return False
            from hostagent.snapshot import assemble_snapshot

            snap = assemble_snapshot(self.topology_doc, self.resources, usage,
                                     host=pub.host, epoch=self.epoch, seq=pub.next_seq(),
                                     now=time.time())
            snap["agent"] = agent
            await pub.publish(snap)
            self._last_content = content
            self._last_publish = time.monotonic()
            if self.notifier.enabled and time.monotonic() - self._last_status >= 1.0:
                self._last_status = time.monotonic()  # STATUS at most once a second
                self.notifier.status(self._status())
            return True
        finally:
            self._flushing = False
            if self._dirty:
                self.mark_dirty()

    def latest_snapshot(self) -> dict[str, Any] | None:
        latest = self.publisher.latest if self.publisher else None
        return None if latest is None else latest["data"]

    def _status(self) -> str:
        pub = self.publisher
        lv = "libvirt connected" if self.watcher and self.watcher.connected else \
            "libvirt unavailable, retrying"
        status = f"seq {pub.seq}, {pub.subscribers} subscribers, {lv}"
        if self._reload_refused is not None:  # `systemctl reload` returned 0 regardless
            status += (f"; reload refused: {self._reload_refused}; running with the "
                       "previous configuration")
        return status

    def record_error(self, where: str, message: str) -> None:
        self.errors.append({"time": time.time(), "where": where, "message": message})
        self.error_counts[where] += 1

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._bg.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._bg.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            log.error("background task failed: %s: %s", type(exc).__name__, exc,
                      exc_info=exc)
            self.record_error("task", f"{type(exc).__name__}: {exc}")

    # --- hotplug, hugepages, watchdog ---------------------------------------------------

    def on_udev(self, device: Any) -> None:
        if self._udev_handle is not None:
            self._udev_handle.cancel()
        loop = asyncio.get_running_loop()
        self._udev_handle = loop.call_later(UDEV_DEBOUNCE_SECONDS,
                                            lambda: self._spawn(self.reprobe("udev")))

    async def reprobe(self, why: str) -> bool:
        """Re-read the topology; on a change the tracker recomputes and we publish."""
        self._udev_handle = None
        self.counters["reprobes"] += 1
        cfg = self.config
        try:
            topo = await asyncio.to_thread(self._probe, cfg)
        except ProbeError as exc:
            log.error("re-probe after %s failed, keeping the previous topology: %s", why, exc)
            self.record_error("probe", str(exc))
            self._memo_key = None  # the next probe starts a new memo: no bad text kept in it
            return False
        if topo == self.topo:
            return False
        log.info("topology changed (%s): re-publishing", why)
        self._set_host(topo, cfg)
        self.mark_dirty()
        return True

    async def poll_hugepages(self) -> bool:
        """Re-read the hugepage counters; on a change the tracker recomputes and we publish.

        A bad file (``ProbeError``: a count no kernel prints, a FIFO, ...) keeps the last
        good counters. It is logged and recorded once, not at every poll, until a poll
        succeeds again.
        """
        self.counters["hugepage_polls"] += 1
        topo = self.topo
        try:
            new = await asyncio.to_thread(read_hugepages, self.config.probe.sysfs_root, topo)
        except (ProbeError, OSError) as exc:
            if str(exc) != self._hugepage_error:
                self._hugepage_error = str(exc)
                log.error("hugepage counters not updated, keeping the last ones: %s", exc)
                self.record_error("hugepages", str(exc))
            return False
        if self._hugepage_error is not None:
            self._hugepage_error = None
            log.info("hugepage counters readable again")
        if new is topo or topo is not self.topo:
            return False
        self.counters["hugepage_changes"] += 1
        log.debug("hugepage counters changed")
        self._set_host(new, self.config)
        self.mark_dirty()
        return True

    async def _hugepage_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.probe.hugepage_poll_seconds)
            await self.poll_hugepages()

    async def _watchdog_loop(self, interval: float) -> None:
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(interval)

    # --- requests ----------------------------------------------------------------------

    async def op_fit(self, req: dict[str, Any]) -> dict[str, Any]:
        from hostagent.fit import STRATEGIES, fit
        from hostagent.fit.request import short_repr

        extra = set(req) - {"op", "request", "strategy"}
        if extra:
            names = sorted(k if isinstance(k, str) else repr(k) for k in extra)
            shown = [n if len(n) <= 64 else n[:48] + "…" for n in names[:8]]
            raise HostagentError(f"op fit: unknown fields {shown} (known: request, strategy)")
        request = req.get("request")
        if not isinstance(request, dict):
            raise HostagentError("op fit: 'request' must be a map (a fit request)")
        strategy = req.get("strategy", self.config.fit.cell_strategy)
        if not isinstance(strategy, str) or strategy not in STRATEGIES:
            raise HostagentError(f"op fit: strategy={short_repr(strategy)}: must be one of "
                                 f"{', '.join(STRATEGIES)}")
        snap = self.latest_snapshot()
        if snap is None:
            raise HostagentError("no snapshot yet: the agent is starting")
        steps = self.config.fit.search_steps
        result = await asyncio.to_thread(
            lambda: fit(self._prepared(snap), request, strategy=strategy, search_steps=steps))
        return {"seq": snap["seq"], "epoch": snap["epoch"], "result": result}

    def _prepared(self, snap: dict[str, Any]) -> Any:
        """The snapshot as the fit reads it, made once per snapshot (a published snapshot
        is never changed; the next one is a new dict) and shared by the fits until then
        (fits in flight at once may each make it: the same result)."""
        from hostagent.fit import prepare

        cached = self._fit_view
        if cached is None or cached[0] is not snap:
            cached = self._fit_view = (snap, prepare(snap))
        return cached[1]

    # --- signals -----------------------------------------------------------------------

    def stop(self) -> None:
        if self._stop is not None:
            self._stop.set()

    async def reload(self) -> bool:
        """SIGHUP: re-read the config file; a bad one is refused and the old one stays."""
        assert self._reload_lock is not None
        async with self._reload_lock:
            self.notifier.reloading()
            try:
                ok = await self._reload()
            finally:
                self.notifier.ready(self._status())
            return ok

    async def _reload(self) -> bool:
        """Everything that can fail (config file, probe, allowed CURVE keys) is read
        first; only then is anything applied: a failure changes nothing."""
        from hostagent.agent.claim_desk import join_keys, load_claimants
        from hostagent.curve import load_allowed_keys

        old = self.config
        allowed = claimants = None
        try:
            new = await asyncio.to_thread(load_config, self.config_path)
            merged, notes = merge_reload(old, new)
            topo = await asyncio.to_thread(self._probe, merged)
            if self.auth is not None:  # bad key files are skipped; a missing dir refuses
                allowed = await asyncio.to_thread(load_allowed_keys,
                                                  merged.curve.allowed_clients_dir)
                claimants = await asyncio.to_thread(load_claimants, merged.curve)
                allowed = join_keys(allowed, claimants)
        except HostagentError as exc:
            self.counters["reloads_refused"] += 1
            self.record_error("reload", str(exc))
            log.error("reload refused, the previous configuration stays in force: %s", exc)
            self._reload_refused = str(exc)
            return False
        self._reload_refused = None
        for note in notes:
            log.warning("reload: %s", note)
        self.config = merged
        self.counters["reloads"] += 1
        set_level(merged.agent.log_level)
        self.publisher.cfg = dataclasses.replace(
            self.publisher.cfg, coalesce_ms=merged.publisher.coalesce_ms,
            heartbeat_seconds=merged.publisher.heartbeat_seconds)
        if claimants is not None:
            self.claim_desk.set_claimants(claimants.keys)
        if allowed is not None:
            removed = self.auth.replace(allowed)
            for message in allowed.skipped:
                self.record_error("curve", message)
            log.info("reload: %d allowed CURVE client keys, %d removed", len(allowed.keys),
                     len(removed))
            if removed:  # ZAP runs only at a handshake: cut the live sessions
                await self._drop_connections()
        if merged.libvirt.uri != old.libvirt.uri:
            await self.watcher.close()
            self._start_watcher()
        else:
            self.watcher.resync_seconds = merged.libvirt.resync_seconds
            self.watcher.reconnect_max = merged.libvirt.reconnect_max_seconds
            self.watcher.call_timeout = merged.libvirt.call_timeout_seconds
            self.watcher.set_thread_check_seconds(thread_check_period(merged.libvirt))
            self.watcher.request_resync()
        self._set_host(topo, merged)
        self._set_vcpu_groups(merged)
        if (merged.probe.sysfs_root, merged.probe.resctrl_root) != (
                old.probe.sysfs_root, old.probe.resctrl_root):
            self._log_roots(topo, merged, "reload")
        log.info("configuration reloaded from %s", merged.source)
        self.mark_dirty()
        return True

    def _set_vcpu_groups(self, cfg: Config) -> None:
        """(Re)build the ``[resctrl] vcpu_groups`` bindings when they or the resctrl root
        changed (start, SIGHUP); a new set is applied at once."""
        from hostagent.agent.vcpu_groups import VcpuGroups

        vg = self.vcpu_groups
        want = (cfg.probe.resctrl_root, cfg.resctrl.vcpu_groups)
        if vg is not None and (vg.resctrl_root, vg.bindings) == want:
            return
        self.vcpu_groups = VcpuGroups(*want) if cfg.resctrl.vcpu_groups else None
        if self.vcpu_groups is not None:
            log.info("vcpu_groups: %d bindings of guest threads to resctrl groups in %s",
                     len(cfg.resctrl.vcpu_groups), cfg.probe.resctrl_root)
            self._vg_wake.set()

    async def _vcpu_group_loop(self) -> None:
        """Apply the bindings off the loop after each changed thread check (and again
        every ``RETRY_SECONDS`` while one has failed)."""
        from hostagent.agent.vcpu_groups import RETRY_SECONDS

        while True:
            failed = self.vcpu_groups is not None and self.vcpu_groups.failed
            try:
                await asyncio.wait_for(self._vg_wake.wait(), RETRY_SECONDS if failed else None)
            except TimeoutError:
                pass
            self._vg_wake.clear()
            vg, tracker = self.vcpu_groups, self.tracker
            if vg is None or tracker is None:
                continue
            names = {u: r.name for u, r in tracker.records.items() if r.active}
            try:
                await asyncio.to_thread(vg.apply, names, dict(tracker.threads))
            except Exception:
                log.exception("vcpu_groups: applying the bindings failed")

    async def _drop_connections(self) -> None:
        """Close every client connection (clients whose key is still allowed reconnect);
        an endpoint that cannot be bound again stops the agent with that error (exit 2,
        systemd restarts it) rather than leave it running unreachable."""
        try:
            await self.publisher.drop_connections()
        except HostagentError as exc:
            log.error("%s: stopping", exc)
            self.record_error("reload", str(exc))
            self.exit_error = exc
            self.stop()
            return
        log.info("reload: client keys were removed: every client connection was closed; "
                 "allowed clients reconnect")

    def dump_document(self) -> dict[str, Any]:
        from hostagent.agent.debug_dump import process_info, thread_stacks, with_iso_times

        pub = self.publisher
        return with_iso_times({
            "written": time.time(),
            "version": __version__,
            "started": self.started,
            "config_path": self.config_path,
            "config": config_document(self.config),
            "host": pub.host,
            "epoch": self.epoch,
            "seq": pub.seq,
            "subscribers": pub.subscribers,
            "publisher": pub.state(),
            "libvirt": self.watcher.state() if self.watcher else None,
            "udev": self.udev.state() if self.udev else {"active": False},
            "counters": dict(self.counters),
            "errors": list(self.errors),
            "claims": self.claim_desk.state() if self.claim_desk else None,
            "vcpu_groups": self.vcpu_groups.state() if self.vcpu_groups else [],
            "notify": {"socket": self.notifier.address, "last": self.notifier.sent,
                       "watchdog_interval": watchdog_interval(self.env)},
            "process": process_info(),
            "threads": thread_stacks(),
            "snapshot": self.latest_snapshot(),
        })

    async def dump(self) -> Path | None:
        """SIGUSR1: write the debug dump; log one line with its path."""
        from hostagent.agent.debug_dump import write_dump

        self.counters["dumps"] += 1
        doc = self.dump_document()
        try:
            path = await asyncio.to_thread(write_dump, self.config.agent.runtime_dir, doc)
        except OSError as exc:
            log.error("debug dump failed: %s", exc)
            self.record_error("dump", str(exc))
            return None
        self.last_dump = str(path)
        log.info("debug dump written to %s (seq %d, %d subscribers)", path, doc["seq"],
                 doc["subscribers"])
        return path

    def metrics_readings(self) -> AgentReadings:
        """What a Prometheus scrape reads (``hostagent.agent.metrics.AgentReadings``): the latest
        published snapshot and copies of the counters. Called on the loop thread."""
        from hostagent.agent.metrics import AgentReadings

        pub = self.publisher
        return AgentReadings(
            host=pub.host, epoch=self.epoch, snapshot=self.latest_snapshot(),
            subscribers=pub.subscribers, publisher=dict(pub.stats),
            agent=dict(self.counters), errors=dict(self.error_counts),
            libvirt=dict(self.watcher.counters) if self.watcher is not None else {})

    async def _start_metrics(self) -> None:
        """``[metrics] listen``: serve the Prometheus endpoint on this loop (off when "")."""
        if not self.config.metrics.listen:
            return
        from hostagent.agent.metrics import start_metrics_server

        self.metrics = await start_metrics_server(self.config.metrics.listen,
                                                  self.metrics_readings)
        log.info("metrics on %s", self.metrics.url)

    # --- run ---------------------------------------------------------------------------

    def _start_watcher(self) -> None:
        from hostagent.agent.libvirt_watch import LibvirtWatcher

        lv = self.config.libvirt
        extra = {} if self._libvirt_opener is None else {"opener": self._libvirt_opener}
        self.watcher = LibvirtWatcher(
            lv.uri, self.mark_dirty, resync_seconds=lv.resync_seconds,
            reconnect_max_seconds=lv.reconnect_max_seconds,
            call_timeout_seconds=lv.call_timeout_seconds, on_connect=self._on_connect,
            thread_check_seconds=thread_check_period(lv), **extra)
        self.watcher.intruder_scope = self._intruder_scope()
        self.watcher.start()

    def _on_connect(self, conn: Any) -> None:
        """(the watcher's worker thread) Every connect hook, on each new connection."""
        for hook in self.connect_hooks:
            hook(conn)

    async def run(self) -> int:
        import zmq
        import zmq.asyncio

        from hostagent.agent.claim_desk import ClaimDesk, join_keys, load_claimants
        from hostagent.agent.libvirt_watch import FIRST_SYNC_WAIT_SECONDS
        from hostagent.agent.test_driver import attach as attach_test_driver
        from hostagent.agent.test_driver import is_test_uri
        from hostagent.agent.udev_watch import UdevWatch
        from hostagent.curve import AllowedKeys, ServerCurve, start_authenticator
        from hostagent.publisher import Publisher

        loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        cfg = self.config
        self._set_host(await asyncio.to_thread(self._probe, cfg), cfg)
        self._log_roots(self.topo, cfg, "probe")
        self.ctx = zmq.asyncio.Context()
        tasks: list[asyncio.Task[Any]] = []
        try:
            curve = None
            if cfg.curve.enabled:
                curve = ServerCurve.load(cfg.curve.server_secret_key,
                                         cfg.curve.allowed_clients_dir)
                self.auth = start_authenticator(self.ctx, curve.allowed_dir)
                claimants = load_claimants(cfg.curve)  # they may connect too
                self.auth.replace(join_keys(AllowedKeys(self.auth.keys, self.auth.skipped),
                                            claimants))
                log.info("CURVE: %d allowed client keys in %s, %d claimants", len(
                    self.auth.keys), curve.allowed_dir, len(claimants.keys))
                for message in self.auth.skipped:
                    self.record_error("curve", message)
            self.publisher = Publisher(self.ctx, cfg.publisher, cfg.host_name, self.epoch,
                                       curve=curve)
            self.publisher.bind()
            self.publisher.register("fit", self.op_fit)
            self.claim_desk = ClaimDesk(self)
            if curve is not None:
                self.claim_desk.set_claimants(claimants.keys)
            self.claim_desk.register(self.publisher)
            self.claim_desk.restore()
            if is_test_uri(cfg.libvirt.uri):  # the test-domain op, the demo guests
                attach_test_driver(self)
            await self._start_metrics()
            self._vg_wake = asyncio.Event()
            self._set_vcpu_groups(cfg)
            tasks.append(asyncio.ensure_future(self._vcpu_group_loop()))
            self._start_watcher()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.stop)
            loop.add_signal_handler(signal.SIGHUP, lambda: self._spawn(self.reload()))
            loop.add_signal_handler(signal.SIGUSR1, lambda: self._spawn(self.dump()))
            faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True,
                                  chain=True)
            if not faulthandler.is_enabled():  # SIGABRT (watchdog timeout): stacks first
                faulthandler.enable(file=sys.stderr, all_threads=True)
            # the first snapshot waits a little for the guests (never for a hung libvirt;
            # a SIGTERM meanwhile stops the agent right after it)
            await self.watcher.wait_synced(min(FIRST_SYNC_WAIT_SECONDS,
                                               cfg.libvirt.call_timeout_seconds))
            await self.flush()
            if cfg.probe.udev:
                self.udev = UdevWatch(self.on_udev, monitor=self._udev_monitor)
                self.udev.start(loop)
            tasks.append(asyncio.ensure_future(self.publisher.run()))
            tasks.append(asyncio.ensure_future(self._hugepage_loop()))
            tasks.append(asyncio.ensure_future(self.claim_desk.run()))
            interval = watchdog_interval(self.env)
            if interval:
                tasks.append(asyncio.ensure_future(self._watchdog_loop(interval)))
            # Everything built so far lives as long as the agent: keep it out of the
            # cyclic collector, whose full passes would otherwise walk it on every publish
            # burst (the per-event garbage is acyclic and freed by reference counting).
            gc.freeze()
            self.notifier.ready(self._status())
            log.info("hostagent %s publishing host %r epoch %s on %s (requests on %s)",
                     __version__, self.publisher.host, self.epoch,
                     ", ".join(self.publisher.bound["stream"]),
                     ", ".join(self.publisher.bound["request"]) or "-")
            stop = asyncio.ensure_future(self._stop.wait())
            done, _ = await asyncio.wait([stop, *tasks], return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                if t is not stop:
                    t.result()  # a crashed core task ends the agent with its error
            if self.exit_error is not None:
                raise self.exit_error
            log.info("stopping")
            return 0
        finally:
            self.notifier.stopping()
            await self._shutdown(loop, tasks)

    async def _shutdown(self, loop: asyncio.AbstractEventLoop,
                        tasks: list[asyncio.Task[Any]]) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)
        with contextlib.suppress(Exception):
            faulthandler.unregister(signal.SIGUSR1)
        if self._flush_handle is not None:
            self._flush_handle.cancel()
        if self._udev_handle is not None:
            self._udev_handle.cancel()
        if self.udev is not None:
            self.udev.stop(loop)
        pending = [*tasks, *self._bg]
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        if self.metrics is not None:
            await self.metrics.close()
        if self.watcher is not None:
            await self.watcher.close()
        if self.claim_desk is not None:
            self.claim_desk.close()
        if self.publisher is not None:
            self.publisher.close()
        if self.auth is not None:
            self.auth.stop()
        if self.ctx is not None:
            self.ctx.destroy(linger=0)


#: The interpreter's thread switch interval in the agent (Python's default: 5 ms). A
#: worker thread (the claims file's writer, a fit, a probe) takes the GIL back after each
#: system call it makes; while the loop runs Python code it would wait up to the interval
#: for each one, so that a claims-file write (a handful of system calls) took tens of ms
#: with the loop busy deciding claims (docs/daemon.md §2).
GIL_SWITCH_SECONDS = 0.0005


def run_agent(config_path: str | None) -> int:
    """Load the config, set up logging, run the loop; the process exit code."""
    sys.setswitchinterval(GIL_SWITCH_SECONDS)
    agent = Agent(config_path)  # ConfigError → the CLI prints it, exit 2
    setup_logging(agent.config.agent.log_level)
    return asyncio.run(agent.run())
