"""The claim ops of the agent's request endpoint: ``claim``, ``release``, ``claims``
(docs/claims.md, docs/daemon.md §5).

One ``ClaimDesk`` per agent, on the agent's loop. It decides claims **one at a time**
(an ``asyncio.Lock``) against the claims overlay of that moment
(``ClaimTracker.fit_view``: the guests' fold, made once per guest change, with the
outstanding claims' sums taken; ``hostagent.claim_overlay``). A small request (at most
``INLINE_MAX_VCPUS`` vCPUs and ``INLINE_MAX_PCI`` PCI functions, no cache reservation,
a fit within ``INLINE_SEARCH_STEPS``) is fitted, made, judged and granted on the loop
with nothing awaited in between; any other is fitted (and made) in the desk's own worker
thread, and back on the loop, with nothing awaited between the check and the grant,
``claims.judge_quickly`` compares what the claim holds with what *that* moment (every
guest and claim) has free: it is granted only if it takes nothing somebody holds. A
guest event that took part of the placement while the fit ran makes the desk fit again
(``DECIDE_ATTEMPTS``). Claim requests waiting for their turn are bounded
(``MAX_CLAIMS_WAITING``) and hold no thread; they are not counted in the publisher's
``MAX_REQUESTS_IN_FLIGHT``.

A claim is on disk before its reply goes out: the claims file under ``[agent]
runtime_dir`` is written after every grant (group commit: claims granted while a write
runs go out together in the next one, and their replies after it). A grant that cannot
be written is taken back and answered with the error. A release, expiry or hand-off is
answered (or logged) without waiting for its write, which goes with the next grant's
or at most ``DEFERRED_WRITE_SECONDS`` later (and at stop): lost, it would only make a
claim come back at start and hold until it expires.

Who may claim: with CURVE, only clients whose key is in ``[curve] claimants_dir``
(others get an error reply for ``claim``/``release``; ``claims`` is for every client).
Without CURVE, every client of the request endpoints may claim: bind them to loopback or
ipc (docs/claims.md, "Who may claim").

Uses of the agent (``hostagent.agent.daemon.Agent``): ``tracker`` (a ``claims.ClaimTracker``),
``config``, ``publisher``, ``topology_doc``, ``resources``, ``epoch``, ``auth``,
``mark_dirty``, ``record_error``, ``_spawn``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hostagent import claims
from hostagent.claim_limits import (
    DEFERRED_WRITE_SECONDS,
    INLINE_MAX_PCI,
    INLINE_MAX_VCPUS,
    INLINE_SEARCH_STEPS,
    MAX_CLAIMS,
    MAX_CLAIMS_WAITING,
)
from hostagent.curve import AllowedKeys, load_allowed_keys
from hostagent.errors import HostagentError
from hostagent.fit.request import FitRequest, parse_request

log = logging.getLogger("hostagent.claims")

#: Fits of one claim request when guest events keep taking part of the placement found.
DECIDE_ATTEMPTS = 3


@dataclass(frozen=True)
class Decision:
    record: claims.ClaimRecord | None
    reasons: list[dict[str, Any]]
    seq: int


class ClaimDesk:
    """Serves the claim ops for one agent (see the module docstring)."""

    def __init__(self, agent: Any) -> None:
        self.agent = agent
        self.path: Path = claims.claims_path(agent.config.agent.runtime_dir)
        self.counters: Counter[str] = Counter()
        self.claimants: frozenset[str] = frozenset()  # z85 keys that may claim (CURVE)
        self._lock = asyncio.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1,
                                            thread_name_prefix="hostagent-claims")
        self._waiting = 0
        self._wake = asyncio.Event()  # a claim was granted or restored: re-read the expiry
        self._texts: dict[str, str] = {}  # claim id → its JSON line in the claims file
        self._write_lock = asyncio.Lock()
        self._generation = 0  # +1 per change to write
        self._written = 0  # the generation on disk
        # the coming write of a release, expiry or hand-off (DEFERRED_WRITE_SECONDS)
        self._deferred: asyncio.TimerHandle | None = None

    # ---- set-up

    def register(self, publisher: Any) -> None:
        publisher.register("claim", self.op_claim, bounded=False)
        publisher.register("release", self.op_release, bounded=False)
        publisher.register("claims", self.op_claims, bounded=False)

    def set_claimants(self, keys: frozenset[bytes] | frozenset[str]) -> None:
        self.claimants = frozenset(k.decode() if isinstance(k, bytes) else k for k in keys)

    def restore(self) -> None:
        """Read the claims file and hold every live claim in it again (at start, before
        the first snapshot). Problems are logged and recorded, never fatal: a file that
        cannot be read as a whole is moved aside to ``claims.json.bad``."""
        tracker = self.agent.tracker
        tracker.on_event = self._on_event
        loaded = claims.load_claims(self.path, time.time())
        for problem in loaded.problems:
            log.error("claims file: %s", problem)
            self.agent.record_error("claims", problem)
        if loaded.problems and not loaded.records and self.path.exists():
            with contextlib.suppress(OSError):
                self.path.replace(self.path.with_name(self.path.name + ".bad"))
        for claim_id in loaded.expired:
            log.info("claim %s expired while the agent was down", claim_id)
        for record in loaded.records:
            try:
                record = tracker.restore(record)
            except HostagentError as exc:
                message = f"claim {record.id} from {self.path} not restored: {exc}"
                log.error("%s", message)
                self.agent.record_error("claims", message)
                continue
            self._texts[record.id] = claims.record_json(record)
        if loaded.records or loaded.expired:
            log.info("claims restored from %s: %d live, %d expired", self.path,
                     len(tracker.claim_records), len(loaded.expired))
            self._changed()

    async def run(self) -> None:
        """Expire claims when their time comes (until cancelled)."""
        while True:
            nxt = self.agent.tracker.next_expiry()
            self._wake.clear()
            timeout = None if nxt is None else max(0.0, nxt - time.time())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)
            self.expire()

    def close(self) -> None:
        """Stop the worker; changes not written yet (a release, expiry or hand-off whose
        write was deferred or cancelled) are written now."""
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self._deferred is not None:
            self._deferred.cancel()
            self._deferred = None
        if self._written < self._generation:
            try:
                claims.save_claims(self.path, self._render())
                self._written = self._generation
            except OSError as exc:
                self._write_failed(exc)

    # ---- ops

    def _may_change(self, op: str) -> None:
        if self.agent.auth is None:
            return  # without CURVE: whoever reaches the request endpoints
        from hostagent.publisher import request_peer_key

        key = request_peer_key()
        if key is None or key not in self.claimants:
            self.counters["refused_clients"] += 1
            raise HostagentError(f"op {op}: this client's key is not in [curve] claimants_dir; "
                                 "it may read (snapshot, fit, claims) but not claim or release")

    def _default_claimant(self) -> str:
        if self.agent.auth is None:
            return ""
        from hostagent.publisher import request_peer_key

        return f"curve:{request_peer_key()}"

    async def op_claim(self, req: dict[str, Any]) -> dict[str, Any]:
        """``{op: "claim", request, strategy?, ttl_s?, claimant?, placement?}``."""
        self._may_change("claim")
        cfg = self.agent.config
        ask = claims.parse_claim_op(req, default_ttl=cfg.claims.default_ttl_seconds,
                                    default_strategy=cfg.fit.cell_strategy,
                                    default_claimant=self._default_claimant())
        if self._waiting >= MAX_CLAIMS_WAITING:
            self.counters["busy"] += 1
            raise HostagentError(f"busy: {self._waiting} claim requests waiting (the limit); "
                                 "retry later")
        self._waiting += 1
        try:
            async with self._lock:
                decision = await self._decide(ask)
        finally:
            self._waiting -= 1
        epoch = self.agent.epoch
        if decision.record is None:
            self.counters["refused"] += 1
            return {"claimed": False, "reasons": decision.reasons, "seq": decision.seq,
                    "epoch": epoch}
        record = decision.record
        try:
            await self.commit()
        except OSError as exc:
            if self.agent.tracker.release(record.id) is not None:
                self._texts.pop(record.id, None)
            message = f"cannot write the claims file {self.path}: {exc.strerror or exc}"
            self.agent.record_error("claims", message)
            raise HostagentError(f"op claim: not granted: {message}") from None
        # published now: the snapshot is built after the reply is sent (nothing is awaited
        # from here to the reply), not on the reply's way
        self.agent.mark_dirty()
        return {"claimed": True, "claim": record.doc(), "seq": decision.seq, "epoch": epoch}

    async def _decide(self, ask: claims.ClaimAsk) -> Decision:
        """Fit and judge until granted, refused, or ``DECIDE_ATTEMPTS`` fits (in the
        desk's thread) were overtaken by guest events. A small request is decided on the
        loop with nothing awaited (``_inline``)."""
        agent = self.agent
        reasons: list[dict[str, Any]] = []
        parsed = parse_request(ask.request)  # RequestError for an invalid request
        inline = _inline(parsed)
        steps = agent.config.fit.search_steps
        for _ in range(DECIDE_ATTEMPTS):
            self.expire()
            tracker = agent.tracker
            seq = agent.publisher.seq
            if len(tracker.claim_records) >= MAX_CLAIMS:
                raise HostagentError(f"op claim: {len(tracker.claim_records)} claims "
                                     f"outstanding, the limit (MAX_CLAIMS); release some")
            ctx = tracker.ctx
            work = functools.partial(claims.prepare_claim, ctx, tracker.fit_view(), ask,
                                     claim_id=claims.new_claim_id(), now=time.time(),
                                     parsed=parsed)
            prepared = None
            if inline:
                prepared = work(search_steps=min(steps, INLINE_SEARCH_STEPS))
                if _exhausted(prepared) and steps > INLINE_SEARCH_STEPS:
                    prepared, inline = None, False  # a long search: in the worker
                else:
                    self.counters["inline"] += 1
            if prepared is None:
                loop = asyncio.get_running_loop()
                prepared = await loop.run_in_executor(self._executor, functools.partial(
                    work, search_steps=steps))
            if prepared.record is None:
                assert prepared.answer is not None
                return Decision(None, list(prepared.answer["reasons"]), seq)
            if tracker.ctx is not ctx:  # the host was re-probed during the fit: again
                continue
            # from here to the grant nothing is awaited: the decision is atomic
            assert prepared.contribution is not None
            reasons = claims.judge_quickly(tracker, prepared.contribution)
            if not reasons:
                self._grant(prepared.record, prepared.contribution, prepared.text)
                return Decision(prepared.record, [], seq)
            if ask.placement is not None:
                return Decision(None, reasons, seq)
            self.counters["refits"] += 1  # a guest took part of the placement meanwhile
        return Decision(None, reasons, agent.publisher.seq)

    def _grant(self, record: claims.ClaimRecord, c: Any, text: str | None = None) -> None:
        tracker = self.agent.tracker
        tracker.grant(record, c)
        self._texts[record.id] = text or claims.record_json(record)
        self._generation += 1  # op_claim writes it before the reply
        self.counters["granted"] += 1
        log.info("claim %s granted to %r until %.0f: %s", record.id, record.claimant,
                 record.expires, _holding(c))
        self._wake.set()  # op_claim writes the claims file, then publishes

    async def op_release(self, req: dict[str, Any]) -> dict[str, Any]:
        """``{op: "release", id}``."""
        self._may_change("release")
        claim_id = claims.parse_release_op(req)
        record = self.agent.tracker.release(claim_id)
        if record is None:
            raise HostagentError(f"op release: no outstanding claim {claim_id!r} (never "
                                 "granted, or already released, expired or consumed)")
        self.counters["released"] += 1
        log.info("claim %s of %r released", record.id, record.claimant)
        # written in the background: should the agent stop before the write, the claim
        # comes back at start and holds its resources until it expires (never less)
        self._changed()
        return {"released": record.id}

    async def op_claims(self, req: dict[str, Any]) -> dict[str, Any]:
        """``{op: "claims"}``: every outstanding claim, oldest first."""
        claims.check_fields("claims", req, ())
        records = sorted(self.agent.tracker.claim_records.values(),
                         key=lambda r: (r.created, r.id))
        return {"claims": [r.doc() for r in records]}

    # ---- changes outside requests

    def expire(self) -> None:
        """Release the claims whose time is up."""
        gone = self.agent.tracker.expire(time.time())
        for record in gone:
            self.counters["expired"] += 1
            log.info("claim %s of %r expired (ttl ended at %.0f): its resources are free",
                     record.id, record.claimant, record.expires)
        if gone:
            self._changed()

    def _on_event(self, event: claims.ClaimEvent) -> None:
        """A guest consumed a claim, or a re-probe dropped one (``ClaimTracker``)."""
        record = event.record
        if event.kind == "consumed":
            self.counters["consumed"] += 1
            if event.mismatch:
                self.counters["mismatched"] += 1
                log.warning("claim %s consumed by guest %s, which holds other resources: %s",
                            record.id, event.guest, event.mismatch)
            else:
                log.info("claim %s consumed by guest %s", record.id, event.guest)
        else:
            self.counters["dropped"] += 1
            message = f"claim {record.id} dropped: {event.why}"
            log.error("%s", message)
            self.agent.record_error("claims", message)
        self._changed(publish=False)  # published by the change under way

    def _changed(self, publish: bool = True) -> None:
        """The claims changed (not a grant): publish, and write the claims file with the
        next grant's write or within ``DEFERRED_WRITE_SECONDS``."""
        self._generation += 1
        if publish:
            self.agent.mark_dirty()
        if self._deferred is None:
            loop = asyncio.get_running_loop()
            self._deferred = loop.call_later(DEFERRED_WRITE_SECONDS, self._write_deferred)

    def _write_deferred(self) -> None:
        self._deferred = None
        self.agent._spawn(self._commit_logged())

    # ---- the claims file

    async def commit(self) -> None:
        """Return once the claims as they are now are on disk (``OSError`` if the write
        fails). Callers arriving while a write runs share the next one."""
        want = self._generation
        async with self._write_lock:
            if self._written >= want:
                return
            generation = self._generation
            text = self._render()
            await asyncio.to_thread(claims.save_claims, self.path, text)
            self._written = generation
            self.counters["writes"] += 1

    def _render(self) -> str:
        records = list(self.agent.tracker.claim_records.values())
        for gone in set(self._texts) - {r.id for r in records}:
            del self._texts[gone]
        return claims.render_claims(records, lambda r: self._texts.get(r.id) or
                                    claims.record_json(r))

    async def _commit_logged(self) -> None:
        try:
            await self.commit()
        except OSError as exc:
            self._write_failed(exc)

    def _write_failed(self, exc: OSError) -> None:
        message = f"cannot write the claims file {self.path}: {exc.strerror or exc}"
        log.error("%s", message)
        self.agent.record_error("claims", message)

    def state(self) -> dict[str, Any]:
        """For the debug dump."""
        return {"file": str(self.path), "outstanding": len(self.agent.tracker.claim_records),
                "waiting": self._waiting, "claimants": len(self.claimants),
                "counters": dict(self.counters)}


def _inline(req: FitRequest) -> bool:
    """Whether the claim of ``req`` is small enough to be decided on the loop
    (``INLINE_*``)."""
    return (req.vcpus <= INLINE_MAX_VCPUS and not req.cache
            and sum(item.count for item in req.pci) <= INLINE_MAX_PCI)


def _exhausted(prepared: claims.Prepared) -> bool:
    """The fit found no placement within its step budget."""
    return prepared.record is None and prepared.answer is not None and any(
        r["resource"] == "search" for r in prepared.answer["reasons"])


def load_claimants(curve: Any) -> AllowedKeys:
    """The public keys of ``[curve] claimants_dir`` (none when it is ""); bad files are
    skipped with a warning, a missing directory is a ``ConfigError``."""
    if not curve.claimants_dir:
        return AllowedKeys(frozenset())
    return load_allowed_keys(curve.claimants_dir, what="claimants")


def join_keys(allowed: AllowedKeys, claimants: AllowedKeys) -> AllowedKeys:
    """The keys that may connect: the allowed clients and the claimants."""
    return AllowedKeys(allowed.keys | claimants.keys, allowed.skipped + claimants.skipped)


def _holding(c: Any) -> str:
    entry = c.entry or {}
    parts = []
    if entry.get("dedicated_cpus"):
        parts.append(f"CPUs {entry['dedicated_cpus']}")
    if entry.get("idle_cpus"):
        parts.append(f"idle {entry['idle_cpus']}")
    for cell in entry.get("cells", ()):
        parts.append(f"{cell['memory_kib']} KiB on cell {cell['host_cell']}"
                     + (f" in {cell['page_size_kib']} KiB pages" if cell["page_size_kib"]
                        else ""))
    if entry.get("pci"):
        parts.append(f"PCI {', '.join(entry['pci'])}")
    return "; ".join(parts) or "shared vCPUs"
