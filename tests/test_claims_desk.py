"""The claim desk (hostagent/agent/claim_desk.py) on an asyncio loop with a stand-in for the
agent (the parts the desk uses: a real ClaimTracker, a Config, publisher seq/host):
a guest that takes the fitted placement while the fit runs in the desk's thread makes
the desk fit again (the check before the grant is on the loop, against that moment);
the outstanding and waiting limits; a grant that cannot be written is taken back."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest
from fit_hosts import flavor, make_topology

from hostagent import claims
from hostagent.agent import claim_desk
from hostagent.agent.claim_desk import ClaimDesk
from hostagent.config import config_from_dict, resolve_resources
from hostagent.errors import HostagentError
from hostagent.guests.source import record_from_xml
from hostagent.model import topology_to_dict

TOPO = make_topology(2, 4, 2, hugepages={2048: 512})
PINNED = flavor(2, 256, cpu_policy="dedicated")


class StandIn:
    """What ClaimDesk uses of hostagent.agent.daemon.Agent."""

    def __init__(self, runtime: Path) -> None:
        self.config = config_from_dict({"agent": {"runtime_dir": str(runtime)},
                                        "resources": {"dedicated_cpus": "0-15"}})
        self.resources = resolve_resources(self.config.resources, TOPO)
        self.tracker = claims.ClaimTracker(TOPO, self.resources)
        self.topology_doc = topology_to_dict(TOPO)
        self.epoch = "e"
        self.auth = None
        self.publisher = type("P", (), {"seq": 1, "host": "h"})()
        self.dirty = 0
        self.errors: list[tuple[str, str]] = []
        self.tasks: set[asyncio.Task[Any]] = set()

    def mark_dirty(self) -> None:
        self.dirty += 1

    def record_error(self, where: str, message: str) -> None:
        self.errors.append((where, message))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 60))


def guest_on(cpus: list[int], n: int = 1) -> Any:
    uuid = f"00000000-0000-0000-0000-{n:012d}"
    pins = "".join(f"<vcpupin vcpu='{v}' cpuset='{c}'/>" for v, c in enumerate(cpus))
    xml = (f"<domain type='kvm' id='{n}'><name>g{n}</name><uuid>{uuid}</uuid>"
           f"<memory>262144</memory><vcpu>{len(cpus)}</vcpu><cputune>{pins}"
           f"<emulatorpin cpuset='{cpus[0]}'/></cputune>"
           "</domain>")
    return record_from_xml(xml, uuid=uuid, name=f"g{n}")


def test_a_guest_taking_the_fitted_threads_during_the_fit_makes_the_desk_fit_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(claim_desk, "INLINE_MAX_VCPUS", 0)  # the fit in the desk's thread
    agent = StandIn(tmp_path / "run")
    desk = ClaimDesk(agent)
    real = claims.prepare_claim
    taken: list[int] = []

    async def main() -> dict[str, Any]:
        loop = asyncio.get_running_loop()

        def racing_prepare(*args: Any, **kw: Any) -> claims.Prepared:
            """The fit, then a guest starts on its threads before the desk checks."""
            out = real(*args, **kw)
            if not taken and out.record is not None:
                taken.extend(out.record.placement["cells"][0]["pinning"].values())
                done = threading.Event()

                def start_guest() -> None:
                    agent.tracker.update(guest_on(taken))
                    done.set()
                loop.call_soon_threadsafe(start_guest)
                assert done.wait(30)
            return out

        monkeypatch.setattr(claims, "prepare_claim", racing_prepare)
        try:
            return await desk.op_claim({"op": "claim", "request": PINNED})
        finally:
            desk.close()

    reply = run(main())
    assert reply["claimed"], reply
    got = set(reply["claim"]["placement"]["cells"][0]["pinning"].values())
    assert taken and not got & set(taken)
    assert desk.counters["refits"] == 1
    assert agent.tracker.usage()["conflicts"] == []


def test_outstanding_claims_are_bounded(tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(claim_desk, "MAX_CLAIMS", 2)
    agent = StandIn(tmp_path / "run")
    desk = ClaimDesk(agent)

    async def main() -> None:
        try:
            for _ in range(2):
                assert (await desk.op_claim({"op": "claim", "request": PINNED}))["claimed"]
            with pytest.raises(HostagentError, match=r"op claim: 2 claims outstanding, the "
                                                     r"limit \(MAX_CLAIMS\); release some"):
                await desk.op_claim({"op": "claim", "request": PINNED})
        finally:
            desk.close()

    run(main())
    assert len(agent.tracker.claim_records) == 2


def test_claim_requests_waiting_for_their_turn_are_bounded(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(claim_desk, "MAX_CLAIMS_WAITING", 2)
    agent = StandIn(tmp_path / "run")
    desk = ClaimDesk(agent)

    async def main() -> list[Any]:
        try:
            async with desk._lock:  # a decision under way: the next ones wait
                waiting = [asyncio.ensure_future(
                    desk.op_claim({"op": "claim", "request": PINNED})) for _ in range(2)]
                await asyncio.sleep(0.05)
                with pytest.raises(HostagentError, match="busy: 2 claim requests waiting "
                                                         r"\(the limit\); retry later"):
                    await desk.op_claim({"op": "claim", "request": PINNED})
            return await asyncio.gather(*waiting)
        finally:
            desk.close()

    replies = run(main())
    assert [r["claimed"] for r in replies] == [True, True]
    assert desk.counters["busy"] == 1


def test_a_grant_that_cannot_be_written_is_taken_back(tmp_path: Path) -> None:
    blocker = tmp_path / "run"
    blocker.write_text("a file where the runtime directory should be")
    agent = StandIn(blocker)
    desk = ClaimDesk(agent)

    async def main() -> None:
        try:
            with pytest.raises(HostagentError, match="op claim: not granted: cannot write the "
                                                     f"claims file {blocker}/claims.json"):
                await desk.op_claim({"op": "claim", "request": PINNED})
        finally:
            desk.close()

    run(main())
    assert agent.tracker.claim_records == {} and agent.tracker.usage()["claims"] == []
    assert agent.errors and agent.errors[0][0] == "claims"
