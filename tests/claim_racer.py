"""One claimer process of the race tests (and bench/claims.py): claims with a raw DEALER
socket, one request at a time, until the agent answers "not claimed".

    python tests/claim_racer.py ENDPOINT REQUEST_JSON OUT_JSON GO_FILE [NAME] [MAX]

Waits (at most 60 s) for GO_FILE to exist so that every claimer starts together, then
sends ``{op: "claim", request, ttl_s: 600, claimant: NAME}`` until a reply says
``claimed: false`` or MAX (default 500) claims were granted. A ``busy: ...`` error reply
is retried after 5 ms (at most 2000 times). Writes ``{grants: [claim], refusal: reasons
or null, errors: [text], busy: n, latencies_ms: [...]}`` to OUT_JSON.
"""

from __future__ import annotations

import json
import os
import sys
import time

import msgpack
import zmq

REPLY_TIMEOUT_MS = 60_000


def main(argv: list[str]) -> int:
    endpoint, request_text, out, go = argv[:4]
    name = argv[4] if len(argv) > 4 else f"racer-{os.getpid()}"
    most = int(argv[5]) if len(argv) > 5 else 500
    request = json.loads(request_text)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(endpoint)
    result: dict = {"grants": [], "refusal": None, "errors": [], "busy": 0,
                    "latencies_ms": []}
    deadline = time.monotonic() + 60
    while not os.path.exists(go) and time.monotonic() < deadline:
        time.sleep(0.002)
    while len(result["grants"]) < most and result["busy"] < 2000:
        t0 = time.perf_counter()
        sock.send(msgpack.packb({"op": "claim", "request": request, "ttl_s": 600,
                                 "claimant": name}, use_bin_type=True))
        if not sock.poll(REPLY_TIMEOUT_MS):
            result["errors"].append("no reply within 60 s")
            break
        reply = msgpack.unpackb(sock.recv(), raw=False)
        ms = (time.perf_counter() - t0) * 1000
        if not reply["ok"]:
            if reply["error"].startswith("busy"):
                result["busy"] += 1
                time.sleep(0.005)
                continue
            result["errors"].append(reply["error"])
            break
        result["latencies_ms"].append(ms)
        if not reply["claimed"]:
            result["refusal"] = reply["reasons"]
            break
        result["grants"].append(reply["claim"])
    with open(out, "w") as fh:
        json.dump(result, fh)
    sock.close(linger=0)
    ctx.term()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
