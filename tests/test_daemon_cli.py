"""The daemon's commands: keys, watch, show (against a real agent process), demo."""

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from daemon_helpers import running_agent, start_web_guest

ROOT = Path(__file__).resolve().parent.parent


def cli(*args, timeout=30, **kw):
    return subprocess.run([sys.executable, "-m", "hostagent.cli", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT, **kw)


@pytest.fixture(scope="module")
def agent():
    with running_agent() as d:
        start_web_guest(d)
        yield d


def test_keys_makes_a_pair_and_refuses_to_overwrite(tmp_path):
    r = cli("keys", str(tmp_path / "k"), "--name", "sched1")
    assert r.returncode == 0, r.stderr
    secret = tmp_path / "k" / "sched1.key_secret"
    assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600
    assert "z85 public" in r.stdout and (tmp_path / "k" / "sched1.key").exists()
    r = cli("keys", str(tmp_path / "k"), "--name", "sched1")
    assert r.returncode == 2 and "already exists" in r.stderr


def test_watch_prints_one_line_per_snapshot(agent):
    r = cli("watch", f"{agent.stream},{agent.req}", "--count", "1", "--wide")
    assert r.returncode == 0, r.stderr
    line = r.stdout.strip()
    assert line.startswith("testhost seq ")
    assert "pCPUs free/dedicated c0:18/20 c1:20/20" in line
    assert "hugepages free/kernel c0:2MiB=" in line and "cache ways free L3#0=" in line
    assert "guests 1" in line


def test_watch_json_prints_whole_snapshots(agent):
    r = cli("watch", agent.stream, "--json", "--count", "1")
    assert r.returncode == 0, r.stderr
    snap = json.loads(r.stdout.splitlines()[0])
    assert snap["host"] == "testhost" and [g["name"] for g in snap["usage"]["guests"]] == ["web"]


def test_watch_seconds_and_config_endpoints(agent):
    r = cli("watch", "--config", str(agent.config), "--count", "1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("testhost seq ")
    # --seconds alone ends the watch (what it printed by then depends on the machine's load)
    r = cli("watch", "--config", str(agent.config), "--seconds", "0.5")
    assert r.returncode == 0, r.stderr
    assert all(ln.startswith("testhost seq ") for ln in r.stdout.splitlines()), r.stdout
    r = cli("watch", "udp://x")
    assert r.returncode == 2 and "must start with tcp://" in r.stderr


def test_show_from_an_endpoint_and_from_a_file(agent, tmp_path):
    r = cli("show", "--endpoint", agent.stream)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "host testhost" in out
    assert "c0 0:2    2=web/v0  26=web/v1" in out
    assert "c0 0:0    0=shared(1)  24=shared" in out  # web's emulator may run on 0
    assert "c1 1:2    14=free  38=free" in out
    assert "L3#0   **DDD..ggzz  free 2 ways" in out and "    g nfv-excl" in out
    assert "hugepage pools" in out and "c0  2 MiB: total 2048" in out
    assert "L3#0" in out and "(default group)" in out
    snap = json.loads(cli("watch", agent.stream, "--json", "--count", "1").stdout)
    f = tmp_path / "snap.json"
    f.write_text(json.dumps(snap))
    r2 = cli("show", "--file", str(f))
    assert r2.returncode == 0 and r2.stdout == out
    f.write_text("{}")
    r3 = cli("show", "--file", str(f))
    assert r3.returncode == 2 and "not a snapshot" in r3.stderr
    r4 = cli("show", "--endpoint", f"ipc://{tmp_path}/nobody", "--timeout", "0.3")
    assert r4.returncode == 2 and "no snapshot within 0.3 s" in r4.stderr


# `hostagent watch` made slow to start, as on a loaded machine (a sitecustomize module on
# PYTHONPATH runs before the command): the demo must wait for it, not for a fixed time
SLOW_WATCH_START_SECONDS = 3.0
SLOW_WATCH = f"""import sys, time
if sys.argv[1:2] == ["watch"]:
    time.sleep({SLOW_WATCH_START_SECONDS})
"""


def snapshot_lines(lines):
    """[(index, seq)] of the lines of `watch` that show a snapshot."""
    out = []
    for i, ln in enumerate(lines):
        m = re.match(r"\S+ seq (\d+)  ", ln)
        if m:
            out.append((i, int(m.group(1))))
    return out


def test_demo_runs_and_exits_0(tmp_path):
    """The demo changes guests only once `watch` shows the first snapshot (seq 1), and
    each change is followed by a newer snapshot, however slowly `watch` starts."""
    (tmp_path / "sitecustomize.py").write_text(SLOW_WATCH)
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-m", "hostagent.agent.demo", "--seconds", "2.5",
                        "--sysfs-root", str(ROOT / "fixtures/sysfs/xeon-2s-cat/sys")],
                       capture_output=True, text=True, timeout=180, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    snaps = snapshot_lines(lines)
    changes = [i for i, ln in enumerate(lines)
               if ln.startswith(("demo: starting ", "demo: stopping "))]
    assert snaps and changes, r.stdout
    assert snaps[0][0] < changes[0] and snaps[0][1] == 1, r.stdout
    for n, i in enumerate(changes):  # each change is shown before the next one is made
        before = max(seq for j, seq in snaps if j < i)
        nxt = changes[n + 1] if n + 1 < len(changes) else len(lines)
        assert any(i < j < nxt and seq > before for j, seq in snaps), r.stdout
    assert "demo: done (agent exit 0)" in r.stdout
    assert ("demo: using libvirt's test:/// driver (qemu:///system not used: --sysfs-root "
            f"{ROOT / 'fixtures/sysfs/xeon-2s-cat/sys'} is not this machine's /sys)") in r.stdout
