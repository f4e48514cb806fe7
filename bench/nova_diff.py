"""bench/nova_diff: hostagent's fit against the real Nova's on random hosts and flavors.

Each case is a random small host (1-4 cells, 2-6 cores of 1, 2 or 4 threads, some cores
shared, some threads taken, hugepage pools partly used, sometimes a thread outside both CPU
sets) and a random flavor (policies, thread policies, placement-form keys, cells, page
sizes, image properties). Both fitters get the same input: hostagent the snapshot, Nova
(``bench/nova_real.py``) the same host as its ``NUMATopology`` and the flavor through its
own ``numa_get_constraints``. Guests Nova leaves without a NUMA topology (they float;
placement alone decides) are skipped.

Every case where the answers differ (fits / does not fit / refused) is named by the first
documented difference (docs/fit.md, "Where we differ from Nova") that explains it; the
rest are printed as "unexplained" with the host and the request, so a new difference is
seen at once. Exit status 1 when any is unexplained.

Run:  .venv/bin/python bench/nova_diff.py --nova-python /tmp/nova-venv/bin/python
      [--cases 2000] [--seed 1] [--show 3]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

from fit_hosts import make_snapshot, make_topology  # noqa: E402
from nova_real import NovaWorker, find_nova_python, host_doc  # noqa: E402

from hostagent.errors import RequestError  # noqa: E402
from hostagent.fit import fit, parse_request  # noqa: E402

# ----------------------------------------------------------------------------- cases


def random_host(rng: random.Random) -> dict[str, Any]:
    cells, cores = rng.randint(1, 4), rng.randint(2, 6)
    threads = rng.choice((1, 2, 2, 2, 4))
    pools = rng.choice(({}, {2048: 256}, {2048: 512, 1048576: 2}))
    topo = make_topology(cells, cores, threads, memory_mib=8192, hugepages=pools)
    cpus = [c.id for c in topo.cpus]
    by_core: dict[tuple[int, ...], list[int]] = {}
    for c in topo.cpus:
        by_core.setdefault(c.siblings, []).append(c.id)
    shared: list[int] = []
    for sib in by_core:
        if rng.random() < 0.2:
            shared.extend(sib)
    outside = [rng.choice(cpus)] if threads > 1 and rng.random() < 0.2 else []
    dedicated = [c for c in cpus if c not in shared and c not in outside]
    taken = {c: "g" for c in dedicated if rng.random() < 0.3}
    cell_cpus = {cell.id: cell.cpus for cell in topo.cells}
    pages_used = {(cell.id, p.size_kib): rng.randint(0, p.total)
                  for cell in topo.cells for p in cell.hugepages}
    return make_snapshot(
        topo, dedicated=dedicated, shared=shared, taken=taken, pages_used=pages_used,
        shared_used={c.id: rng.randint(0, 8) if set(cell_cpus[c.id]) & set(shared) else 0
                     for c in topo.cells},
        memory_used_kib={c.id: rng.choice((0, 1024, 2048, 4096)) * 1024 for c in topo.cells},
        cpu_ratio=rng.choice((1.0, 4.0)), ram_ratio=rng.choice((1.0, 1.5)))


def random_request(rng: random.Random) -> dict[str, Any]:
    vcpus = rng.randint(1, 12)
    memory = rng.choice((512, 1024, 2048, 4096))
    extra: dict[str, str] = {}
    image: dict[str, str] = {}
    form = rng.random()
    policy = rng.choice((None, "shared", "dedicated", "dedicated", "mixed"))
    if form < 0.15 and policy in ("dedicated", "shared"):
        extra["resources:PCPU" if policy == "dedicated" else "resources:VCPU"] = str(vcpus)
    elif policy is not None:
        extra["hw:cpu_policy"] = policy
    if policy == "mixed" and vcpus > 1:
        lo = rng.randint(0, vcpus - 2)
        extra["hw:cpu_dedicated_mask"] = rng.choice((f"^0-{lo}", f"0-{lo}"))
    thread = rng.choice((None, None, "prefer", "isolate", "require"))
    if thread is not None and policy in ("dedicated", "mixed"):
        if rng.random() < 0.2:
            extra["trait:HW_CPU_HYPERTHREADING"] = \
                "required" if thread == "require" else "forbidden"
        else:
            extra["hw:cpu_thread_policy"] = thread
    if rng.random() < 0.4:
        extra["hw:numa_nodes"] = str(rng.choice((1, 2, 2, 3)))
    if rng.random() < 0.4:
        extra["hw:mem_page_size"] = rng.choice(("small", "large", "any", "2MB", "1GB"))
    if policy in ("dedicated", "mixed") and rng.random() < 0.15:
        extra["hw:emulator_threads_policy"] = rng.choice(("share", "isolate"))
        if "resources:PCPU" in extra and extra["hw:emulator_threads_policy"] == "isolate":
            extra["resources:PCPU"] = str(vcpus + 1)
    if rng.random() < 0.1:
        image["hw_cpu_policy"] = rng.choice(("shared", "dedicated"))
    if rng.random() < 0.1:
        image["hw_cpu_thread_policy"] = rng.choice(("prefer", "isolate", "require"))
    out: dict[str, Any] = {"vcpus": vcpus, "memory_mb": memory, "extra_specs": extra}
    if image:
        out["image_properties"] = image
    return out


# ----------------------------------------------------------------------------- why


def _cells(snap: dict[str, Any]) -> int:
    return len(snap["topology"]["cells"])


def _smt(snap: dict[str, Any]) -> bool:
    return any(len(c["siblings"]) > 1 for c in snap["topology"]["cpus"])


def _outside(snap: dict[str, Any]) -> bool:
    cfg = snap["config"]
    return len(cfg["dedicated_cpus"]) + len(cfg["shared_cpus"]) < len(snap["topology"]["cpus"])


def _over_shared_limit(snap: dict[str, Any]) -> bool:
    """Whether a host cell's shared vCPUs already exceed its shared threads x the ratio
    (possible after the ratio was lowered)."""
    ratio = snap["config"]["cpu_allocation_ratio"]
    return any(c["cpu_usage"] > len(c["cpuset"]) * ratio for c in host_doc(snap)["cells"])


def _host_threads(snap: dict[str, Any]) -> int:
    """The host's threads per core (its largest core)."""
    return max(len(c["siblings"]) for c in snap["topology"]["cpus"])


def _nova_ram_limited(snap: dict[str, Any], req: Any, answer: dict[str, Any] | None) -> bool:
    """Whether Nova's RAM limit for guests with shared vCPUs (every guest's memory, any
    page size, against the whole cell times the ratio) refuses a cell this fit used, or
    this fit refused a cell for memory."""
    if answer is None:
        return False
    if not answer["fits"]:
        return any(r["resource"] in ("memory", "hugepages") for r in answer["reasons"])
    doc = {c["id"]: c for c in host_doc(snap)["cells"]}
    ratio = snap["config"]["ram_allocation_ratio"]
    return any(doc[c["host_cell"]]["memory_usage"] + c["memory_mib"]
               > doc[c["host_cell"]]["memory"] * ratio for c in answer["placement"]["cells"])


def explain(snap: dict[str, Any], request: dict[str, Any], req: Any, ours: str, nova: str,
            fresh: str | None, answer: dict[str, Any] | None = None) -> str | None:
    """The difference of docs/fit.md ("Where we differ from Nova") that explains the two
    answers, or None. ``fresh``: Nova's cell rules without the state its search carries
    between host cells (``nova_real._fresh``)."""
    extra, image = request["extra_specs"], request.get("image_properties", {})
    if ours == "refused" or nova == "refused" or req is None:
        return None  # every refusal Nova makes, hostagent makes (this generator's keys)
    if extra.get("hw:cpu_thread_policy") == "prefer" and \
            image.get("hw_cpu_thread_policy") in ("isolate", "require"):
        return "an image's isolate/require under a flavor's prefer applies (Nova keeps prefer)"
    if nova == "invalid":
        return "Nova's placement is invalid"
    if fresh is not None and fresh == ours:
        if len(req.cells) == 1:
            return ("Nova's search keeps the page size a failed host cell chose "
                    "(large/any)")
        return ("Nova's search carries state between host cells (its cache keyed on a cell "
                "id the fit overwrites; a page size a failed cell chose)")
    if req.thread_policy == "isolate" and _host_threads(snap) > 1 and ours == "fits":
        return "isolate on an SMT host (Nova refuses it with cpu_dedicated_set)"
    if req.cpu_policy == "mixed" and ours == "fits" and (
            (req.thread_policy == "isolate" and any(not g.dedicated for g in req.cells))
            or (req.emulator_policy == "isolate" and not req.cells[0].dedicated)):
        return ("a mixed guest cell without dedicated vCPUs under isolate or emulator "
                "isolate (Nova: no fit)")
    if req.cpu_policy == "mixed" and ours == "fits" and any(not g.shared for g in req.cells) \
            and _over_shared_limit(snap):
        return ("a mixed guest cell without shared vCPUs on a cell over its shared-CPU "
                "limit (Nova: no fit)")
    if req.thread_policy == "require" and _host_threads(snap) > 2 and ours == "no":
        return "require takes whole free cores of all T threads (Nova: any t >= 2 free)"
    if _outside(snap) and req.pinned:
        return "threads outside both CPU sets count in cores (Nova drops them)"
    if req.cpu_policy in ("shared", "mixed") and _nova_ram_limited(snap, req, answer):
        return ("RAM overcommit counted against small-page memory only (Nova: all memory, "
                "every page size)")
    return None


# ----------------------------------------------------------------------------- run


def ours_answer(snap: dict[str, Any], request: dict[str, Any]
                ) -> tuple[str, Any, str, dict[str, Any] | None]:
    try:
        req = parse_request(request)
    except RequestError as exc:
        return "refused", None, str(exc), None
    answer = fit(snap, req)
    return ("fits" if answer["fits"] else "no"), req, "", answer


def nova_invalid(doc: dict[str, Any], got: dict[str, Any]) -> str | None:
    """Why Nova's placement cannot be used (a dedicated vCPU left unpinned, a thread
    outside the chosen cell, taken or used twice), or None."""
    cells = {c["id"]: c for c in doc["cells"]}
    used: set[int] = set()
    if len({c["host_cell"] for c in got["cells"]}) < len(got["cells"]):
        return "two guest cells on one host cell"
    for gc in got["cells"]:
        host = cells[gc["host_cell"]]
        pins = {int(v): p for v, p in gc["pinning"].items()}
        if sorted(pins) != gc["dedicated_vcpus"]:
            return (f"guest cell on host cell {host['id']}: dedicated vCPUs "
                    f"{gc['dedicated_vcpus']} but pinned {sorted(pins)}")
        for cpu in list(pins.values()) + gc["reserved"]:
            if cpu not in host["pcpuset"] or cpu in host["pinned_cpus"] or cpu in used:
                return (f"thread {cpu} on host cell {host['id']} is not a free dedicated "
                        "thread of that cell, or is used twice")
            used.add(cpu)
    return None


def nova_answer(got: dict[str, Any]) -> str:
    if "error" in got:
        return "refused"
    if got.get("floating"):
        return "floats"
    return "fits" if got["fits"] else "no"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nova-python")
    ap.add_argument("--cases", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--show", type=int, default=3, help="examples printed per kind")
    ap.add_argument("--dump", type=Path, help="write the unexplained cases to this JSON file")
    args = ap.parse_args()
    python, how = find_nova_python(args.nova_python)
    if python is None:
        print(f"the real Nova is not available: {how}")
        return 2
    print(f"peer: {how}; {args.cases} cases, seed {args.seed}")
    rng = random.Random(args.seed)
    worker = NovaWorker(python)
    tally: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    shown: Counter[str] = Counter()
    unexplained = 0
    dumped: list[dict[str, Any]] = []
    try:
        for _ in range(args.cases):
            snap, request = random_host(rng), random_request(rng)
            ours, req, error, answer = ours_answer(snap, request)
            doc = host_doc(snap)
            got = worker.ask({"host": doc, "request": request})
            nova = nova_answer(got)
            if nova == "floats":
                tally["skipped: Nova gives the guest no NUMA topology"] += 1
                continue
            bad = nova_invalid(doc, got) if nova == "fits" else None
            if bad is not None:
                tally["Nova's placement is invalid (its cache bug, 3+ host cells)"
                      if _cells(snap) >= 3 else "Nova's placement is INVALID"] += 1
                nova = "invalid"
                if shown["invalid"] < args.show:
                    shown["invalid"] += 1
                    print(f"- Nova's placement is invalid: {bad}\n    request {request}")
            if ours == nova:
                tally["same answer"] += 1
                continue
            fresh = None
            if ours != "refused" and nova in ("fits", "no", "invalid"):
                fresh = nova_answer(worker.ask({"host": doc, "request": request,
                                                "fresh": True}))
            why = explain(snap, request, req, ours, nova, fresh, answer)
            kind = f"{why or 'UNEXPLAINED'}: hostagent {ours}, Nova {nova}"
            kinds[kind] += 1
            tally["differ, explained" if why else "differ, UNEXPLAINED"] += 1
            unexplained += why is None
            if why is None:
                dumped.append({"snapshot": snap, "request": request, "nova": got})
            if shown[kind] < args.show:
                shown[kind] += 1
                print(f"- {kind}\n    request {request}\n    ours: {error or ours}; "
                      f"nova: {got.get('error', nova)}\n    host: "
                      f"{_cells(snap)} cells, dedicated {snap['config']['dedicated_cpus']}, "
                      f"shared {snap['config']['shared_cpus']}, taken "
                      f"{[t['cpu'] for t in snap['usage']['threads'] if t['guest']]}")
    finally:
        worker.close()
    if args.dump is not None:
        args.dump.write_text(json.dumps(dumped))
    print()
    for name, n in tally.most_common():
        print(f"{n:6d}  {name}")
    print()
    for name, n in kinds.most_common():
        print(f"{n:6d}  {name}")
    return 1 if unexplained else 0


if __name__ == "__main__":
    sys.exit(main())
