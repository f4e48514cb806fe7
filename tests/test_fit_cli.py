"""``hostagent fit``: files, a real ZeroMQ ROUTER endpoint, exit codes and error messages."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import msgpack
import pytest
import zmq
from fit_hosts import flavor, make_snapshot, make_topology

from hostagent.cli import main
from hostagent.fit import fit

SNAP = make_snapshot(make_topology(2, 4, 2), taken={0: "a"})


def write(tmp: Path, name: str, doc: object) -> str:
    path = tmp / name
    path.write_text(json.dumps(doc))
    return str(path)


def test_fits_json(tmp_path, capsys):
    snap = write(tmp_path, "s.json", SNAP)
    req = write(tmp_path, "r.json", flavor(2, 512, cpu_policy="dedicated"))
    assert main(["fit", "--snapshot", snap, "--request", req, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fits"] and out["placement"]["cells"][0]["host_cell"] == 1


def test_readable_and_pack(tmp_path, capsys):
    snap = write(tmp_path, "s.json", SNAP)
    req = write(tmp_path, "r.json", flavor(2, 512, cpu_policy="dedicated",
                                           cpu_thread_policy="isolate"))
    assert main(["fit", "--snapshot", snap, "--request", req, "--strategy", "pack"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("fits (strategy pack)\n")
    assert "  guest cell 0 -> host cell 0: pinned 0->1 1->2; 512 MiB on 4 KiB pages; " \
           "idle siblings 9-10\n" in out
    assert "  cputune: <cputune><vcpupin vcpu=\"0\" cpuset=\"1\" />" in out


def test_no_fit_exit_1_with_reasons(tmp_path, capsys):
    snap = write(tmp_path, "s.json", SNAP)
    req = write(tmp_path, "r.json", flavor(12, 512, cpu_policy="dedicated"))
    assert main(["fit", "--snapshot", snap, "--request", req]) == 1
    out = capsys.readouterr().out
    assert out.splitlines() == [
        "does not fit (strategy spread):",
        "  host cell 0: guest cell 0: dedicated_threads: needs 12 free dedicated threads, "
        "the cell has 7",
        "  host cell 1: guest cell 0: dedicated_threads: needs 12 free dedicated threads, "
        "the cell has 8",
    ]


@pytest.mark.parametrize("request_doc,message", [
    ({"vcpus": 2, "memory_mb": 512, "extra_specs": {"hw:cpu_policy": "pinned"}},
     "hostagent: extra_specs hw:cpu_policy='pinned': must be one of shared, dedicated, mixed"),
    ([], "hostagent: request must be a JSON object, got list"),
])
def test_invalid_request_exit_2(tmp_path, capsys, request_doc, message):
    snap = write(tmp_path, "s.json", SNAP)
    req = write(tmp_path, "r.json", request_doc)
    assert main(["fit", "--snapshot", snap, "--request", req]) == 2
    err = capsys.readouterr().err
    assert err.strip() == message


def test_unreadable_files(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    req = write(tmp_path, "r.json", flavor(1, 64))
    assert main(["fit", "--snapshot", str(bad), "--request", req]) == 2
    assert f"hostagent: --snapshot {bad}: not JSON" in capsys.readouterr().err
    assert main(["fit", "--snapshot", str(tmp_path / "missing.json"), "--request", req]) == 2
    assert "cannot read (No such file or directory)" in capsys.readouterr().err
    snap = write(tmp_path, "s.json", {"topology": {}})
    assert main(["fit", "--snapshot", snap, "--request", req]) == 2
    assert "hostagent: snapshot config: missing or not an object" in capsys.readouterr().err


class Router:
    """A ROUTER answering ``{op: "snapshot"}`` the way the agent does (wire.ok_reply)."""

    def __init__(self, endpoint: str, reply: dict | None) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.bind(endpoint)
        self.reply = reply
        self.requests: list[dict] = []
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        while poller.poll(5000):
            frames = self.sock.recv_multipart()
            self.requests.append(msgpack.unpackb(frames[-1], raw=False))
            if self.reply is not None:
                self.sock.send_multipart([*frames[:-1], msgpack.packb(self.reply)])
            return

    def close(self) -> None:
        self.thread.join(6)
        self.sock.close(0)
        self.ctx.term()


def test_endpoint_asks_the_agent_to_fit(tmp_path, capsys):
    """With --endpoint the agent answers ({op: "fit"}): no strategy is sent unless given,
    so the agent's own [fit] cell_strategy applies."""
    endpoint = f"ipc://{tmp_path}/req.sock"
    request = flavor(2, 512, cpu_policy="dedicated")
    answer = fit(SNAP, request, strategy="pack")
    router = Router(endpoint, {"v": 1, "ok": True, "seq": 3, "epoch": "e", "result": answer})
    try:
        req = write(tmp_path, "r.json", request)
        assert main(["fit", "--endpoint", endpoint, "--request", req, "--json"]) == 0
    finally:
        router.close()
    assert router.requests == [{"op": "fit", "request": request}]
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(answer))
    router = Router(endpoint, {"v": 1, "ok": True, "seq": 3, "epoch": "e", "result": answer})
    try:
        assert main(["fit", "--endpoint", endpoint, "--request", req, "--json",
                     "--strategy", "spread"]) == 0
    finally:
        router.close()
    assert router.requests == [{"op": "fit", "request": request, "strategy": "spread"}]


def test_endpoint_error_reply_and_timeout(tmp_path, capsys):
    endpoint = f"ipc://{tmp_path}/req.sock"
    router = Router(endpoint, {"v": 1, "ok": False, "error": "no snapshot yet: the agent is "
                                                             "starting"})
    req = write(tmp_path, "r.json", flavor(1, 64))
    try:
        assert main(["fit", "--endpoint", endpoint, "--request", req]) == 2
    finally:
        router.close()
    assert capsys.readouterr().err.strip() == (
        f"hostagent: --endpoint {endpoint}: the agent refused: no snapshot yet: the agent "
        "is starting")
    silent = Router(endpoint.replace("req", "quiet"), None)
    try:
        assert main(["fit", "--endpoint", endpoint.replace("req", "quiet"), "--request", req,
                     "--timeout", "0.2"]) == 2
    finally:
        silent.close()
    assert "no reply within 0.2 s (is the agent running" in capsys.readouterr().err


def test_console_script_subprocess(tmp_path):
    snap = write(tmp_path, "s.json", SNAP)
    req = write(tmp_path, "r.json", flavor(64, 512, cpu_policy="dedicated"))
    proc = subprocess.run([sys.executable, "-m", "hostagent.cli", "fit", "--snapshot", snap,
                           "--request", req, "--json"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1
    assert json.loads(proc.stdout)["fits"] is False


def test_endpoint_gives_the_agents_own_answer(capsys):
    """One answer for one question: an agent whose [fit] cell_strategy is pack answers
    ``hostagent fit --endpoint`` exactly as it answers ``{op: "fit"}``, and that differs
    from the local default (spread) on the same snapshot."""
    from daemon_helpers import DaemonProc

    d = DaemonProc(extra='\n[fit]\ncell_strategy = "pack"\n')
    try:
        d.wait_notify("READY=1")
        request = flavor(2, 512, cpu_policy="dedicated")
        req = write(d.dir, "r.json", request)
        assert main(["fit", "--endpoint", d.req, "--request", req, "--json"]) == 0
        via_cli = json.loads(capsys.readouterr().out)
        via_op = d.request({"op": "fit", "request": request}, timeout=30)["result"]
        assert via_cli == via_op and via_cli["strategy"] == "pack"
        snap = d.request({"op": "snapshot"}, timeout=30)["data"]
        local = fit(snap, request)
        assert local["strategy"] == "spread"
        assert main(["fit", "--endpoint", d.req, "--request", req]) == 0
        assert "fits (strategy pack)" in capsys.readouterr().out
        assert d.stop() == 0
    finally:
        d.close()
