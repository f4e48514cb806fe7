"""``hostagent forward``: an XSUB/XPUB fan-in between many agents and many subscribers.

Agents' streams come in on one XSUB socket: it **connects** to each agent's stream
endpoint listed in ``[forward] upstream`` (the agents keep binding, nothing changes on
them), and/or **binds** ``[forward] listen`` for agents whose XPUB connects to it
(``[publisher] forward_to`` on the agent). Subscribers (schedulers, ``hostagent watch``)
connect a SUB to the forwarder's XPUB (``[forward] endpoints``), exactly as to one agent.

Subscriptions travel up: the XPUB has ``XPUB_VERBOSE``, so every subscription of every
new subscriber (not only the first for a prefix) reaches every agent, and each agent's
welcome re-publish (docs/daemon.md §3.2) brings its latest snapshot to the newcomer; the
others drop it as a duplicate. An agent that connects (or reconnects) later gets the
forwarder's whole subscription set from libzmq's XSUB at once, and welcomes as well.

The loop (``Forwarder.run``) moves messages itself instead of ``zmq.proxy`` so that it
can count them and drop what is not a stream message: a message from an agent must be
two frames with a ``hostagent.<host>.`` or ``hostagent-delta.<host>.`` topic
(``wire.stream_of_topic``) or it is dropped
(``bad_messages``); the body is not decoded (subscribers decode strictly, the forwarder
only carries). A subscription frame from a subscriber must be ``\\x00``/``\\x01`` +
prefix (``bad_subscriptions`` otherwise).

What a peer can make the forwarder hold (docs/security.md §15): per subscriber at most
``send_hwm`` messages queued (libzmq's XPUB drops beyond it, for that subscriber only:
it sees a gap), per agent connection ``recv_hwm`` messages of at most
``max_message_bytes`` each, subscription frames of at most
``publisher.MAX_SUBSCRIPTION_BYTES``; ZMTP heartbeats and the handshake timeout drop
dead peers. tcp beyond loopback needs CURVE or ``insecure`` (the agent's rule).

Signals: SIGTERM/SIGINT stop (exit 0); SIGUSR1 writes ``hostagent-forward-dump.json``
in ``runtime_dir`` (counters, endpoints, process). With ``$NOTIFY_SOCKET`` it sends
``READY=1`` once bound and connected.
"""

from __future__ import annotations

import json
import logging
import signal
import time
import tomllib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hostagent import wire
from hostagent.config import EXPOSED_WHY, PublisherConfig, _Reader, exposed_endpoints
from hostagent.errors import ConfigError, HostagentError

log = logging.getLogger("hostagent.forward")

DEFAULT_PATH = "/etc/hostagent/forward.toml"
DUMP_NAME = "hostagent-forward-dump.json"

#: Messages queued for one subscriber (XPUB ``SNDHWM``) by default: one welcome
#: re-publish per host arrives when a scheduler subscribes, so this must exceed the
#: number of hosts behind the forwarder (10,000 in the fleet bench) or a newcomer
#: loses snapshots to its own HWM (it then sees them as gaps and heals by heartbeat).
DEFAULT_SEND_HWM = 20_000
#: Messages queued from one agent connection (XSUB ``RCVHWM``) by default.
DEFAULT_RECV_HWM = 1_000
#: Largest stream frame accepted from an agent by default (the subscriber's default).
DEFAULT_MAX_MESSAGE_BYTES = wire.DEFAULT_MAX_MESSAGE_BYTES
#: Agent connections: ZMTP PING every second, dropped after 3 s of silence (as the
#: subscriber library does), so a vanished agent's connection is retried quickly.
UPSTREAM_HEARTBEAT_IVL_MS = 1_000
UPSTREAM_HEARTBEAT_TIMEOUT_MS = 3_000
#: The loop wakes at least this often to look at signals.
POLL_MS = 200
#: Messages moved per socket per turn, so neither direction starves the other.
BATCH = 1_000


@dataclass(frozen=True)
class Upstream:
    """One agent stream endpoint the forwarder connects to, and its CURVE public key file
    (None: the ``[curve] agent_public_key``)."""

    endpoint: str
    server_key: str | None = None


@dataclass(frozen=True)
class ForwardCurve:
    enabled: bool = False
    server_secret_key: str = "/etc/hostagent/curve/forward.key_secret"
    allowed_clients_dir: str = "/etc/hostagent/curve/forward-clients"
    client_secret_key: str = "/etc/hostagent/curve/forward.key_secret"
    agent_public_key: str = "/etc/hostagent/curve/server.key"


@dataclass(frozen=True)
class ForwardConfig:
    endpoints: tuple[str, ...] = ("tcp://127.0.0.1:6520",)
    upstream: tuple[Upstream, ...] = ()
    listen: tuple[str, ...] = ()
    send_hwm: int = DEFAULT_SEND_HWM
    recv_hwm: int = DEFAULT_RECV_HWM
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    insecure: bool = False
    runtime_dir: str = "/run/hostagent-forward"  # its unit's RuntimeDirectory=
    log_level: str = "info"
    curve: ForwardCurve = field(default_factory=ForwardCurve)
    source: str = "<defaults>"


_FORWARD_KEYS = ("endpoints", "upstream", "listen", "send_hwm", "recv_hwm",
                 "max_message_bytes", "insecure", "runtime_dir", "log_level")
_CURVE_KEYS = ("enabled", "server_secret_key", "allowed_clients_dir", "client_secret_key",
               "agent_public_key")
_PREFIXES = ("tcp://", "ipc://", "inproc://")


def _check_keys(r: _Reader, known: tuple[str, ...]) -> None:
    for key in r.data:
        if key not in known:
            r.fail(key, r.data[key], f"unknown option (known: {', '.join(sorted(known))})")


def _endpoint(r: _Reader, key: str, ep: Any) -> str:
    if not isinstance(ep, str) or not ep.startswith(_PREFIXES):
        r.fail(key, ep, "endpoints must start with tcp://, ipc:// or inproc://")
    return ep


def _upstream(r: _Reader) -> tuple[Upstream, ...]:
    items = r.get("upstream", [], list)
    out = []
    for item in items:
        if isinstance(item, dict):
            extra = set(item) - {"endpoint", "server_key"}
            if extra or "endpoint" not in item:
                r.fail("upstream", item, "an entry is an endpoint string or a table "
                       "{endpoint = \"tcp://...\", server_key = \"FILE.key\"}")
            key = item.get("server_key")
            if key is not None and (not isinstance(key, str) or not key):
                r.fail("upstream", item, "server_key must be a key file path")
            out.append(Upstream(_endpoint(r, "upstream", item["endpoint"]), key))
        else:
            out.append(Upstream(_endpoint(r, "upstream", item)))
    return tuple(out)


def forward_config_from_dict(data: dict[str, Any], source: str = "<dict>") -> ForwardConfig:
    """Validate a parsed forwarder config (tables ``[forward]`` and ``[curve]``)."""
    for table in data:
        if table not in ("forward", "curve"):
            raise ConfigError(f"{source}: unknown table [{table}] (known: curve, forward)")
    fw = _Reader(source, "forward", data.get("forward", {}))
    cv = _Reader(source, "curve", data.get("curve", {}))
    _check_keys(fw, _FORWARD_KEYS)
    _check_keys(cv, _CURVE_KEYS)
    d = ForwardConfig()
    endpoints = tuple(_endpoint(fw, "endpoints", ep)
                      for ep in fw.strings("endpoints", d.endpoints))
    if not endpoints:
        fw.fail("endpoints", [], "at least one endpoint for subscribers")
    listen = tuple(_endpoint(fw, "listen", ep) for ep in fw.strings("listen", ()))
    upstream = _upstream(fw)
    if not upstream and not listen:
        fw.fail("upstream", [], "nothing to forward: give agents' stream endpoints in "
                "upstream, or endpoints for agents to connect to in listen")
    curve = ForwardCurve(enabled=cv.get("enabled", False, bool),
                         **{k: cv.get(k, getattr(ForwardCurve, k), str)
                            for k in _CURVE_KEYS[1:]})
    insecure = fw.get("insecure", False, bool)
    if curve.enabled and listen:
        fw.fail("listen", list(listen), "agents connecting to the forwarder cannot use "
                "CURVE (each agent is a CURVE server with its own key): with [curve] "
                "enabled list the agents in upstream instead")
    if not curve.enabled and not insecure:
        for key, eps in (("endpoints", endpoints), ("listen", listen)):
            for ep in exposed_endpoints(PublisherConfig(endpoints=eps, request_endpoints=())):
                fw.fail(key, list(eps), f"{ep} {EXPOSED_WHY}; set [curve] enabled = true, "
                        "or forward.insecure = true to accept that")
    log_level = fw.choice("log_level", d.log_level, ("debug", "info", "warning", "error"))
    return ForwardConfig(
        endpoints=endpoints, upstream=upstream, listen=listen,
        send_hwm=fw.integer("send_hwm", d.send_hwm, minimum=1),
        recv_hwm=fw.integer("recv_hwm", d.recv_hwm, minimum=1),
        max_message_bytes=fw.integer("max_message_bytes", d.max_message_bytes, minimum=1024),
        insecure=insecure, runtime_dir=fw.get("runtime_dir", d.runtime_dir, str),
        log_level=log_level, curve=curve, source=source)


def load_forward_config(path: str | Path) -> ForwardConfig:
    """Read and validate a forwarder config file; ``ConfigError`` names the file."""
    try:
        text = Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        data = tomllib.loads(text.decode())
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return forward_config_from_dict(data, str(path))


class Forwarder:
    """The two sockets and the loop between them; ``run()`` until ``stop()``."""

    def __init__(self, cfg: ForwardConfig, ctx: Any = None) -> None:
        import zmq

        from hostagent.publisher import (
            HANDSHAKE_TIMEOUT_MS,
            MAX_SUBSCRIPTION_BYTES,
            PEER_HEARTBEAT_IVL_MS,
            PEER_HEARTBEAT_TIMEOUT_MS,
        )

        self._zmq = zmq
        self.cfg = cfg
        self.ctx = ctx or zmq.Context()
        self.stats: Counter[str] = Counter()
        self.subscriptions = 0  # live subscriptions seen from subscribers
        self.bound: dict[str, list[str]] = {"subscribers": [], "agents": []}
        self.started = time.time()
        self.auth = None
        self._stopping = False
        self._dump_wanted = False
        self.xsub = self.ctx.socket(zmq.XSUB)
        self.xpub = self.ctx.socket(zmq.XPUB)
        for sock in (self.xsub, self.xpub):
            sock.linger = 0
            sock.setsockopt(zmq.HANDSHAKE_IVL, HANDSHAKE_TIMEOUT_MS)
        self.xsub.setsockopt(zmq.HEARTBEAT_IVL, UPSTREAM_HEARTBEAT_IVL_MS)
        self.xsub.setsockopt(zmq.HEARTBEAT_TIMEOUT, UPSTREAM_HEARTBEAT_TIMEOUT_MS)
        self.xsub.maxmsgsize = cfg.max_message_bytes
        self.xsub.rcvhwm = cfg.recv_hwm
        self.xpub.setsockopt(zmq.HEARTBEAT_IVL, PEER_HEARTBEAT_IVL_MS)
        self.xpub.setsockopt(zmq.HEARTBEAT_TIMEOUT, PEER_HEARTBEAT_TIMEOUT_MS)
        self.xpub.setsockopt(zmq.XPUB_VERBOSE, 1)
        self.xpub.maxmsgsize = MAX_SUBSCRIPTION_BYTES
        self.xpub.sndhwm = cfg.send_hwm

    def start(self) -> None:
        """CURVE setup, bind the subscribers' and agents' endpoints, connect to agents.
        ``HostagentError`` (``ConfigError``) names what fails."""
        zmq = self._zmq
        cfg = self.cfg
        client_keys: tuple[bytes, bytes] | None = None
        if cfg.curve.enabled:
            from hostagent.curve import ServerCurve, load_keys, start_authenticator

            server = ServerCurve.load(cfg.curve.server_secret_key,
                                      cfg.curve.allowed_clients_dir)
            self.auth = start_authenticator(self.ctx, server.allowed_dir, asyncio_ctx=False)
            server.apply(self.xpub)
            public, secret = load_keys(cfg.curve.client_secret_key, need_secret=True)
            assert secret is not None
            client_keys = (public, secret)
            default_agent_key = None
            if any(u.server_key is None for u in cfg.upstream):
                default_agent_key, _ = load_keys(cfg.curve.agent_public_key,
                                                 need_secret=False)
        for ep in cfg.endpoints:
            try:
                self.xpub.bind(ep)
            except zmq.ZMQError as exc:
                raise HostagentError(f"cannot bind subscribers' endpoint {ep}: {exc}") from None
            self.bound["subscribers"].append(self.xpub.getsockopt(zmq.LAST_ENDPOINT).decode())
        for ep in cfg.listen:
            try:
                self.xsub.bind(ep)
            except zmq.ZMQError as exc:
                raise HostagentError(f"cannot bind agents' endpoint {ep}: {exc}") from None
            self.bound["agents"].append(self.xsub.getsockopt(zmq.LAST_ENDPOINT).decode())
        for up in cfg.upstream:
            if client_keys is not None:  # options apply to the connects that follow
                from hostagent.curve import load_keys

                agent_key = (default_agent_key if up.server_key is None
                             else load_keys(up.server_key, need_secret=False)[0])
                self.xsub.curve_publickey, self.xsub.curve_secretkey = client_keys
                self.xsub.curve_serverkey = agent_key
            try:
                self.xsub.connect(up.endpoint)
            except zmq.ZMQError as exc:
                raise HostagentError(f"cannot connect to agent {up.endpoint}: {exc}") from None

    # --- the loop ----------------------------------------------------------------------

    def _from_agents(self) -> None:
        zmq = self._zmq
        for _ in range(BATCH):
            try:
                frames = self.xsub.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            size = sum(len(f) for f in frames)
            self.stats["messages_in"] += 1
            self.stats["bytes_in"] += size
            if len(frames) != 2:
                self._bad(f"a message of {len(frames)} frames (a stream message has 2)")
                continue
            try:
                wire.stream_of_topic(frames[0].bytes)
            except wire.WireError as exc:
                self._bad(str(exc))
                continue
            self.xpub.send_multipart(frames, copy=False)  # never blocks: drops at SNDHWM
            self.stats["messages_out"] += 1
            self.stats["bytes_out"] += size

    def _bad(self, why: str) -> None:
        self.stats["bad_messages"] += 1
        level = logging.WARNING if self.stats["bad_messages"] == 1 else logging.DEBUG
        log.log(level, "message from an agent dropped: %s", why)

    def _from_subscribers(self) -> None:
        zmq = self._zmq
        for _ in range(BATCH):
            try:
                msg = self.xpub.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            if not msg or msg[0] not in (0, 1):
                self.stats["bad_subscriptions"] += 1
                continue
            if msg[0] == 1:
                self.stats["subscribes"] += 1
                self.subscriptions += 1
            else:
                self.stats["unsubscribes"] += 1
                self.subscriptions = max(0, self.subscriptions - 1)
            self.xsub.send(msg)  # XSUB passes it to every agent (and to later ones)

    def run(self) -> int:
        """Forward until ``stop()`` (or SIGTERM when ``install_signals`` was called)."""
        zmq = self._zmq
        poller = zmq.Poller()
        poller.register(self.xsub, zmq.POLLIN)
        poller.register(self.xpub, zmq.POLLIN)
        while not self._stopping:
            events = dict(poller.poll(POLL_MS))
            if self.xsub in events:
                self._from_agents()
            if self.xpub in events:
                self._from_subscribers()
            if self._dump_wanted:
                self._dump_wanted = False
                self.dump()
        return 0

    def stop(self) -> None:
        self._stopping = True

    def install_signals(self) -> None:
        """SIGTERM/SIGINT stop the loop, SIGUSR1 asks for a dump (on its next turn)."""
        signal.signal(signal.SIGTERM, lambda *_: self.stop())
        signal.signal(signal.SIGINT, lambda *_: self.stop())
        signal.signal(signal.SIGUSR1, lambda *_: setattr(self, "_dump_wanted", True))

    # --- state -------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """Counters and endpoints (the dump's ``forward`` part)."""
        return {"endpoints": self.bound,
                "upstream": [u.endpoint for u in self.cfg.upstream],
                "curve": self.cfg.curve.enabled, "subscriptions": self.subscriptions,
                "send_hwm": self.cfg.send_hwm, "recv_hwm": self.cfg.recv_hwm,
                "max_message_bytes": self.cfg.max_message_bytes,
                "counters": dict(self.stats)}

    def dump(self) -> Path | None:
        """Write the SIGUSR1 dump (``DUMP_NAME`` in ``runtime_dir``); the path, or None
        when it cannot be written (logged)."""
        from hostagent.agent.debug_dump import _default, process_info, with_iso_times
        from hostagent.atomic_file import write_atomically

        doc = with_iso_times({"written": time.time(), "started": self.started,
                              "config": self.cfg.source, "forward": self.state(),
                              "process": process_info()})
        text = json.dumps(doc, indent=1, sort_keys=True, default=_default) + "\n"
        try:
            path = write_atomically(Path(self.cfg.runtime_dir) / DUMP_NAME, text)
        except OSError as exc:
            log.error("cannot write the debug dump in %s: %s", self.cfg.runtime_dir, exc)
            return None
        self.stats["dumps"] += 1
        log.info("debug dump written to %s", path)
        return path

    def close(self) -> None:
        if self.auth is not None:
            self.auth.stop()
        self.xsub.close(linger=0)
        self.xpub.close(linger=0)
        self.ctx.term()


def run_forwarder(config_path: str) -> int:
    """``hostagent forward``: load the config, start, notify READY, forward until SIGTERM."""
    from hostagent.agent.daemon import setup_logging
    from hostagent.agent.notify import Notifier

    cfg = load_forward_config(config_path)
    setup_logging(cfg.log_level)
    fwd = Forwarder(cfg)
    try:
        fwd.start()
        fwd.install_signals()
        status = (f"forwarding {len(cfg.upstream)} upstream + {', '.join(cfg.listen) or '-'}"
                  f" to {', '.join(fwd.bound['subscribers'])}")
        Notifier().ready(status)
        log.info("hostagent forward: %s%s", status, " (CURVE)" if cfg.curve.enabled else "")
        code = fwd.run()
        log.info("stopping")
        return code
    finally:
        fwd.close()
