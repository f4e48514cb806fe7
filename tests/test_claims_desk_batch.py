"""How the claim desk (hostagent/agent/claim_desk.py) spends its time, on an asyncio loop
with the stand-in agent of tests/test_claims_desk.py: a small claim is decided on the
loop, a large one (or one whose short search runs out) in the desk's thread with the
whole step budget; claims decided while a write runs go out in one write and none is
answered before it is on disk; releases are written together, later, and at stop; the
agent's short thread switch interval."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from fit_hosts import flavor
from test_claims_desk import PINNED, StandIn, run

from hostagent import claims
from hostagent.agent import claim_desk
from hostagent.agent.claim_desk import ClaimDesk

TWO_CELLS = flavor(2, 256, cpu_policy="dedicated", numa_nodes=2)


def saved_ids(path: Path) -> set[str]:
    return {c["id"] for c in json.loads(path.read_text())["claims"]}


async def until(condition: Any, what: str, timeout: float = 30.0) -> None:
    """Wait (bounded) until ``condition()`` holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


def test_small_claims_are_decided_on_the_loop_and_others_in_the_desks_thread(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    agent = StandIn(tmp_path / "run")
    desk = ClaimDesk(agent)
    on_loop: list[bool] = []
    real = claims.prepare_claim

    def prepare(*args: Any, **kw: Any) -> claims.Prepared:
        on_loop.append(threading.current_thread() is threading.main_thread())
        return real(*args, **kw)

    monkeypatch.setattr(claims, "prepare_claim", prepare)

    async def main() -> list[dict[str, Any]]:
        try:
            small = await desk.op_claim({"op": "claim", "request": PINNED})
            monkeypatch.setattr(claim_desk, "INLINE_MAX_VCPUS", 1)
            large = await desk.op_claim({"op": "claim", "request": PINNED})
            monkeypatch.setattr(claim_desk, "INLINE_MAX_VCPUS", 64)
            # a search longer than the loop's share runs again, whole, in the thread
            monkeypatch.setattr(claim_desk, "INLINE_SEARCH_STEPS", 1)
            searched = await desk.op_claim({"op": "claim", "request": TWO_CELLS})
            return [small, large, searched]
        finally:
            desk.close()

    replies = run(main())
    assert [r["claimed"] for r in replies] == [True, True, True], replies
    assert on_loop == [True, False, True, False]
    assert desk.counters["inline"] == 1 and desk.counters["granted"] == 3
    assert agent.tracker.usage()["conflicts"] == []


def test_claims_decided_while_a_write_runs_share_the_next_write_and_wait_for_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    agent = StandIn(tmp_path / "run")
    desk = ClaimDesk(agent)
    path = tmp_path / "run" / "claims.json"
    writes: list[set[str]] = []
    first_running, go_on = threading.Event(), threading.Event()
    real = claims.save_claims

    def save(p: Any, text: str) -> None:
        writes.append({c["id"] for c in json.loads(text)["claims"]})
        if len(writes) == 1:
            first_running.set()
            assert go_on.wait(30)
        real(p, text)

    monkeypatch.setattr(claims, "save_claims", save)

    async def main() -> list[dict[str, Any]]:
        loop = asyncio.get_running_loop()
        try:
            first = asyncio.ensure_future(desk.op_claim({"op": "claim", "request": PINNED}))
            assert await loop.run_in_executor(None, first_running.wait, 30)
            others = [asyncio.ensure_future(desk.op_claim({"op": "claim", "request": PINNED}))
                      for _ in range(3)]
            await until(lambda: desk.counters["granted"] == 4, "the 3 grants")
            assert not any(t.done() for t in [first, *others])  # nothing on disk yet
            go_on.set()
            return await asyncio.gather(first, *others)
        finally:
            desk.close()

    replies = run(main())
    ids = [r["claim"]["id"] for r in replies]
    assert all(r["claimed"] for r in replies)
    assert writes == [{ids[0]}, set(ids)]  # one write for the three decided meanwhile
    assert saved_ids(path) == set(ids)


def test_releases_are_written_together_soon_after_and_at_stop(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    agent = StandIn(tmp_path / "run")
    desk = ClaimDesk(agent)
    path = tmp_path / "run" / "claims.json"
    writes: list[set[str]] = []
    real = claims.save_claims

    def save(p: Any, text: str) -> None:
        writes.append({c["id"] for c in json.loads(text)["claims"]})
        real(p, text)

    monkeypatch.setattr(claims, "save_claims", save)

    async def main() -> list[str]:
        ids = []
        for _ in range(4):
            ids.append((await desk.op_claim({"op": "claim", "request": PINNED}))["claim"]["id"])
        assert len(writes) == 4 and saved_ids(path) == set(ids)
        for claim_id in ids[:3]:
            await desk.op_release({"op": "release", "id": claim_id})
        assert len(writes) == 4  # answered before written
        await until(lambda: len(writes) == 5, "the releases' write")
        await asyncio.sleep(3 * claim_desk.DEFERRED_WRITE_SECONDS)
        assert writes[4] == {ids[3]} and len(writes) == 5  # one write for the three
        await desk.op_release({"op": "release", "id": ids[3]})
        desk.close()  # stopping: the release is written now
        return ids

    run(main())
    assert len(writes) == 6 and saved_ids(path) == set()


def test_the_agent_runs_with_a_short_thread_switch_interval(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The claims file's writer (a worker thread) gets the GIL back within 0.5 ms of each
    system call, not 5 ms, while the loop decides claims (docs/daemon.md §2)."""
    import sys

    from hostagent.agent import daemon

    class Started(Exception):
        pass

    seen: list[float] = []

    def agent(config_path: Any) -> None:
        seen.append(sys.getswitchinterval())
        raise Started

    monkeypatch.setattr(daemon, "Agent", agent)
    before = sys.getswitchinterval()
    try:
        with pytest.raises(Started):
            daemon.run_agent(None)
    finally:
        sys.setswitchinterval(before)
    assert seen == [daemon.GIL_SWITCH_SECONDS] and daemon.GIL_SWITCH_SECONDS <= 0.001
