"""A scheduler that hears its fleet only through a forwarder survives a forwarder restart
in the middle of placing (issue 15): claims go to each host's advertised request
endpoint, not through the forwarder, so placing goes on while the forwarder is down
(a refused claim refreshes that host from its agent), and once the forwarder is back the
scheduler's index holds every host's newest snapshot again.
"""

from __future__ import annotations

import contextlib
import time

from claim_helpers import boot_xml, snapshot, wait_snapshot
from daemon_helpers import DaemonProc
from forward_helpers import ForwardProc

from hostagent.fleet import Fleet, feed, place_and_claim
from hostagent.subscriber import Subscriber, request

HOSTS = ("ffa", "ffb")
#: vm-1s-nosmt with CPUs 1-3 dedicated: room for 3 guests of PINNED1 per host
PINNED1 = {"vcpus": 1, "memory_mb": 256, "extra_specs": {"hw:cpu_policy": "dedicated"}}
PER_HOST = 3


def advertising_agent(name: str) -> DaemonProc:
    """A vm-1s-nosmt agent named ``name`` advertising its request endpoint."""
    d = DaemonProc("vm-1s-nosmt", dedicated="1-3", start=False)
    d.config.write_text(d.config.read_text().replace(
        'name = "testhost"', f'name = "{name}"').replace(
        "max_message_bytes = 262144\n",
        f'max_message_bytes = 262144\nadvertise_request = "{d.req}"\n'))
    return d


def feed_until(sub: Subscriber, fleet: Fleet, pred, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {fleet.stats}"
        feed(sub, fleet, timeout=0.2)


def place_and_boot(sub: Subscriber, fleet: Fleet, guest: str) -> str:
    """Place ``guest`` with place_and_claim and boot it from the claim's XML; its host."""
    feed(sub, fleet, timeout=0)
    got = place_and_claim(fleet, PINNED1, weigher="pack", claimant="sched", ttl_s=600,
                          timeout=20.0)
    assert got is not None, (guest, fleet.stats)
    rep = request(got.endpoint, {"op": "test-domain", "action": "create",
                                 "xml": boot_xml(got.claim, guest, PINNED1["memory_mb"])},
                  timeout=30.0)
    assert rep["ok"], rep
    return got.host


def test_forwarder_restart_mid_placement(tmp_path):
    """Two agents → forwarder → an in-process scheduler; 2 guests placed, the forwarder
    stopped, 2 placed while it is down, it starts again on the same endpoint, the fleet
    catches up with both hosts' newest snapshots, the last 2 fill the fleet. No conflict,
    no claim left, every claim at the advertised endpoint. (> 2 s: two agents, a
    forwarder started twice, six boots.)"""
    with contextlib.ExitStack() as stack:
        agents = {h: advertising_agent(h) for h in HOSTS}
        for d in agents.values():
            stack.callback(d.close)
        fwd = ForwardProc([d.stream for d in agents.values()])
        stack.callback(fwd.close)
        fwd.start()
        for d in agents.values():
            d.start()
        for d in agents.values():
            d.wait_notify("READY=1")
        fleet = Fleet()
        sub = stack.enter_context(Subscriber([fwd.stream], dead_after=60.0))
        feed_until(sub, fleet, lambda: set(fleet.hosts()) == set(HOSTS), "both hosts")

        placed = [place_and_boot(sub, fleet, f"g{i}") for i in range(2)]
        assert fwd.stop() == 0, fwd.log_text()
        placed += [place_and_boot(sub, fleet, f"g{i}") for i in range(2, 4)]
        fwd.start()
        newest = {h: snapshot(d)["seq"] for h, d in agents.items()}
        feed_until(sub, fleet, lambda: all(
            h in fleet.entries and fleet.entries[h].seq >= newest[h] for h in HOSTS),
            "the newest snapshots through the restarted forwarder")
        placed += [place_and_boot(sub, fleet, f"g{i}") for i in range(4, 6)]
        assert sorted(placed) == sorted(HOSTS * PER_HOST), placed
        feed(sub, fleet, timeout=0)
        assert place_and_claim(fleet, PINNED1, claimant="sched", timeout=20.0) is None

        for h, d in agents.items():
            snap = wait_snapshot(d, lambda s: len(s["usage"]["guests"]) == PER_HOST
                                 and not s["usage"]["claims"])
            bad = [c for c in snap["usage"]["conflicts"]
                   if c["kind"] in ("dedicated_overlap", "claim_mismatch")]
            assert bad == [], (h, bad)
        assert sub.stats["bad_messages"] == 0
        assert fwd.stop() == 0, fwd.log_text()
