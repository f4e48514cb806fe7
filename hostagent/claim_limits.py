"""Bounds on claims (docs/claims.md, "Limits"): a module of its own, so that the
configuration can read them without importing the tracker and the fitter."""

from __future__ import annotations

#: Claims outstanding at once; one more is an error reply.
MAX_CLAIMS = 1024
#: ``ttl_s`` (and ``[claims] default_ttl_seconds``): at least this many seconds...
MIN_TTL_SECONDS = 1.0
#: ... and at most this many: a claim is a promise held while a guest boots.
MAX_TTL_SECONDS = 3600.0
#: ``[claims] default_ttl_seconds`` when it is not set.
DEFAULT_TTL_SECONDS = 120.0
#: Characters of ``claimant`` (printable text).
MAX_CLAIMANT_CHARS = 128
#: One claim as kept (request, placement, XML) in JSON; a bigger one is refused.
MAX_CLAIM_RECORD_BYTES = 64 * 1024
#: The claims file: at most ``MAX_CLAIMS`` records; a bigger file is reported and ignored.
MAX_CLAIMS_FILE_BYTES = MAX_CLAIMS * MAX_CLAIM_RECORD_BYTES + 4096
#: Claim requests waiting for their turn (they are decided one at a time); one more is
#: answered ``busy: ...``. Waiting requests hold no thread.
MAX_CLAIMS_WAITING = 64
#: A claim request is decided entirely on the agent's loop (no hop to the desk's worker
#: thread) when it is small: at most this many vCPUs, ...
INLINE_MAX_VCPUS = 64
#: ... at most this many PCI functions, no cache reservation (the planner is slow per
#: step), and its fit ends within ``INLINE_SEARCH_STEPS`` steps of search; otherwise the
#: fit runs (again, with the whole ``[fit] search_steps``) in the desk's worker thread,
#: so that no claim holds the loop for long.
INLINE_MAX_PCI = 8
INLINE_SEARCH_STEPS = 200
#: A release, expiry or hand-off is written to the claims file within this many seconds
#: (or with the next grant's write, if sooner): a burst of them is one write.
DEFERRED_WRITE_SECONDS = 0.05
