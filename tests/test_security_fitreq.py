"""Hostile fit requests: every field bounded by what a host can have, a deterministic step
budget for the search, and requests served concurrently (snapshot answered while a fit
runs). The daemon tests use a real agent process and real DEALER sockets."""

from __future__ import annotations

import asyncio
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
import zmq
import zmq.asyncio
from fit_hosts import make_snapshot, make_topology
from zmq_helpers import run, running_publisher, snapshot_data

from hostagent import resctrl, wire
from hostagent.errors import HostagentError, RequestError
from hostagent.fit import fit, parse_request

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "sysfs"
HUGE = "99999999999999999999"  # 20 digits: above 2**64
DED = {"hw:cpu_policy": "dedicated"}


def r(vcpus: Any = 4, memory_mb: Any = 4096, image: dict[str, Any] | None = None,
      **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"vcpus": vcpus, "memory_mb": memory_mb, "extra_specs": extra}
    if image is not None:
        out["image_properties"] = image
    return out


def refused(request: Any) -> tuple[str, int]:
    """(message, peak bytes traced while parsing) of a request that must be refused."""
    tracemalloc.start()
    try:
        with pytest.raises(RequestError) as info:
            parse_request(request)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return str(info.value), peak


# -- (a) every request field is bounded ----------------------------------------------

# (request, substrings the one-line error must contain: field, value, limit)
OVER_LIMITS = [
    ({"vcpus": 10_000_000, "memory_mb": 1, "extra_specs": DED},
     ["request vcpus=10000000", "at most 8192"]),
    ({"vcpus": 2**64 - 1, "memory_mb": 1, "extra_specs": DED},
     ["request vcpus=18446744073709551615", "at most 8192"]),
    ({"vcpus": 8193, "memory_mb": 1}, ["request vcpus=8193", "at most 8192"]),
    ({"vcpus": 1, "memory_mb": 2**64 - 1},
     ["request memory_mb=18446744073709551615", "at most 4294967296"]),
    ({"vcpus": 1, "memory_mb": 2**32 + 1}, ["memory_mb=4294967297", "at most 4294967296"]),
    (r(**{"hw:numa_nodes": HUGE}), ["hw:numa_nodes='" + HUGE, "between 1 and 128"]),
    (r(**{"hw:numa_nodes": 2**64 - 1}),
     ["hw:numa_nodes='18446744073709551615'", "between 1 and 128"]),
    (r(2, 2, **{"hw:numa_nodes": "1", "hw:numa_cpus.0": "0-1", "hw:numa_mem.0": HUGE}),
     ["hw:numa_mem.0='" + HUGE, "at most 4294967296"]),
    (r(4, 2, **{"hw:numa_nodes": "1", "hw:numa_cpus.0": "0-30000000", "hw:numa_mem.0": "2"}),
     ["hw:numa_cpus.0='0-30000000'", "vCPU 30000000 is beyond the last vCPU 3"]),
    (r(4, 2, **{"hw:numa_nodes": "1", "hw:numa_cpus.0": "^0-30000000,1",
                "hw:numa_mem.0": "2"}),
     ["hw:numa_cpus.0='^0-30000000,1'", "beyond the last vCPU 3"]),
    (r(**{"hw:numa_nodes": "1", "hw:numa_cpus." + "9" * 300: "0", "hw:numa_mem.0": "1"}),
     ["hw:numa_cpus.999", "at most 255 characters"]),
    (r(**{"hw:cpu_sockets": HUGE}), ["hw:cpu_sockets='" + HUGE, "at most 8192"]),
    (r(**{"hw:cpu_cores": "8193"}), ["hw:cpu_cores='8193'", "at most 8192"]),
    (r(**{"hw:cpu_threads": HUGE}), ["hw:cpu_threads", "at most 8192"]),
    (r(**{"hw:cpu_max_sockets": HUGE}), ["hw:cpu_max_sockets", "at most 8192"]),
    (r(**{"hw:cpu_max_cores": HUGE}), ["hw:cpu_max_cores", "at most 8192"]),
    (r(**{"hw:cpu_max_threads": HUGE}), ["hw:cpu_max_threads", "at most 8192"]),
    (r(image={"hw_cpu_threads": HUGE}), ["image_properties hw_cpu_threads", "at most 8192"]),
    (r(image={"hw_cpu_max_sockets": HUGE}), ["hw_cpu_max_sockets", "at most 8192"]),
    (r(image={"hw_numa_nodes": HUGE}), ["image_properties hw_numa_nodes", "and 128"]),
    (r(**{"hw:mem_page_size": "1TB"}), ["hw:mem_page_size='1TB'", "at most 16 GiB"]),
    (r(**{"hw:mem_page_size": HUGE + "GB"}), ["hw:mem_page_size", "at most 16 GiB"]),
    (r(**{"hw:mem_page_size": HUGE}), ["hw:mem_page_size", "at most 16 GiB"]),
    (r(**{"hw:mem_page_size": "any"}, image={"hw_mem_page_size": "32GB"}),
     ["image_properties hw_mem_page_size='32GB'", "at most 16 GiB"]),
    (r(**{"hw:pci_devices": "8086:154d:" + HUGE}),
     ["hw:pci_devices", "the count", "at most 65536"]),
    (r(**{"hw:pci_devices": "8086:154d:65537"}), ["hw:pci_devices", "at most 65536"]),
    (r(**{"resources:PCPU": HUGE}), ["resources:PCPU='" + HUGE, "at most 8193"]),
    (r(**{"resources:VCPU": HUGE}), ["resources:VCPU='" + HUGE, "at most 8192"]),
    (r(**DED, **{"hw:cpu_realtime": "yes", "hw:emulator_threads_policy": "share",
                 "hw:cpu_realtime_mask": "^0-" + HUGE}),
     ["hw:cpu_realtime_mask", "beyond the last vCPU 3"]),
    (r(**{"hw:cpu_policy": "mixed", "hw:cpu_dedicated_mask": "0-" + HUGE}),
     ["hw:cpu_dedicated_mask", "beyond the last vCPU 3"]),
    (r(**DED, **{"hw:cache_reservation": f"vcpus=0-{HUGE}:type=both,size=2mb"}),
     ["hw:cache_reservation", "beyond the last vCPU 3"]),
    (r(**DED, **{"hw:cache_reservation": "vcpus=0:type=both,size=2mb;" * 200}),
     ["hw:cache_reservation", "at most 4096 characters"]),
    # strings: key length, value length, number of keys, in both dicts
    (r(**{"quota:" + "x" * 300: "1"}), ["extra_specs quota:xxxx", "at most 255 characters"]),
    (r(**{"quota:cpu_shares": "1" * 5000}),
     ["extra_specs quota:cpu_shares", "5000 characters", "at most 4096"]),
    (r(image={"os_distro": "x" * 4097}), ["image_properties os_distro", "at most 4096"]),
    (r(**{f"quota:k{i}": "1" for i in range(600)}),
     ["extra_specs", "600 keys", "at most 512"]),
    (r(image={f"p{i}": "1" for i in range(513)}), ["image_properties", "513 keys"]),
    # integers given as values: above 64 bits, or too long to turn into text at all
    (r(**{"hw:numa_nodes": 10**5000}), ["extra_specs hw:numa_nodes", "64 bits"]),
    (r(**{"quota:x": -(2**70)}), ["extra_specs quota:x", "64 bits"]),
]


@pytest.mark.parametrize("request_,parts", OVER_LIMITS,
                         ids=[f"over{i}" for i in range(len(OVER_LIMITS))])
def test_every_field_is_bounded_and_refused_early(request_, parts):
    message, peak = refused(request_)
    for part in parts:
        assert part in message, message
    assert "\n" not in message and len(message) < 400, message
    assert peak < 4 * 1024 * 1024, f"parsing used {peak} bytes"


# wrong types and signs: refused cleanly (most were already; these keep them so)
WRONG = [
    ({"vcpus": -1, "memory_mb": 1}, "request vcpus=-1: must be an integer >= 1"),
    ({"vcpus": -(2**63), "memory_mb": 1}, "must be an integer >= 1"),
    ({"vcpus": 4.0, "memory_mb": 1}, "request vcpus=4.0: must be an integer >= 1"),
    ({"vcpus": float("nan"), "memory_mb": 1}, "request vcpus=nan"),
    ({"vcpus": True, "memory_mb": 1}, "request vcpus=True"),
    ({"vcpus": 1, "memory_mb": False}, "request memory_mb=False"),
    ({"vcpus": 1, "memory_mb": -5}, "request memory_mb=-5"),
    ({"vcpus": 1, "memory_mb": 1e300}, "request memory_mb=1e+300"),
    ({"vcpus": "4", "memory_mb": 1}, "request vcpus='4'"),
    ({"vcpus": None, "memory_mb": 1}, "request vcpus=None"),
    (r(**{"hw:numa_nodes": "-2"}), "hw:numa_nodes='-2': must be an integer"),
    (r(**{"hw:numa_nodes": 2.0}), "hw:numa_nodes=2.0: values must be strings"),
    (r(**{"hw:numa_nodes": True}), "hw:numa_nodes='true': must be an integer"),
    (r(**{"hw:cpu_sockets": "1e3"}), "hw:cpu_sockets='1e3': must be an integer"),
    (r(**{"hw:mem_page_size": "-2MB"}), "hw:mem_page_size='-2MB'"),
    (r(**{"hw:mem_page_size": "0"}), "hw:mem_page_size='0'"),
    (r(**{"hw:numa_nodes": [1]}), "values must be strings"),
    ({"vcpus": 1, "memory_mb": 1, "extra_specs": [1]}, "request extra_specs=[1]"),
]


@pytest.mark.parametrize("request_,part", WRONG, ids=[f"wrong{i}" for i in range(len(WRONG))])
def test_wrong_types_and_signs_are_refused(request_, part):
    message, _ = refused(request_)
    assert part in message, message


def test_limits_are_named_constants():
    from hostagent import fit_limits as limits

    assert limits.MAX_VCPUS == 8192 and limits.MAX_MEMORY_MB == 1 << 32
    assert limits.MAX_GUEST_CELLS == 128 and limits.MAX_PAGE_SIZE_KIB == 16 << 20
    assert limits.MAX_PCI_DEVICES == 65536 and limits.MAX_SPEC_KEYS == 512
    assert limits.MAX_KEY_CHARS == 255 and limits.MAX_VALUE_CHARS == 4096


def test_largest_valid_values_are_accepted():
    big = parse_request({"vcpus": 8192, "memory_mb": 1 << 32, "extra_specs": {
        "hw:cpu_policy": "dedicated", "hw:numa_nodes": "128", "hw:mem_page_size": "16GB",
        "hw:cpu_max_sockets": "8192", "hw:pci_devices": "8086:154d:65536"}})
    assert big.vcpus == 8192 and len(big.cells) == 128 and big.page_size == 16 << 20
    assert big.pci[0].count == 65536


def test_more_vcpus_than_the_host_has_is_a_fast_no():
    """8192 pinned vCPUs on a 16-thread host: a plain 'does not fit', small structures."""
    snap = make_snapshot(make_topology())
    tracemalloc.start()
    try:
        answer = fit(snap, {"vcpus": 8192, "memory_mb": 1, "extra_specs": DED})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert answer["fits"] is False
    assert {x["resource"] for x in answer["reasons"]} == {"dedicated_threads"}
    assert peak < 8 * 1024 * 1024, peak



# -- the fit command line: the same bounds, a bounded request file --------------------

@pytest.mark.parametrize("text,message", [
    ('{"vcpus": 10000000, "memory_mb": 1, "extra_specs": {"hw:cpu_policy": "dedicated"}}',
     "request vcpus=10000000: must be an integer >= 1 and at most 8192 (no host has more "
     "CPUs)"),
    ('{"vcpus": 18446744073709551615, "memory_mb": 1}',
     "request vcpus=18446744073709551615: must be an integer >= 1 and at most 8192"),
    ('{"vcpus": ' + "9" * 5000 + ', "memory_mb": 1}', "not JSON (Exceeds the limit"),
    ("[" * 60_000, "not JSON (nested too deep)"),
    ('{"vcpus": 1, "memory_mb": 1, "extra_specs": {"quota:x": "' + "x" * 70_000 + '"}}',
     "longer than 65536 characters (the limit for a request, as over the wire)"),
])
def test_fit_cli_refuses_hostile_request_files_with_exit_2(tmp_path, capsys, text, message):
    import json

    from hostagent.cli import main

    snap = tmp_path / "s.json"
    snap.write_text(json.dumps(make_snapshot(make_topology())))
    req = tmp_path / "r.json"
    req.write_text(text)
    assert main(["fit", "--snapshot", str(snap), "--request", str(req)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hostagent: ") and message in err and err.count("\n") == 1, err

# -- the step budget -----------------------------------------------------------------

def big448_snapshot() -> dict[str, Any]:
    from hostagent.config import Config, ResourcesConfig
    from hostagent.probe.host import probe_host
    from hostagent.snapshot import build_snapshot

    base = FIXTURES / "big-448" / "sys"
    topo = probe_host(base, base / "fs" / "resctrl")
    dedicated = tuple(c.id for c in topo.cpus if c.online and c.core >= 2)
    cfg = Config(resources=ResourcesConfig(dedicated_cpus=dedicated))
    return build_snapshot(topo, cfg, [], host="h", epoch="e", seq=1, now=0.0)


def expensive_request() -> dict[str, Any]:
    """8 guest cells on big-448's 8 cells, each vCPU reserving 3 of the 15 L3 ways. Each
    guest cell fits every host cell alone (4+ contiguous free ways), but every full
    placement puts two guest cells on each socket's L3 and two 3-way reservations do not
    fit in 4 free ways (three of the four sockets): every leaf fails, the search is
    exhausted."""
    groups = ";".join(f"vcpus={i}:type=both,size=21mb" for i in range(8))
    return {"vcpus": 8, "memory_mb": 8192, "extra_specs": {
        "hw:cpu_policy": "dedicated", "hw:numa_nodes": "8", "hw:cache_reservation": groups}}


def test_search_budget_bounds_the_work_and_says_so(monkeypatch):
    from hostagent.fit.place import STEP_BUDGET

    calls = []
    real = resctrl.plan_reservation

    def counting(*args: Any, **kw: Any) -> Any:
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(resctrl, "plan_reservation", counting)
    snap = big448_snapshot()
    answer = fit(snap, expensive_request())
    assert answer["fits"] is False
    search = [x for x in answer["reasons"] if x["resource"] == "search"]
    assert len(search) == 1, answer["reasons"]
    assert search[0]["message"] == (
        f"search budget exhausted: {STEP_BUDGET} steps ([fit] search_steps) without a "
        "placement")
    # each planner call costs at least one step: the work is bounded by the budget
    assert len(calls) <= STEP_BUDGET + 64  # + the per-pair checks before the search
    # deterministic: the same budget gives the same answer
    assert fit(snap, expensive_request()) == answer


def test_search_budget_is_a_parameter():
    snap = big448_snapshot()
    answer = fit(snap, expensive_request(), search_steps=50)
    assert answer["reasons"][-1]["message"] == (
        "search budget exhausted: 50 steps ([fit] search_steps) without a placement")
    with pytest.raises(RequestError, match="search_steps=0: must be an integer >= 1"):
        fit(snap, expensive_request(), search_steps=0)
    # a placement that needs few steps is unaffected by a small budget
    ok = fit(snap, {"vcpus": 8, "memory_mb": 8192, "extra_specs": {
        "hw:cpu_policy": "dedicated", "hw:numa_nodes": "8"}}, search_steps=16)
    assert ok["fits"] is True


def test_search_steps_config_option(tmp_path):
    from hostagent.config import load_config
    from hostagent.fit.place import STEP_BUDGET

    path = tmp_path / "c.toml"
    path.write_text("[fit]\nsearch_steps = 300\n")
    assert load_config(path).fit.search_steps == 300
    path.write_text("# defaults\n")
    assert load_config(path).fit.search_steps == STEP_BUDGET
    for bad in ("0", "-1", "1.5", '"many"', "true", str(10**9)):
        path.write_text(f"[fit]\nsearch_steps = {bad}\n")
        with pytest.raises(HostagentError, match="search_steps"):
            load_config(path)


# -- (c) requests are served concurrently: the publisher -------------------------------

async def _dealer(ctx: Any, tmp: Path) -> Any:
    s = ctx.socket(zmq.DEALER)
    s.linger = 0
    s.connect(f"ipc://{tmp}/request")
    return s


async def _reply(sock: Any, timeout: float = 10.0) -> dict[str, Any]:
    return wire.decode_reply((await asyncio.wait_for(sock.recv_multipart(), timeout))[-1])


def test_snapshot_is_answered_while_a_handler_is_in_flight(tmp_path):
    from hostagent.publisher import MAX_REQUESTS_IN_FLIGHT

    async def main():
        async with running_publisher(tmp_path, heartbeat_seconds=30) as pub:
            await pub.publish(snapshot_data(1))
            release = asyncio.Event()
            entered: list[int] = []
            all_in = asyncio.Event()

            async def slow(req: dict[str, Any]) -> dict[str, Any]:
                entered.append(req["n"])
                if len(entered) == MAX_REQUESTS_IN_FLIGHT:
                    all_in.set()
                await release.wait()
                return {"n": req["n"]}

            pub.register("slow", slow)
            ctx = pub.ctx
            slow_socks = [await _dealer(ctx, tmp_path) for _ in range(MAX_REQUESTS_IN_FLIGHT)]
            for n, s in enumerate(slow_socks):
                await s.send(wire.pack({"op": "slow", "n": n}))
            await asyncio.wait_for(all_in.wait(), 10)
            # every handler slot is taken: a snapshot is still answered at once
            snap = await _dealer(ctx, tmp_path)
            await snap.send(wire.pack({"op": "snapshot"}))
            rep = await _reply(snap)
            assert rep["ok"] and rep["seq"] == 1
            # one more handler request is refused, not queued
            extra = await _dealer(ctx, tmp_path)
            await extra.send(wire.pack({"op": "slow", "n": 99}))
            busy = await _reply(extra)
            assert busy == {"v": 1, "ok": False, "error":
                            f"busy: {MAX_REQUESTS_IN_FLIGHT} requests in flight (the limit); "
                            "retry later"}
            assert pub.stats["busy_requests"] == 1
            for s in slow_socks:
                assert not await s.poll(0)  # still waiting: nothing was answered for them
            release.set()
            got = sorted([(await _reply(s))["n"] for s in slow_socks])
            assert got == list(range(MAX_REQUESTS_IN_FLIGHT))
            # the slots are free again
            await extra.send(wire.pack({"op": "slow", "n": 7}))
            assert (await _reply(extra)) == {"v": 1, "ok": True, "n": 7}
            for s in [*slow_socks, snap, extra]:
                s.close()

    run(main())


def test_replies_on_one_dealer_come_as_requests_finish(tmp_path):
    """One DEALER: a slow request, then a snapshot; the snapshot's reply comes first."""
    async def main():
        async with running_publisher(tmp_path, heartbeat_seconds=30) as pub:
            await pub.publish(snapshot_data(1))
            release = asyncio.Event()

            async def slow(req: dict[str, Any]) -> dict[str, Any]:
                await release.wait()
                return {"done": True}

            pub.register("slow", slow)
            s = await _dealer(pub.ctx, tmp_path)
            await s.send(wire.pack({"op": "slow"}))
            await s.send(wire.pack({"op": "snapshot"}))
            first = await _reply(s)
            assert first["ok"] and first["kind"] == "snapshot"
            release.set()
            assert (await _reply(s)) == {"v": 1, "ok": True, "done": True}
            s.close()

    run(main())


def test_answer_api_still_gives_the_reply_frames(tmp_path):
    async def main():
        async with running_publisher(tmp_path, heartbeat_seconds=30) as pub:
            await pub.publish(snapshot_data(1))
            frames = await pub.answer([b"id", wire.pack({"op": "snapshot"})])
            assert frames is not None and frames[0] == b"id"
            assert wire.decode_reply(frames[1])["seq"] == 1

    run(main())


# -- (b), (c): a real agent process, real DEALER sockets --------------------------------

# big-448: cores 0-1 of every socket shared, the rest dedicated
BIG_DEDICATED = "2-55,58-111,114-167,170-223,226-279,282-335,338-391,394-447"
AGENT_SEARCH_STEPS = 20000


def vm_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def agent448():
    from daemon_helpers import DaemonProc

    d = DaemonProc("big-448", dedicated=BIG_DEDICATED,
                   extra=f"\n[fit]\nsearch_steps = {AGENT_SEARCH_STEPS}\n")
    try:
        d.wait_notify("READY=1", timeout=60)
        yield d
        assert d.stop(timeout=60) == 0, d.log_text()
    finally:
        d.close()


HOSTILE = [
    # the two requests
    ({"vcpus": 10_000_000, "memory_mb": 1, "extra_specs": DED}, "vcpus=10000000"),
    ({"vcpus": 2**64 - 1, "memory_mb": 1, "extra_specs": DED}, "vcpus=18446744073709551615"),
    ({"vcpus": -(2**63), "memory_mb": 1}, "vcpus=-9223372036854775808"),
    ({"vcpus": 1e300, "memory_mb": 1}, "vcpus=1e+300"),
    ({"vcpus": 1, "memory_mb": 2**64 - 1}, "memory_mb=18446744073709551615"),
    (r(4, 2, **{"hw:numa_nodes": "1", "hw:numa_cpus.0": "0-300000000", "hw:numa_mem.0": "2"}),
     "hw:numa_cpus.0"),
    (r(**{"hw:mem_page_size": "1TB"}), "hw:mem_page_size"),
    (r(**{"hw:pci_devices": "8086:154d:" + HUGE}), "hw:pci_devices"),
    (r(**{"quota:x": "x" * 40000}), "quota:x"),
]
# valid but far beyond any host: a plain "does not fit", fast
TOO_BIG_FOR_THE_HOST = [
    ({"vcpus": 8192, "memory_mb": 1, "extra_specs": DED}, "dedicated_threads"),
    ({"vcpus": 8192, "memory_mb": 1}, "shared_threads"),
    ({"vcpus": 1, "memory_mb": 1 << 32, "extra_specs": DED}, "memory"),
    ({"vcpus": 8192, "memory_mb": 8192, "extra_specs": {
        **DED, "hw:numa_nodes": "128", "hw:cpu_thread_policy": "isolate"}}, "cells"),
]


def test_hostile_fit_requests_over_the_wire(agent448):
    pid = agent448.proc.pid
    warm = agent448.request({"op": "fit", "request": {"vcpus": 2, "memory_mb": 512}},
                            timeout=60)
    assert warm["ok"] and warm["result"]["fits"], warm
    before = vm_rss_kib(pid)
    for req, field in HOSTILE:
        rep = agent448.request({"op": "fit", "request": req}, timeout=60)
        assert rep["ok"] is False and field in rep["error"], (req, rep)
        assert "\n" not in rep["error"] and len(rep["error"]) < 400, rep["error"]
    for req, resource in TOO_BIG_FOR_THE_HOST:
        rep = agent448.request({"op": "fit", "request": req}, timeout=60)
        assert rep["ok"] and rep["result"]["fits"] is False, rep
        assert resource in {x["resource"] for x in rep["result"]["reasons"]}, rep
    after = vm_rss_kib(pid)
    assert after < before + 30 * 1024, (before, after)
    assert agent448.request({"op": "snapshot"}, timeout=60)["ok"]
    assert agent448.proc.poll() is None


def test_fit_op_fields_are_quoted_short_and_never_an_internal_error(agent448):
    rep = agent448.request({"op": "fit", "request": {"vcpus": 1, "memory_mb": 1},
                            "strategy": "x" * 60_000}, timeout=60)
    assert rep["ok"] is False and rep["error"].startswith("op fit: strategy='xxx")
    assert "(60000 characters): must be one of spread, pack" in rep["error"]
    assert len(rep["error"]) < 300
    rep = agent448.request({"op": "fit", "request": {"vcpus": 1, "memory_mb": 1},
                            b"k": 1, "z": 2}, timeout=60)
    assert rep == {"v": 1, "ok": False, "error": "op fit: unknown fields [\"b'k'\", 'z'] "
                                                 "(known: request, strategy)"}


def test_snapshot_is_answered_while_a_fit_runs(agent448):
    """A fit that exhausts its search budget (AGENT_SEARCH_STEPS) runs in a thread; a
    snapshot asked after it is answered before it."""
    ctx = zmq.Context.instance()
    socks = {}
    for name in ("fit", "snapshot"):
        s = ctx.socket(zmq.DEALER)
        s.linger = 0
        s.connect(agent448.req)
        socks[name] = s
    try:
        socks["fit"].send(wire.pack({"op": "fit", "request": expensive_request()}))
        socks["snapshot"].send(wire.pack({"op": "snapshot"}))
        poller = zmq.Poller()
        for s in socks.values():
            poller.register(s, zmq.POLLIN)
        order: list[str] = []
        replies: dict[str, dict[str, Any]] = {}
        for _ in range(2):
            ready = dict(poller.poll(120_000))
            assert ready, "no reply within 120 s"
            for name, s in socks.items():
                if s in ready and name not in replies:
                    replies[name] = wire.decode_reply(s.recv())
                    order.append(name)
                    poller.unregister(s)
            if len(replies) == 2:
                break
        assert order == ["snapshot", "fit"], order
        assert replies["snapshot"]["ok"] and replies["snapshot"]["kind"] == "snapshot"
        result = replies["fit"]["result"]
        assert result["fits"] is False
        assert result["reasons"][-1] == {
            "host_cell": None, "guest_cell": None, "resource": "search",
            "message": f"search budget exhausted: {AGENT_SEARCH_STEPS} steps ([fit] "
                       "search_steps) without a placement"}
    finally:
        for s in socks.values():
            s.close(linger=0)
