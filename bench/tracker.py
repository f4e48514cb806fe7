"""Tracker speed and memory on the 448-thread fixture with 200 guests.

    .venv/bin/python bench/tracker.py [--guests 200] [--repeat 30]

Host: fixtures/sysfs/big-448 (4 sockets x 56 cores x 2 threads, 8 cells, L3 CAT with six
``qemu-N-vmN-vcpus_0-3`` groups). Config: per cell the first 2 cores (4 threads) shared,
the other 52 threads dedicated. Guests (the default 200):

* 50% pinned: 4 vCPUs 1:1 on two dedicated cores, emulator on the cell's shared threads,
  one guest NUMA cell bound by memnode, 4 GiB on 1G pages or 2 GiB on 2M pages;
  vm1..vm6 carry a cachetune that matches the fixture's resctrl groups;
* 30% shared: 2-8 vCPUs pinned (Nova style) to one cell's shared threads, memory strict
  on that cell, one in five on 2M hugepages;
* 20% floating: cpuset = every shared thread, no numatune.

Compared: an event handled by ``UsageTracker`` (recompute that guest's contribution and
fold) against the previous way, a full ``compute_usage`` per event; per event, packing the
usage and building the compressed message with the publisher's block cache
(``wire.PackCache``) against plain msgpack and one zlib pass. Also: parsing the domain
XML, building and packing the snapshot, and memory per guest (tracemalloc).
Targets: one-guest update < 5 ms, full recompute < 50 ms.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import msgpack  # noqa: E402
from libvirt_helpers import domain_xml, probe_fixture, uuid_for  # noqa: E402

from hostagent.config import config_from_dict, resolve_resources  # noqa: E402
from hostagent.cpulist import format_cpulist  # noqa: E402
from hostagent.guests.source import record_from_xml  # noqa: E402
from hostagent.snapshot import assemble_snapshot  # noqa: E402
from hostagent.tracker import UsageTracker, compute_usage  # noqa: E402


def host_config(topo):
    shared, dedicated = [], []
    for cell in topo.cells:
        base = cell.id * 28
        sh = {base, base + 1, base + 224, base + 225}
        shared += sorted(sh)
        dedicated += [c for c in cell.cpus if c not in sh]
    doc = {"dedicated_cpus": format_cpulist(dedicated), "shared_cpus": format_cpulist(shared)}
    return resolve_resources(config_from_dict({"resources": doc}).resources, topo)


def guest_xmls(n: int) -> list[tuple[str, str]]:
    out = []
    n_pinned, n_shared = n * 50 // 100, n * 30 // 100
    all_shared = format_cpulist(
        [c * 28 + o for c in range(8) for o in (0, 1, 224, 225)])
    for i in range(n):
        cell = i % 8
        shared = format_cpulist([cell * 28, cell * 28 + 1, cell * 28 + 224, cell * 28 + 225])
        if i < n_pinned:
            slot = i // 8
            a = cell * 28 + 2 + 2 * slot
            threads = [a, a + 224, a + 1, a + 225]
            name = f"vm{i + 1}" if i < 6 else f"pinned{i}"
            one_g = (i // 8) % 2 == 1
            mem = (4 if one_g else 2) * 1048576
            xml = domain_xml(
                name, vcpus=4, memory_kib=mem,
                vcpupin={v: str(t) for v, t in enumerate(threads)}, emulatorpin=shared,
                cells=[("0-3", mem)], memnodes={0: str(cell)},
                hugepages=[(1048576 if one_g else 2048, None)],
                vcpusched=[("0-3", "fifo", 1)],
                cachetunes=[("0-3", [(0, 3, "both", 2 * 7168)])] if i < 6 else (),
            )
            if i < 6:  # running domain ids 1..6 match the fixture's groups
                xml = xml.replace("<domain type='test'", f"<domain type='test' id='{i + 1}'")
        elif i < n_pinned + n_shared:
            name = f"shared{i}"
            vcpus = 2 + (i % 4) * 2
            xml = domain_xml(
                name, vcpus=vcpus, memory_kib=2 * 1048576,
                vcpupin={v: shared for v in range(vcpus)}, emulatorpin=shared,
                numa_memory=("strict", str(cell)),
                hugepages=[] if i % 5 == 0 else None,
            )
        else:
            name = f"float{i}"
            xml = domain_xml(name, vcpus=2, memory_kib=1048576, cpuset=all_shared)
        out.append((name, xml))
    return out


def median_ms(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--guests", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=30)
    args = ap.parse_args()

    topo = probe_fixture("big-448")
    res = host_config(topo)
    xmls = guest_xmls(args.guests)

    t0 = time.perf_counter()
    records = [record_from_xml(x, uuid=uuid_for(n), name=n) for n, x in xmls]
    parse_ms = (time.perf_counter() - t0) * 1000
    assert all(r.error is None for r in records)

    # memory per guest: parsed specs + cached contributions
    tracemalloc.start()
    base = tracemalloc.take_snapshot()
    recs2 = [record_from_xml(x, uuid=uuid_for(n), name=n) for n, x in xmls]
    after_parse = tracemalloc.take_snapshot()
    tracker = UsageTracker(topo, res)
    tracker.replace_all(recs2)
    after_contrib = tracemalloc.take_snapshot()
    tracemalloc.stop()

    def total(snap_a, snap_b):
        return sum(s.size_diff for s in snap_b.compare_to(snap_a, "filename"))

    spec_bytes = total(base, after_parse) / args.guests
    contrib_bytes = total(after_parse, after_contrib) / args.guests

    tracker = UsageTracker(topo, res)
    tracker.replace_all(records)
    usage = tracker.usage()
    assert usage == compute_usage(topo, res, records)
    conflicts = usage["conflicts"]

    full_ms = median_ms(lambda: compute_usage(topo, res, records), args.repeat)

    # an event: one guest changes (alternate two versions of each guest's record)
    changed = []
    for r in records[: min(len(records), 50)]:
        x = dict(xmls)[r.name].replace("<memory unit='KiB'>", "<memory unit='KiB'>1", 1)
        changed.append(record_from_xml(x, uuid=r.uuid, name=r.name))
    state = {"i": 0}

    def one_event():
        i = state["i"] % len(changed)
        rec = changed[i] if (state["i"] // len(changed)) % 2 == 0 else records[i]
        state["i"] += 1
        tracker.update(rec)
        tracker.usage()

    current = {r.uuid: r for r in records}

    def one_event_naive():
        i = state["i"] % len(changed)
        rec = changed[i] if (state["i"] // len(changed)) % 2 == 0 else records[i]
        state["i"] += 1
        current[rec.uuid] = rec
        compute_usage(topo, res, current.values())

    event_ms = median_ms(one_event, max(args.repeat, 100))
    state["i"] = 0
    naive_event_ms = median_ms(one_event_naive, args.repeat)
    fold_ms = median_ms(lambda: (setattr(tracker, "_usage", None), tracker.usage()),
                        max(args.repeat, 100))

    from hostagent.model import topology_to_dict

    topo_dict = topology_to_dict(topo)
    snap = assemble_snapshot(topo_dict, res, tracker.usage(), host="big-448", epoch="e",
                             seq=1, now=time.time())
    pack_ms = median_ms(lambda: msgpack.packb(snap, use_bin_type=True), args.repeat)
    packed = msgpack.packb(snap, use_bin_type=True)
    usage_bytes = len(msgpack.packb(snap["usage"], use_bin_type=True))
    topo_ms = median_ms(lambda: topology_to_dict(topo), args.repeat)

    # per event, what the publisher does with the new usage: pack it (the daemon compares
    # those bytes) and build the compressed message; blocks (wire.PackCache) against the
    # previous way, plain msgpack of the usage and zlib of the whole snapshot
    from hostagent import wire

    cache = wire.PackCache()
    state["i"] = 0
    pack_times, msg_times, plain_pack, plain_msg, sizes = [], [], [], [], []
    for _ in range(max(args.repeat, 100)):
        one_event()
        usage = tracker.usage()
        t0 = time.perf_counter()
        cache.packed("usage", usage)
        t1 = time.perf_counter()
        snap = assemble_snapshot(topo_dict, res, usage, host="big-448", epoch="e", seq=1,
                                 now=time.time())
        frames = wire.encode_stream(wire.make_body("snapshot", "big-448", "e", 1, 1.0, snap),
                                    cache=cache)
        t2 = time.perf_counter()
        wire.pack(usage)
        t3 = time.perf_counter()
        wire.encode_stream(wire.make_body("snapshot", "big-448", "e", 1, 1.0, snap))
        t4 = time.perf_counter()
        pack_times.append((t1 - t0) * 1000)
        msg_times.append((t2 - t1) * 1000)
        plain_pack.append((t3 - t2) * 1000)
        plain_msg.append((t4 - t3) * 1000)
        sizes.append(len(frames[1]))
    med = statistics.median

    n = args.guests
    print(f"tracker bench: big-448 ({len(topo.cpus)} threads, {len(topo.cells)} cells), "
          f"{n} guests ({n * 50 // 100} pinned, {n * 30 // 100} shared, "
          f"{n - n * 50 // 100 - n * 30 // 100} floating), {len(conflicts)} conflicts, "
          f"median of >= {args.repeat} runs")
    print()
    rows = [
        ("one-guest update (event)", f"{event_ms:.2f} ms", f"{naive_event_ms:.2f} ms",
         f"{naive_event_ms / event_ms:.1f}x", "< 5 ms"),
        ("  of which fold only", f"{fold_ms:.2f} ms", "", "", ""),
        ("full recompute", f"{full_ms:.2f} ms", f"{full_ms:.2f} ms", "1.0x", "< 50 ms"),
        ("parse domain XML (all guests)", f"{parse_ms:.2f} ms", f"{parse_ms:.2f} ms", "", ""),
        ("topology_to_dict", f"{topo_ms:.2f} ms", "", "", ""),
        ("msgpack the snapshot", f"{pack_ms:.2f} ms", "", "", ""),
        ("pack the usage, per event", f"{med(pack_times):.2f} ms",
         f"{med(plain_pack):.2f} ms (plain)", f"{med(plain_pack) / med(pack_times):.1f}x", ""),
        ("build the compressed message", f"{med(msg_times):.2f} ms",
         f"{med(plain_msg):.2f} ms (whole zlib)", f"{med(plain_msg) / med(msg_times):.1f}x",
         ""),
    ]
    head = ("step", "this version", "previous: full per event", "speed-up", "target")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(5)]
    for r in [head, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    print()
    print(f"memory per guest: {spec_bytes / 1024:.1f} KiB parsed spec+record, "
          f"{contrib_bytes / 1024:.1f} KiB cached contribution")
    print(f"snapshot size: {len(packed) / 1024:.0f} KiB msgpack "
          f"(usage {usage_bytes / 1024:.0f} KiB), {med(sizes) / 1024:.1f} KiB on the wire")
    ok = event_ms < 5 and full_ms < 50
    print("targets:", "met" if ok else "MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
