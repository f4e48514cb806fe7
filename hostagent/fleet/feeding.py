"""``feed``: apply a subscriber's updates to a fleet index."""

from __future__ import annotations

import time
from typing import Any

from hostagent.fleet.index import Fleet
from hostagent.subscriber import POLL_BATCH

#: ``feed`` copies every host's last-heard time (heartbeats included) into the index at
#: most this often, so a quiet but alive host does not turn stale by age
TOUCH_INTERVAL_S = 1.0


def feed(subscriber: Any, fleet: Fleet, timeout: float | None = 0.0, *,
         max_messages: int = POLL_BATCH) -> int:
    """Poll ``subscriber`` (a ``hostagent.subscriber.Subscriber``) once, waiting up to
    ``timeout`` seconds and reading at most ``max_messages`` messages per source (a
    scheduler that places between feeds keeps placing under a backlog), and apply its
    updates: ``snapshot`` → ``Fleet.update`` (with the
    source's request endpoint as the fallback claim endpoint), ``stale`` →
    ``mark_stale``, ``dead`` → ``mark_dead``. Returns the number of updates applied."""
    updates = subscriber.poll(timeout, max_messages=max_messages)
    now = time.monotonic()
    for upd in updates:
        if upd.kind == "snapshot" and upd.snapshot is not None:
            st = subscriber.hosts.get(upd.host)
            endpoint = None
            if st is not None and 0 <= st.source < len(subscriber.sources):
                endpoint = subscriber.sources[st.source].request
            fleet.update(upd.snapshot, now, request_endpoint=endpoint)
        elif upd.kind == "stale":
            fleet.mark_stale(upd.host)
        elif upd.kind == "dead":
            fleet.mark_dead(upd.host)
    if now - fleet.touched_at >= TOUCH_INTERVAL_S:
        fleet.touched_at = now
        for host, st in subscriber.hosts.items():
            if st.alive:
                fleet.touch(host, st.last_seen)
    return len(updates)
