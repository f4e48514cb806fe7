"""``hostagent fit``: does a request fit a host, and where (docs/fit.md).

With ``--snapshot FILE`` (``-`` = stdin) the request is fitted here, on that snapshot. With
``--endpoint E`` the agent answers it: one ``{op: "fit"}`` request to its ROUTER endpoint
over a ZeroMQ DEALER socket (waiting at most ``--timeout`` seconds), so the answer is the
agent's own — its ``[fit] cell_strategy`` unless ``--strategy`` is given, its search
budget, its latest snapshot — exactly what a scheduler asking the agent gets. The request
is a JSON file. Exit status: 0 fits, 1 does not fit, 2 invalid input (message on stderr).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from hostagent.errors import HostagentError, RequestError

MAX_REPLY_BYTES = 64 * 1024 * 1024


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "fit",
        help="does a guest (Nova flavor + image properties) fit a host, and exactly where",
        description="Fit a request onto a snapshot: cells, threads, pages, cache, devices, "
        "and libvirt XML fragments.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--snapshot", metavar="FILE", help="snapshot JSON file ('-' = stdin)")
    src.add_argument("--endpoint", metavar="E",
                     help="agent request endpoint, e.g. tcp://127.0.0.1:6511")
    p.add_argument("--request", metavar="FILE", required=True,
                   help="request JSON file ('-' = stdin)")
    p.add_argument("--strategy", choices=("spread", "pack"), default=None,
                   help="cell choice (default: with --snapshot spread, with --endpoint the "
                   "agent's [fit] cell_strategy)")
    p.add_argument("--timeout", type=float, default=5.0, metavar="S",
                   help="seconds to wait for the agent's reply (default 5)")
    p.add_argument("--json", action="store_true", help="print the answer as JSON")
    p.set_defaults(func=run)


def _load_json(path: str, what: str, max_chars: int | None = None) -> Any:
    """The JSON document in ``path`` (``-`` = stdin); with ``max_chars``, a longer file is
    refused before it is parsed."""
    limit = -1 if max_chars is None else max_chars + 1
    try:
        if path == "-":
            text = sys.stdin.read(limit)
        else:
            with open(path, encoding="utf-8") as fh:
                text = fh.read(limit)
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise HostagentError(f"{what} {path}: cannot read ({why})") from None
    if max_chars is not None and len(text) > max_chars:
        raise RequestError(f"{what} {path}: longer than {max_chars} characters (the limit for "
                           "a request, as over the wire)")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        # ValueError: JSONDecodeError, and integers too long to convert; RecursionError:
        # arrays or objects nested too deep
        why = "nested too deep" if isinstance(exc, RecursionError) else str(exc)
        raise RequestError(f"{what} {path}: not JSON ({why})") from None


def ask(endpoint: str, req: dict[str, Any], timeout: float) -> dict[str, Any]:
    """One request/reply round trip to an agent's request endpoint; the ``ok`` reply."""
    import msgpack
    import zmq

    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, max(1, int(timeout * 1000)))
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_REPLY_BYTES)
    try:
        try:
            sock.connect(endpoint)
        except zmq.ZMQError as exc:
            raise HostagentError(f"--endpoint {endpoint!r}: {exc}") from None
        sock.send(msgpack.packb(req, use_bin_type=True))
        try:
            frames = sock.recv_multipart()
        except zmq.Again:
            raise HostagentError(
                f"--endpoint {endpoint}: no reply within {timeout:g} s "
                "(is the agent running and is this its request endpoint?)") from None
    finally:
        sock.close()
    try:
        reply = msgpack.unpackb(frames[-1], raw=False, strict_map_key=True)
    except Exception as exc:
        raise HostagentError(f"--endpoint {endpoint}: unreadable reply ({exc})") from None
    if not isinstance(reply, dict) or not reply.get("ok"):
        err = reply.get("error") if isinstance(reply, dict) else reply
        raise HostagentError(f"--endpoint {endpoint}: the agent refused: {err}")
    return reply


def fetch_snapshot(endpoint: str, timeout: float) -> dict[str, Any]:
    """One ``{op: "snapshot"}`` round trip to an agent's request endpoint."""
    reply = ask(endpoint, {"op": "snapshot"}, timeout)
    snap = reply.get("snapshot", reply.get("data"))
    if not isinstance(snap, dict):
        raise HostagentError(f"--endpoint {endpoint}: the reply carries no snapshot")
    return snap


def fit_at_agent(endpoint: str, request: Any, strategy: str | None,
                 timeout: float) -> dict[str, Any]:
    """The agent's own answer (``{op: "fit"}``): its strategy unless one is given."""
    req: dict[str, Any] = {"op": "fit", "request": request}
    if strategy is not None:
        req["strategy"] = strategy
    answer = ask(endpoint, req, timeout).get("result")
    if not isinstance(answer, dict) or "fits" not in answer:
        raise HostagentError(f"--endpoint {endpoint}: the reply carries no fit answer")
    return answer


def run(args: argparse.Namespace) -> int:
    from hostagent.fit import fit
    from hostagent.fit.explain import explain
    from hostagent.wire import MAX_REQUEST_BYTES

    request = _load_json(args.request, "--request", MAX_REQUEST_BYTES)
    if args.snapshot:
        snapshot = _load_json(args.snapshot, "--snapshot")
        answer = fit(snapshot, request, strategy=args.strategy or "spread")
    else:
        answer = fit_at_agent(args.endpoint, request, args.strategy, args.timeout)
    if args.json:
        sys.stdout.write(json.dumps(answer, indent=2) + "\n")
    else:
        if args.snapshot is None:  # the cell ids, to say "every host cell"
            snapshot = fetch_snapshot(args.endpoint, args.timeout)
        cells = (snapshot.get("topology") or {}).get("cells") or []
        sys.stdout.write(explain(answer, [c["id"] for c in cells if isinstance(c, dict)]))
    return 0 if answer["fits"] else 1
