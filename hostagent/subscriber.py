"""The subscriber library: follow one or many agents and hold the latest snapshot per host.

    from hostagent.subscriber import Subscriber
    with Subscriber(["tcp://10.0.0.5:6510,tcp://10.0.0.5:6511", "tcp://10.0.0.6:6510"]) as sub:
        for update in sub.updates():          # blocks; Update(kind, host, ...)
            snap = sub.latest(update.host)    # the schema-v1 snapshot dict

Each source is ``STREAM[,REQUEST]``: the agent's XPUB endpoint and, optionally, its
ROUTER request endpoint (used to fetch a fresh snapshot after a gap). A source may be
a forwarder carrying many hosts. ``AsyncSubscriber`` is the same for asyncio
(``await sub.poll()`` / ``async for update in sub``).

Rules (design §4.3), applied per host by ``SubscriberState``, which does no I/O:
- a message of a new ``epoch`` resets the host (the agent restarted);
- a snapshot whose ``seq`` is not above the one held is a duplicate and is dropped
  (this is how re-publishes for newcomers are ignored); one above it replaces it
  (skipping numbers counts a gap — snapshots are full, nothing else is needed);
- a heartbeat whose ``seq`` is above the one held means a snapshot was missed: the
  host is *stale*, and a fresh snapshot is fetched through the source's request
  endpoint if it has one (otherwise the next snapshot repairs it);
- a host is *alive* while any message arrived within ``dead_after`` seconds; a host
  going silent yields one ``dead`` update.

Every received message passes ``wire.decode_stream`` (strict msgpack, size limits);
bad messages are counted in ``stats`` and dropped. ``MAXMSGSIZE`` is set on every
receiving socket. ``request()`` / ``async_request()`` send one request to an agent's
request endpoint and return the reply.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from hostagent import wire
from hostagent.curve import ClientCurve
from hostagent.errors import HostagentError

DEFAULT_DEAD_AFTER = 5.0
DEFAULT_REQUEST_TIMEOUT = 3.0


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
    source: int = -1  # index of the source it arrived on
    gaps: int = 0
    resets: int = 0


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

    def feed(self, body: dict[str, Any], now: float, source: int = -1) -> Update | None:
        """Apply one validated stream body (or snapshot reply); the resulting update."""
        host = body["host"]
        st = self.hosts.get(host)
        if st is None:
            st = self.hosts[host] = HostState(host)
        st.last_seen, st.source = now, source
        st.alive = True
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
        st.seq, st.snapshot, st.stale = seq, body["data"], False
        self.stats["snapshots"] += 1
        return Update("snapshot", host, st.epoch, seq, st.snapshot)

    def expire(self, now: float) -> list[Update]:
        """``dead`` updates for hosts silent for longer than ``dead_after``."""
        out = []
        for st in self.hosts.values():
            if st.alive and now - st.last_seen > self.dead_after:
                st.alive = False
                self.stats["dead"] += 1
                out.append(Update("dead", st.host, st.epoch, st.seq, st.snapshot))
        return out

    def next_expiry(self, now: float) -> float | None:
        """Seconds until the next host could be declared dead (``None``: no live host)."""
        waits = [st.last_seen + self.dead_after - now for st in self.hosts.values()
                 if st.alive]
        return max(0.0, min(waits)) if waits else None


@dataclass(frozen=True)
class Source:
    stream: str
    request: str | None = None

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


def _topics(hosts: Sequence[str] | None) -> list[bytes]:
    return [wire.TOPIC_PREFIX] if not hosts else [wire.topic(h) for h in hosts]


def _setup_sub(sock: Any, zmq: Any, src: Source, topics: list[bytes], max_bytes: int,
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
    sock.connect(src.stream)


class _Base:
    def __init__(self, sources: Sequence[str | Source], *, hosts: Sequence[str] | None,
                 curve: ClientCurve | None, max_message_bytes: int, dead_after: float,
                 request_timeout: float) -> None:
        self.sources = _sources(sources)
        self.topics = _topics(hosts)
        self.curve = curve
        self.max_bytes = max_message_bytes
        self.request_timeout = request_timeout
        self.state = SubscriberState(dead_after=dead_after)
        #: per host: the last snapshot's topology/config and usage list elements, reused
        #: while their bytes are unchanged (wire.DecodeCache)
        self._decode_caches: dict[str, wire.DecodeCache] = {}

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

    def _decode(self, frames: list[bytes], index: int, now: float) -> Update | None:
        cache = None
        if len(frames) == 2:
            try:
                host = wire.host_of_topic(bytes(frames[0]))
            except wire.WireError:
                host = None
            if host is not None:
                cache = self._decode_caches.get(host) or wire.DecodeCache()
        try:
            body = wire.decode_stream(frames, max_bytes=self.max_bytes, cache=cache)
        except wire.WireError:
            self.state.stats["bad_messages"] += 1
            return None
        if cache is not None and (cache.parts or cache.elements):
            self._decode_caches.setdefault(body["host"], cache)
        return self.state.feed(body, now, index)

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

    def _open(self, zmq: Any, ctx: Any, poller: Any, curve: ClientCurve | None,
              max_message_bytes: int, rcvhwm: int) -> None:
        """One SUB socket per source, all registered with ``poller`` (sync or asyncio)."""
        self._zmq = zmq
        self.ctx = ctx
        self.poller = poller
        self.socks = []
        for src in self.sources:
            s = ctx.socket(zmq.SUB)
            _setup_sub(s, zmq, src, self.topics, max_message_bytes, curve, rcvhwm)
            self.socks.append(s)
            poller.register(s, zmq.POLLIN)

    def _expire_and_wait(self, deadline: float | None) -> tuple[list[Update], float | None]:
        """Liveness updates due now, and how long the next poll may wait (seconds or None)."""
        now = time.monotonic()
        out = self.state.expire(now)
        wait = self.state.next_expiry(now)
        if deadline is not None:
            left = max(0.0, deadline - now)
            wait = left if wait is None else min(wait, left)
        return out, wait


class Subscriber(_Base):
    """Blocking subscriber (one SUB socket per source, all polled together)."""

    def __init__(self, sources: Sequence[str | Source], *, hosts: Sequence[str] | None = None,
                 curve: ClientCurve | None = None,
                 max_message_bytes: int = wire.DEFAULT_MAX_MESSAGE_BYTES,
                 dead_after: float = DEFAULT_DEAD_AFTER, rcvhwm: int = 10000,
                 request_timeout: float = DEFAULT_REQUEST_TIMEOUT, ctx: Any = None) -> None:
        import zmq

        super().__init__(sources, hosts=hosts, curve=curve, max_message_bytes=max_message_bytes,
                         dead_after=dead_after, request_timeout=request_timeout)
        self._open(zmq, ctx or zmq.Context.instance(), zmq.Poller(), curve,
                   max_message_bytes, rcvhwm)

    def poll(self, timeout: float | None = None) -> list[Update]:
        """Wait up to ``timeout`` seconds (``None``: forever) for updates."""
        zmq = self._zmq
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            out, wait = self._expire_and_wait(deadline)
            events = dict(self.poller.poll(None if wait is None else wait * 1000 + 1))
            for i, s in enumerate(self.socks):
                if s not in events:
                    continue
                while True:
                    try:
                        frames = s.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    upd = self._decode(frames, i, time.monotonic())
                    if upd is not None:
                        out.append(upd)
                        if upd.kind == "stale":
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
                            curve=self.curve, ctx=self.ctx, max_message_bytes=self.max_bytes)
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
        for s in self.socks:
            s.close(linger=0)

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
                 request_timeout: float = DEFAULT_REQUEST_TIMEOUT, ctx: Any = None) -> None:
        import zmq
        import zmq.asyncio

        super().__init__(sources, hosts=hosts, curve=curve, max_message_bytes=max_message_bytes,
                         dead_after=dead_after, request_timeout=request_timeout)
        self._open(zmq, ctx or zmq.asyncio.Context.instance(), zmq.asyncio.Poller(), curve,
                   max_message_bytes, rcvhwm)

    async def poll(self, timeout: float | None = None) -> list[Update]:
        zmq = self._zmq
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            out, wait = self._expire_and_wait(deadline)
            events = dict(await self.poller.poll(None if wait is None else wait * 1000 + 1))
            for i, s in enumerate(self.socks):
                if s not in events:
                    continue
                while True:
                    try:
                        frames = await s.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    upd = self._decode(frames, i, time.monotonic())
                    if upd is not None:
                        out.append(upd)
                        if upd.kind == "stale" and self.sources[i].request is not None:
                            try:
                                reply = await async_request(
                                    self.sources[i].request, {"op": "snapshot"},
                                    timeout=self.request_timeout, curve=self.curve,
                                    ctx=self.ctx, max_message_bytes=self.max_bytes)
                            except HostagentError:
                                reply = None
                            fetched = self._apply_reply(reply, i)
                            if fetched is not None:
                                out.append(fetched)
            out.extend(self.state.expire(time.monotonic()))
            if out or (deadline is not None and time.monotonic() >= deadline):
                return out

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
        for s in self.socks:
            s.close(linger=0)


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
