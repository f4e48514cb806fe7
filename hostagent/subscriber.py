"""The subscriber library: follow one or many agents and hold the latest snapshot per host.

    from hostagent.subscriber import Subscriber
    with Subscriber(["tcp://10.0.0.5:6510,tcp://10.0.0.5:6511", "tcp://10.0.0.6:6510"]) as sub:
        for update in sub.updates():          # blocks; Update(kind, host, ...)
            snap = sub.latest(update.host)    # the schema-v1 snapshot dict

Each source is ``STREAM[,REQUEST]``: the agent's XPUB endpoint and, optionally, its
ROUTER request endpoint (used to fetch a fresh snapshot after a gap). A source may be
a forwarder carrying many hosts. ``AsyncSubscriber`` is the same for asyncio
(``await sub.poll()`` / ``async for update in sub``).

Rules (docs/daemon.md §3.2), applied per host by ``SubscriberState``, which does no I/O:
- a message of a new ``epoch`` resets the host (the agent restarted);
- a snapshot whose ``seq`` is not above the one held is a duplicate and is dropped
  (this is how re-publishes for newcomers are ignored); one above it replaces it
  (skipping numbers counts a gap — snapshots are full, nothing else is needed);
- a heartbeat whose ``seq`` is above the one held means a snapshot was missed: the
  host is *stale*, and a fresh snapshot is fetched through the source's request
  endpoint if it has one (otherwise the next snapshot repairs it);
- a host is *alive* while any message arrived within ``dead_after`` seconds; a host
  going silent yields one ``dead`` update;
- a host is bound to the source it was first heard on (its endpoint and, with CURVE, the
  agent key that source was connected with): the same host name from another source is
  dropped (``foreign_source``) while the host is alive; once it has been silent on its
  source for ``dead_after`` the binding is released and the next source to carry it
  takes it (``rebinds``; the held state starts again from that source's messages);
- a snapshot that would be accepted is first checked against schema v1
  (``wire.check_snapshot``); one that fails is dropped (``invalid_snapshots``) before it
  changes anything (no epoch reset, no binding).

Every received message passes ``wire.decode_stream`` (strict msgpack, size limits,
``0 <= seq <= wire.MAX_SEQ``); bad messages are counted in ``stats`` and dropped.
``MAXMSGSIZE`` is set on every receiving socket. libzmq drops a connection that breaks
the protocol (a frame over ``MAXMSGSIZE``) and does not retry it: each SUB socket is
monitored, and a disconnect that libzmq does not follow with a retry within
``RECONNECT_GRACE_SECONDS`` is reconnected by the library (``reconnects``; doubling
delays up to ``RECONNECT_MAX_SECONDS`` while it keeps happening before any snapshot
arrives). ``request()`` / ``async_request()`` send one request to an agent's request
endpoint and return the reply; ``claim()`` / ``release()`` claim a placement at an agent
and give it back (docs/claims.md).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import math
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from hostagent import wire
from hostagent.curve import ClientCurve
from hostagent.errors import HostagentError

log = logging.getLogger("hostagent.subscriber")

DEFAULT_DEAD_AFTER = 5.0
DEFAULT_REQUEST_TIMEOUT = 3.0
#: After a source's connection drops, libzmq schedules its own retry at once (a
#: ``CONNECT_RETRIED`` event) unless it gave up on a protocol error; a drop not followed
#: by a retry within this many seconds is reconnected by the library.
RECONNECT_GRACE_SECONDS = 0.5
#: Successive library reconnects of one source with no snapshot in between wait twice
#: as long each time (0.5, 1, 2, ... s), up to this: an agent whose every snapshot is
#: over ``max_message_bytes`` costs it one re-publish per 30 s, not a loop.
RECONNECT_MAX_SECONDS = 30.0
#: At most this many (kind, host, source) warnings are remembered to log each once;
#: beyond it, further first-time ones are logged at debug level.
MAX_WARNED = 1024
#: Messages read from one source per turn of ``poll``: a subscriber that receives faster
#: than it decodes still returns from ``poll`` (by its timeout, with what it applied)
#: instead of draining a queue that never empties.
POLL_BATCH = 1000
#: Messages shorter than this (heartbeats, small snapshots: never compressed) are decoded
#: without looking up the host's decode cache.
DECODE_CACHE_MIN_BYTES = 256
#: Delta stream (``deltas=True``): a host whose held snapshot cannot take the next delta
#: (a missed one, a delta that does not fit) is healed with a full snapshot — fetched from
#: the source's request endpoint, else asked for by subscribing to its topic once more
#: (the agent's welcome re-publish) — at most once per this many seconds per host.
DELTA_HEAL_SECONDS = 1.0


@dataclass
class HostState:
    """What a subscriber holds about one host."""

    host: str
    epoch: str | None = None
    seq: int = -1  # seq of the snapshot held (-1: none)
    snapshot: dict[str, Any] | None = None
    last_seen: float = 0.0  # monotonic time of the last valid message
    heard_seq: int = -1  # highest seq announced (snapshot or heartbeat)
    stale: bool = False
    alive: bool = True
    source: int = -1  # index of the source it is bound to (where it was first heard)
    gaps: int = 0
    resets: int = 0
    #: delta stream: bytes of deltas applied since the last full snapshot (bounded by
    #: the subscriber's message limit, then a full snapshot is asked for)
    delta_bytes: int = 0
    heal_at: float = -1e9  # monotonic time of the last heal asked for


@dataclass(frozen=True)
class Update:
    """One change: ``kind`` is ``snapshot`` (a newer snapshot is held), ``stale`` (a
    heartbeat showed a missed snapshot), ``dead`` (silent for ``dead_after``)."""

    kind: str
    host: str
    epoch: str | None
    seq: int
    snapshot: dict[str, Any] | None = None


@dataclass
class SubscriberState:
    """The pure per-host state machine (no sockets): feed it decoded bodies."""

    dead_after: float = DEFAULT_DEAD_AFTER
    hosts: dict[str, HostState] = field(default_factory=dict)
    stats: Counter[str] = field(default_factory=Counter)
    #: what to call source ``i`` in log lines (default ``source i``)
    source_names: list[str] = field(default_factory=list)
    #: delta stream: what the deltas applied since a full snapshot may add up to
    max_delta_bytes: int = wire.DEFAULT_MAX_MESSAGE_BYTES
    #: False: a snapshot is handed over in its ``Update`` and not held (``HostState``
    #: keeps epoch, seq, liveness): for a caller that keeps its own copy (a ``Fleet``)
    keep_snapshots: bool = True
    #: (source, host) pairs whose held snapshot needs a full one (delta stream), for the
    #: subscriber's loop to heal (``DELTA_HEAL_SECONDS`` apart per host)
    heal: set[tuple[int, str]] = field(default_factory=set)
    _warned: set[tuple[str, str, int]] = field(default_factory=set, repr=False)
    #: no live host can be dead before this (monotonic) time: ``expire`` walks the hosts
    #: only from then on, so polling costs O(1), not O(hosts), between expiries
    _due: float = field(default=math.inf, repr=False)

    def _seen(self, st: HostState, now: float) -> None:
        st.last_seen = now
        st.alive = True
        if now + self.dead_after < self._due:
            self._due = now + self.dead_after

    def feed(self, body: dict[str, Any], now: float, source: int = -1, *,
             size: int = 0) -> Update | None:
        """Apply one validated stream body (or snapshot reply) received from ``source``
        (``size``: its frame's bytes, counted for deltas); the resulting update
        (``None``: nothing changed, or the body was dropped)."""
        if body["kind"] == "delta":
            return self._feed_delta(body, now, source, size)
        host = body["host"]
        st = self.hosts.get(host)
        moving = False
        if st is not None and st.source != source:
            if st.alive and now - st.last_seen <= self.dead_after:
                self.stats["foreign_source"] += 1
                self.warn_once(
                    "foreign", host, source, "host %r from %s dropped: it is bound to %s "
                    "(where it was first heard) while that one carries it",
                    host, self.source_name(source), self.source_name(st.source))
                return None
            moving = True
        fresh = st is None or moving or body["epoch"] != st.epoch
        if body["kind"] == "snapshot" and (fresh or body["seq"] > st.seq):
            try:
                wire.check_snapshot(body["data"], body)
            except wire.WireError as exc:
                self.stats["invalid_snapshots"] += 1
                self.warn_once("invalid", host, source,
                               "snapshot of host %r seq %d from %s dropped: %s",
                               host, body["seq"], self.source_name(source), exc)
                return None
        if st is None:
            st = self.hosts[host] = HostState(host, source=source)
        elif moving:
            log.info("host %r: now bound to %s (nothing from %s for %.1f s)", host,
                     self.source_name(source), self.source_name(st.source),
                     now - st.last_seen)
            self.stats["rebinds"] += 1
            st.source, st.epoch, st.seq, st.snapshot, st.heard_seq, st.stale = (
                source, None, -1, None, -1, False)
        self._seen(st, now)
        if body["epoch"] != st.epoch:
            if st.epoch is not None:
                st.resets += 1
                self.stats["epoch_resets"] += 1
            st.epoch, st.seq, st.snapshot, st.heard_seq, st.stale = (
                body["epoch"], -1, None, -1, False)
        seq = body["seq"]
        st.heard_seq = max(st.heard_seq, seq)
        if body["kind"] == "heartbeat":
            self.stats["heartbeats"] += 1
            if seq > st.seq and (seq > 0 or st.seq >= 0):
                self.heal.add((source, host))
                if not st.stale:
                    st.stale = True
                    self.stats["stale"] += 1
                    return Update("stale", host, st.epoch, st.seq, st.snapshot)
            return None
        if seq <= st.seq:
            self.stats["duplicates"] += 1
            return None
        if st.seq >= 0 and seq > st.seq + 1:
            st.gaps += 1
            self.stats["gaps"] += 1
        st.seq, st.stale = seq, False
        st.snapshot = body["data"] if self.keep_snapshots else None
        st.delta_bytes = 0
        self.heal.discard((source, host))
        self.stats["snapshots"] += 1
        return Update("snapshot", host, st.epoch, seq, body["data"])

    def _feed_delta(self, body: dict[str, Any], now: float, source: int,
                    size: int) -> Update | None:
        """A delta (docs/wire.md §12): applied when the host's held snapshot is its
        ``seq - 1`` from the same source and epoch; otherwise the host needs a full
        snapshot (``heal``) and, if it was not stale yet, a ``stale`` update."""
        host, seq = body["host"], body["seq"]
        st = self.hosts.get(host)
        if st is not None and st.source != source:
            if st.alive and now - st.last_seen <= self.dead_after:
                self.stats["foreign_source"] += 1
                return None
            st = None  # moved: a full snapshot from the new source rebinds it
        if st is None or body["epoch"] != st.epoch:
            self.stats["unusable_deltas"] += 1
            self.heal.add((source, host))  # nothing to apply it to: ask for a full one
            return None
        self._seen(st, now)
        st.heard_seq = max(st.heard_seq, seq)
        if seq <= st.seq:
            self.stats["duplicates"] += 1
            return None
        why = None
        if seq != st.seq + 1 or st.snapshot is None:
            why = "missed"
        elif st.delta_bytes + size > self.max_delta_bytes:
            why = "budget"
        else:
            try:
                snap = wire.check_snapshot(wire.apply_delta(st.snapshot, body["data"], body),
                                           body)
            except wire.WireError as exc:
                self.stats["invalid_deltas"] += 1
                self.warn_once("delta", host, source,
                               "delta of host %r seq %d from %s dropped: %s",
                               host, seq, self.source_name(source), exc)
                why = "invalid"
        if why is not None:
            self.stats["unusable_deltas"] += 1
            self.heal.add((source, host))
            if not st.stale:
                st.stale = True
                self.stats["stale"] += 1
                return Update("stale", host, st.epoch, st.seq, st.snapshot)
            return None
        st.seq, st.snapshot, st.stale = seq, snap, False
        st.delta_bytes += size
        self.stats["deltas"] += 1
        self.stats["snapshots"] += 1
        return Update("snapshot", host, st.epoch, seq, snap)

    def source_name(self, source: int) -> str:
        if 0 <= source < len(self.source_names):
            return self.source_names[source]
        return f"source {source}"

    def warn_once(self, kind: str, host: str, source: int, msg: str, *args: Any) -> None:
        """Log a warning the first time for (``kind``, ``host``, ``source``), at debug
        level after that (a flood of bad input is counted in ``stats``, not logged)."""
        key = (kind, host, source)
        if key in self._warned or len(self._warned) >= MAX_WARNED:
            log.debug(msg, *args)
            return
        self._warned.add(key)
        log.warning(msg, *args)

    def expire(self, now: float) -> list[Update]:
        """``dead`` updates for hosts silent for longer than ``dead_after``."""
        if now <= self._due:
            return []
        out = []
        due = math.inf
        for st in self.hosts.values():
            if not st.alive:
                continue
            if now - st.last_seen > self.dead_after:
                st.alive = False
                self.stats["dead"] += 1
                out.append(Update("dead", st.host, st.epoch, st.seq, st.snapshot))
            else:
                due = min(due, st.last_seen + self.dead_after)
        self._due = due
        return out

    def next_expiry(self, now: float) -> float | None:
        """Seconds until the next host could be declared dead (``None``: no live host)."""
        return None if self._due == math.inf else max(0.0, self._due - now)


@dataclass(frozen=True)
class Source:
    """One source: the agent's stream endpoint, optionally its request endpoint and, with
    CURVE, the agent's public key (z85, 40 bytes) when it is not the subscriber's default
    ``ClientCurve.server_public`` (each agent may have its own key)."""

    stream: str
    request: str | None = None
    server_key: bytes | None = None

    @classmethod
    def parse(cls, text: str) -> Source:
        """``STREAM[,REQUEST]`` as given on the command line."""
        parts = [p.strip() for p in text.split(",")]
        if len(parts) > 2 or not all(parts):
            raise HostagentError(f"source {text!r}: expected STREAM_ENDPOINT[,REQUEST_ENDPOINT]")
        for p in parts:
            if not p.startswith(("tcp://", "ipc://", "inproc://")):
                raise HostagentError(f"endpoint {p!r}: must start with tcp://, ipc:// or inproc://")
        return cls(parts[0], parts[1] if len(parts) == 2 else None)


def _sources(sources: Sequence[str | Source]) -> list[Source]:
    out = [s if isinstance(s, Source) else Source.parse(s) for s in sources]
    if not out:
        raise HostagentError("no endpoint to subscribe to")
    return out


def _source_curve(curve: ClientCurve | None, src: Source) -> ClientCurve | None:
    """The CURVE settings of one source: ``curve`` with the source's agent key if it has one."""
    if src.server_key is None:
        return curve
    if curve is None:
        raise HostagentError(f"source {src.stream}: a server_key needs the subscriber's "
                             "own CURVE keys (curve=ClientCurve...)")
    if len(src.server_key) != 40:
        raise HostagentError(f"source {src.stream}: server_key of {len(src.server_key)} "
                             "bytes, expected 40 (z85)")
    return dataclasses.replace(curve, server_public=src.server_key)


def _topics(hosts: Sequence[str] | None, deltas: bool = False) -> list[bytes]:
    if deltas:
        return [wire.DELTA_PREFIX] if not hosts else [wire.delta_topic(h) for h in hosts]
    return [wire.TOPIC_PREFIX] if not hosts else [wire.topic(h) for h in hosts]


def _setup_sub(sock: Any, zmq: Any, topics: list[bytes], max_bytes: int,
               curve: ClientCurve | None, rcvhwm: int) -> None:
    sock.linger = 0
    sock.maxmsgsize = max_bytes
    sock.rcvhwm = rcvhwm
    sock.setsockopt(zmq.HEARTBEAT_IVL, 1000)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3000)
    if curve is not None:
        curve.apply(sock)
    for t in topics:
        sock.subscribe(t)


def _poll_batch(max_messages: int) -> int:
    """``max_messages`` checked: an integer from 1 to ``POLL_BATCH``."""
    if isinstance(max_messages, bool) or not isinstance(max_messages, int) or \
            not 1 <= max_messages <= POLL_BATCH:
        raise HostagentError(f"max_messages={max_messages!r}: must be an integer from 1 to "
                             f"{POLL_BATCH}")
    return max_messages


def reconnect_delay(failures: int) -> float:
    """Seconds to wait after a drop before the library reconnects, when ``failures``
    reconnects of that source came before it with no snapshot in between."""
    return min(RECONNECT_MAX_SECONDS, RECONNECT_GRACE_SECONDS * 2 ** min(failures, 16))


#: unique inproc addresses for the monitor sockets (pyzmq's default, derived from the
#: socket's fd, can still be bound by a just-closed socket's monitor)
_monitor_ids = itertools.count()


@dataclass
class _Link:
    """The connection state of one source's SUB socket, from its monitor's events."""

    retry_at: float | None = None  # reconnect then, unless libzmq retries first
    failures: int = 0  # library reconnects since the last snapshot on this source


class _Base:
    def __init__(self, sources: Sequence[str | Source], *, hosts: Sequence[str] | None,
                 curve: ClientCurve | None, max_message_bytes: int, dead_after: float,
                 request_timeout: float, deltas: bool = False,
                 keep_snapshots: bool = True) -> None:
        if deltas and not keep_snapshots:
            raise HostagentError("deltas=True needs keep_snapshots=True (a delta applies "
                                 "to the held snapshot)")
        self.sources = _sources(sources)
        self.deltas = deltas
        self.topics = _topics(hosts, deltas)
        self.curve = curve
        #: per source: the CURVE settings its sockets use (its own agent key, if any)
        self.curves = [_source_curve(curve, src) for src in self.sources]
        self.max_bytes = max_message_bytes
        self.request_timeout = request_timeout
        self.state = SubscriberState(dead_after=dead_after,
                                     source_names=[s.stream for s in self.sources],
                                     max_delta_bytes=max_message_bytes,
                                     keep_snapshots=keep_snapshots)
        #: per (source, host): the last snapshot's topology/config and usage list
        #: elements, reused while their bytes are unchanged (wire.DecodeCache)
        self._decode_caches: dict[tuple[int, str], wire.DecodeCache] = {}
        #: decoded parts and elements shared by all hosts (wire.SharedDecoded)
        self._shared_decoded = wire.SharedDecoded()
        self._links = [_Link() for _ in self.sources]

    @property
    def stats(self) -> Counter[str]:
        return self.state.stats

    @property
    def hosts(self) -> dict[str, HostState]:
        return self.state.hosts

    def latest(self, host: str) -> dict[str, Any] | None:
        st = self.state.hosts.get(host)
        return None if st is None else st.snapshot

    def alive(self, host: str) -> bool:
        st = self.state.hosts.get(host)
        return st is not None and st.alive

    def binding(self, host: str) -> tuple[str, bytes | None] | None:
        """What ``host`` is bound to: (stream endpoint, agent public key or ``None``
        without CURVE) of the source it was first heard on; ``None`` if never heard."""
        st = self.state.hosts.get(host)
        if st is None or not 0 <= st.source < len(self.sources):
            return None
        curve = self.curves[st.source]
        return self.sources[st.source].stream, None if curve is None else curve.server_public

    def _decode(self, frames: list[bytes], index: int, now: float) -> Update | None:
        cache = key = None
        if len(frames) == 2 and len(frames[1]) >= DECODE_CACHE_MIN_BYTES:
            try:
                key = (index, wire.stream_of_topic(bytes(frames[0]))[0])
            except wire.WireError:
                key = None
            if key is not None:
                # usage elements reused and shared even when the snapshots are not held:
                # the caller (a Fleet) holds the usage it is handed, so equal elements
                # are one object fleet-wide
                cache = self._decode_caches.get(key) or wire.DecodeCache(
                    shared=self._shared_decoded)
        try:
            body = wire.decode_stream(frames, max_bytes=self.max_bytes, cache=cache)
        except wire.WireError as exc:
            self.state.stats["bad_messages"] += 1
            self.state.warn_once("bad", "", index, "bad message from %s dropped: %s",
                                 self.sources[index].stream, exc)
            return None
        if body["kind"] == "snapshot":
            self._links[index].failures = 0  # a whole snapshot got through
        if key is not None and (cache.parts or cache.elements):
            self._decode_caches.setdefault(key, cache)
        return self.state.feed(body, now, index, size=len(frames[1]))

    def _heals_due(self) -> list[tuple[int, str]]:
        """(source, host) pairs to heal now (delta stream), at most one per host per
        ``DELTA_HEAL_SECONDS``; the others stay queued. Without deltas: none (a stale
        host is fetched at once, as before)."""
        if not self.state.heal or not self.deltas:
            self.state.heal.clear()
            return []
        now = time.monotonic()
        due = []
        for index, host in list(self.state.heal):
            st = self.state.hosts.get(host)
            if st is not None and now - st.heal_at < DELTA_HEAL_SECONDS:
                continue
            if st is not None:
                st.heal_at = now
            self.state.heal.discard((index, host))
            due.append((index, host))
        return due

    def _ask_welcome(self, index: int, host: str) -> None:
        """Ask the agent of ``host`` (through source ``index``, a forwarder included) for
        its full snapshot: subscribe to its topic once more (the agent re-publishes its
        latest to every new subscription) and drop that extra subscription again."""
        topic = wire.delta_topic(host)
        self.socks[index].subscribe(topic)
        self.socks[index].unsubscribe(topic)
        self.state.stats["heal_requests"] += 1

    def _apply_reply(self, reply: dict[str, Any] | None, index: int) -> Update | None:
        if reply is None or not reply.get("ok"):
            self.state.stats["fetch_failures"] += 1
            return None
        body = {k: v for k, v in reply.items() if k != "ok"}
        try:
            wire.check_body(body)
        except wire.WireError:
            self.state.stats["fetch_failures"] += 1
            return None
        self.state.stats["fetches"] += 1
        return self.state.feed(body, time.monotonic(), index)

    def _open(self, zmq: Any, ctx: Any, poller: Any, max_message_bytes: int,
              rcvhwm: int) -> None:
        """One SUB socket per source, and a monitor socket watching its connection, all
        registered with ``poller`` (sync or asyncio)."""
        self._zmq = zmq
        self.ctx = ctx
        self.poller = poller
        self.socks = []
        self.monitors = []
        events = (zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECT_RETRIED
                  | zmq.EVENT_CONNECT_DELAYED | zmq.EVENT_CONNECTED)
        for src, curve in zip(self.sources, self.curves, strict=True):
            s = ctx.socket(zmq.SUB)
            _setup_sub(s, zmq, self.topics, max_message_bytes, curve, rcvhwm)
            mon = s.get_monitor_socket(
                events, addr=f"inproc://hostagent-subscriber-monitor-{next(_monitor_ids)}")
            s.connect(src.stream)
            self.socks.append(s)
            self.monitors.append(mon)
            poller.register(s, zmq.POLLIN)
            poller.register(mon, zmq.POLLIN)

    def _monitors_ready(self, indexes: Iterable[int]) -> Iterator[int]:
        """Of ``indexes``, each source whose monitor has an event to read, once per event
        (the caller reads it before asking again)."""
        zmq = self._zmq
        for i in indexes:
            while self.monitors[i].get(zmq.EVENTS) & zmq.POLLIN:
                yield i

    def _due_links(self) -> list[int]:
        """Sources whose reconnect is due: their monitor is read once more first, in case
        libzmq's retry event is queued behind the drop (the application polled late)."""
        now = time.monotonic()
        return [i for i, link in enumerate(self._links)
                if link.retry_at is not None and now >= link.retry_at]

    def _on_monitor(self, index: int, frames: list[bytes]) -> None:
        """One monitor event of source ``index``'s socket."""
        from zmq.utils.monitor import parse_monitor_message

        event = parse_monitor_message(frames)["event"]
        link = self._links[index]
        if event == self._zmq.EVENT_DISCONNECTED:
            self.state.stats["disconnects"] += 1
            link.retry_at = time.monotonic() + reconnect_delay(link.failures)
        else:  # libzmq is connecting or retrying by itself
            link.retry_at = None

    def _reconnect_dropped(self, now: float) -> None:
        """Connect again every source whose dropped connection libzmq did not retry."""
        for i, link in enumerate(self._links):
            if link.retry_at is None or now < link.retry_at:
                continue
            link.retry_at = None
            link.failures += 1
            self.state.stats["reconnects"] += 1
            src = self.sources[i]
            log.warning("%s: connection dropped and not retried by libzmq (a frame over "
                        "max_message_bytes = %d, or a protocol error); connecting again "
                        "(%d in a row)", src.stream, self.max_bytes, link.failures)
            try:
                self.socks[i].disconnect(src.stream)
            except self._zmq.ZMQError:
                pass  # the endpoint's session is already gone
            self.socks[i].connect(src.stream)

    def _expire_and_wait(self, deadline: float | None) -> tuple[list[Update], float | None]:
        """Reconnects and liveness updates due now, and how long the next poll may wait
        (seconds or None)."""
        now = time.monotonic()
        self._reconnect_dropped(now)
        out = self.state.expire(now)
        heal_wait = DELTA_HEAL_SECONDS if self.deltas and self.state.heal else None
        waits = [w for w in (self.state.next_expiry(now), heal_wait,
                             *(link.retry_at - now for link in self._links
                               if link.retry_at is not None),
                             None if deadline is None else deadline - now) if w is not None]
        return out, max(0.0, min(waits)) if waits else None

    def _close(self) -> None:
        for s, mon in zip(self.socks, self.monitors, strict=True):
            if s.closed:
                continue
            s.disable_monitor()
            mon.close(linger=0)
            s.close(linger=0)


class Subscriber(_Base):
    """Blocking subscriber (one SUB socket per source, all polled together)."""

    def __init__(self, sources: Sequence[str | Source], *, hosts: Sequence[str] | None = None,
                 curve: ClientCurve | None = None,
                 max_message_bytes: int = wire.DEFAULT_MAX_MESSAGE_BYTES,
                 dead_after: float = DEFAULT_DEAD_AFTER, rcvhwm: int = 10000,
                 request_timeout: float = DEFAULT_REQUEST_TIMEOUT, ctx: Any = None,
                 deltas: bool = False, keep_snapshots: bool = True) -> None:
        import zmq

        super().__init__(sources, hosts=hosts, curve=curve, max_message_bytes=max_message_bytes,
                         dead_after=dead_after, request_timeout=request_timeout,
                         deltas=deltas, keep_snapshots=keep_snapshots)
        self._open(zmq, ctx or zmq.Context.instance(), zmq.Poller(), max_message_bytes, rcvhwm)

    def poll(self, timeout: float | None = None, *,
             max_messages: int = POLL_BATCH) -> list[Update]:
        """Wait up to ``timeout`` seconds (``None``: forever) for updates; read at most
        ``max_messages`` messages per source (1 to ``POLL_BATCH``): a caller that has
        other work between polls (a scheduler placing) bounds each turn's ingest."""
        batch = _poll_batch(max_messages)
        zmq = self._zmq
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            for i in self._monitors_ready(self._due_links()):
                self._on_monitor(i, self.monitors[i].recv_multipart(zmq.NOBLOCK))
            out, wait = self._expire_and_wait(deadline)
            events = dict(self.poller.poll(None if wait is None else wait * 1000 + 1))
            for i in self._monitors_ready(i for i, m in enumerate(self.monitors)
                                          if m in events):
                self._on_monitor(i, self.monitors[i].recv_multipart(zmq.NOBLOCK))
            for i, s in enumerate(self.socks):
                if s not in events:
                    continue
                for _ in range(batch):  # bounded: an overloaded poll still returns
                    try:
                        frames = s.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    upd = self._decode(frames, i, time.monotonic())
                    if upd is not None:
                        out.append(upd)
                        if upd.kind == "stale" and not self.deltas:
                            fetched = self._fetch(i)
                            if fetched is not None:
                                out.append(fetched)
            for i, host in self._heals_due():
                if self.sources[i].request is None:
                    self._ask_welcome(i, host)
                    continue
                fetched = self._fetch(i)
                if fetched is not None:
                    out.append(fetched)
            out.extend(self.state.expire(time.monotonic()))
            if out or (deadline is not None and time.monotonic() >= deadline):
                return out

    def _fetch(self, index: int) -> Update | None:
        src = self.sources[index]
        if src.request is None:
            return None
        try:
            reply = request(src.request, {"op": "snapshot"}, timeout=self.request_timeout,
                            curve=self.curves[index], ctx=self.ctx,
                            max_message_bytes=self.max_bytes)
        except HostagentError:
            reply = None
        return self._apply_reply(reply, index)

    def updates(self, timeout: float | None = None) -> Iterator[Update]:
        """Updates as they come; stops after ``timeout`` seconds without one."""
        while True:
            batch = self.poll(timeout)
            if not batch:
                return
            yield from batch

    def wait_snapshot(self, host: str | None = None, timeout: float = 5.0) -> dict[str, Any]:
        """Block until a snapshot (of ``host``, or of any host) is held; return it."""
        deadline = time.monotonic() + timeout
        while True:
            for st in self.hosts.values():
                if st.snapshot is not None and host in (None, st.host):
                    return st.snapshot
            left = deadline - time.monotonic()
            if left <= 0:
                streams = ", ".join(s.stream for s in self.sources)
                raise HostagentError(f"no snapshot within {timeout:g} s from {streams}")
            self.poll(left)

    def close(self) -> None:
        self._close()

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncSubscriber(_Base):
    """The asyncio subscriber: same behaviour, ``await poll()`` / ``async for``."""

    def __init__(self, sources: Sequence[str | Source], *, hosts: Sequence[str] | None = None,
                 curve: ClientCurve | None = None,
                 max_message_bytes: int = wire.DEFAULT_MAX_MESSAGE_BYTES,
                 dead_after: float = DEFAULT_DEAD_AFTER, rcvhwm: int = 10000,
                 request_timeout: float = DEFAULT_REQUEST_TIMEOUT, ctx: Any = None,
                 deltas: bool = False, keep_snapshots: bool = True) -> None:
        import zmq
        import zmq.asyncio

        super().__init__(sources, hosts=hosts, curve=curve, max_message_bytes=max_message_bytes,
                         dead_after=dead_after, request_timeout=request_timeout,
                         deltas=deltas, keep_snapshots=keep_snapshots)
        self._open(zmq, ctx or zmq.asyncio.Context.instance(), zmq.asyncio.Poller(),
                   max_message_bytes, rcvhwm)

    async def poll(self, timeout: float | None = None, *,
                   max_messages: int = POLL_BATCH) -> list[Update]:
        """As ``Subscriber.poll``."""
        batch = _poll_batch(max_messages)
        zmq = self._zmq
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            for i in self._monitors_ready(self._due_links()):
                self._on_monitor(i, await self.monitors[i].recv_multipart(zmq.NOBLOCK))
            out, wait = self._expire_and_wait(deadline)
            events = dict(await self.poller.poll(None if wait is None else wait * 1000 + 1))
            for i in self._monitors_ready(i for i, m in enumerate(self.monitors)
                                          if m in events):
                self._on_monitor(i, await self.monitors[i].recv_multipart(zmq.NOBLOCK))
            for i, s in enumerate(self.socks):
                if s not in events:
                    continue
                for _ in range(batch):  # bounded: an overloaded poll still returns
                    try:
                        frames = await s.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    upd = self._decode(frames, i, time.monotonic())
                    if upd is not None:
                        out.append(upd)
                        if (upd.kind == "stale" and not self.deltas
                                and self.sources[i].request is not None):
                            fetched = await self._async_fetch(i)
                            if fetched is not None:
                                out.append(fetched)
            for i, host in self._heals_due():
                if self.sources[i].request is None:
                    self._ask_welcome(i, host)
                    continue
                fetched = await self._async_fetch(i)
                if fetched is not None:
                    out.append(fetched)
            out.extend(self.state.expire(time.monotonic()))
            if out or (deadline is not None and time.monotonic() >= deadline):
                return out

    async def _async_fetch(self, index: int) -> Update | None:
        try:
            reply = await async_request(
                self.sources[index].request, {"op": "snapshot"},
                timeout=self.request_timeout, curve=self.curves[index],
                ctx=self.ctx, max_message_bytes=self.max_bytes)
        except HostagentError:
            reply = None
        return self._apply_reply(reply, index)

    async def __aiter__(self) -> AsyncIterator[Update]:
        while True:
            for upd in await self.poll():
                yield upd

    async def wait_snapshot(self, host: str | None = None,
                            timeout: float = 5.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            for st in self.hosts.values():
                if st.snapshot is not None and host in (None, st.host):
                    return st.snapshot
            left = deadline - time.monotonic()
            if left <= 0:
                raise HostagentError(f"no snapshot within {timeout:g} s")
            await self.poll(left)

    def close(self) -> None:
        self._close()


# --- one-off requests ------------------------------------------------------------------

def _dealer(ctx: Any, zmq: Any, endpoint: str, curve: ClientCurve | None,
            max_bytes: int) -> Any:
    s = ctx.socket(zmq.DEALER)
    s.linger = 0
    s.maxmsgsize = max_bytes
    if curve is not None:
        curve.apply(s)
    s.connect(endpoint)
    return s


def _reply(payload: bytes, endpoint: str, max_bytes: int) -> dict[str, Any]:
    try:
        return wire.decode_reply(payload, max_bytes=max_bytes)
    except wire.WireError as exc:
        raise HostagentError(f"{endpoint}: bad reply: {exc}") from None


def request(endpoint: str, req: dict[str, Any], *, timeout: float = DEFAULT_REQUEST_TIMEOUT,
            curve: ClientCurve | None = None, ctx: Any = None,
            max_message_bytes: int = wire.DEFAULT_MAX_MESSAGE_BYTES) -> dict[str, Any]:
    """Send one request to an agent's request endpoint; the reply dict (``ok`` true or
    false). ``HostagentError`` if nothing comes back within ``timeout`` seconds."""
    import zmq

    ctx = ctx or zmq.Context.instance()
    s = _dealer(ctx, zmq, endpoint, curve, max_message_bytes)
    try:
        s.send(wire.pack(req))
        if not s.poll(timeout * 1000):
            raise HostagentError(f"{endpoint}: no reply within {timeout:g} s")
        return _reply(s.recv(), endpoint, max_message_bytes)
    finally:
        s.close(linger=0)


async def async_request(endpoint: str, req: dict[str, Any], *,
                        timeout: float = DEFAULT_REQUEST_TIMEOUT,
                        curve: ClientCurve | None = None, ctx: Any = None,
                        max_message_bytes: int = wire.DEFAULT_MAX_MESSAGE_BYTES
                        ) -> dict[str, Any]:
    """``request`` for asyncio."""
    import zmq
    import zmq.asyncio

    ctx = ctx or zmq.asyncio.Context.instance()
    s = _dealer(ctx, zmq, endpoint, curve, max_message_bytes)
    try:
        await s.send(wire.pack(req))
        try:
            payload = await asyncio.wait_for(s.recv(), timeout)
        except TimeoutError:
            raise HostagentError(f"{endpoint}: no reply within {timeout:g} s") from None
        return _reply(payload, endpoint, max_message_bytes)
    finally:
        s.close(linger=0)


# --- claims ----------------------------------------------------------------------------

def _checked(endpoint: str, reply: dict[str, Any]) -> dict[str, Any]:
    if not reply["ok"]:
        raise HostagentError(f"{endpoint}: {reply['error']}")
    return reply


def claim(endpoint: str, request_: dict[str, Any], *, ttl_s: float | None = None,
          strategy: str | None = None, claimant: str | None = None,
          placement: dict[str, Any] | None = None,
          timeout: float = DEFAULT_REQUEST_TIMEOUT, curve: ClientCurve | None = None,
          ctx: Any = None) -> dict[str, Any]:
    """Claim a placement for fit request ``request_`` at the agent (docs/claims.md): the
    agent's own fit, or ``placement`` (the ``placement`` of a fit answer) if given.

    Returns the reply: ``{claimed: True, claim: {id, expires, claimant, request,
    placement, libvirt_xml, ...}, seq, epoch}``, or ``{claimed: False, reasons, ...}``
    when it does not fit or is taken. An error reply (an invalid field, a client that may
    not claim, ``busy: ...``) or no reply within ``timeout`` is a ``HostagentError``.
    """
    req: dict[str, Any] = {"op": "claim", "request": request_}
    for key, value in (("ttl_s", ttl_s), ("strategy", strategy), ("claimant", claimant),
                       ("placement", placement)):
        if value is not None:
            req[key] = value
    return _checked(endpoint, request(endpoint, req, timeout=timeout, curve=curve, ctx=ctx))


def release(endpoint: str, claim_id: str, *, timeout: float = DEFAULT_REQUEST_TIMEOUT,
            curve: ClientCurve | None = None, ctx: Any = None) -> dict[str, Any]:
    """Give claim ``claim_id`` back (``{released: id}``); ``HostagentError`` for an
    unknown id, a client that may not release, or no reply."""
    return _checked(endpoint, request(endpoint, {"op": "release", "id": claim_id},
                                      timeout=timeout, curve=curve, ctx=ctx))
