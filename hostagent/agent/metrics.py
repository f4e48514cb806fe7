"""The Prometheus endpoint (``[metrics] listen``, off by default; docs/metrics.md).

Nothing here runs per event: ``AgentCollector.collect`` builds every metric family at
scrape time from the latest *published* snapshot (the same numbers schedulers see) and
from copies of the agent's counters (``AgentReadings``). The HTTP server runs on the
agent's asyncio loop, so the collector reads the agent's state on the loop thread and
needs no lock. Scrapes are bounded (named constants below): at most
``MAX_CONNECTIONS`` connections, a request head of at most ``MAX_REQUEST_BYTES`` that
must arrive within ``REQUEST_TIMEOUT_SECONDS``, the answer written (and the connection
closed) within ``WRITE_TIMEOUT_SECONDS``, and the text rendered at most once per
``RENDER_CACHE_SECONDS`` per format, however often it is asked for. A connection beyond
the limit closes the oldest connection still waiting for its request (so clients that
connect and never send cannot lock a scraper out), or is closed itself when every
connection is already answering.

The registry is our own (``CollectorRegistry``), not prometheus_client's global one; it
also holds prometheus_client's process, platform and gc collectors (``process_*``,
``python_*``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.exposition import generate_latest as generate_text
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

from hostagent import __version__
from hostagent.config import parse_listen
from hostagent.errors import HostagentError

log = logging.getLogger("hostagent.metrics")

#: The one path served; anything else is 404.
METRICS_PATH = "/metrics"
#: Connections open at once; one more closes the oldest still waiting for its request.
MAX_CONNECTIONS = 8
#: The request line and headers (a scraper sends a few hundred bytes); over it: 431.
MAX_REQUEST_BYTES = 8192
#: Time for the whole request head to arrive after the connection is accepted.
REQUEST_TIMEOUT_SECONDS = 5.0
#: Time to hand the answer to the client and close the connection.
WRITE_TIMEOUT_SECONDS = 10.0
#: A rendered answer is served again to every scrape for this long (per format).
RENDER_CACHE_SECONDS = 1.0

#: The two formats served: Prometheus text (the default) and OpenMetrics, when the
#: scraper's Accept header names application/openmetrics-text.
CONTENT_TYPE_TEXT = "text/plain; version=0.0.4; charset=utf-8"
CONTENT_TYPE_OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"

#: Every conflict kind of docs/tracker.md §4: each is exported, 0 when absent, so an
#: alert on ``hostagent_conflicts > 0`` has a series from the start.
CONFLICT_KINDS = ("dedicated_overlap", "pin_offline", "pin_not_dedicated",
                  "idle_thread_taken", "floating_on_dedicated", "cell_missing",
                  "hugepages_exhausted", "hugepages_untracked", "hugepage_size_missing",
                  "memory_exhausted",
                  "cache_group_missing", "pci_overlap", "pci_missing", "xml_error",
                  "claim_mismatch", "affinity_drift", "host_tasks_on_dedicated")
#: Where errors are counted (``hostagent_errors_total{where}``), each exported from 0:
#: the agent's recorded errors (docs/daemon.md §7.2 ``errors``), requests a handler
#: failed on with a bug, and libvirt errors during reads.
ERROR_WHERE = ("probe", "hugepages", "reload", "curve", "dump", "task", "request",
               "libvirt", "claims")
#: The server's own answers and dropped connections, each exported from 0.
HTTP_CODES = (200, 400, 404, 405, 431, 500)
DROP_REASONS = ("evicted", "refused", "request_timeout", "write_timeout")


@dataclass(frozen=True)
class AgentReadings:
    """What a scrape reads from the agent: the latest published snapshot (replaced on
    every publish, never changed in place) and copies of its counters."""

    host: str
    epoch: str
    snapshot: Mapping[str, Any] | None
    subscribers: int
    publisher: Mapping[str, int]  # Publisher.stats: snapshots, requests, bad_requests…
    agent: Mapping[str, int]  # Agent.counters: reloads, reloads_refused, reprobes…
    errors: Mapping[str, int]  # recorded errors by where
    libvirt: Mapping[str, int]  # LibvirtWatcher.counters: errors…


# --- metric families -------------------------------------------------------------------

KIB = 1024

#: (metric, usage.cells[] key, scale, help) — one gauge per cell.
_CELL_GAUGES = (
    ("hostagent_cell_dedicated_threads", "dedicated_cpus", 1,
     "Online dedicated threads of the cell (config.dedicated_cpus)."),
    ("hostagent_cell_dedicated_threads_free", "free_pcpus", 1,
     "Dedicated threads nobody owns, keeps idle or floats onto (usage.cells[].free_pcpus)."),
    ("hostagent_cell_cores_free", "free_cores", 1,
     "Whole cores whose every online thread is dedicated and free."),
    ("hostagent_cell_shared_threads", "shared_cpus", 1,
     "Online shared threads of the cell."),
    ("hostagent_cell_shared_vcpus", "shared_vcpus", 1,
     "Shared vCPUs placed in the cell."),
    ("hostagent_cell_shared_vcpus_limit", "shared_vcpus_limit", 1,
     "floor(shared threads x cpu_allocation_ratio)."),
    ("hostagent_cell_memory_limit_bytes", "memory_limit_kib", KIB,
     "Ordinary memory guests may take in the cell (usage.cells[].memory_limit_kib)."),
    ("hostagent_cell_memory_used_bytes", "memory_used_kib", KIB,
     "Ordinary memory the guests take in the cell."),
)


def _labels(*names: str) -> list[str]:
    return list(names)


def cell_families(snap: Mapping[str, Any]) -> list[Metric]:
    """Per cell: threads, cores, memory (bookkeeping and the kernel's)."""
    gauges = {name: GaugeMetricFamily(name, doc, labels=_labels("cell"))
              for name, _key, _scale, doc in _CELL_GAUGES}
    total = GaugeMetricFamily("hostagent_cell_memory_bytes",
                              "MemTotal of the cell (topology.cells[].memory_kib).",
                              labels=_labels("cell"))
    free = GaugeMetricFamily(
        "hostagent_cell_memory_free_bytes",
        "Free memory of the cell: source=tracker is the limit minus what guests take, "
        "source=kernel is MemFree as of the last probe.", labels=_labels("cell", "source"))
    topo_cells = {c["id"]: c for c in snap["topology"]["cells"]}
    for cell in snap["usage"]["cells"]:
        cid = str(cell["id"])
        for name, key, scale, _doc in _CELL_GAUGES:
            gauges[name].add_metric([cid], cell[key] * scale)
        free.add_metric([cid, "tracker"], cell["memory_free_kib"] * KIB)
        topo = topo_cells.get(cell["id"])
        if topo is not None:
            free.add_metric([cid, "kernel"], topo["memory_free_kib"] * KIB)
            total.add_metric([cid], topo["memory_kib"] * KIB)
    return [*gauges.values(), total, free]


def hugepage_families(snap: Mapping[str, Any]) -> list[Metric]:
    """Per cell and page size: total, reserved, used by guests, free (tracker, kernel)."""
    labels = _labels("cell", "size_bytes")
    total = GaugeMetricFamily("hostagent_hugepages_total",
                              "Pages in the pool (nr_hugepages).", labels=labels)
    reserved = GaugeMetricFamily("hostagent_hugepages_reserved",
                                 "Pages kept back by [resources] reserved_hugepages.",
                                 labels=labels)
    used = GaugeMetricFamily("hostagent_hugepages_used",
                             "Pages the guests libvirt knows about take.", labels=labels)
    free = GaugeMetricFamily(
        "hostagent_hugepages_free",
        "Free pages: source=tracker is total - reserved - used by guests, source=kernel "
        "is free_hugepages (re-read every hugepage_poll_seconds).",
        labels=_labels("cell", "size_bytes", "source"))
    for cell in snap["usage"]["cells"]:
        cid = str(cell["id"])
        for pool in cell["hugepages"]:
            key = [cid, str(pool["size_kib"] * KIB)]
            total.add_metric(key, pool["total"])
            reserved.add_metric(key, pool["reserved"])
            used.add_metric(key, pool["used"])
            free.add_metric([*key, "tracker"], pool["free"])
    for cell in snap["topology"]["cells"]:
        for pool in cell["hugepages"]:
            free.add_metric([str(cell["id"]), str(pool["size_kib"] * KIB), "kernel"],
                            pool["free"])
    return [total, reserved, used, free]


def cache_families(snap: Mapping[str, Any]) -> list[Metric]:
    """Per resctrl resource and cache ID: ways, free ways, largest free run, free bytes."""
    labels = _labels("resource", "level", "type", "cache_id")
    ways = GaugeMetricFamily("hostagent_cache_ways",
                             "Ways of the cache ID (bits of cbm_mask).", labels=labels)
    free = GaugeMetricFamily("hostagent_cache_ways_free",
                             "Ways no resctrl group holds (usage.caches[].free_ways).",
                             labels=labels)
    run = GaugeMetricFamily("hostagent_cache_ways_free_contiguous",
                            "The largest run of adjacent free ways (what one new "
                            "allocation can take).", labels=labels)
    free_bytes = GaugeMetricFamily("hostagent_cache_free_bytes",
                                   "Bytes of the free ways.", labels=labels)
    for c in snap["usage"]["caches"]:
        key = [c["resource"], str(c["level"]), c["type"], str(c["id"])]
        ways.add_metric(key, int(c["cbm_mask"], 16).bit_count())
        free.add_metric(key, c["free_ways"])
        run.add_metric(key, c["largest_free_run"])
        free_bytes.add_metric(key, c["free_bytes"])
    return [ways, free, run, free_bytes]


def state_families(snap: Mapping[str, Any]) -> list[Metric]:
    """Guests, floating usage, conflicts by kind, libvirt, and which snapshot this is."""
    usage = snap["usage"]
    conflicts = GaugeMetricFamily("hostagent_conflicts",
                                  "Conflicts in the latest snapshot, by kind "
                                  "(docs/tracker.md §4).", labels=_labels("kind"))
    kinds = Counter(c["kind"] for c in usage["conflicts"])
    for kind in dict.fromkeys((*CONFLICT_KINDS, *sorted(kinds))):
        conflicts.add_metric([kind], kinds[kind])
    agent = snap.get("agent") or {}
    connected = bool(agent.get("libvirt", {}).get("connected"))
    return [
        GaugeMetricFamily("hostagent_guests", "Guests tracked (active domains).",
                          value=len(usage["guests"])),
        GaugeMetricFamily("hostagent_claims", "Outstanding claims (usage.claims, "
                          "docs/claims.md).", value=len(usage.get("claims") or ())),
        GaugeMetricFamily("hostagent_floating_vcpus",
                          "vCPUs of guests with no affinity to any one cell.",
                          value=usage["floating_vcpus"]),
        GaugeMetricFamily("hostagent_floating_memory_bytes",
                          "Guest memory bound to no one cell.",
                          value=usage["floating_memory_kib"] * KIB),
        conflicts,
        GaugeMetricFamily("hostagent_libvirt_connected",
                          "1 while the agent is connected to libvirt (agent.libvirt).",
                          value=int(connected)),
        GaugeMetricFamily("hostagent_snapshot_seq", "seq of the latest published snapshot.",
                          value=snap["seq"]),
        GaugeMetricFamily("hostagent_snapshot_timestamp_seconds",
                          "When the latest published snapshot was built (unix time).",
                          value=snap["time"]),
    ]


def snapshot_families(snap: Mapping[str, Any]) -> list[Metric]:
    """Every metric taken from one published snapshot."""
    return [*cell_families(snap), *hugepage_families(snap), *cache_families(snap),
            *state_families(snap)]


#: (metric, AgentReadings field, key, help) — counters exported from 0.
_COUNTERS = (
    ("hostagent_snapshots_published", "publisher", "snapshots",
     "Snapshots published (each new seq)."),
    ("hostagent_heartbeats", "publisher", "heartbeats", "Heartbeats sent."),
    ("hostagent_requests", "publisher", "requests",
     "Messages received on the request endpoint."),
    ("hostagent_bad_requests", "publisher", "bad_requests",
     "Requests refused as malformed (not msgpack, no op, unknown op, over a limit)."),
    ("hostagent_failed_requests", "publisher", "failed_requests",
     "Well-formed requests answered with an error (bad fit request, no snapshot yet)."),
    ("hostagent_busy_requests", "publisher", "busy_requests",
     "Requests answered busy: too many requests in flight (docs/daemon.md 3.4)."),
    ("hostagent_reloads", "agent", "reloads", "Configuration reloads applied (SIGHUP)."),
    ("hostagent_reloads_refused", "agent", "reloads_refused",
     "Reloads refused; the previous configuration stayed in force."),
    ("hostagent_reprobes", "agent", "reprobes", "Re-probes of the host (hotplug, reload)."),
)


def agent_families(r: AgentReadings) -> list[Metric]:
    """The agent's identity, subscribers and counters (present before any snapshot)."""
    info = GaugeMetricFamily("hostagent_info", "The agent: version, host name, epoch.",
                             labels=_labels("version", "host", "epoch"))
    info.add_metric([__version__, r.host, r.epoch], 1)
    fams: list[Metric] = [
        info,
        GaugeMetricFamily("hostagent_subscribers",
                          "Active subscriptions that match the agent's topic.",
                          value=r.subscribers),
    ]
    for name, source, key, doc in _COUNTERS:
        fams.append(CounterMetricFamily(name, doc, value=getattr(r, source).get(key, 0)))
    errors = CounterMetricFamily("hostagent_errors", "Errors, by where they happened.",
                                 labels=_labels("where"))
    counts = Counter(r.errors)
    counts["request"] += r.publisher.get("internal_errors", 0)
    counts["libvirt"] += r.libvirt.get("errors", 0)
    for where in dict.fromkeys((*ERROR_WHERE, *sorted(counts))):
        errors.add_metric([where], counts[where])
    fams.append(errors)
    return fams


class AgentCollector:
    """A prometheus_client collector: every family built at scrape time from ``read()``."""

    def __init__(self, read: Callable[[], AgentReadings]) -> None:
        self.read = read

    def collect(self) -> Iterable[Metric]:
        readings = self.read()
        yield from agent_families(readings)
        if readings.snapshot is not None:
            yield from snapshot_families(readings.snapshot)


class _ServerCollector:
    """The HTTP server's own counters."""

    def __init__(self, responses: Counter[int], dropped: Counter[str]) -> None:
        self.responses, self.dropped = responses, dropped

    def collect(self) -> Iterable[Metric]:
        codes = CounterMetricFamily("hostagent_metrics_http_responses",
                                    "Answers of the metrics endpoint, by status code.",
                                    labels=_labels("code"))
        for code in sorted({*HTTP_CODES, *self.responses}):
            codes.add_metric([str(code)], self.responses[code])
        dropped = CounterMetricFamily(
            "hostagent_metrics_connections_dropped",
            "Metrics connections closed without an answer, by reason (docs/metrics.md).",
            labels=_labels("reason"))
        for reason in DROP_REASONS:
            dropped.add_metric([reason], self.dropped[reason])
        yield codes
        yield dropped


def build_registry(read: Callable[[], AgentReadings]) -> CollectorRegistry:
    """Our own registry: the agent's collector plus process, platform and gc metrics."""
    registry = CollectorRegistry()
    registry.register(AgentCollector(read))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


# --- the HTTP server -------------------------------------------------------------------

def _response(status: int, body: bytes, content_type: str = "text/plain; charset=utf-8",
              extra: tuple[str, ...] = ()) -> bytes:
    head = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}",
            f"Content-Type: {content_type}", f"Content-Length: {len(body)}",
            "Connection: close", *extra]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


class MetricsServer:
    """``GET /metrics`` on the asyncio loop, bounded (see the module docstring).

    One answer per connection (``Connection: close``). The limits are keyword arguments
    only so that tests can shorten the timeouts; the agent uses the module constants.
    """

    def __init__(self, registry: CollectorRegistry, host: str, port: int, *,
                 max_connections: int = MAX_CONNECTIONS,
                 max_request_bytes: int = MAX_REQUEST_BYTES,
                 request_timeout: float = REQUEST_TIMEOUT_SECONDS,
                 write_timeout: float = WRITE_TIMEOUT_SECONDS,
                 render_cache_seconds: float = RENDER_CACHE_SECONDS) -> None:
        self.registry = registry
        self.host, self.port = host, port
        self.max_connections = max_connections
        self.max_request_bytes = max_request_bytes
        self.request_timeout = request_timeout
        self.write_timeout = write_timeout
        self.render_cache_seconds = render_cache_seconds
        self.responses: Counter[int] = Counter()
        self.dropped: Counter[str] = Counter()
        registry.register(_ServerCollector(self.responses, self.dropped))
        self._conns: dict[asyncio.StreamWriter, bool] = {}  # writer → still reading
        self._cache: dict[bool, tuple[float, int, bytes, str]] = {}
        self._server: asyncio.Server | None = None
        self.bound: tuple[str, int] | None = None

    @property
    def url(self) -> str:
        assert self.bound is not None
        host, port = self.bound
        return f"http://{f'[{host}]' if ':' in host else host}:{port}{METRICS_PATH}"

    async def start(self) -> None:
        """Bind and listen; ``HostagentError`` names the address when that fails."""
        try:
            self._server = await asyncio.start_server(
                self._serve, self.host, self.port, limit=self.max_request_bytes)
        except OSError as exc:
            where = f"[{self.host}]" if ":" in self.host else self.host
            raise HostagentError(f"cannot listen for metrics on {where}:{self.port}: "
                                 f"{exc.strerror or exc}") from None
        sockname = self._server.sockets[0].getsockname()
        self.bound = (sockname[0], sockname[1])

    async def close(self) -> None:
        """Stop listening and drop every open connection."""
        if self._server is not None:
            self._server.close()
        for writer in list(self._conns):
            writer.transport.abort()
        self._conns.clear()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)

    # --- one connection ----------------------------------------------------------------

    def _admit(self, writer: asyncio.StreamWriter) -> bool:
        """Room for one more connection: evict the oldest one still reading if needed."""
        if len(self._conns) >= self.max_connections:
            victim = next((w for w, reading in self._conns.items() if reading), None)
            if victim is None:
                self.dropped["refused"] += 1
                return False
            del self._conns[victim]
            victim.transport.abort()
            self.dropped["evicted"] += 1
        self._conns[writer] = True
        return True

    async def _serve(self, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        if not self._admit(writer):
            writer.transport.abort()
            return
        try:
            answer = await self._read_request(reader)
            if answer is not None and writer in self._conns:
                self._conns[writer] = False  # answering: no longer evictable
                await self._write(writer, answer)
        except Exception:  # a bug here must never reach the loop's exception handler
            log.exception("metrics connection failed")
        finally:
            self._conns.pop(writer, None)
            writer.transport.abort()  # no-op once closed cleanly

    async def _read_request(self, reader: asyncio.StreamReader) -> bytes | None:
        """The answer to the request head, or ``None`` to close without one."""
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"),
                                          self.request_timeout)
        except TimeoutError:
            self.dropped["request_timeout"] += 1
            return None
        except asyncio.LimitOverrunError:
            return self._error(431, f"request head over {self.max_request_bytes} bytes\n")
        except (asyncio.IncompleteReadError, OSError):
            return None  # the client went away (or was evicted)
        return self._answer(head)

    async def _write(self, writer: asyncio.StreamWriter, answer: bytes) -> None:
        writer.write(answer)
        try:
            async with asyncio.timeout(self.write_timeout):
                await writer.drain()
                writer.close()
                await writer.wait_closed()
        except TimeoutError:
            self.dropped["write_timeout"] += 1
        except OSError:
            pass  # the client went away

    def _error(self, status: int, text: str, extra: tuple[str, ...] = ()) -> bytes:
        self.responses[status] += 1
        return _response(status, text.encode(), extra=extra)

    def _answer(self, head: bytes) -> bytes:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            return self._error(400, "bad request line\n")
        method, target, _version = parts
        if method != "GET":
            return self._error(405, "only GET\n", extra=("Allow: GET",))
        if target.split("?", 1)[0] != METRICS_PATH:
            return self._error(404, f"not found: the metrics are at {METRICS_PATH}\n")
        accept = ""
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "accept":
                accept = value
        openmetrics = "application/openmetrics-text" in accept
        status, body, content_type = self._render(openmetrics)
        self.responses[status] += 1
        return _response(status, body, content_type)

    def _render(self, openmetrics: bool) -> tuple[int, bytes, str]:
        """The exposition text, from the cache when rendered less than
        ``render_cache_seconds`` ago (a failure is cached too: one log line a period)."""
        now = time.monotonic()
        cached = self._cache.get(openmetrics)
        if cached is not None and now - cached[0] < self.render_cache_seconds:
            return cached[1:]
        try:
            if openmetrics:
                out = (200, generate_openmetrics(self.registry), CONTENT_TYPE_OPENMETRICS)
            else:
                out = (200, generate_text(self.registry), CONTENT_TYPE_TEXT)
        except Exception as exc:
            log.exception("rendering the metrics failed")
            out = (500, f"internal error: {type(exc).__name__}: {exc}\n".encode(),
                   "text/plain; charset=utf-8")
        self._cache[openmetrics] = (now, *out)
        return out


async def start_metrics_server(listen: str,
                               read: Callable[[], AgentReadings]) -> MetricsServer:
    """Serve ``read()``'s metrics on ``listen`` (``HOST:PORT``, validated by the config)."""
    host, port = parse_listen(listen)
    server = MetricsServer(build_registry(read), host, port)
    await server.start()
    return server
