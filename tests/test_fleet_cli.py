"""``hostagent place`` and ``hostagent show --fleet`` against real agents, and their
invalid input (exit 2, one line)."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys

import pytest
from daemon_helpers import ROOT
from test_fleet_claim import PINNED4, agent

from hostagent.cli import main

HUGE = {"vcpus": 64, "memory_mb": 1024, "extra_specs": {"hw:cpu_policy": "dedicated"}}


def hostagent(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hostagent.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(("extra", "msg"), [
    (["--weigher", "best"], "weigher 'best': must be one of pack, spread, numa, cores, cache"),
    (["--count", "0"], "--count 0: must be from 1 to 1000"),
    (["--wait", "0"], "--wait 0: must be a number of seconds > 0"),
    (["--source", "nowhere"], "endpoint 'nowhere': must start with tcp://"),
])
def test_place_invalid_input(tmp_path, capsys, extra, msg):
    req = tmp_path / "r.json"
    req.write_text(json.dumps(PINNED4))
    args = ["place", "--request", str(req), *extra]
    if "--source" not in extra:
        args += ["--source", f"ipc://{tmp_path}/none"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("hostagent: ") and msg in err and err.count("\n") == 1, err


def test_place_invalid_request(tmp_path, capsys):
    req = tmp_path / "r.json"
    req.write_text(json.dumps({"vcpus": 0, "memory_mb": 1}))
    assert main(["place", "--request", str(req), "--source", f"ipc://{tmp_path}/n"]) == 2
    assert "vcpus" in capsys.readouterr().err


def test_place_and_show_fleet_on_real_agents(tmp_path):
    """Two real agents (~3 s to start) and five CLI processes (~1 s each)."""
    a = agent("a", advertise=True)
    b = agent("b", advertise=False)
    with contextlib.ExitStack() as stack:
        stack.callback(b.close)
        stack.callback(a.close)
        req = tmp_path / "r.json"
        req.write_text(json.dumps(PINNED4))
        srcs = ["--source", a.stream, "--source", f"{b.stream},{b.req}"]
        r = hostagent("place", *srcs, "--request", str(req), "--count", "2")
        assert r.returncode == 0, r.stderr
        assert "2 of 2 hosts (best first):" in r.stdout and "cell " in r.stdout
        r = hostagent("place", *srcs, "--request", str(req), "--json", "--weigher", "pack")
        doc = json.loads(r.stdout)
        assert r.returncode == 0 and doc["hosts"] == 2 and len(doc["candidates"]) == 1
        assert doc["candidates"][0]["answer"]["fits"]
        r = hostagent("place", *srcs, "--request", str(req), "--claim", "--claimant", "cli",
                      "--json")
        assert r.returncode == 0, r.stderr
        claim = json.loads(r.stdout)["claim"]
        agent_of = {"a": a, "b": b}[claim["host"]]
        [held] = agent_of.request({"op": "claims"})["claims"]
        assert held["id"] == claim["id"] and held["claimant"] == "cli"
        huge = tmp_path / "huge.json"
        huge.write_text(json.dumps(HUGE))
        r = hostagent("place", *srcs, "--request", str(huge))
        assert r.returncode == 1
        assert "no host fits (2 heard); per host class:" in r.stdout
        assert "48 threads, 2 cells, 2 sockets:" in r.stdout
        assert ("2 hosts: dedicated_threads: needs 64 free dedicated threads, the hosts have "
                "36-40") in r.stdout, r.stdout
        r = hostagent("show", "--fleet", *srcs)
        assert r.returncode == 0, r.stderr
        lines = r.stdout.splitlines()
        assert lines[0].startswith("host ") and len(lines) == 3
        assert all(len(line) <= 80 for line in lines)
        assert lines[1].startswith("a ") and " ok " in lines[1] and "20/10" in lines[2]
