"""Claims against real agent processes (docs/claims.md): many claimer processes racing
on raw DEALER sockets never get overlapping grants and get exactly what fits one by one;
release and expiry free exactly what was held; a restart keeps the live claims (a
corrupt claims file is reported and ignored); a guest started on libvirt's test:///
driver from the claim's XML consumes it (other pins: ``claim_mismatch``); every bad field
is an error reply and the agent keeps serving; with CURVE only claimants may claim."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from claim_helpers import boot_xml, fits_one_by_one, held, race, snapshot, wait_snapshot
from daemon_helpers import DaemonProc

from hostagent.resctrl_cbm import parse_mask

# xeon-2s-cat: 2 cells x 12 cores x 2 threads; dedicated 2-11,14-23,26-35,38-47 (20 cores);
# 2048 pages of 2 MiB per cell; L3 (11 ways) with 2 free ways on cache 0, 3 on cache 1
PINNED = {"vcpus": 2, "memory_mb": 512,
          "extra_specs": {"hw:cpu_policy": "dedicated", "hw:mem_page_size": "2MB"}}
ISOLATE = {"vcpus": 2, "memory_mb": 256,
           "extra_specs": {"hw:cpu_policy": "dedicated", "hw:cpu_thread_policy": "isolate"}}
# isolate (idle siblings) and one L3 way each (a way is 2304 KiB): the free ways limit it
CACHED = {"vcpus": 2, "memory_mb": 256,
          "extra_specs": {"hw:cpu_policy": "dedicated", "hw:cpu_thread_policy": "isolate",
                          "hw:cache_reservation": "vcpus=0-1:type=both,size=2304kb"}}
CLAIMERS = 8


@pytest.fixture
def agent():
    d = DaemonProc()
    try:
        d.wait_notify("READY=1")
        yield d
    finally:
        d.close()


def _usage_without_claims(snap: dict[str, Any]) -> dict[str, Any]:
    u = snap["usage"]
    return {k: u[k] for k in ("cells", "threads", "caches", "pci", "floating_vcpus",
                              "floating_memory_kib", "floating_hugepages", "conflicts")}


# --------------------------------------------------------------------------- the race


@pytest.mark.parametrize("request_", [PINNED, CACHED], ids=["pinned-2M", "isolate-cache-ways"])
def test_concurrent_claimers_never_share_anything_and_get_what_fits_one_by_one(
        agent: DaemonProc, tmp_path: Path, request_: dict[str, Any]) -> None:
    before = snapshot(agent)
    dedicated = set(before["config"]["dedicated_cpus"])
    results = race(agent, request_, CLAIMERS, tmp_path)
    assert [r["errors"] for r in results] == [[]] * CLAIMERS
    # every claimer stopped at a refusal: the host was full for it
    assert all(r["refusal"] for r in results), [r["refusal"] for r in results]
    grants = [g for r in results for g in r["grants"]]
    assert grants
    ids = [g["id"] for g in grants]
    assert len(set(ids)) == len(ids)
    # zero overlap: no thread, hugepage beyond the pool, PCI function or cache way twice
    threads: dict[int, str] = {}
    ways: dict[tuple[str, int], int] = {}
    pages: dict[tuple[int, int], int] = {}
    for g in grants:
        h = held(g["placement"], dedicated)
        for t in h["threads"]:
            assert threads.setdefault(t, g["id"]) == g["id"], f"thread {t} granted twice"
        for key, mask in h["ways"].items():
            assert ways.get(key, 0) & mask == 0, f"ways {mask:x} of {key} granted twice"
            ways[key] = ways.get(key, 0) | mask
        for key, n in h["pages"].items():
            pages[key] = pages.get(key, 0) + n
    # every grant satisfiable, all of them together, on the host as it was
    assert set(threads) <= dedicated
    for cell in before["usage"]["cells"]:
        for pool in cell["hugepages"]:
            assert pages.get((cell["id"], pool["size_kib"]), 0) <= pool["free"]
    free = {(c["resource"], c["id"]): parse_mask(c["free_mask"])
            for c in before["usage"]["caches"]}
    for key, mask in ways.items():
        assert mask & ~free[key] == 0, f"{key}: ways {mask:x} were not free"
    # exactly what a fit says fits one by one
    if request_ is not CACHED:
        assert len(grants) == fits_one_by_one(before, request_)
    else:  # a guest's ways live in a resctrl group the fixture cannot create: count
        # the free ways (5) and the CLOSIDs left for new groups (MB has 8, 4 are used):
        # each claim's group is one CLOSID promised
        assert {g["placement"]["cache"][0]["ways"] for g in grants} == {1}
        rc = before["topology"]["resctrl"]
        closids = min([r["num_closids"] for r in rc["resources"]] + [rc["mb"]["num_closids"]])
        ways_free = sum(bin(m).count("1") for m in free.values())
        assert len(grants) == min(ways_free, closids - len(rc["groups"])) == 4
    # the agent's published snapshot says the same, with no conflict
    snap = wait_snapshot(agent, lambda s: len(s["usage"]["claims"]) == len(grants))
    assert sorted(c["id"] for c in snap["usage"]["claims"]) == sorted(ids)
    assert snap["usage"]["conflicts"] == before["usage"]["conflicts"]  # none added
    assert {t["cpu"] for t in snap["usage"]["threads"] if t["claim"]} == set(threads)
    listed = agent.request({"op": "claims"})["claims"]
    assert sorted(c["id"] for c in listed) == sorted(ids)


# --------------------------------------------------------------------------- release, expiry


def test_release_and_expiry_free_exactly_what_was_held(agent: DaemonProc) -> None:
    before = wait_snapshot(agent, lambda s: True)
    base = _usage_without_claims(before)
    rep = agent.request({"op": "claim", "request": ISOLATE, "ttl_s": 600, "claimant": "a"})
    assert rep["ok"] and rep["claimed"], rep
    claim = rep["claim"]
    held_snap = wait_snapshot(agent, lambda s: s["usage"]["claims"] != [])
    [entry] = held_snap["usage"]["claims"]
    assert entry["id"] == claim["id"] and entry["claimant"] == "a"
    cell = claim["placement"]["cells"][0]["host_cell"]
    free_before = before["usage"]["cells"][cell]["free_pcpus"]
    assert held_snap["usage"]["cells"][cell]["free_pcpus"] == free_before - 4  # 2 + 2 idle
    assert agent.request({"op": "release", "id": claim["id"]}) == {
        "v": 1, "ok": True, "released": claim["id"]}
    after = wait_snapshot(agent, lambda s: s["usage"]["claims"] == [])
    assert _usage_without_claims(after) == base
    # expiry: a 1 s claim goes by itself
    rep = agent.request({"op": "claim", "request": ISOLATE, "ttl_s": 1})
    assert rep["claimed"]
    wait_snapshot(agent, lambda s: s["usage"]["claims"] != [])
    after = wait_snapshot(agent, lambda s: s["usage"]["claims"] == [])
    assert _usage_without_claims(after) == base
    agent.wait_log(f"claim {rep['claim']['id']} of '' expired")
    assert agent.request({"op": "claims"})["claims"] == []


# --------------------------------------------------------------------------- restart


def test_a_restart_keeps_live_claims_and_drops_expired_ones() -> None:
    d = DaemonProc()
    try:
        d.wait_notify("READY=1")
        live = d.request({"op": "claim", "request": PINNED, "ttl_s": 3600})["claim"]
        short = d.request({"op": "claim", "request": PINNED, "ttl_s": 1})["claim"]
        held_before = wait_snapshot(d, lambda s: len(s["usage"]["claims"]) == 2)
        saved = json.loads((d.dir / "run" / "claims.json").read_text())
        assert sorted(c["id"] for c in saved["claims"]) == sorted([live["id"], short["id"]])
        assert d.stop() == 0
        while time.time() <= short["expires"]:  # let the short one expire while down
            time.sleep(0.05)
        d.start()
        d.wait_notify("READY=1")
        snap = wait_snapshot(d, lambda s: True)
        assert [c["id"] for c in snap["usage"]["claims"]] == [live["id"]]
        [listed] = d.request({"op": "claims"})["claims"]
        assert listed == live
        claimed = {t["cpu"] for t in snap["usage"]["threads"] if t["claim"] == live["id"]}
        assert claimed == set(live["placement"]["cells"][0]["pinning"].values())
        assert claimed == {t["cpu"] for t in held_before["usage"]["threads"]
                           if t["claim"] == live["id"]}
        d.wait_log(f"claim {short['id']} expired while the agent was down")
        # a claim made after the restart never takes the live one's threads
        again = d.request({"op": "claim", "request": PINNED, "ttl_s": 60})["claim"]
        assert not set(again["placement"]["cells"][0]["pinning"].values()) & claimed
    finally:
        d.close()


def test_a_corrupt_claims_file_is_reported_and_the_agent_starts() -> None:
    d = DaemonProc(start=False)
    try:
        run = d.dir / "run"
        run.mkdir()
        (run / "claims.json").write_text('{"version": 1, "claims": [{"id": ')
        d.start()
        d.wait_notify("READY=1")
        d.wait_log("claims file: ")
        assert "not a claims file: not JSON" in d.log_text()
        assert (run / "claims.json.bad").exists()
        assert d.request({"op": "claims"})["claims"] == []
        assert d.request({"op": "claim", "request": PINNED})["claimed"]
        saved = json.loads((run / "claims.json").read_text())
        assert len(saved["claims"]) == 1
    finally:
        d.close()


# --------------------------------------------------------------------------- hand-off


def test_a_guest_started_from_the_claim_consumes_it(agent: DaemonProc) -> None:
    claim = agent.request({"op": "claim", "request": ISOLATE, "ttl_s": 600})["claim"]
    held_snap = wait_snapshot(agent, lambda s: s["usage"]["claims"] != [])
    xml = boot_xml(claim, "from-claim", ISOLATE["memory_mb"])
    assert claim["id"] in xml
    rep = agent.request({"op": "test-domain", "action": "create", "xml": xml})
    assert rep["ok"], rep
    snap = wait_snapshot(agent, lambda s: s["usage"]["claims"] == [] and s["usage"]["guests"])
    [guest] = snap["usage"]["guests"]
    assert guest["name"] == "from-claim"
    assert snap["usage"]["conflicts"] == held_snap["usage"]["conflicts"]  # the fixture's
    cpus = set(claim["placement"]["cells"][0]["pinning"].values())
    assert set(guest["dedicated_cpus"]) == cpus
    for a, b in zip(snap["usage"]["cells"], held_snap["usage"]["cells"], strict=True):
        assert (a["free_cpus"], a["free_cores"], a["hugepages"]) == (
            b["free_cpus"], b["free_cores"], b["hugepages"])
    agent.wait_log(f"claim {claim['id']} consumed by guest {guest['uuid']}")
    assert agent.request({"op": "claims"})["claims"] == []
    saved = agent.dir / "run" / "claims.json"  # written after the hand-off, not before it
    deadline = time.monotonic() + 30
    while json.loads(saved.read_text())["claims"] != []:
        assert time.monotonic() < deadline, saved.read_text()
        time.sleep(0.02)


def test_a_guest_started_with_other_pins_is_a_claim_mismatch(agent: DaemonProc) -> None:
    claim = agent.request({"op": "claim", "request": PINNED, "ttl_s": 600})["claim"]
    pins = claim["placement"]["cells"][0]["pinning"]
    free = set(snapshot(agent)["usage"]["cells"][0]["free_cpus"]) - set(pins.values())
    other = min(free)
    xml = boot_xml(claim, "moved", PINNED["memory_mb"],
                   replace=(f'vcpu="0" cpuset="{pins["0"]}"', f'vcpu="0" cpuset="{other}"'))
    assert agent.request({"op": "test-domain", "action": "create", "xml": xml})["ok"]
    snap = wait_snapshot(agent, lambda s: any(c["kind"] == "claim_mismatch"
                                              for c in s["usage"]["conflicts"]))
    [c] = [c for c in snap["usage"]["conflicts"] if c["kind"] == "claim_mismatch"]
    [guest] = snap["usage"]["guests"]
    assert c["guests"] == [guest["uuid"]] and c["claims"] == [claim["id"]]
    assert f"moved was booted from {claim['id']}" in c["detail"]
    assert snap["usage"]["claims"] == []  # consumed: the guest holds what it holds
    agent.wait_log("which holds other resources")


# --------------------------------------------------------------------------- bad input


BAD = [
    ({"op": "claim"}, "op claim: request=None: must be a map"),
    ({"op": "claim", "request": "4 vcpus"}, "op claim: request='4 vcpus': must be a map"),
    ({"op": "claim", "request": {"vcpus": 0, "memory_mb": 1}}, "vcpus"),
    ({"op": "claim", "request": PINNED, "strategy": 5}, "op claim: strategy=5"),
    ({"op": "claim", "request": PINNED, "ttl_s": -1}, "op claim: ttl_s=-1: must be between"),
    ({"op": "claim", "request": PINNED, "ttl_s": 1e300}, "must be between 1 and 3600"),
    ({"op": "claim", "request": PINNED, "ttl_s": "60"}, "must be a number of seconds"),
    ({"op": "claim", "request": PINNED, "ttl_s": None}, "ttl_s=None: must be a number"),
    ({"op": "claim", "request": PINNED, "claimant": ["me"]}, "claimant=['me']: must be a str"),
    ({"op": "claim", "request": PINNED, "claimant": "x" * 1000}, "at most 128 characters"),
    ({"op": "claim", "request": PINNED, "placement": 3}, "placement=3: must be a map"),
    ({"op": "claim", "request": PINNED, "id": "x"}, "op claim: unknown fields ['id']"),
    ({"op": "release"}, "op release: id=None: must be a claim id"),
    ({"op": "release", "id": 12}, "op release: id=12: must be a claim id"),
    ({"op": "release", "id": "claim-000000000000000000000000"},
     "op release: no outstanding claim 'claim-000000000000000000000000'"),
    ({"op": "claims", "all": True}, "op claims: unknown fields ['all']"),
]


def test_bad_claim_requests_get_error_replies_and_the_agent_keeps_serving(
        agent: DaemonProc) -> None:
    snap = snapshot(agent)
    fitted = agent.request({"op": "fit", "request": PINNED})["result"]["placement"]
    ghost = json.loads(json.dumps(fitted))
    ghost["cells"][0]["pinning"]["0"] = 4000  # a thread the host does not have
    wrong = json.loads(json.dumps(fitted))
    wrong["cells"][0]["pinning"] = "2,3"
    cases = [*BAD,
             ({"op": "claim", "request": PINNED, "placement": ghost},
              "placement.cells[0].pinning[0]=[4000]: CPU(s) 4000 are not CPUs of this host"),
             ({"op": "claim", "request": PINNED, "placement": wrong},
              "placement.cells[0].pinning='2,3': must be a map")]
    for req, message in cases:
        rep = agent.request(req)
        assert rep["ok"] is False, (req, rep)
        assert message in rep["error"], (req, rep["error"])
    assert agent.request({"op": "claims"})["claims"] == []
    # and it serves as before: the fitted placement, given, is claimed; snapshots answered
    rep = agent.request({"op": "claim", "request": PINNED, "placement": fitted})
    assert rep["claimed"], rep
    assert rep["claim"]["placement"]["cells"][0]["pinning"] == fitted["cells"][0]["pinning"]
    again = agent.request({"op": "claim", "request": PINNED, "placement": fitted})
    assert again["ok"] and not again["claimed"]
    assert any(f"is held by claim {rep['claim']['id']}" in r["message"]
               for r in again["reasons"])
    assert snapshot(agent)["seq"] >= snap["seq"]


# --------------------------------------------------------------------------- who may claim


def test_with_curve_only_claimants_may_claim_and_release() -> None:
    from hostagent.curve import ClientCurve, make_keypair
    from hostagent.subscriber import claim, release, request

    d = DaemonProc(start=False)
    try:
        keys, allowed, claimants = d.dir / "keys", d.dir / "allowed", d.dir / "claimants"
        allowed.mkdir()
        claimants.mkdir()
        srv_pub, srv_sec = make_keypair(keys, "server")
        make_keypair(allowed, "reader")
        make_keypair(claimants, "scheduler")  # a claimant need not be in allowed_clients_dir
        for name, where in (("reader", allowed), ("scheduler", claimants)):
            (where / f"{name}.key_secret").rename(keys / f"{name}.key_secret")
        d.config.write_text(d.config.read_text() + f"""
[curve]
enabled = true
server_secret_key = "{srv_sec}"
allowed_clients_dir = "{allowed}"
claimants_dir = "{claimants}"
""")
        d.start()
        d.wait_notify("READY=1")
        reader = ClientCurve.load(keys / "reader.key_secret", srv_pub)
        sched = ClientCurve.load(keys / "scheduler.key_secret", srv_pub)
        rep = request(d.req, {"op": "claim", "request": PINNED}, curve=reader, timeout=10)
        assert rep["ok"] is False
        assert "op claim: this client's key is not in [curve] claimants_dir" in rep["error"]
        got = claim(d.req, PINNED, curve=sched, timeout=10, ttl_s=60)
        assert got["claimed"]
        assert got["claim"]["claimant"].startswith("curve:")
        listed = request(d.req, {"op": "claims"}, curve=reader, timeout=10)
        assert [c["id"] for c in listed["claims"]] == [got["claim"]["id"]]
        rep = request(d.req, {"op": "release", "id": got["claim"]["id"]}, curve=reader,
                      timeout=10)
        assert rep["ok"] is False and "not in [curve] claimants_dir" in rep["error"]
        assert release(d.req, got["claim"]["id"], curve=sched, timeout=10) == {
            "v": 1, "ok": True, "released": got["claim"]["id"]}
        # SIGHUP re-reads the claimants: a key added there may connect and claim
        make_keypair(claimants, "late")
        (claimants / "late.key_secret").rename(keys / "late.key_secret")
        d.signal(signal.SIGHUP)
        d.wait_notify("RELOADING=1")
        d.wait_notify("READY=1")
        late = ClientCurve.load(keys / "late.key_secret", srv_pub)
        assert claim(d.req, PINNED, curve=late, timeout=10, ttl_s=60)["claimed"]
        # a missing claimants directory refuses the reload; the claimants stay
        for f in claimants.iterdir():
            f.unlink()
        claimants.rmdir()
        d.signal(signal.SIGHUP)
        d.wait_notify("READY=1")
        d.wait_log("claimants directory does not exist")
        assert claim(d.req, PINNED, curve=sched, timeout=10, ttl_s=60)["claimed"]
    finally:
        d.close()


# --------------------------------------------------------------------------- the CLI


def test_claim_and_release_commands(agent: DaemonProc, tmp_path: Path) -> None:
    import subprocess
    import sys

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "hostagent.cli", *args],
                              capture_output=True, text=True, timeout=60)

    req = tmp_path / "req.json"
    req.write_text(json.dumps(PINNED))
    out = cli("claim", "--endpoint", agent.req, "--request", str(req), "--ttl", "30",
              "--claimant", "cli")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("claimed claim-") and " for cli\n" in out.stdout
    assert "libvirt XML fragments:" in out.stdout and "hostagent:claim id=" in out.stdout
    claim_id = out.stdout.split()[1]
    out = cli("claim", "--endpoint", agent.req, "--request", str(req), "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["claimed"] is True
    big = tmp_path / "big.json"
    big.write_text(json.dumps({"vcpus": 200, "memory_mb": 1024,
                               "extra_specs": {"hw:cpu_policy": "dedicated"}}))
    out = cli("claim", "--endpoint", agent.req, "--request", str(big))
    assert out.returncode == 1 and out.stdout.startswith("not claimed:")
    out = cli("claim", "--endpoint", agent.req, "--request", str(req), "--ttl", "0")
    assert out.returncode == 2
    assert out.stderr.startswith("hostagent: ") and "ttl_s=0.0: must be between" in out.stderr
    out = cli("release", "--endpoint", agent.req, claim_id)
    assert out.returncode == 0 and out.stdout == f"released {claim_id}\n"
    out = cli("release", "--endpoint", agent.req, claim_id)
    assert out.returncode == 2 and "no outstanding claim" in out.stderr
