"""``place_and_claim``: rank the fleet, claim on the best host, move on when refused.

The agent decides every claim against its own state and every outstanding claim
(docs/claims.md), so two schedulers holding the same replicated view never both get the
same thread: the loser is refused, refreshes that host's snapshot and tries again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hostagent.curve import ClientCurve
from hostagent.errors import HostagentError
from hostagent.fleet.index import Candidate, Fleet
from hostagent.subscriber import DEFAULT_REQUEST_TIMEOUT, claim, request

log = logging.getLogger("hostagent.fleet")

#: claim requests one ``place_and_claim`` sends at most before it gives up
MAX_CLAIM_ATTEMPTS = 8
#: candidates ranked per round (claims go to them in order until one is refused)
CLAIM_CANDIDATES = 3


@dataclass(frozen=True)
class Claimed:
    """A placement claimed at its host: boot the guest from ``libvirt_xml`` (the claim id
    is in its metadata) before the claim expires."""

    host: str
    claim_id: str
    placement: dict[str, Any]
    libvirt_xml: dict[str, str]
    claim: dict[str, Any]  # the agent's whole claim (expires, claimant, request, ...)
    endpoint: str
    attempts: int


def refresh(fleet: Fleet, host: str, endpoint: str, *, timeout: float,
            curve: ClientCurve | None = None, ctx: Any = None) -> bool:
    """Fetch ``host``'s latest snapshot from its request endpoint into ``fleet``; False
    (and the host marked dead) if it does not answer."""
    try:
        reply = request(endpoint, {"op": "snapshot"}, timeout=timeout, curve=curve, ctx=ctx)
    except HostagentError as exc:
        log.warning("host %r: no snapshot from %s (%s): not offered until its next one",
                    host, endpoint, exc)
        fleet.mark_dead(host)
        return False
    data = reply.get("data") if reply.get("ok") else None
    if not isinstance(data, Mapping) or data.get("host") != host:
        log.warning("host %r: %s answered a snapshot of %r: not offered until its next one",
                    host, endpoint, None if not isinstance(data, Mapping) else data.get("host"))
        fleet.mark_dead(host)
        return False
    fleet.update(data, time.monotonic(), request_endpoint=endpoint)
    return True


def place_and_claim(fleet: Fleet, request_: Mapping[str, Any], *,
                    weigher: str | Mapping[str, float] | None = None,
                    claimant: str | None = None, ttl_s: float | None = None,
                    timeout: float = DEFAULT_REQUEST_TIMEOUT,
                    curve: ClientCurve | None = None, ctx: Any = None,
                    max_attempts: int = MAX_CLAIM_ATTEMPTS,
                    own_placement: bool = False) -> Claimed | None:
    """Claim ``request_`` on the best host: ``Fleet.place`` ranks, and the first candidate
    is claimed at its agent, which fits the request against its own latest state and
    every outstanding claim (the weigher's in-host strategy; the same fit, so the same
    placement when the scheduler's view is current) — or, with ``own_placement``, the
    candidate's placement exactly (the ``placement`` form: refused if any of it is taken).
    On a refusal that host's snapshot is refreshed and the ranking starts again; a host
    that does not answer is marked dead and the next candidate is tried. ``None`` when no
    host fits (or ``max_attempts`` claims were refused). ``RequestError`` for an invalid
    request; an error reply from an agent (e.g. not allowed to claim) is a
    ``HostagentError``."""
    from hostagent.fleet.weighers import in_host_strategy, parse_weigher

    strategy = in_host_strategy(parse_weigher(weigher))
    attempts = 0
    exclude: set[str] = set()
    while attempts < max_attempts:
        cands = fleet.place(request_, count=CLAIM_CANDIDATES, weigher=weigher,
                            exclude=exclude)
        if not cands:
            return None
        for cand in cands:
            if attempts >= max_attempts:
                break
            if cand.endpoint is None:
                log.warning("host %r: no request endpoint known (no agent.request_endpoint, "
                            "no REQUEST in its source): cannot claim there", cand.host)
                exclude.add(cand.host)
                continue
            attempts += 1
            got = _try(fleet, cand, request_, claimant=claimant, ttl_s=ttl_s,
                       timeout=timeout, curve=curve, ctx=ctx, exclude=exclude,
                       strategy=None if own_placement else strategy)
            if isinstance(got, dict):
                c = got["claim"]
                fleet.await_snapshot_after(cand.host, str(got.get("epoch")),
                                           int(got.get("seq") or 0))
                fleet.stats["claimed"] += 1
                return Claimed(cand.host, c["id"], c["placement"], c["libvirt_xml"], c,
                               cand.endpoint, attempts)
            if got == "refused":
                break  # rank again with the refreshed snapshot
    log.info("no claim after %d attempts", attempts)
    return None


def _try(fleet: Fleet, cand: Candidate, request_: Mapping[str, Any], *,
         claimant: str | None, ttl_s: float | None, timeout: float,
         curve: ClientCurve | None, ctx: Any, exclude: set[str],
         strategy: str | None) -> dict[str, Any] | str:
    """One claim at ``cand`` (``strategy`` None: of its placement; else the agent's fit
    with that strategy): the reply if granted, else ``"refused"`` (the host's snapshot
    refreshed), ``"busy"`` (the agent's claim queue is full: left out of this call) or
    ``"unreachable"`` (the host marked dead)."""
    assert cand.endpoint is not None
    try:
        reply = claim(cand.endpoint, dict(request_),
                      placement=cand.placement if strategy is None else None,
                      strategy=strategy, claimant=claimant, ttl_s=ttl_s, timeout=timeout,
                      curve=curve, ctx=ctx)
    except HostagentError as exc:
        if ": busy:" in str(exc):  # the agent's claim queue is full: not this round
            log.info("host %r: %s; trying the next host", cand.host, exc)
            fleet.stats["claim_busy"] += 1
            exclude.add(cand.host)
            return "busy"
        if "no reply within" not in str(exc):
            raise
        log.warning("host %r: claim not answered (%s): not offered until its next snapshot",
                    cand.host, exc)
        fleet.stats["claim_unanswered"] += 1
        fleet.mark_dead(cand.host)
        exclude.add(cand.host)
        return "unreachable"
    if reply.get("claimed"):
        return reply
    fleet.stats["claim_refused"] += 1
    log.info("host %r: claim refused (%s); refreshing its snapshot", cand.host,
             "; ".join(str(r.get("message")) for r in reply.get("reasons") or [])[:200])
    # (waiting for a snapshot after the refusal's seq could wait forever: what beat us
    # may already be in the latest one, and nothing else may change there)
    if refresh(fleet, cand.host, cand.endpoint, timeout=timeout, curve=curve, ctx=ctx):
        e = fleet.entry(cand.host)
        if e is not None and (e.epoch, e.seq) == (cand.epoch, cand.seq):
            exclude.add(cand.host)  # nothing newer to fit against: not this round
    else:
        exclude.add(cand.host)
    return "refused"
