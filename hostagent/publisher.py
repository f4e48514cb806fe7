"""The agent's ZeroMQ side: the XPUB snapshot stream and the ROUTER request endpoint.

Stream (docs/daemon.md §3.1): every message is ``[topic, msgpack(body)]`` with topic
``hostagent.<host>.``. ``publish(data)`` sends a full snapshot with the next ``seq``;
``run()`` sends a heartbeat (current ``seq``, ``data: None``) whenever nothing went out
for ``heartbeat_seconds``, reads subscription messages, and serves requests.

New subscribers: XPUB cannot address one subscriber, so when a subscription that
matches our topic arrives (``XPUB_VERBOSER`` passes every one), the latest snapshot is
*re-published unchanged* — same ``seq``, same bytes. The newcomer takes it; everyone
who already holds that ``seq`` drops it as a duplicate (docs/daemon.md §3.2: "drop seq not
above the last"). Subscriptions arriving together (a scheduler restarting with 100
sockets) cause one re-publish: the handler drains every queued subscription message
first, and re-publishes at most once per coalescing window.

Slow subscribers: ``SNDHWM`` bounds each subscriber's queue; beyond it XPUB drops for
that subscriber only and never blocks (the subscriber sees a ``seq`` gap and resyncs).

Reload: assigning ``cfg`` takes effect at once: the heartbeat loop re-reads its period
(and is woken from its wait). ``drop_connections()`` closes every client connection
(unbind and bind again every endpoint): CURVE clients are authenticated only at their
handshake, so this is how a client whose key was removed loses its live session.

Requests: a ROUTER answers one msgpack map per message (from DEALER ``[payload]`` or REQ
``["", payload]`` clients) with ``{v: 1, ok: true, ...}`` or
``{v: 1, ok: false, error}``. ``{op: "snapshot"}`` returns the latest snapshot as a
stream body plus ``ok``; other ops are handlers registered by the daemon. A malformed,
oversized (over ``MAX_REQUEST_BYTES``) or wrong-typed request, an unknown op or a
failing handler get an error reply and are counted; nothing a client sends stops the
loop. Frames over ``max_message_bytes`` are cut by libzmq (``MAXMSGSIZE``), which
disconnects that peer.

Every request is served in its own task and its reply is sent when it is ready (the
ROUTER envelope routes it), so a slow handler (a fit runs in a worker thread) never
delays the others: ``snapshot`` is answered at once. At most ``MAX_REQUESTS_IN_FLIGHT``
handler requests run at a time; one more is answered ``busy: ...`` at once instead of
being queued. ``snapshot`` is never counted: it is answered on the spot, nor are the ops
registered with ``bounded=False`` (the claim ops, which bound their own queue).

With CURVE, a handler reads the requesting client's public key (z85 text, from the ZAP
handler's ``User-Id``) with ``request_peer_key()``; it is None without CURVE.

What one peer can make the agent hold (docs/daemon.md §6.1): replies it does not read,
``REQUEST_SEND_HWM`` of them; requests, ``REQUEST_RECV_HWM``; snapshots it does not read,
``send_hwm``. libzmq bounds neither the frames of a multipart message that never ends nor
the number of subscriptions, so tcp beyond loopback needs CURVE or an explicit
``insecure`` (``config.exposed_endpoints``; ``bind`` refuses it otherwise). Dead peers are
dropped by ZMTP heartbeats and the handshake timeout; every ``MEMORY_CHECK_SECONDS`` the
publisher hands heap that gone peers freed back to the kernel (``memtrim``).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from hostagent import wire
from hostagent.agent import memtrim
from hostagent.config import EXPOSED_WHY, PublisherConfig, exposed_endpoints
from hostagent.curve import ServerCurve
from hostagent.errors import HostagentError

log = logging.getLogger("hostagent.publisher")

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]

#: Largest subscription frame (``MAXMSGSIZE`` of the XPUB; a longer one disconnects its
#: peer). A subscription is a flag byte plus a topic prefix, or a ZMTP 3.1 SUBSCRIBE
#: command (10 bytes of name); no topic is longer than ``hostagent.`` + a 253-character
#: host name + ``.``, so nothing longer can match any agent. libzmq's trie costs about
#: 50 bytes per byte of distinct prefix, so this also bounds each subscription's cost.
MAX_SUBSCRIPTION_BYTES = 300
#: Replies queued for one request peer (ROUTER ``SNDHWM``); beyond it the reply is dropped
#: for that peer only. A peer that never reads holds at most this many replies.
REQUEST_SEND_HWM = 8
#: Requests queued from one request peer (ROUTER ``RCVHWM``); beyond it libzmq stops
#: reading that peer's connection (TCP pushes back; nothing is dropped).
REQUEST_RECV_HWM = 32
#: ZMTP heartbeats on both sockets: a PING every interval; a peer that sends nothing within
#: the timeout after it is disconnected, and what it held is freed.
PEER_HEARTBEAT_IVL_MS = 10_000
PEER_HEARTBEAT_TIMEOUT_MS = 30_000
#: A connection that has not completed the ZMTP (and CURVE) handshake by then is closed.
HANDSHAKE_TIMEOUT_MS = 10_000
#: How often the publisher checks its RSS (and returns free heap, see below).
MEMORY_CHECK_SECONDS = 5.0
#: RSS above the lowest seen by this much makes the check return free heap to the kernel.
TRIM_ABOVE_BYTES = 16 << 20
#: ``drop_connections`` retries a bind refused with EADDRINUSE (the old listener still
#: closing) for this long before giving up.
REBIND_TIMEOUT_SECONDS = 5.0

#: Requests for registered handlers (``fit``, ``test-domain``) served at the same time;
#: one more gets the error reply ``busy: N requests in flight (the limit); retry later``.
#: Below the worker threads asyncio gives ``to_thread`` (at least 5), so fits never hold
#: every worker the probe needs.
MAX_REQUESTS_IN_FLIGHT = 4

#: The CURVE public key (z85 text) of the client whose request is being served; each
#: request runs in its own task, so each sees its own.
_PEER_KEY: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "hostagent_request_peer_key", default=None)


def request_peer_key() -> str | None:
    """The CURVE public key (z85) of the client whose request the calling handler serves;
    None without CURVE."""
    return _PEER_KEY.get()


class Publisher:
    """Owns the XPUB and ROUTER sockets of one agent; use from one asyncio loop only."""

    def __init__(self, ctx: Any, cfg: PublisherConfig, host: str, epoch: str, *,
                 curve: ServerCurve | None = None) -> None:
        import zmq

        self._zmq = zmq
        self.ctx = ctx
        self._cfg_changed = asyncio.Event()  # wakes the heartbeat loop on a new cfg
        self.cfg = cfg
        self.host = host
        self.epoch = epoch
        self.topic = wire.topic(host)
        self.delta_topic = wire.delta_topic(host)
        self.curve = curve
        self.seq = 0
        self.latest: dict[str, Any] | None = None  # body of the latest snapshot
        self._snapshot_packed: tuple[dict[str, Any], bytes] | None = None
        self._latest_frames: list[bytes] | None = None
        self._pack_cache = wire.PackCache()  # the topology is packed once per re-probe
        self._last_send = 0.0
        self._last_welcome = 0.0
        self._welcome_handle: asyncio.Handle | None = None
        self.handlers: dict[str, Handler] = {}
        self._unbounded: set[str] = set()  # ops not counted in MAX_REQUESTS_IN_FLIGHT
        self.in_flight = 0  # handler requests being served
        self._serving: set[asyncio.Task[None]] = set()
        self.stats: Counter[str] = Counter()
        self.subscribers = 0
        self.delta_subscribers = 0  # subscriptions matching the delta topic (docs/wire.md §12)
        self._welcome_topics: set[bytes] = set()  # the topics the next welcome goes out on
        self.bound: dict[str, list[str]] = {"stream": [], "request": []}
        self.forwarding: list[str] = []  # endpoints the XPUB connected to (forward_to)
        self.xpub = ctx.socket(zmq.XPUB)
        self.router = ctx.socket(zmq.ROUTER)
        for sock in (self.xpub, self.router):
            sock.linger = 0
            sock.setsockopt(zmq.HEARTBEAT_IVL, PEER_HEARTBEAT_IVL_MS)
            sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, PEER_HEARTBEAT_TIMEOUT_MS)
            sock.setsockopt(zmq.HANDSHAKE_IVL, HANDSHAKE_TIMEOUT_MS)
            if curve is not None:
                curve.apply(sock)
        self.xpub.sndhwm = cfg.send_hwm
        self.xpub.setsockopt(zmq.XPUB_VERBOSER, 1)
        # a host name longer than 253 characters still gets its own subscriptions through
        self.xpub.maxmsgsize = max(MAX_SUBSCRIPTION_BYTES, len(self.delta_topic) + 11)
        self.router.maxmsgsize = cfg.max_message_bytes
        self.router.sndhwm = REQUEST_SEND_HWM
        self.router.rcvhwm = REQUEST_RECV_HWM

    # --- setup -------------------------------------------------------------------------

    def bind(self) -> None:
        """Bind every configured endpoint; ``HostagentError`` names the one that fails.

        tcp beyond loopback without CURVE is refused unless ``cfg.insecure`` (then it is
        bound with a warning): see ``config.exposed_endpoints``.
        """
        zmq = self._zmq
        exposed = exposed_endpoints(self.cfg) if self.curve is None else []
        if exposed and not self.cfg.insecure:
            raise HostagentError(f"{exposed[0]} {EXPOSED_WHY}; enable [curve] or set "
                                 "publisher.insecure = true")
        if exposed:
            log.warning("publisher.insecure = true: %s bound without CURVE; any host that "
                        "reaches %s can make the agent hold unbounded memory",
                        ", ".join(exposed), "it" if len(exposed) == 1 else "them")
        for kind, sock, eps in (("stream", self.xpub, self.cfg.endpoints),
                                ("request", self.router, self.cfg.request_endpoints)):
            for ep in eps:
                try:
                    sock.bind(ep)
                except zmq.ZMQError as exc:
                    raise HostagentError(f"cannot bind {kind} endpoint {ep}: {exc}") from None
                self.bound[kind].append(sock.getsockopt(zmq.LAST_ENDPOINT).decode())
        for ep in self.cfg.forward_to:  # a forwarder's listen endpoint (docs/daemon.md §12)
            try:
                self.xpub.connect(ep)
            except zmq.ZMQError as exc:
                raise HostagentError(f"cannot connect the stream to {ep}: {exc}") from None
            self.forwarding.append(ep)

    @property
    def cfg(self) -> PublisherConfig:
        return self._cfg

    @cfg.setter
    def cfg(self, cfg: PublisherConfig) -> None:
        """A new config (SIGHUP): the heartbeat loop re-reads its period at once."""
        self._cfg = cfg
        self._cfg_changed.set()

    async def drop_connections(self) -> None:
        """Close every client connection: unbind each bound endpoint, then bind it again.

        Clients reconnect by themselves (ZeroMQ's reconnect) and pass the CURVE/ZAP
        handshake again; one whose key is no longer allowed fails it. Subscribers get
        the latest snapshot again (welcome re-publish); a request in flight loses its
        reply. A bind refused with EADDRINUSE is retried for ``REBIND_TIMEOUT_SECONDS``;
        ``HostagentError`` names the endpoint if it still fails.
        """
        zmq = self._zmq
        self.stats["connection_drops"] += 1
        socks = (("stream", self.xpub), ("request", self.router))
        for kind, sock in socks:
            for ep in self.bound[kind]:
                sock.unbind(ep)  # closes the connections accepted through ep
        for kind, sock in socks:
            for ep in self.bound[kind]:
                deadline = time.monotonic() + REBIND_TIMEOUT_SECONDS
                delay = 0.005
                while True:
                    try:
                        sock.bind(ep)
                        break
                    except zmq.ZMQError as exc:
                        if exc.errno != zmq.EADDRINUSE or time.monotonic() > deadline:
                            raise HostagentError(
                                f"cannot bind {kind} endpoint {ep} again: {exc}") from None
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 0.2)

    def close(self) -> None:
        if self._welcome_handle is not None:
            self._welcome_handle.cancel()
        self.xpub.close(linger=0)
        self.router.close(linger=0)

    # --- stream ------------------------------------------------------------------------

    def next_seq(self) -> int:
        return self.seq + 1

    def pack_part(self, key: str, value: Any) -> bytes:
        """``wire.pack(value)``, from the publisher's cache when ``key`` is one it keeps
        (``wire.PackCache``): a caller comparing parts by their bytes (the daemon's
        usage) packs them here, and ``publish`` then sends those same bytes."""
        return self._pack_cache.packed(key, value)

    async def publish(self, data: Mapping[str, Any], *, now: float | None = None) -> int:
        """Send ``data`` as the next snapshot; returns its ``seq``.

        ``data``'s ``host``, ``epoch``, ``seq`` and ``time`` are set to the message's
        (a shallow copy; the caller's dict is not changed). Parts packed before with
        ``pack_part`` are sent as those bytes, not packed again.
        """
        t = time.time() if now is None else now
        self.seq += 1
        snap = dict(data)
        snap.update(host=self.host, epoch=self.epoch, seq=self.seq, time=t)
        body = wire.make_body("snapshot", self.host, self.epoch, self.seq, t, snap)
        frames = wire.encode_stream(body, cache=self._pack_cache)
        previous = self.latest
        self.latest, self._latest_frames = body, frames
        self.stats["snapshots"] += 1
        self.stats["last_snapshot_bytes"] = len(frames[1])
        await self._send(frames)
        if self.delta_subscribers > 0:
            await self._send(self._delta_frames(previous, body, frames))
        return self.seq

    def _delta_frames(self, previous: dict[str, Any] | None, body: dict[str, Any],
                      frames: list[bytes]) -> list[bytes]:
        """The delta stream's message for the snapshot ``body`` just published: a delta
        against ``previous`` (its ``seq - 1``), or the full snapshot's own bytes when
        there is none or the delta would be ``wire.DELTA_MAX_BYTES`` or more."""
        if previous is not None and previous["seq"] == body["seq"] - 1:
            delta = wire.make_delta(previous["data"], body["data"])
            packed = wire.pack(wire.make_body("delta", self.host, self.epoch, body["seq"],
                                              body["time"], delta))
            if len(packed) < wire.DELTA_MAX_BYTES:
                self.stats["deltas"] += 1
                self.stats["last_delta_bytes"] = len(packed)
                return [self.delta_topic, packed]
        self.stats["delta_stream_snapshots"] += 1
        return [self.delta_topic, frames[1]]

    async def heartbeat(self) -> None:
        body = wire.make_body("heartbeat", self.host, self.epoch, self.seq, time.time(), None)
        self.stats["heartbeats"] += 1
        frames = wire.encode_stream(body)
        await self._send(frames)
        if self.delta_subscribers > 0:
            await self._send([self.delta_topic, frames[1]])

    async def _send(self, frames: list[bytes]) -> None:
        self._last_send = time.monotonic()
        # XPUB never blocks: at SNDHWM it drops for that subscriber only.
        await self.xpub.send_multipart(frames, copy=False)

    async def _heartbeats(self) -> None:
        while True:
            # the period is read on every turn; a new cfg (reload) ends the wait early
            wait = self._last_send + self.cfg.heartbeat_seconds - time.monotonic()
            if wait > 0:
                self._cfg_changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._cfg_changed.wait(), wait)
                continue
            await self.heartbeat()

    # --- subscriptions -----------------------------------------------------------------

    def _matches(self, prefix: bytes) -> bool:
        return self.topic.startswith(prefix) or self.delta_topic.startswith(prefix)

    async def _subscriptions(self) -> None:
        zmq = self._zmq
        while True:
            msg = await self.xpub.recv()
            welcome = False
            while True:
                welcome |= self._on_subscription(msg)
                try:
                    msg = self.xpub.recv(zmq.NOBLOCK).result()
                except zmq.Again:
                    break
            if welcome:
                self._schedule_welcome()

    def _on_subscription(self, msg: bytes) -> bool:
        if not msg or msg[0] not in (0, 1):
            self.stats["bad_subscriptions"] += 1
            return False
        prefix = bytes(msg[1:])
        if not self._matches(prefix):
            self.stats["other_subscriptions"] += 1
            return False
        delta = self.delta_topic.startswith(prefix)
        if msg[0] == 1:
            self.subscribers += 1
            self.stats["subscribes"] += 1
            if delta:
                self.delta_subscribers += 1
                self._welcome_topics.add(self.delta_topic)
            if self.topic.startswith(prefix):
                self._welcome_topics.add(self.topic)
            return True
        self.subscribers = max(0, self.subscribers - 1)
        if delta:
            self.delta_subscribers = max(0, self.delta_subscribers - 1)
        self.stats["unsubscribes"] += 1
        return False

    def _schedule_welcome(self) -> None:
        if self._welcome_handle is not None:
            return  # one re-publish is already on its way
        gap = max(self.cfg.coalesce_ms / 1000.0, 0.005)
        delay = max(0.0, self._last_welcome + gap - time.monotonic())
        loop = asyncio.get_running_loop()
        self._welcome_handle = loop.call_later(delay, self._welcome_now)

    def _welcome_now(self) -> None:
        self._welcome_handle = None
        self._last_welcome = time.monotonic()
        topics, self._welcome_topics = self._welcome_topics, set()
        if self._latest_frames is None:
            return  # nothing published yet; the first snapshot will reach everyone
        for topic in sorted(topics):  # the full snapshot, on each stream subscribed
            self.stats["welcome_republishes"] += 1
            task = asyncio.ensure_future(self._send([topic, self._latest_frames[1]]))
            task.add_done_callback(_log_failure)

    # --- requests ----------------------------------------------------------------------

    def register(self, op: str, handler: Handler, *, bounded: bool = True) -> None:
        """Answer ``{op: <op>, ...}`` with ``await handler(request)`` (a reply dict
        without ``v``/``ok``; raise ``HostagentError`` for an error reply). An op
        registered with ``bounded=False`` is not counted in ``MAX_REQUESTS_IN_FLIGHT``:
        its handler bounds what it holds itself."""
        self.handlers[op] = handler
        if bounded:
            self._unbounded.discard(op)
        else:
            self._unbounded.add(op)

    async def _requests(self) -> None:
        zmq = self._zmq
        while True:
            if self.curve is None:
                frames = await self.router.recv_multipart()
                key = None
            else:  # the ZAP handler's User-Id: the client's public key (z85)
                raw = await self.router.recv_multipart(copy=False)
                try:
                    key = raw[-1].get("User-Id")
                except zmq.ZMQError:
                    key = None
                frames = [f.bytes for f in raw]
            task = asyncio.ensure_future(self._serve(frames, key))
            self._serving.add(task)
            task.add_done_callback(self._served)
            await asyncio.sleep(0)  # a flood of requests must not starve the loop

    async def _serve(self, frames: list[bytes], key: str | None = None) -> None:
        """Answer one request and send its reply as soon as it is ready."""
        _PEER_KEY.set(key)  # this task's own context
        reply_frames = await self.answer(frames)
        if reply_frames is not None:
            await self.router.send_multipart(reply_frames)

    def _served(self, task: asyncio.Task[None]) -> None:
        self._serving.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.stats["internal_errors"] += 1
            log.error("sending a reply failed: %s", task.exception())

    async def answer(self, frames: list[bytes]) -> list[bytes] | None:
        """The reply frames for one ROUTER message (``None`` if it cannot be answered)."""
        self.stats["requests"] += 1
        try:
            envelope, payload = wire.split_envelope(frames)
        except wire.WireError as exc:
            self.stats["bad_requests"] += 1
            log.debug("unanswerable request: %s", exc)
            if len(frames) < 2:
                return None  # only an identity: nowhere to put a reply
            return [bytes(frames[0]), wire.pack(wire.error_reply(str(exc)))]
        try:
            req = wire.decode_request(payload)
            reply = await self._dispatch(req)
        except wire.WireError as exc:
            self.stats["bad_requests"] += 1
            reply = wire.error_reply(f"bad request: {exc}")
        except HostagentError as exc:
            self.stats["failed_requests"] += 1
            reply = wire.error_reply(str(exc))
        except Exception as exc:  # a handler bug must not stop the endpoint
            self.stats["internal_errors"] += 1
            log.exception("request %r failed", payload[:200])
            reply = wire.error_reply(f"internal error: {type(exc).__name__}: {exc}")
        return [*envelope, reply if isinstance(reply, bytes) else wire.pack(reply)]

    def _snapshot_reply(self) -> bytes:
        """The packed ``{op: "snapshot"}`` reply to the latest snapshot, packed once per
        snapshot: every client asking for the same ``seq`` gets the same bytes (libzmq
        sends replies of 64 KiB or more without copying them, so replies queued for many
        peers share one buffer)."""
        latest = self.latest
        cached = self._snapshot_packed
        if cached is None or cached[0] is not latest:
            cached = self._snapshot_packed = (latest, wire.pack(wire.ok_reply(**latest)))
        return cached[1]

    async def _dispatch(self, req: dict[str, Any]) -> dict[str, Any] | bytes:
        op = req["op"]
        if op == "snapshot":
            extra = set(req) - {"op"}
            if extra:
                raise wire.WireError(f"op snapshot takes no fields (got {sorted(extra)})")
            if self.latest is None:
                raise HostagentError("no snapshot yet: the agent is starting")
            self.stats["op_snapshot"] += 1
            return self._snapshot_reply()
        handler = self.handlers.get(op)
        if handler is None:
            known = ", ".join(sorted({"snapshot", *self.handlers}))
            raise wire.WireError(f"unknown op {op[:64]!r} (known: {known})")
        if op in self._unbounded:
            self.stats[f"op_{op}"] += 1
            return wire.ok_reply(**await handler(req))
        if self.in_flight >= MAX_REQUESTS_IN_FLIGHT:
            self.stats["busy_requests"] += 1
            raise HostagentError(f"busy: {self.in_flight} requests in flight (the limit); "
                                 "retry later")
        self.stats[f"op_{op}"] += 1
        self.in_flight += 1
        try:
            result = await handler(req)
        finally:
            self.in_flight -= 1
        return wire.ok_reply(**result)

    # --- memory ------------------------------------------------------------------------

    async def _memory_care(self) -> None:
        """Every ``MEMORY_CHECK_SECONDS``: when RSS is ``TRIM_ABOVE_BYTES`` over the lowest
        seen, give free heap back to the kernel (``memtrim.trim``, in a worker thread: it
        took up to 110 ms after 245 MB of replies to gone peers were freed).

        libzmq frees what a gone peer held, but glibc keeps it until that arena is next
        used (20 gone clients' replies: 245 MB until the next request) or for good (the
        subscription trie's small nodes: 470 MB).
        """
        lowest = memtrim.rss_bytes()
        while True:
            await asyncio.sleep(MEMORY_CHECK_SECONDS)
            rss = memtrim.rss_bytes()
            if rss > lowest + TRIM_ABOVE_BYTES:
                start = time.perf_counter()
                if await asyncio.to_thread(memtrim.trim):
                    self.stats["memory_trims"] += 1
                    before, rss = rss, memtrim.rss_bytes()
                    log.debug("free heap returned to the kernel: RSS %.0f -> %.0f MB in "
                              "%.1f ms", before / 2**20, rss / 2**20,
                              (time.perf_counter() - start) * 1000)
            lowest = min(lowest, rss)

    # --- main --------------------------------------------------------------------------

    async def run(self) -> None:
        """Heartbeats, subscriptions and requests, until cancelled."""
        tasks = [asyncio.ensure_future(c) for c in
                 (self._heartbeats(), self._subscriptions(), self._requests(),
                  self._memory_care())]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for t in done:
                t.result()  # re-raise a crash of one part
        finally:
            for t in (*tasks, *self._serving):
                t.cancel()
            await asyncio.gather(*tasks, *self._serving, return_exceptions=True)

    def state(self) -> dict[str, Any]:
        """Counters and endpoints for the debug dump."""
        return {"host": self.host, "epoch": self.epoch, "seq": self.seq,
                "subscribers": self.subscribers,
                "delta_subscribers": self.delta_subscribers, "endpoints": self.bound,
                "forward_to": self.forwarding,
                "curve": self.curve is not None, "requests_in_flight": self.in_flight,
                "counters": dict(self.stats)}


def _log_failure(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("re-publish failed: %s", task.exception())
