"""The Prometheus endpoint in-process: config validation, the families, the HTTP bounds.

The server runs on a real asyncio loop with real loopback sockets; clients are plain
sockets and urllib (in a thread, so the loop keeps serving). The daemon as a process is
tests/test_metrics_daemon.py.
"""

from __future__ import annotations

import asyncio
import re
import socket
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.metrics_core import GaugeMetricFamily
from prometheus_client.parser import text_string_to_metric_families

from hostagent.agent import metrics
from hostagent.agent.daemon import merge_reload
from hostagent.config import MetricsConfig, config_from_dict, parse_listen
from hostagent.errors import ConfigError, HostagentError

ROOT = Path(__file__).resolve().parent.parent


# --- config ----------------------------------------------------------------------------

def test_metrics_are_off_by_default():
    assert config_from_dict({}).metrics == MetricsConfig(listen="", allow_remote=False)


@pytest.mark.parametrize("text, want", [
    ("127.0.0.1:9464", ("127.0.0.1", 9464)),
    ("[::1]:9464", ("::1", 9464)),
    ("127.0.0.1:0", ("127.0.0.1", 0)),
    ("0.0.0.0:65535", ("0.0.0.0", 65535)),
])
def test_parse_listen(text, want):
    assert parse_listen(text) == want


@pytest.mark.parametrize("doc, needle", [
    ({"listen": "9464"}, "metrics.listen = '9464': must be HOST:PORT"),
    ({"listen": ":9464"}, "must be HOST:PORT"),
    ({"listen": "localhost:9464"}, "the host 'localhost' must be an IP address"),
    ({"listen": "::1:9464"}, "an IPv6 address goes in brackets"),
    ({"listen": "[127.0.0.1]:9464"}, "brackets are for IPv6 addresses"),
    ({"listen": "127.0.0.1:65536"}, "the port '65536' must be a number 0-65535"),
    ({"listen": "127.0.0.1:http"}, "the port 'http' must be a number"),
    ({"listen": "127.0.0.1:٩٤"}, "must be a number"),  # Arabic-Indic digits
    ({"listen": 9464}, "metrics.listen = 9464: must be a string"),
    ({"listen": "0.0.0.0:9464"}, "not a loopback address"),
    ({"listen": "[::]:9464"}, "set metrics.allow_remote = true"),
    ({"allow_remote": "yes"}, "metrics.allow_remote = 'yes': must be true or false"),
    ({"port": 9464}, "metrics.port = 9464: unknown option (known: allow_remote, listen)"),
])
def test_bad_metrics_config_is_one_clear_error(doc, needle):
    with pytest.raises(ConfigError) as err:
        config_from_dict({"metrics": doc}, "test.toml")
    assert str(err.value).startswith("test.toml: ")
    assert needle in str(err.value)


def test_remote_listen_needs_the_acknowledgement():
    cfg = config_from_dict({"metrics": {"listen": "0.0.0.0:9464", "allow_remote": True}})
    assert cfg.metrics.listen == "0.0.0.0:9464" and cfg.metrics.allow_remote


def test_metrics_section_is_restart_only():
    old = config_from_dict({"metrics": {"listen": "127.0.0.1:9464"}})
    new = config_from_dict({"metrics": {"listen": "127.0.0.1:9465"}})
    merged, notes = merge_reload(old, new)
    assert merged.metrics == old.metrics
    assert "[metrics] takes effect at restart" in notes


# --- families --------------------------------------------------------------------------

def test_every_conflict_kind_of_the_tracker_is_exported():
    """CONFLICT_KINDS lists every kind tracker.py can emit and docs/tracker.md documents."""
    source = (ROOT / "hostagent" / "tracker.py").read_text()
    emitted = set(re.findall(r'_conflict\(\s*"([a-z_]+)"', source))
    documented = set(re.findall(r"^\| `([a-z_]+)` \|",
                                (ROOT / "docs" / "tracker.md").read_text().split(
                                    "## 4. Conflicts")[1].split("\n## ")[0], re.M))
    assert emitted and emitted <= set(metrics.CONFLICT_KINDS)
    assert documented == set(metrics.CONFLICT_KINDS)


def _readings(snapshot: dict[str, Any] | None = None, **over: Any) -> metrics.AgentReadings:
    base = dict(host="h1", epoch="e" * 16, snapshot=snapshot, subscribers=2,
                publisher={"snapshots": 3, "requests": 5, "bad_requests": 1,
                           "internal_errors": 2},
                agent={"reloads": 1}, errors={"probe": 4, "metrics-new": 1},
                libvirt={"errors": 6})
    base.update(over)
    return metrics.AgentReadings(**base)


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def _render(readings: metrics.AgentReadings) -> str:
    from prometheus_client.exposition import generate_latest

    return generate_latest(metrics.build_registry(lambda: readings)).decode()


def test_counters_before_any_snapshot():
    s = _samples(_render(_readings()))
    assert s[("hostagent_info", (("epoch", "e" * 16), ("host", "h1"),
                                 ("version", "0.1.0")))] == 1
    assert s[("hostagent_snapshots_published_total", ())] == 3
    assert s[("hostagent_requests_total", ())] == 5
    assert s[("hostagent_bad_requests_total", ())] == 1
    assert s[("hostagent_reloads_total", ())] == 1
    assert s[("hostagent_reloads_refused_total", ())] == 0
    assert s[("hostagent_busy_requests_total", ())] == 0
    errors = {dict(k[1])["where"]: v for k, v in s.items() if k[0] == "hostagent_errors_total"}
    assert errors == {"probe": 4, "hugepages": 0, "reload": 0, "curve": 0, "dump": 0,
                      "task": 0, "request": 2, "libvirt": 6, "claims": 0, "metrics-new": 1}
    assert ("hostagent_guests", ()) not in s  # nothing from a snapshot yet
    assert ("process_resident_memory_bytes", ()) in s


# --- the HTTP server -------------------------------------------------------------------

class _Counting:
    """A registry collector that counts its calls (and can make a huge answer)."""

    def __init__(self, label_bytes: int = 1) -> None:
        self.calls = 0
        self.label = "x" * label_bytes

    def collect(self) -> Any:
        self.calls += 1
        g = GaugeMetricFamily("t_calls", "calls", labels=["pad"])
        g.add_metric([self.label], self.calls)
        yield g


async def _server(collector: Any = None, **limits: Any) -> metrics.MetricsServer:
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    if collector is not None:
        registry.register(collector)
    server = metrics.MetricsServer(registry, "127.0.0.1", 0, **limits)
    await server.start()
    return server


def _get(url: str, headers: dict[str, str] | None = None,
         method: str = "GET") -> tuple[int, str, str]:
    data = b"x" if method == "POST" else None
    req = urllib.request.Request(url, headers=headers or {}, data=data, method=method)
    try:
        with urllib.request.urlopen(req, timeout=20) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


def _run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 60))


def _connect(server: metrics.MetricsServer) -> socket.socket:
    assert server.bound is not None
    return socket.create_connection(server.bound, timeout=20)


def _read_all(sock: socket.socket) -> bytes:
    """Everything until the server closes (bounded by the socket timeout)."""
    out = b""
    try:
        while chunk := sock.recv(65536):
            out += chunk
    except ConnectionResetError:
        pass
    return out


def test_get_answers_text_that_the_parser_reads_and_other_requests_are_refused():
    async def main() -> None:
        server = await _server(_Counting())
        try:
            code, ctype, body = await asyncio.to_thread(_get, server.url)
            assert code == 200 and ctype == metrics.CONTENT_TYPE_TEXT
            assert _samples(body)[("t_calls", (("pad", "x"),))] == 1
            code, ctype, body = await asyncio.to_thread(
                _get, server.url, {"Accept": "application/openmetrics-text;version=1.0.0"})
            assert code == 200 and ctype == metrics.CONTENT_TYPE_OPENMETRICS
            assert body.endswith("# EOF\n")
            code, _, body = await asyncio.to_thread(_get, server.url.replace("/metrics", "/"))
            assert code == 404 and "/metrics" in body
            code, _, _ = await asyncio.to_thread(_get, server.url, None, "POST")
            assert code == 405
            sock = await asyncio.to_thread(_connect, server)
            with sock:
                sock.sendall(b"nonsense\r\n\r\n")
                answer = await asyncio.to_thread(_read_all, sock)
            assert answer.startswith(b"HTTP/1.1 400 ")
            assert server.responses == {200: 2, 404: 1, 405: 1, 400: 1}
        finally:
            await server.close()

    _run(main())


def test_clients_that_connect_and_never_send_do_not_stop_a_scrape():
    """More idle connections than MAX_CONNECTIONS: the oldest are closed to make room,
    and the scrape is answered (without eviction it would wait for their timeouts)."""
    async def main() -> None:
        server = await _server(_Counting(), request_timeout=3600)
        idle = []
        try:
            for _ in range(metrics.MAX_CONNECTIONS + 3):
                idle.append(await asyncio.to_thread(_connect, server))
            code, _, body = await asyncio.to_thread(_get, server.url)
            assert code == 200 and "t_calls" in body
            # the first ones were closed by the server (EOF), the last ones still wait
            assert await asyncio.to_thread(_read_all, idle[0]) == b""
            assert server.dropped["evicted"] >= 4
            assert len(server._conns) <= metrics.MAX_CONNECTIONS
        finally:
            for s in idle:
                s.close()
            await server.close()

    _run(main())


def test_a_request_that_never_completes_is_closed_after_the_request_timeout():
    async def main() -> None:
        server = await _server(_Counting(), request_timeout=0.2)
        try:
            sock = await asyncio.to_thread(_connect, server)
            with sock:
                sock.sendall(b"GET /metrics HTTP/1.1\r\n")  # and never the blank line
                assert await asyncio.to_thread(_read_all, sock) == b""
            assert server.dropped["request_timeout"] == 1
        finally:
            await server.close()

    _run(main())


def test_a_request_head_over_the_limit_is_431():
    async def main() -> None:
        server = await _server(_Counting())
        try:
            sock = await asyncio.to_thread(_connect, server)
            with sock:
                head = b"GET /metrics HTTP/1.1\r\nX-Pad: " + b"a" * metrics.MAX_REQUEST_BYTES
                sock.sendall(head)
                answer = await asyncio.to_thread(_read_all, sock)
            assert answer.startswith(b"HTTP/1.1 431 ")
            assert server.responses[431] == 1
        finally:
            await server.close()

    _run(main())


def test_a_client_that_does_not_read_the_answer_is_cut_after_the_write_timeout():
    """An answer larger than the socket buffers to a client that never reads."""
    async def main() -> None:
        server = await _server(_Counting(label_bytes=16 << 20), write_timeout=0.3)
        try:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.settimeout(20)
            await asyncio.to_thread(sock.connect, server.bound)
            with sock:
                sock.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
                for _ in range(600):  # bounded: up to 60 s on a loaded machine
                    if server.dropped["write_timeout"]:
                        break
                    await asyncio.sleep(0.1)
            assert server.dropped["write_timeout"] == 1
            assert not server._conns
        finally:
            await server.close()

    _run(main())


def test_scrapes_within_the_cache_period_render_once():
    async def main() -> None:
        counting = _Counting()
        server = await _server(counting, render_cache_seconds=3600)
        try:
            bodies = [(await asyncio.to_thread(_get, server.url))[2] for _ in range(5)]
            assert counting.calls == 1 and len(set(bodies)) == 1
        finally:
            await server.close()
        counting = _Counting()
        server = await _server(counting, render_cache_seconds=0)
        try:
            for _ in range(3):
                await asyncio.to_thread(_get, server.url)
            assert counting.calls == 3
        finally:
            await server.close()

    _run(main())


def test_an_address_in_use_is_a_clear_error():
    async def main() -> None:
        first = await _server()
        try:
            host, port = first.bound
            second = metrics.MetricsServer(first.registry.__class__(), host, port)
            with pytest.raises(HostagentError,
                               match=rf"cannot listen for metrics on 127.0.0.1:{port}: "):
                await second.start()
        finally:
            await first.close()

    _run(main())


class _Broken:
    def __init__(self) -> None:
        self.calls = 0

    def collect(self) -> Any:
        self.calls += 1
        raise KeyError("usage")


def test_a_collector_failure_is_500_and_rendered_at_most_once_per_period():
    async def main() -> None:
        broken = _Broken()
        server = await _server(broken, render_cache_seconds=3600)
        try:
            for _ in range(3):
                code, _, body = await asyncio.to_thread(_get, server.url)
                assert code == 500 and body == "internal error: KeyError: 'usage'\n"
            assert broken.calls == 1 and server.responses[500] == 3
        finally:
            await server.close()

    _run(main())


def test_the_agent_does_not_import_prometheus_client_unless_metrics_are_on():
    import subprocess
    import sys

    code = ("import sys, hostagent.agent.daemon, hostagent.cli; "
            "sys.exit('prometheus_client' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=60).returncode == 0
