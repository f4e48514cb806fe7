"""``hostagent watch`` for a person (issue "Output a person reads", item 13): labelled
fields, one host on one 80-column line by default (``--wide`` for everything), and a
word when nothing arrives (a non-zero exit when ``--count``/``--seconds`` end with none).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from daemon_helpers import running_agent, start_web_guest
from libvirt_helpers import FIXTURES, probe_fixture

from hostagent.commands.watch import LINE_WIDTH, summary
from hostagent.config import Config
from hostagent.snapshot import build_snapshot

ROOT = Path(__file__).resolve().parent.parent
NAMES = sorted(p.name for p in FIXTURES.iterdir() if (p / "sys").is_dir())


def cli(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "hostagent.cli", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def snapshot_of(name: str, host: str = "compute-0017", seq: int = 123456) -> dict:
    snap = build_snapshot(probe_fixture(name), Config(), [], host=host, epoch="e", seq=seq,
                          now=0.0)
    return json.loads(json.dumps(snap))


@pytest.mark.parametrize("name", NAMES)
def test_default_line_fits_80_columns_on_every_fixture_host(name):
    line = summary(snapshot_of(name))
    assert len(line) <= LINE_WIDTH == 80, line
    assert line.startswith("compute-0017 seq 123456  ") and "free: pCPUs 0/0" in line


def test_default_line_labels_host_wide_totals_and_puts_alarms_first():
    snap = snapshot_of("xeon-2s-cat", host="h1", seq=7)
    snap["agent"] = {"libvirt": {"connected": False}}
    # xeon-2s-cat: 2048+2048 free 2 MiB pages, 32+32 1 GiB pages, 2+3 free ways; the
    # alarms come first, so what does not fit is the guest count
    assert summary(snap) == ("h1 seq 7  conflicts 3  LIBVIRT DOWN  free: pCPUs 0/0 "
                             "2MiB 4096 1GiB 64 ways 5  …")
    snap["usage"]["conflicts"] = []
    snap["agent"] = {}
    assert summary(snap) == "h1 seq 7  free: pCPUs 0/0 2MiB 4096 1GiB 64 ways 5  guests 0"


def test_a_line_too_long_drops_fields_from_the_end_and_says_so():
    line = summary(snapshot_of("big-448", host="a-rather-long-host-name.example.org"))
    assert len(line) <= 80 and line.endswith("  …")
    assert line.startswith("a-rather-long-host-name.example.org seq 123456  conflicts 16  ")
    huge = summary(snapshot_of("vm-1s-nosmt", host="h" * 200))
    assert len(huge) == 80 and huge.endswith("…")


def test_wide_line_is_everything_per_cell():
    line = summary(snapshot_of("large-8cell", host="h1", seq=1), wide=True)
    assert line.startswith("h1 seq 1  pCPUs free/dedicated c0:0/0 c1:0/0 ")
    assert " c3:2MiB=4096/0,1GiB=16/16 " in line  # accounting / kernel per pool
    assert line.endswith("  guests 0  conflicts 4") and len(line) > 80


# --- the command, against a real agent, and against nobody -----------------------------


@pytest.fixture(scope="module")
def agent():
    with running_agent() as d:
        start_web_guest(d)
        yield d


def test_watch_default_and_wide_lines_from_an_agent(agent):
    r = cli("watch", f"{agent.stream},{agent.req}", "--count", "1")
    assert r.returncode == 0, r.stderr
    line = r.stdout.strip()
    assert len(line) <= 80 and line.startswith("testhost seq ")
    # 3 conflicts: the fixture's pages in use by no guest (hugepages_untracked)
    assert line.startswith("testhost seq ") and "  conflicts 3  free: pCPUs 38/40 2MiB " \
        "4096 1GiB 64 ways 5" in line
    assert "free: pCPUs free/dedicated" in r.stderr  # the legend, once, with "watching"
    r = cli("watch", agent.stream, "--count", "1", "--wide")
    assert r.returncode == 0, r.stderr
    wide = r.stdout.strip()
    assert "pCPUs free/dedicated c0:18/20 c1:20/20" in wide
    assert "hugepages free/kernel c0:2MiB=2048/1536," in wide and "guests 1" in wide


def test_watch_with_nothing_arriving_says_so_and_exits_1(tmp_path):
    nobody = f"ipc://{tmp_path}/nobody"
    r = cli("watch", nobody, "--seconds", "1.5", "--dead-after", "0.2")
    assert r.returncode == 1 and r.stdout == ""
    err = r.stderr.splitlines()
    assert f"watch: no snapshot within 0.2 s from {nobody} (is the agent running, and is " \
        "this its stream endpoint?)" in err
    assert err[-1] == "watch: no snapshot within 1.5 s"
    r = cli("watch", nobody, "--json", "--seconds", "0.3")
    assert r.returncode == 1 and r.stderr.strip() == "watch: no snapshot within 0.3 s"
