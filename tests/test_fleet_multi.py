"""The whole path, real: 20 agents of four shapes → one forwarder (``hostagent forward``)
→ 3 scheduler processes placing 300 guests concurrently with place_and_claim → each
guest booted from its claim's XML through the test-domain op (libvirt's test:/// driver).

The schedulers hear the agents only through the forwarder: their one source is its
stream, without a request endpoint. Half the agents are the forwarder's ``upstream``
(it connects to them), the other half connect to its ``listen`` (``[publisher]
forward_to``). Every agent advertises its request endpoint (``[publisher]
advertise_request`` → ``agent.request_endpoint``), which is where each claim is made
and each guest booted.

Afterwards: no ``dedicated_overlap`` / ``claim_mismatch`` conflict on any agent, no claim
left (each was consumed by its guest), every guest holds exactly the threads its claim
placed it on, and the 150 guests placed with ``pack`` sit on few hosts while the 150
placed next with ``spread`` go first to the hosts pack left empty. The forwarder dropped
nothing (``bad_messages`` 0) and exits cleanly.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from claim_helpers import snapshot
from daemon_helpers import DaemonProc
from forward_helpers import ForwardProc

HERE = Path(__file__).resolve().parent
PINNED2 = {"vcpus": 2, "memory_mb": 1024, "extra_specs": {"hw:cpu_policy": "dedicated"}}
# (fixture, dedicated threads, agents): 40 + 40 + 60 + 3 dedicated threads per host,
# room for 20, 20, 30 and 1 guests of PINNED2
CAPACITY = {"xeon-2s-cat": 20, "xeon-2s-cdp": 20, "epyc-amd": 30, "vm-1s-nosmt": 1}
SHAPES = [("xeon-2s-cat", "2-11,14-23,26-35,38-47", 8),
          ("xeon-2s-cdp", "2-11,14-23,26-35,38-47", 4),
          ("epyc-amd", "2-31,34-63", 4),
          ("vm-1s-nosmt", "1-3", 4)]
SCHEDULERS = 3
PER_PHASE = 150


def start_fleet(stack: contextlib.ExitStack) -> tuple[dict[str, DaemonProc], ForwardProc]:
    """The agents and the one forwarder they are heard through, all started: agents of
    even index are the forwarder's upstream, the odd ones connect to its listen."""
    agents: dict[str, DaemonProc] = {}
    for fixture, dedicated, n in SHAPES:
        for i in range(n):
            name = f"{fixture}-{i}"
            d = DaemonProc(fixture, dedicated=dedicated, start=False, heartbeat=1.0)
            stack.callback(d.close)
            agents[name] = d
    upstream = [d for i, d in enumerate(agents.values()) if i % 2 == 0]
    fwd = ForwardProc([d.stream for d in upstream])
    stack.callback(fwd.close)
    listen = f"ipc://{fwd.dir}/listen"
    fwd.config.write_text(fwd.config.read_text().replace(
        'log_level = "debug"', f'log_level = "info"\nlisten = ["{listen}"]'))
    for name, d in agents.items():
        forward_to = "" if d in upstream else f'forward_to = ["{listen}"]\n'
        d.config.write_text(d.config.read_text().replace(
            'name = "testhost"', f'name = "{name}"').replace(
            'log_level = "debug"', 'log_level = "info"').replace(
            "max_message_bytes = 262144\n", "max_message_bytes = 262144\n"
            f'advertise_request = "{d.req}"\n{forward_to}'))
    fwd.start()
    for d in agents.values():
        d.start()
    for d in agents.values():
        d.wait_notify("READY=1", timeout=120)
    return agents, fwd


def run_phase(agents: dict[str, DaemonProc], fwd: ForwardProc, weigher: str, tmp: Path,
              tag: str) -> list[dict]:
    sources = json.dumps([fwd.stream])  # no request endpoint: claims go where advertised
    go = tmp / f"go-{tag}"
    outs, procs = [], []
    per = [PER_PHASE // SCHEDULERS + (i < PER_PHASE % SCHEDULERS) for i in range(SCHEDULERS)]
    for i in range(SCHEDULERS):
        out = tmp / f"{tag}-{i}.json"
        outs.append(out)
        procs.append(subprocess.Popen(
            [sys.executable, str(HERE / "fleet_scheduler.py"), sources, json.dumps(PINNED2),
             str(per[i]), weigher, f"{tag}{i}", str(go), str(out), str(len(agents))]))
    deadline = time.monotonic() + 180
    while not all(Path(str(o) + ".ready").exists() for o in outs):
        assert time.monotonic() < deadline, "schedulers did not gather the fleet"
        assert all(p.poll() is None for p in procs), "a scheduler exited early"
        time.sleep(0.05)
    go.write_text("go")
    results = []
    for out, p in zip(outs, procs, strict=True):
        try:
            assert p.wait(max(1.0, deadline + 300 - time.monotonic())) == 0
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise AssertionError("a scheduler did not finish") from None
        results += json.loads(out.read_text())["results"]
    return results


def test_three_schedulers_place_300_guests_on_20_agents_through_a_forwarder(tmp_path):
    """20 agents, one forwarder, 3 schedulers, 300 guests: 13-18 s wall measured on the
    shared 2-core machine (the variant connecting to every agent directly, which this one
    replaced, measured 9-65 s). > 2 s because the whole path is the point: 20 agent
    start-ups, 300 claims and boots, every snapshot through the forwarder to 3 schedulers."""
    with contextlib.ExitStack() as stack:
        agents, fwd = start_fleet(stack)
        packed = run_phase(agents, fwd, "pack", tmp_path, "p")
        assert len(packed) == PER_PHASE and all(r["booted"] for r in packed), packed[-1:]
        per_host_a = Counter(r["host"] for r in packed)
        spread = run_phase(agents, fwd, "spread", tmp_path, "s")
        assert len(spread) == PER_PHASE and all(r["booted"] for r in spread), spread[-1:]
        per_host_b = Counter(r["host"] for r in spread)

        # pack filled hosts to the brim and left whole hosts empty ...
        capacity = {h: CAPACITY[h.rsplit("-", 1)[0]] for h in agents}
        full_after_a = [h for h in agents if per_host_a[h] == capacity[h]]
        empty_after_a = [h for h in agents if per_host_a[h] == 0]
        assert len(full_after_a) >= 4 and len(empty_after_a) >= 6, per_host_a
        # ... which spread then used, evenly: every one got guests, and the 40-thread
        # hosts pack had not filled end within 4 guests of each other (3 schedulers
        # racing on views a few snapshots old)
        assert all(per_host_b[h] >= 1 for h in empty_after_a), (per_host_a, per_host_b)
        totals = [per_host_a[h] + per_host_b[h] for h in agents
                  if capacity[h] == 20 and per_host_a[h] < 20]
        assert len(totals) >= 6 and max(totals) - min(totals) <= 4, (per_host_a, per_host_b)

        # every claim was made at the host's advertised request endpoint
        assert all(r["endpoint"] == agents[r["host"]].req for r in packed + spread)
        by_guest = {r["guest"]: r for r in packed + spread}
        assert len({r["claim"] for r in by_guest.values()}) == 2 * PER_PHASE
        for name, d in agents.items():
            mine = {g: r for g, r in by_guest.items() if r["host"] == name}
            deadline = time.monotonic() + 60
            while True:  # the last boots reach the snapshot
                snap = snapshot(d)
                names = {g["name"] for g in snap["usage"]["guests"]}
                if set(mine) <= names and not snap["usage"]["claims"]:
                    break
                assert time.monotonic() < deadline, (name, set(mine) - names,
                                                     snap["usage"]["claims"])
                time.sleep(0.1)
            bad = [c for c in snap["usage"]["conflicts"]
                   if c["kind"] in ("dedicated_overlap", "claim_mismatch")]
            assert bad == [], (name, bad)
            taken: set[int] = set()
            dedicated = set(snap["config"]["dedicated_cpus"])
            cell_cpus = {c["id"]: set(c["cpus"]) for c in snap["topology"]["cells"]}
            for g in snap["usage"]["guests"]:
                [cell] = mine[g["name"]]["placement"]["cells"]
                placed = set(cell["pinning"].values())
                assert placed <= dedicated & cell_cpus[cell["host_cell"]], (name, cell)
                assert set(g["dedicated_cpus"]) == placed, (name, g["name"])
                assert not taken & placed
                taken |= placed
        refused = sum(json.loads((tmp_path / f"{t}-{i}.json").read_text())["stats"].get(
            "claim_refused", 0) for t in "ps" for i in range(SCHEDULERS))
        print(f"pack per host {sorted(per_host_a.values(), reverse=True)}; spread per host "
              f"{sorted(per_host_b.values(), reverse=True)}; refused claims {refused}")
        # the schedulers did race: pack sent them to the same hosts at the same time
        sched_per_host: dict[str, set[str]] = {}
        for r in packed:
            sched_per_host.setdefault(r["host"], set()).add(r["guest"].split("-")[0])
        assert max(map(len, sched_per_host.values())) == SCHEDULERS, sched_per_host
        # the forwarder carried both kinds of agent and dropped nothing
        counters = fwd.dump()["forward"]["counters"]
        assert counters.get("bad_messages", 0) == 0, counters
        assert counters.get("bad_subscriptions", 0) == 0, counters
        assert counters["subscribes"] >= 2 * SCHEDULERS, counters
        assert fwd.stop() == 0, fwd.log_text()
