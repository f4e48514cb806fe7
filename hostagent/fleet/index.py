"""The fleet index: the latest state of every host a scheduler hears, compact, and
placement over it (docs/fleet.md).

``Fleet.update(snapshot, now)`` takes one host's latest decoded schema-v1 snapshot (as
``hostagent.subscriber`` delivers it) and keeps:

- the topology and config once per host *shape* (interned under a hash of their bytes:
  hosts of one kind share one copy); a snapshot whose topology and config equal its
  host's shape (a C-level ``==``, ~25 µs for 48 threads) is not hashed again;
- the usage as the decoded map it was handed (not copied, not packed again: on the
  delta stream it is the subscriber's held snapshot's, and elements of equal bytes are
  one object fleet-wide, ``wire.SharedDecoded``); the views built for exact fits are
  kept in an LRU of ``VIEW_CACHE_SIZE``;
- a ``HostSummary`` (free threads, whole cores, memory, pages per cell; cache ways; PCI).

``Fleet.place(request, count, weigher)`` offers only hosts that are alive, not stale,
readable and not quarantined; refuses most by their summary (``prefilter``), ranks the
rest by the weighers and runs the exact fit best-first until ``count`` hosts fit.
"""

from __future__ import annotations

import hashlib
import heapq
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from hostagent import wire
from hostagent.errors import RequestError
from hostagent.fit import FitRequest, HostView, fit, parse_request, prepare
from hostagent.fleet.summary import (
    HostSummary,
    Needs,
    Shape,
    make_shape,
    needs_of,
    prefilter,
    summarize,
)
from hostagent.fleet.weighers import final_score, in_host_strategy, parse_weigher, score

log = logging.getLogger("hostagent.fleet")

#: seconds without a snapshot (or, through ``feed``, any message) after which a host is
#: stale and no longer offered
DEFAULT_STALE_AFTER_S = 30.0
#: exact-fit views (decoded usage + ``prepare``) kept, least recently used dropped
VIEW_CACHE_SIZE = 256
#: hosts the index holds at most; a snapshot of a further host is refused (logged once)
DEFAULT_MAX_HOSTS = 100_000
#: at most this many hosts named in log lines about refused snapshots (then debug level)
MAX_WARNED_HOSTS = 1024
#: most candidates ``place`` returns
MAX_COUNT = 1000
#: rankings kept (one per distinct request and weigher placed recently, least recently
#: used dropped): each holds a heap entry per feasible host (~80 bytes)
RANK_CACHE_SIZE = 32
#: the change log the rankings read is cut (and the rankings rebuilt on their next use)
#: when it is longer than this or 4 entries per host
CHANGE_LOG_MIN = 100_000


@dataclass
class _Ranking:
    """The hosts that pass the prefilter for one (needs, weights), best first: a heap of
    (-score, host, version); entries of an older version are skipped when popped, and
    the hosts changed since ``log_pos`` are scored again before each place."""

    heap: list[tuple[float, str, int]]
    log_pos: int


@dataclass(slots=True)
class HostEntry:
    """What the index holds about one host."""

    host: str
    epoch: str
    seq: int
    seen: float  # caller's clock: the last snapshot (or, through feed, any message)
    shape: Shape
    summary: HostSummary
    usage: Mapping[str, Any]  # the snapshot's usage as handed to update (shared: read only)
    time: float  # the snapshot's own time (unix seconds)
    endpoint: str | None  # where to claim: agent.request_endpoint, else the source's
    alive: bool = True
    stale: bool = False  # the subscriber saw a missed snapshot not yet repaired
    unreadable: str | None = None  # why the last snapshot was refused
    prev_epoch: str | None = None
    quarantined_until: float = 0.0  # two agents claim this name: not offered before
    awaiting_seq: int = -1  # a claim was granted at this seq: not offered until a later one
    version: int = 0  # +1 on every change (the rank caches' entries name the version)


@dataclass(frozen=True)
class Candidate:
    """One host for a request: its score (higher is better), the exact fit answer
    (``answer["placement"]``, ``answer["libvirt_xml"]``), where to claim it, and the
    snapshot it was computed from."""

    host: str
    score: float
    answer: dict[str, Any]
    endpoint: str | None
    epoch: str
    seq: int

    @property
    def placement(self) -> dict[str, Any]:
        return self.answer["placement"]


def _digest(*parts: Any) -> str:
    h = hashlib.blake2b(digest_size=12)
    for p in parts:
        h.update(wire.pack(p))
    return h.hexdigest()


@dataclass
class Fleet:
    """The replicated state of the fleet in one scheduler process (not thread-safe)."""

    stale_after_s: float = DEFAULT_STALE_AFTER_S
    max_hosts: int = DEFAULT_MAX_HOSTS
    view_cache_size: int = VIEW_CACHE_SIZE
    entries: dict[str, HostEntry] = field(default_factory=dict)
    shapes: dict[str, Shape] = field(default_factory=dict)
    stats: Counter[str] = field(default_factory=Counter)
    _shape_users: Counter[str] = field(default_factory=Counter, repr=False)
    #: the held shapes by the ids of their topology and config objects
    _shape_of_objects: dict[tuple[int, int], Shape] = field(default_factory=dict, repr=False)
    _views: OrderedDict[str, tuple[str, int, HostView]] = field(
        default_factory=OrderedDict, repr=False)
    _warned: set[tuple[str, str]] = field(default_factory=set, repr=False)
    touched_at: float = field(default=float("-inf"), repr=False)  # feed's last touch pass
    rank_cache_size: int = RANK_CACHE_SIZE
    _log: list[str] = field(default_factory=list, repr=False)  # hosts changed, in order
    _ranks: OrderedDict[Any, _Ranking] = field(default_factory=OrderedDict, repr=False)

    def _changed(self, entry: HostEntry) -> None:
        entry.version += 1
        if not self._ranks:
            return
        self._log.append(entry.host)
        if len(self._log) > max(CHANGE_LOG_MIN, 4 * len(self.entries)):
            self._ranks.clear()  # rebuilt on their next use
            self._log.clear()

    # ------------------------------------------------------------------ ingest
    def update(self, snapshot: Mapping[str, Any], now: float, *,
               request_endpoint: str | None = None) -> None:
        """Take one host's latest snapshot (``now``: the caller's clock, the same as for
        ``place``). A snapshot that cannot be read is refused and logged once per host;
        the host is then not offered until a readable one comes. The snapshot's usage is
        kept as it is, not copied: the caller must not change it afterwards (the
        subscriber hands over a new map for every snapshot)."""
        host = snapshot.get("host") if isinstance(snapshot, Mapping) else None
        if not isinstance(host, str) or not host:
            self._refuse(None, f"no host name ({type(snapshot).__name__})")
            return
        entry = self.entries.get(host)
        try:
            if snapshot.get("schema") != 1:
                raise ValueError(f"schema {snapshot.get('schema')!r}, expected 1")
            epoch, seq = snapshot["epoch"], snapshot["seq"]
            if not isinstance(epoch, str) or isinstance(seq, bool) or not isinstance(seq, int):
                raise ValueError(f"epoch {epoch!r} / seq {seq!r}")
            topo, config, usage = snapshot["topology"], snapshot["config"], snapshot["usage"]
            if not all(isinstance(x, Mapping) for x in (topo, config, usage)):
                raise ValueError("topology, config and usage must be maps")
            if entry is not None and (entry.shape.topology is topo or
                                      entry.shape.topology == topo) and \
                    (entry.shape.config is config or entry.shape.config == config):
                shape = entry.shape
            elif (known := self._shape_of_objects.get((id(topo), id(config)))) is not None \
                    and known.topology is topo and known.config is config:
                shape = known  # the very objects of a held shape (the subscriber shares
                # one decoded topology among the hosts of a kind): not hashed again
            else:
                key = _digest(topo, config)
                shape = self.shapes.get(key) or make_shape(key, topo, config)
            summary = summarize(shape, usage)
            agent = snapshot.get("agent")
            advertised = agent.get("request_endpoint") if isinstance(agent, Mapping) else None
            stamp = float(snapshot.get("time") or 0.0)
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
            self._refuse(host, f"{type(exc).__name__}: {exc}")
            if entry is not None:
                entry.unreadable = str(exc)
                self._changed(entry)
            return
        endpoint = advertised if isinstance(advertised, str) and advertised else \
            request_endpoint
        if entry is None:
            if len(self.entries) >= self.max_hosts:
                self._refuse(host, f"the index holds max_hosts={self.max_hosts} hosts")
                return
            entry = self.entries[host] = HostEntry(
                host, epoch, seq, now, shape, summary, usage, stamp, endpoint)
            self._use_shape(shape)
        else:
            if epoch != entry.epoch:
                self._new_epoch(entry, epoch, now)
            elif seq < entry.seq:
                self.stats["older"] += 1
                return  # an older snapshot of the same epoch (e.g. a late fetch reply)
            if shape is not entry.shape:
                self._drop_shape(entry.shape)
                self._use_shape(shape)
            entry.epoch, entry.seq, entry.seen, entry.shape = epoch, seq, now, shape
            entry.summary, entry.usage, entry.time = summary, usage, stamp
            entry.endpoint = endpoint or entry.endpoint
            entry.alive, entry.stale, entry.unreadable = True, False, None
        self._changed(entry)
        self.stats["updates"] += 1

    def _new_epoch(self, entry: HostEntry, epoch: str, now: float) -> None:
        """A snapshot of another epoch: an agent restart, or (an epoch coming back after
        another replaced it) two agents publishing under one name: quarantined."""
        if epoch == entry.prev_epoch:
            self.stats["duplicate_name"] += 1
            if now >= entry.quarantined_until:
                self._warn(entry.host, "duplicate",
                           "host %r: snapshots of two agents alternate (epochs %s and %s): "
                           "not offered until one alone is heard for %g s",
                           entry.host, entry.epoch, epoch, self.stale_after_s)
            entry.quarantined_until = now + self.stale_after_s
        entry.prev_epoch = entry.epoch
        entry.awaiting_seq = -1  # seqs of another agent
        self.stats["epochs"] += 1

    def _use_shape(self, shape: Shape) -> None:
        if self.shapes.setdefault(shape.key, shape) is shape:
            # the shape holds these objects: their ids are not reused while it is held
            self._shape_of_objects[(id(shape.topology), id(shape.config))] = shape
        self._shape_users[shape.key] += 1

    def _drop_shape(self, shape: Shape) -> None:
        self._shape_users[shape.key] -= 1
        if self._shape_users[shape.key] <= 0:
            del self._shape_users[shape.key]
            held = self.shapes.pop(shape.key, None)
            if held is not None:
                self._shape_of_objects.pop((id(held.topology), id(held.config)), None)

    def _warn(self, host: str, kind: str, msg: str, *args: Any) -> None:
        key = (kind, host)
        if key in self._warned or len(self._warned) >= MAX_WARNED_HOSTS:
            log.debug(msg, *args)
            return
        self._warned.add(key)
        log.warning(msg, *args)

    def _refuse(self, host: str | None, why: str) -> None:
        self.stats["refused"] += 1
        self._warn(host or "?", "refused", "snapshot of host %r refused: %s", host, why)

    def mark_dead(self, host: str) -> None:
        """The host went silent (or did not answer a claim): not offered until its next
        snapshot."""
        entry = self.entries.get(host)
        if entry is not None:
            entry.alive = False
            self._changed(entry)

    def mark_stale(self, host: str) -> None:
        """A snapshot of the host was missed: not offered until the next one."""
        entry = self.entries.get(host)
        if entry is not None:
            entry.stale = True
            self._changed(entry)

    def touch(self, host: str, now: float) -> None:
        """The host was heard (a heartbeat) at ``now``: it is not stale by age."""
        entry = self.entries.get(host)
        if entry is not None and now > entry.seen:
            entry.seen = now

    def await_snapshot_after(self, host: str, epoch: str, seq: int) -> None:
        """The agent of ``host`` (``epoch``) granted this scheduler a claim at ``seq`` (the
        claim reply's): the host is not offered until a snapshot after ``seq`` is held (the
        agent publishes one for every grant; it counts the claim), so this scheduler does
        not at once pick what it already holds."""
        entry = self.entries.get(host)
        if entry is not None and entry.epoch == epoch:
            entry.awaiting_seq = max(entry.awaiting_seq, seq)
            self._changed(entry)

    def forget(self, host: str) -> None:
        """Drop a host from the index."""
        entry = self.entries.pop(host, None)
        if entry is not None:
            self._drop_shape(entry.shape)
            self._views.pop(host, None)
            self._changed(entry)

    # ------------------------------------------------------------------ reading
    def hosts(self) -> list[str]:
        """Every host the index holds, offered or not, sorted."""
        return sorted(self.entries)

    def offered(self, host: str, now: float | None = None) -> bool:
        """Whether ``host`` may be offered now (alive, fresh, readable, not quarantined)."""
        entry = self.entries.get(host)
        return entry is not None and self._why_not_offered(
            entry, time.monotonic() if now is None else now) is None

    def why_not_offered(self, host: str, now: float | None = None) -> str | None:
        """Why ``host`` is not offered now (``dead``, ``stale ...``, ``unreadable
        snapshot``, ``duplicate host name``, ...), ``None`` if it is."""
        entry = self.entries.get(host)
        if entry is None:
            return "unknown host"
        return self._why_not_offered(entry, time.monotonic() if now is None else now)

    def _why_not_offered(self, e: HostEntry, now: float) -> str | None:
        if not e.alive:
            return "dead"
        if e.stale:
            return "stale (a snapshot was missed)"
        if now - e.seen > self.stale_after_s:
            return f"stale (nothing for {now - e.seen:.0f} s)"
        if e.unreadable is not None:
            return "unreadable snapshot"
        if now < e.quarantined_until:
            return "duplicate host name"
        if e.seq <= e.awaiting_seq:
            return "a claim granted here is not in its snapshot yet"
        return None

    def summary(self, host: str) -> HostSummary | None:
        """The host's summary (``None``: unknown host)."""
        entry = self.entries.get(host)
        return None if entry is None else entry.summary

    def entry(self, host: str) -> HostEntry | None:
        return self.entries.get(host)

    def snapshot(self, host: str) -> dict[str, Any] | None:
        """The host's latest snapshot rebuilt (topology, config and usage are the ones
        held, shared: do not change them)."""
        e = self.entries.get(host)
        if e is None:
            return None
        return {"schema": 1, "host": e.host, "epoch": e.epoch, "seq": e.seq, "time": e.time,
                "topology": e.shape.topology, "config": e.shape.config,
                "usage": e.usage}

    def view(self, host: str) -> HostView:
        """The exact-fit view of the host's latest snapshot (LRU-cached)."""
        e = self.entries[host]
        got = self._views.get(host)
        if got is not None and got[0] == e.epoch and got[1] == e.seq:
            self._views.move_to_end(host)
            return got[2]
        snap = self.snapshot(host)
        assert snap is not None
        v = prepare(snap)
        self._views[host] = (e.epoch, e.seq, v)
        self._views.move_to_end(host)
        while len(self._views) > self.view_cache_size:
            self._views.popitem(last=False)
        return v

    # ------------------------------------------------------------------ placement
    def place(self, request: Mapping[str, Any] | FitRequest, count: int = 1,
              weigher: str | Mapping[str, float] | None = None, *,
              now: float | None = None, exclude: frozenset[str] | set[str] = frozenset()
              ) -> list[Candidate]:
        """Up to ``count`` hosts where ``request`` fits, best first, each with the exact
        fit answer. ``RequestError`` for an invalid request, count or weigher."""
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_COUNT:
            raise RequestError(f"count={count!r}: must be an integer from 1 to {MAX_COUNT}")
        req = request if isinstance(request, FitRequest) else parse_request(request)
        weights = parse_weigher(weigher)
        strategy = in_host_strategy(weights)
        needs = needs_of(req)
        now = time.monotonic() if now is None else now
        self.stats["place"] += 1
        ranking = self._ranking(needs, weights)
        heap = ranking.heap
        found: list[Candidate] = []
        keep: list[tuple[float, str, int]] = []  # popped, still valid: pushed back after
        while heap and len(found) < count:
            item = heapq.heappop(heap)
            e = self.entries.get(item[1])
            if e is None or e.version != item[2]:
                continue  # changed since: its newer entry (if any) is in the heap
            if e.host in exclude or self._why_not_offered(e, now) is not None:
                keep.append(item)  # time may make it offered again (age, quarantine)
                continue
            self.stats["exact_fits"] += 1
            try:
                answer = fit(self.view(e.host), req, strategy=strategy)
            except RequestError as exc:  # a snapshot the fit cannot read
                self._refuse(e.host, str(exc))
                e.unreadable = str(exc)
                self._changed(e)
                continue
            if not answer["fits"]:
                continue  # dropped from this ranking until the host changes
            keep.append(item)
            found.append(Candidate(
                e.host, final_score(e.shape, e.summary, needs, weights, answer["placement"]),
                answer, e.endpoint, e.epoch, e.seq))
        for item in keep:
            heapq.heappush(heap, item)
        found.sort(key=lambda c: (-c.score, c.host))
        return found

    def _candidate_item(self, e: HostEntry, needs: Needs,
                        weights: tuple[tuple[str, float], ...]
                        ) -> tuple[float, str, int] | None:
        """The heap entry of host ``e`` for a ranking, ``None`` if it cannot be offered
        until it changes (dead, stale, unreadable, awaiting a snapshot, or refused by the
        prefilter)."""
        if not e.alive or e.stale or e.unreadable is not None or e.seq <= e.awaiting_seq:
            return None
        if prefilter(e.shape, e.summary, needs) is not None:
            return None
        return (-score(e.shape, e.summary, needs, weights), e.host, e.version)

    def _ranking(self, needs: Needs, weights: tuple[tuple[str, float], ...]) -> _Ranking:
        """The ranking for (needs, weights), built on first use (every host scored once),
        then brought up to date with the hosts changed since its last use."""
        key = (needs, weights)
        r = self._ranks.get(key)
        if r is None:
            items = [it for e in self.entries.values()
                     if (it := self._candidate_item(e, needs, weights)) is not None]
            heapq.heapify(items)
            r = self._ranks[key] = _Ranking(items, len(self._log))
            self.stats["rankings_built"] += 1
            while len(self._ranks) > self.rank_cache_size:
                self._ranks.popitem(last=False)
            return r
        self._ranks.move_to_end(key)
        changed = dict.fromkeys(self._log[r.log_pos:])
        r.log_pos = len(self._log)
        for host in changed:
            e = self.entries.get(host)
            if e is not None and (it := self._candidate_item(e, needs, weights)) is not None:
                heapq.heappush(r.heap, it)
        if len(r.heap) > 2 * len(self.entries) + 1024:  # drop entries of old versions
            r.heap = [it for it in r.heap if (e := self.entries.get(it[1])) is not None
                      and e.version == it[2]]
            heapq.heapify(r.heap)
        return r

    def why_not(self, request: Mapping[str, Any] | FitRequest, *,
                now: float | None = None) -> dict[str, list[str]]:
        """Why each kind of host does not take ``request``: {host class: distinct reasons,
        each with the number of hosts}. A host class is its shape's name (threads, cells,
        sockets); hosts not offered count under their state."""
        req = request if isinstance(request, FitRequest) else parse_request(request)
        needs = needs_of(req)
        now = time.monotonic() if now is None else now
        per: dict[str, dict[str, list[int]]] = {}
        for e in self.entries.values():
            why = self._why_not_offered(e, now) or prefilter(e.shape, e.summary, needs)
            if why is None:
                answer = fit(self.view(e.host), req, strategy="spread")
                if answer["fits"]:
                    continue
                r = answer["reasons"][0]
                why = f"{r['resource']}: {r['message']}"
            head, sep, have = why.rpartition(", the host has ")
            key, value = (head, int(have)) if sep and have.isdigit() else (why, -1)
            per.setdefault(e.shape.name, {}).setdefault(key, []).append(value)
        out: dict[str, list[str]] = {}
        for cls, reasons in sorted(per.items()):
            lines = []
            for why, values in sorted(reasons.items(), key=lambda kv: -len(kv[1])):
                n = len(values)
                text = f"{n} host{'s' * (n != 1)}: {why}"
                if values[0] >= 0:
                    lo, hi = min(values), max(values)
                    text += (f", the host has {lo}" if n == 1 else
                             f", the hosts have {lo}" + (f"-{hi}" if hi > lo else ""))
                lines.append(text)
            out[cls] = lines
        return out


def needs_for(request: Mapping[str, Any] | FitRequest) -> Needs:
    """The request's needs in summary terms (parses it; ``RequestError`` if invalid)."""
    req = request if isinstance(request, FitRequest) else parse_request(request)
    return needs_of(req)
