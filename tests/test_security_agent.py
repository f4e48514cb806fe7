"""After every attack on its sockets, the agent still serves and gives its memory back.

One real ``hostagent run`` process takes the whole battery (tests/attack_battery.py:
hostile fits, malformed requests, an oversized frame, multipart messages that never
end, subscription floods, peers that never read their replies). Afterwards it must
answer ``snapshot`` and ``fit`` as before, go on publishing to a subscriber that was
there all along, and its RSS must come back within 20 MB of where it was before the
attacks (docs/security.md). How fast it answers is measured by bench/attacks.py, not
asserted here.
"""

from __future__ import annotations

import json
import signal

import pytest
from attack_battery import run_battery
from daemon_helpers import guest_names, running_agent, wait_for
from libvirt_helpers import domain_xml
from test_security_zmq import MB, rss, settled_rss, wait_rss_below, wait_until

MAX_MESSAGE_BYTES = 262_144  # daemon_helpers' config


@pytest.fixture
def agent():
    with running_agent() as d:
        yield d


def test_after_every_attack_the_agent_answers_and_returns_its_memory(agent):
    d = agent
    fit = {"op": "fit", "request": {"vcpus": 2, "memory_mb": 512,
                                    "extra_specs": {"hw:cpu_policy": "dedicated"}}}
    before_fit = d.request(fit, timeout=30)
    assert before_fit["ok"] and before_fit["result"]["fits"], before_fit
    with d.subscriber() as sub:
        first = wait_for(sub, lambda s: True, timeout=30)
        baseline = settled_rss(d)

        got = run_battery(d.stream, d.req, max_message_bytes=MAX_MESSAGE_BYTES)

        for reply in got["hostile_fits"]:
            assert not reply["ok"] or not reply["result"]["fits"], reply
        assert not any(r["ok"] for r in got["malformed"]), got["malformed"]
        assert all("internal error" not in r.get("error", "") for r in
                   got["hostile_fits"] + got["malformed"])

        # it still answers, with the same placement as before the attacks
        snap = d.request({"op": "snapshot"}, timeout=30)
        assert snap["ok"] and snap["epoch"] == first["epoch"]
        after_fit = d.request(fit, timeout=30)
        assert after_fit["ok"] and after_fit["result"] == before_fit["result"]

        # the subscriber that was there all along still gets what the agent publishes
        xml = domain_xml("after-attacks", vcpupin={0: "2", 1: "3"})
        assert d.request({"op": "test-domain", "action": "create", "xml": xml},
                         timeout=30)["ok"]
        later = wait_for(sub, lambda s: "after-attacks" in guest_names(s), timeout=30)
        assert later["epoch"] == first["epoch"] and later["seq"] > first["seq"]

        # and it gives back what the attacks made it hold
        wait_rss_below(d, baseline + 20 * MB, "after the attacks", timeout=120)
    assert d.proc.poll() is None
    dump = d.dir / "run" / "hostagent-dump.json"
    d.signal(signal.SIGUSR1)
    wait_until(dump.exists, 30, "the debug dump", pause=0.05)
    counters = json.loads(dump.read_text())["publisher"]["counters"]
    assert counters["bad_requests"] >= len(got["malformed"]) - 2  # a few are op errors
    assert counters.get("internal_errors", 0) == 0
    assert rss(d.proc.pid) < baseline + 20 * MB
