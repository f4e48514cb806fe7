"""One scheduler process for tests/test_fleet_multi.py: follow every agent (through the
sources given: a forwarder's stream), then place guests with place_and_claim and boot each
from its claim's XML (test-domain op) at the endpoint the claim was made at.

    fleet_scheduler.py SOURCES_JSON REQUEST_JSON COUNT WEIGHER NAME GO_FILE OUT_JSON HOSTS

Waits until it holds HOSTS hosts, writes OUT_JSON.ready, waits for GO_FILE, then places
COUNT guests (each try bounded; a full fleet ends it early) and writes the results.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from claim_helpers import boot_xml  # noqa: E402

from hostagent.fleet import Fleet, feed, place_and_claim  # noqa: E402
from hostagent.subscriber import Subscriber, request  # noqa: E402

#: seconds one guest may take to be placed (feeding while the fleet catches up)
PLACE_SECONDS = 60.0


def main() -> int:
    sources, req = json.loads(sys.argv[1]), json.loads(sys.argv[2])
    count, weigher, name = int(sys.argv[3]), sys.argv[4], sys.argv[5]
    go, out, want = Path(sys.argv[6]), Path(sys.argv[7]), int(sys.argv[8])
    fleet = Fleet(stale_after_s=120.0)
    results = []
    with Subscriber(sources, dead_after=60.0) as sub:
        deadline = time.monotonic() + 120
        while len(fleet.hosts()) < want and time.monotonic() < deadline:
            feed(sub, fleet, timeout=0.5)
        Path(str(out) + ".ready").write_text(str(len(fleet.hosts())))
        while not go.exists() and time.monotonic() < deadline:
            feed(sub, fleet, timeout=0.05)
        for i in range(count):
            until = time.monotonic() + PLACE_SECONDS
            got = None
            while got is None and time.monotonic() < until:
                feed(sub, fleet, timeout=0)
                got = place_and_claim(fleet, req, weigher=weigher, claimant=name,
                                      ttl_s=600, timeout=20.0)
                if got is None:
                    feed(sub, fleet, timeout=0.2)  # wait for snapshots, then rank again
            if got is None:
                break
            guest = f"{name}-{i}"
            rep = request(got.endpoint, {"op": "test-domain", "action": "create",
                                         "xml": boot_xml(got.claim, guest, req["memory_mb"])},
                          timeout=30.0)
            results.append({"host": got.host, "claim": got.claim_id, "guest": guest,
                            "endpoint": got.endpoint,
                            "placement": got.placement, "attempts": got.attempts,
                            "booted": bool(rep.get("ok")), "error": rep.get("error")})
        stats = dict(fleet.stats)
    tmp = Path(str(out) + ".tmp")
    tmp.write_text(json.dumps({"results": results, "stats": stats}))
    os.replace(tmp, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
