"""The SIGUSR1 debug dump: every time an ISO-8601 string (UTC, with its offset), and
``hostagent show --file`` draws the snapshot a dump holds. A real agent process."""

import json
import signal
import subprocess
import sys
from datetime import UTC, datetime

import pytest
from daemon_helpers import DaemonProc, guest_names, wait_for
from libvirt_helpers import domain_xml

from hostagent.agent.debug_dump import TIME_FIELDS, iso_time, with_iso_times


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hostagent.cli", *args], capture_output=True,
                          text=True, timeout=60)


def utc(text: str) -> datetime:
    """The time an ISO-8601 text names; it must carry the UTC offset."""
    assert isinstance(text, str), text
    t = datetime.fromisoformat(text)
    assert t.utcoffset() is not None and t.utcoffset().total_seconds() == 0, text
    return t


def test_iso_time():
    assert iso_time(0.0) == "1970-01-01T00:00:00.000+00:00"
    assert iso_time(1767225600.25) == "2026-01-01T00:00:00.250+00:00"
    assert iso_time(None) is None


def test_with_iso_times_converts_the_listed_fields_only():
    doc = {"written": 0.0, "started": 1.5, "errors": [{"time": 2.0, "where": "x"}],
           "libvirt": {"connected_since": None, "last_events": [{"time": 3.0}]},
           "process": {"started": 4.0}, "snapshot": {"time": 5.0}, "udev": {"active": False}}
    out = with_iso_times(doc)
    assert out["written"] == "1970-01-01T00:00:00.000+00:00"
    assert out["errors"][0] == {"time": "1970-01-01T00:00:02.000+00:00", "where": "x"}
    assert out["libvirt"] == {"connected_since": None,
                              "last_events": [{"time": "1970-01-01T00:00:03.000+00:00"}]}
    assert out["process"]["started"] == "1970-01-01T00:00:04.000+00:00"
    assert out["snapshot"] == {"time": 5.0}  # the snapshot is schema v1, as published
    assert doc["written"] == 0.0  # the input is not changed
    assert ("snapshot", "time") not in TIME_FIELDS


@pytest.fixture(scope="module")
def dumped():
    """An agent with one libvirt event and one refused reload, dumped; (agent, doc)."""
    d = DaemonProc()
    try:
        d.wait_notify("READY=1")
        with d.subscriber() as sub:
            sub.wait_snapshot("testhost")
            xml = domain_xml("dumped", vcpus=1, vcpupin={0: "2"})
            assert d.request({"op": "test-domain", "action": "define", "xml": xml})["ok"]
            assert d.request({"op": "test-domain", "action": "start", "name": "dumped"})["ok"]
            wait_for(sub, lambda s: guest_names(s) == ["dumped"])
        good = d.config.read_text()
        d.config.write_text("[nope]\n")
        d.signal(signal.SIGHUP)
        d.wait_log("reload refused")
        d.config.write_text(good)
        d.signal(signal.SIGUSR1)
        d.wait_log("debug dump written to")
        dump = d.dir / "run" / "hostagent-dump.json"
        yield d, dump, json.loads(dump.read_text())
        assert d.stop() == 0, d.log_text()
    finally:
        d.close()


def test_every_time_in_the_dump_is_iso_8601_utc(dumped):
    _, _, doc = dumped
    written = utc(doc["written"])
    assert utc(doc["started"]) <= written
    assert utc(doc["process"]["started"]) <= written
    assert utc(doc["libvirt"]["connected_since"]) <= written
    assert doc["libvirt"]["last_events"], doc["libvirt"]
    for event in doc["libvirt"]["last_events"]:
        assert utc(event["time"]) <= written
    assert [e["where"] for e in doc["errors"]] == ["reload"]
    assert utc(doc["errors"][0]["time"]) <= written
    assert abs((datetime.now(UTC) - written).total_seconds()) < 3600
    assert isinstance(doc["snapshot"]["time"], float)  # the snapshot itself is unchanged


def test_show_file_draws_the_snapshot_a_dump_holds(dumped, tmp_path):
    _, dump, doc = dumped
    snap = tmp_path / "snap.json"
    snap.write_text(json.dumps(doc["snapshot"]))
    from_dump = cli("show", "--file", str(dump))
    assert from_dump.returncode == 0, from_dump.stderr
    assert "dumped" in from_dump.stdout and "threads" in from_dump.stdout
    assert from_dump.stdout == cli("show", "--file", str(snap)).stdout


def test_show_file_of_a_dump_without_a_snapshot_says_so(dumped, tmp_path):
    _, _, doc = dumped
    empty = tmp_path / "early-dump.json"
    empty.write_text(json.dumps({**doc, "snapshot": None}))
    r = cli("show", "--file", str(empty))
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == (f"hostagent: {empty}: a debug dump without a snapshot (the agent "
                        "had published none yet)\n")
