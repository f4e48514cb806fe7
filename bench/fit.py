"""bench/fit: fit time per request, hostagent vs the real Nova's fitter on the same inputs.

Hosts are generated sysfs trees (``fixtures.generate.scaled_host``: 16 cores x 2 threads
per cell, 1, 2, 4, 8 and 16 cells), probed with ``probe_host`` and turned into snapshots
with ``build_snapshot``; cores 0-1 of every socket are shared, the rest dedicated. Each
host is first loaded to about 40 % of its dedicated threads with guests placed by the
fitter itself (their domain XML goes through the tracker). Then every typical request is
timed, plus the worst cases on the 16-cell host: an 8-cell guest that fits nowhere, and
one whose cells fit only on 7 host cells (Hall's condition fails).

The peer is Nova's own ``nova.virt.hardware.numa_fit_instance_to_host`` (``nova`` 34 from
PyPI), run by ``bench/nova_real.py`` in an interpreter that has it: the same host (as
Nova's ``NUMATopology``), the guest from Nova's own ``numa_get_constraints`` on the same
flavor, ``NUMATopologyLimits`` from the host's ratios. Columns:

- ``snapshot``: ``fit(snapshot, request)``, everything: read the snapshot, parse the
  request, search, guest topology, libvirt XML;
- ``prepared``: ``fit(prepare(snapshot), request)``, what the agent does per request (it
  reads each snapshot once); still parses the request and writes the XML;
- ``nova``: Nova's call alone, its host objects built and the guest topology cloned
  outside the timed part (the scheduler keeps host state and clones per host);

all in CPU time (``time.process_time``), the median of ``--reps`` calls, the least of
``--rounds`` such medians, hostagent's and Nova's rounds interleaved so both see the same
load. ``ratio`` is hostagent / Nova (below 1: hostagent is faster). A worst case Nova
cannot finish within ``--nova-timeout`` seconds (wall time) is stopped; the row shows the
permutations it went through, its CPU seconds, and the CPU time all of them would take
at that rate.

Without Nova the bench says so and compares with ``bench/nova_like.py``, a re-statement
of Nova's algorithm that is *not* Nova (``--nova-like`` adds it beside Nova): it keys its
caches correctly, so it avoids Nova's cache bug, and it is faster per permutation.

Run:  .venv/bin/python bench/fit.py [--nova-python /tmp/nova-venv/bin/python]
      [--cells 1,2,4,8,16] [--nova-timeout S] [--nova-like]
Install Nova beside the project (it is large):  python3 -m venv /tmp/nova-venv &&
      /tmp/nova-venv/bin/pip install nova     (or: pip install '.[bench-nova]')
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from nova_like import nova_fit  # noqa: E402
from nova_real import NovaWorker, find_nova_python, host_doc  # noqa: E402

from hostagent.config import Config, ResourcesConfig  # noqa: E402
from hostagent.fit import fit, parse_request, prepare  # noqa: E402
from hostagent.guests.source import record_from_xml  # noqa: E402
from hostagent.probe.host import probe_host  # noqa: E402
from hostagent.snapshot import build_snapshot  # noqa: E402


def flavor(vcpus: int, memory_mb: int, **specs: Any) -> dict[str, Any]:
    return {"vcpus": vcpus, "memory_mb": memory_mb,
            "extra_specs": {f"hw:{k}": str(v) for k, v in specs.items()}}


TYPICAL = {
    "4 dedicated": flavor(4, 4096, cpu_policy="dedicated"),
    "8 ded, 2 cells, 2M": flavor(8, 8192, cpu_policy="dedicated", numa_nodes=2,
                                 mem_page_size="2MB"),
    "4 isolate + emu": flavor(4, 4096, cpu_policy="dedicated", cpu_thread_policy="isolate",
                              emulator_threads_policy="isolate"),
    "8 require, 1G": flavor(8, 4096, cpu_policy="dedicated", cpu_thread_policy="require",
                            mem_page_size="1GB"),
    "4 mixed": flavor(4, 4096, cpu_policy="mixed", cpu_dedicated_mask="^0"),
    "2 shared numa": flavor(2, 2048, numa_nodes=1),
}


def make_host(cells: int, tmp: Path) -> Any:
    from fixtures.generate import generate_tree, scaled_host

    spec = scaled_host(cells, cores_per_cell=16, threads=2,
                       cells_per_socket=1 if cells <= 2 else 2)
    root = generate_tree(spec, tmp / f"h{cells}")
    return probe_host(root / "sys", root / "sys" / "fs" / "resctrl")


def config_for(topo: Any) -> Config:
    return Config(resources=ResourcesConfig(
        dedicated_cpus=tuple(c.id for c in topo.cpus if c.online and c.core >= 2)))


def snapshot(topo: Any, guests: list[Any]) -> dict[str, Any]:
    return build_snapshot(topo, config_for(topo), guests, host="bench", epoch="e", seq=0,
                          now=0.0)


def load(topo: Any, share: float) -> tuple[dict[str, Any], list[Any]]:
    """Place guests with the fitter until ``share`` of the dedicated threads are held."""
    loaders = [flavor(6, 4096, cpu_policy="dedicated"),
               flavor(4, 2048, cpu_policy="dedicated", cpu_thread_policy="require"),
               flavor(3, 2048, cpu_policy="dedicated", mem_page_size="2MB")]
    guests: list[Any] = []
    ded = len(config_for(topo).resources.dedicated_cpus)
    i = 0
    while True:
        snap = snapshot(topo, guests)
        held = sum(1 for t in snap["usage"]["threads"] if t["guest"] is not None)
        if held >= share * ded:
            return snap, guests
        req = loaders[i % len(loaders)]
        answer = fit(snap, req, strategy="pack" if i % 2 else "spread")
        if not answer["fits"]:
            return snap, guests
        x = answer["libvirt_xml"]
        uuid = f"00000000-0000-4000-8000-{i:012d}"
        xml = (f"<domain type='kvm'><name>l{i}</name><uuid>{uuid}</uuid>"
               f"<memory unit='MiB'>{req['memory_mb']}</memory>"
               + "".join(x[k] for k in ("vcpu", "cputune", "numatune", "cpu", "memoryBacking",
                                        "metadata") if k in x) + "</domain>")
        guests.append(record_from_xml(xml, uuid=uuid, name=f"l{i}"))
        i += 1


def cpu_median(fn: Callable[[], Any], reps: int) -> float:
    """CPU seconds per call: the median of ``reps`` calls (nova_real.py's measure)."""
    times: list[float] = []
    for _ in range(reps):
        t = time.process_time()
        fn()
        times.append(time.process_time() - t)
    return statistics.median(times)


def us(seconds: float) -> str:
    return f"{seconds * 1e6:,.0f} µs" if seconds < 0.01 else f"{seconds * 1e3:,.1f} ms"


class Bench:
    def __init__(self, args: argparse.Namespace, worker: NovaWorker | None) -> None:
        self.args, self.worker = args, worker
        self.rows: list[list[str]] = []

    def typical(self, host: str, snap: dict[str, Any], name: str, request: dict[str, Any]
                ) -> None:
        args = self.args
        ours = fit(snap, request)
        view = prepare(snap)
        doc = host_doc(snap)
        t_snap: list[float] = []
        t_prep: list[float] = []
        t_nova: list[float] = []
        nova: dict[str, Any] = {}
        for _ in range(args.rounds):
            t_snap.append(cpu_median(lambda: fit(snap, request), args.reps))
            t_prep.append(cpu_median(lambda: fit(view, request), args.reps))
            if self.worker is not None:
                nova = self.worker.ask({"host": doc, "request": request, "reps": args.reps})
                if "seconds" in nova:
                    t_nova.append(nova["seconds"])
        row = [host, name, "yes" if ours["fits"] else "no", us(min(t_snap)), us(min(t_prep))]
        if self.worker is None:
            row += ["-", "-", "-", "-"]
        elif "fits" not in nova or not t_nova:
            row += [nova.get("error") or nova.get("died") or "floats: no NUMA fit", "-", "-",
                    "-"]
        else:
            best = min(t_nova)
            row += ["yes" if nova["fits"] else "no", us(best), f"{min(t_snap) / best:.2f}",
                    f"{min(t_prep) / best:.2f}"]
        if args.nova_like:
            row.append(self.nova_like(snap, request))
        self.rows.append(row)

    def worst(self, host: str, snap: dict[str, Any], name: str, request: dict[str, Any]
              ) -> None:
        args = self.args
        req = parse_request(request)
        ours = fit(snap, request)
        t_ours = min(cpu_median(lambda: fit(snap, request), 20) for _ in range(args.rounds))
        row = [host, name, "yes" if ours["fits"] else "no", us(t_ours), "-"]
        total = math.perm(len(snap["topology"]["cells"]), len(req.cells))
        if self.worker is None or args.nova_timeout <= 0:
            row += ["not run" if self.worker else "-", "-", "-", "-"]
        else:
            nova = self.worker.ask({"host": host_doc(snap), "request": request,
                                    "timeout": args.nova_timeout})
            if "died" in nova:
                row += [nova["died"], "-", "-", "-"]
            elif nova.get("timed_out"):
                rate = nova["permutations"] / max(nova["cpu_seconds"], 1e-9)
                row += ["?", f"> {nova['cpu_seconds']:.0f} CPU-s: {nova['permutations']:,} of "
                        f"{total:,} permutations at {rate:,.0f}/CPU-s, all: "
                        f"~{total / rate / 60:,.0f} CPU-min", "-", "-"]
            else:
                row += ["yes" if nova["fits"] else "no",
                        f"{us(nova['cpu_seconds'])} ({nova['permutations']:,} permutations)",
                        f"{t_ours / nova['cpu_seconds']:.2g}", "-"]
        if args.nova_like:
            row.append(self.nova_like(snap, request, timeout=args.nova_timeout))
        self.rows.append(row)

    def nova_like(self, snap: dict[str, Any], request: dict[str, Any],
                  timeout: float = 0.0) -> str:
        req = parse_request(request)
        t0 = time.process_time()
        got = nova_fit(snap, req, timeout=timeout or None)
        first = time.process_time() - t0
        if got["timed_out"]:
            total = math.perm(len(snap["topology"]["cells"]), len(req.cells))
            rate = got["permutations"] / first
            return (f"> {first:.0f} CPU-s, {rate:,.0f} perms/CPU-s, all: "
                    f"~{total / rate / 60:,.0f} CPU-min")
        t = first if first > 0.5 else min(
            cpu_median(lambda: nova_fit(snap, req), self.args.reps) for _ in range(2))
        return f"{'yes' if got['fits'] else 'no'} {us(t)}"


def no_fit_8(snap: dict[str, Any]) -> dict[str, Any]:
    """8 guest cells, each needing one thread more than any host cell has free."""
    most = max(len(c["free_cpus"]) for c in snap["usage"]["cells"])
    per = most + 1
    return flavor(8 * per, 8 * 1024, cpu_policy="dedicated", numa_nodes=8)


def hall_8(snap: dict[str, Any]) -> dict[str, Any]:
    """8 guest cells that each fit only on the 7 emptiest host cells."""
    free = sorted((len(c["free_cpus"]) for c in snap["usage"]["cells"]), reverse=True)
    per = free[6]  # the 7th emptiest cell still fits; the 8th does not if smaller
    if free[7] >= per:
        per = free[7] + 1
    return flavor(8 * per, 8 * 1024, cpu_policy="dedicated", numa_nodes=8)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nova-python", help="an interpreter that can import nova (default: "
                    "$HOSTAGENT_NOVA_PYTHON, else this one if it can)")
    ap.add_argument("--nova-timeout", type=float, default=10.0,
                    help="stop Nova's worst-case search after this many seconds (default "
                         "10; 0: do not run it)")
    ap.add_argument("--nova-like", action="store_true",
                    help="add bench/nova_like.py (a re-statement, not Nova) as a column")
    ap.add_argument("--cells", default="1,2,4,8,16")
    ap.add_argument("--reps", type=int, default=200, help="calls per median (default 200)")
    ap.add_argument("--rounds", type=int, default=5, help="medians per figure (default 5)")
    args = ap.parse_args()
    python, how = find_nova_python(args.nova_python)
    print(f"peer: {how}" if python else f"peer: the real Nova is not available: {how}")
    if python is None:
        print("      comparing with bench/nova_like.py only (a re-statement, not Nova)")
        args.nova_like = True
    worker = NovaWorker(python) if python else None
    bench = Bench(args, worker)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for cells in [int(c) for c in args.cells.split(",")]:
                topo = make_host(cells, Path(tmp))
                snap, guests = load(topo, 0.4)
                host = f"{cells} cell{'s' if cells > 1 else ''} ({len(guests)} guests)"
                for name, request in TYPICAL.items():
                    if len(parse_request(request).cells) > cells:
                        continue
                    bench.typical(host, snap, name, request)
                if cells == 16:
                    bench.worst(host, snap, "8-cell guest, no cell fits", no_fit_8(snap))
                    bench.worst(host, snap, "8-cell guest, 7 cells fit", hall_8(snap))
    finally:
        if worker is not None:
            worker.close()
    head = ["host", "request", "fits", "snapshot", "prepared", "nova fits", "nova",
            "ratio snapshot", "ratio prepared"]
    if args.nova_like:
        head.append("nova-like (not Nova)")
    widths = [max(len(r[i]) for r in bench.rows + [head]) for i in range(len(head))]
    for r in [head, ["-" * w for w in widths]] + bench.rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    print(f"CPU time per call: median of {args.reps} calls, least of {args.rounds} medians; "
          "ratio = hostagent / Nova")
    return 0


if __name__ == "__main__":
    sys.exit(main())
