"""Applying reservations (hostagent.resctrl_fs) on temporary copies of fixture resctrl trees.

The sysfs part of a fixture is only read, so tests use it in place; the resctrl part is
copied to tmp_path and written. The kernel's validation does not run on a plain
directory: ``kernel_accepts`` re-checks every group with the kernel's rules instead, and
the failure tests write ``info/last_cmd_status`` the way the kernel does.
"""

from __future__ import annotations

import errno
import multiprocessing
import os
import shutil
import threading
from pathlib import Path

import pytest
from fixture_trees import need_fixture

from hostagent import resctrl_fs
from hostagent.errors import HostagentError, RequestError
from hostagent.probe.host import probe_host
from hostagent.resctrl import LOCKED_MODES, validate_mask
from hostagent.resctrl_cbm import cache_ways, parse_mask
from hostagent.resctrl_fs import (
    PREFIX,
    ResctrlApplyError,
    carve,
    group_dir_name,
    release,
    reserve,
)

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "sysfs"


def tree(tmp_path: Path, name: str) -> tuple[str, str]:
    """(resctrl root copy, sysfs root in place) of fixture ``name``."""
    dst = tmp_path / f"{name}-resctrl"
    shutil.copytree(need_fixture(name) / "fs/resctrl", dst, symlinks=True)
    return str(dst), str(FIXTURES / name / "sys")


def free_map(resctrl: str, sysfs: str) -> dict[tuple[str, int], str]:
    return {(w["resource"], w["id"]): w["free_mask"]
            for w in cache_ways(probe_host(sysfs, resctrl))}


def kernel_accepts(resctrl: str, sysfs: str) -> None:
    """Every group's masks pass the kernel's CBM check and overlap no exclusive group."""
    rc = probe_host(sysfs, resctrl).resctrl
    assert rc is not None
    for g in rc.groups:
        for res in rc.resources:
            for cid, text in g.schemata.get(res.name, {}).items():
                mask = parse_mask(text)
                assert validate_mask(mask, res) is None, (g.name, res.name, cid, text)
                if not g.name.startswith(PREFIX):
                    continue
                for other in rc.groups:
                    if other.name == g.name or other.mode not in LOCKED_MODES:
                        continue
                    peers = {res.name, res.name.replace("CODE", "DATA").replace("DATA", "CODE")}
                    for name in peers:
                        om = parse_mask(other.schemata.get(name, {}).get(cid, "0"))
                        assert mask & om == 0, (g.name, other.name, name, cid)


# ----------------------------------------------------------------------------- names


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("", "group name '': empty (give e.g. 'rt1'; the group becomes hostagent-rt1)"),
        ("hostagent-", "group name 'hostagent-': empty"),
        ("a/b", "group name 'a/b': must not contain '/'"),
        ("../etc", "group name '../etc': must not contain '/'"),
        ("..", "group name '..': must not contain '..'"),
        ("a..b", "group name 'a..b': must not contain '..'"),
        (".hidden", "group name '.hidden': must not start with '.'"),
        ("x" * 65, "longer than 64 characters"),
        ("rt 1", "group name 'rt 1': character ' ' is not allowed (use A-Z a-z 0-9 _ . : + -)"),
        ("rt\n1", "character '\\n' is not allowed"),
    ],
)
def test_group_name_errors(name, message):
    with pytest.raises(RequestError) as exc:
        group_dir_name(name)
    assert message in str(exc.value)


def test_group_names_are_namespaced():
    assert group_dir_name("rt1") == "hostagent-rt1"
    assert group_dir_name("hostagent-rt1") == "hostagent-rt1"
    assert group_dir_name("x" * 64) == "hostagent-" + "x" * 64
    assert group_dir_name("vm.1:vcpu_0-1+a") == "hostagent-vm.1:vcpu_0-1+a"


# ----------------------------------------------------------------------------- reserve


def test_reserve_creates_the_group_and_probe_shows_it(tmp_path):
    resctrl, sysfs = tree(tmp_path, "xeon-2s-cat")
    before = free_map(resctrl, sysfs)
    r = reserve(resctrl, sysfs, "rt1", "type=both,size=4608k;mb=50", cpus="12-13")
    assert r.action == "created" and r.group == "hostagent-rt1"
    d = Path(resctrl, "hostagent-rt1")
    assert (d / "schemata").read_text() == "L3:0=7c0;1=00c\nMB:0=100;1=50\n"
    assert (d / "cpus_list").read_text() == "12-13\n"
    topo = probe_host(sysfs, resctrl)
    grp = topo.resctrl.group("hostagent-rt1")
    assert grp.cpus == (12, 13) and grp.mb == {0: 100, 1: 50}
    ways = {(w["resource"], w["id"]): w for w in cache_ways(topo)}
    alloc = [a for a in ways[("L3", 1)]["allocations"] if a["group"] == "hostagent-rt1"]
    assert alloc == [{"group": "hostagent-rt1", "guest": None, "mode": "shareable",
                      "mask": "00c", "ways": 2, "bytes": 4718592}]
    assert before[("L3", 1)] == "01c" and ways[("L3", 1)]["free_mask"] == "010"
    assert ways[("L3", 0)]["free_mask"] == before[("L3", 0)]  # cache 0 shares the default's
    kernel_accepts(resctrl, sysfs)


def test_reapplying_is_a_no_op_and_a_new_size_updates(tmp_path):
    resctrl, sysfs = tree(tmp_path, "xeon-2s-cat")
    reserve(resctrl, sysfs, "rt1", "type=both,size=2304k,cache-id=1", cpus=[14])
    schemata = Path(resctrl, "hostagent-rt1", "schemata")
    os.utime(schemata, ns=(1, 1))
    again = reserve(resctrl, sysfs, "hostagent-rt1", "type=both,size=2304k,cache-id=1", cpus=[14])
    assert again.action == "unchanged" and again.plan.caches[0].reused
    assert schemata.stat().st_mtime_ns == 1  # nothing was written
    grown = reserve(resctrl, sysfs, "rt1", "type=both,size=6912k,cache-id=1")
    assert grown.action == "updated"
    assert schemata.read_text() == "L3:0=7c0;1=01c\n"
    assert Path(resctrl, "hostagent-rt1", "cpus_list").read_text() == "14\n"  # untouched
    kernel_accepts(resctrl, sysfs)


def test_dry_run_writes_nothing(tmp_path):
    resctrl, sysfs = tree(tmp_path, "xeon-2s-cat")
    listing = sorted(p.name for p in Path(resctrl).iterdir())
    r = reserve(resctrl, sysfs, "rt1", "type=both,size=4608k,cache-id=0", dry_run=True)
    assert r.action == "dry-run" and r.plan.text == "L3:0=030;1=7c0\n"
    assert sorted(p.name for p in Path(resctrl).iterdir()) == listing


def test_tasks_are_attached_one_write_each(tmp_path):
    resctrl, sysfs = tree(tmp_path, "xeon-2s-cat")
    me = os.getpid()
    r = reserve(resctrl, sysfs, "rt1", "type=both,size=2304k,cache-id=0", tasks=f"{me},{me}")
    assert r.tasks == (me,)
    assert Path(resctrl, "hostagent-rt1", "tasks").read_text() == f"{me}\n"
    assert reserve(resctrl, sysfs, "rt1", "type=both,size=2304k,cache-id=0",
                   tasks=[me]).action == "unchanged"


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"tasks": "abc"}, "--tasks 'abc': give process ids such as 1234,1240"),
        ({"tasks": "0"}, "--tasks '0': give process ids"),
        ({"tasks": [2**22 + 12345]}, "--tasks: there is no process with id 4206649"),
        ({"cpus": "3-1"}, "--cpus: not a CPU list: '3-1' (range 3-1 runs backwards)"),
        ({"cpus": "200"}, "CPU(s) 200 are not online CPUs of this host (online: 0-47)"),
    ],
)
def test_bad_cpus_and_tasks_write_nothing(tmp_path, kw, message):
    resctrl, sysfs = tree(tmp_path, "xeon-2s-cat")
    with pytest.raises(RequestError) as exc:
        reserve(resctrl, sysfs, "rt1", "type=both,size=2304k,cache-id=0", **kw)
    assert message in str(exc.value)
    assert not Path(resctrl, "hostagent-rt1").exists()


def test_planning_errors_leave_nothing(tmp_path):
    resctrl, sysfs = tree(tmp_path, "xeon-2s-cat")
    with pytest.raises(RequestError, match="not enough contiguous free ways on L3 cache 0"):
        reserve(resctrl, sysfs, "rt1", "type=both,size=6912k,cache-id=0")
    assert not Path(resctrl, "hostagent-rt1").exists()


def test_unmounted_and_missing_roots(tmp_path):
    _, sysfs = tree(tmp_path, "xeon-2s-cat")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RequestError, match="resctrl is not mounted here"):
        reserve(str(empty), sysfs, "rt1", "type=both,size=2304k")
    with pytest.raises(HostagentError, match="no such directory .is resctrl mounted"):
        reserve(str(tmp_path / "nope"), sysfs, "rt1", "type=both,size=2304k")


def test_cdp_and_amd_trees(tmp_path):
    resctrl, sysfs = tree(tmp_path, "xeon-2s-cdp")
    r = reserve(resctrl, sysfs, "rt", "type=code,size=2304k;type=data,size=2304k", cpus="12")
    assert Path(r.path, "schemata").read_text() == "L3CODE:0=7c0;1=004\nL3DATA:0=7c0;1=004\n"
    kernel_accepts(resctrl, sysfs)
    resctrl, sysfs = tree(tmp_path, "epyc-amd")
    r = reserve(resctrl, sysfs, "vnf", "type=both,size=2m,cache-id=2;mb=512,node=2")
    text = Path(r.path, "schemata").read_text()
    assert text.startswith("L3:0=ff00;2=0030;4=ffff;") and "MB:0=2048;2=512;4=2048" in text
    kernel_accepts(resctrl, sysfs)


# ----------------------------------------------------------------------------- failures


def test_schemata_path_that_is_a_directory_leaves_no_group(tmp_path, monkeypatch):
    resctrl, sysfs = tree(tmp_path, "xeon-2s-cat")
    real_mkdir = os.mkdir

    def mkdir_with_bad_schemata(path, *args, **kw):
        real_mkdir(path, *args, **kw)
        real_mkdir(os.path.join(path, "schemata"))

    monkeypatch.setattr(os, "mkdir", mkdir_with_bad_schemata)
    with pytest.raises(ResctrlApplyError) as exc:
        reserve(resctrl, sysfs, "rt1", "type=both,size=2304k,cache-id=0", cpus="1")
    monkeypatch.undo()
    msg = str(exc.value)
    assert msg.startswith(f"writing {resctrl}/hostagent-rt1/schemata failed: Is a directory")
    assert msg.endswith("; group hostagent-rt1 removed")
    assert not Path(resctrl, "hostagent-rt1").exists()
    assert free_map(resctrl, sysfs)[("L3", 0)] == "030"


def _kernel_refuses(resctrl: str, target: str, status: str):
    """A ``_write`` that fails like the kernel on ``target``: EINVAL + last_cmd_status."""
    real = resctrl_fs._write

    def write(path, text, *, append=False):
        Path(resctrl, "info", "last_cmd_status").write_text("ok\n")  # every command resets it
        if os.path.basename(path) == target:
            Path(resctrl, "info", "last_cmd_status").write_text(status + "\n")
            raise OSError(errno.EINVAL, "Invalid argument")
        real(path, text, append=append)

    return write


@pytest.mark.parametrize(
    ("target", "status"),
    [
        ("schemata", "mask 7f has non-consecutive 1-bits"),
        ("cpus_list", "Can only assign online CPUs"),
        ("tasks", "No task 4242"),
    ],
)
def test_kernel_refusal_reports_last_cmd_status_and_removes_the_group(
    tmp_path, monkeypatch, target, status
):
    resctrl, sysfs = tree(tmp_path, "xeon-2s-cat")
    monkeypatch.setattr(resctrl_fs, "_write", _kernel_refuses(resctrl, target, status))
    with pytest.raises(ResctrlApplyError) as exc:
        reserve(resctrl, sysfs, "rt1", "type=both,size=2304k,cache-id=0", cpus="1",
                tasks=[os.getpid()])
    assert exc.value.status == status
    assert str(exc.value) == (
        f"writing {resctrl}/hostagent-rt1/{target} failed: Invalid argument; "
        f"info/last_cmd_status says: {status}; group hostagent-rt1 removed"
    )
    assert not Path(resctrl, "hostagent-rt1").exists()


def test_failed_update_keeps_the_previous_schemata(tmp_path, monkeypatch):
    resctrl, sysfs = tree(tmp_path, "xeon-2s-cat")
    reserve(resctrl, sysfs, "rt1", "type=both,size=2304k,cache-id=1")
    schemata = Path(resctrl, "hostagent-rt1", "schemata")
    before = schemata.read_text()
    real = resctrl_fs._write
    calls = []

    def write(path, text, *, append=False):
        calls.append(text)
        if len(calls) == 1:  # the update fails as a whole, like the kernel's
            raise OSError(errno.EINVAL, "Invalid argument")
        real(path, text, append=append)

    monkeypatch.setattr(resctrl_fs, "_write", write)
    with pytest.raises(ResctrlApplyError, match="group hostagent-rt1 keeps its previous"):
        reserve(resctrl, sysfs, "rt1", "type=both,size=4608k,cache-id=1")
    assert schemata.read_text() == before
    assert Path(resctrl, "hostagent-rt1").is_dir()


# ----------------------------------------------------------------------------- release


def test_release_restores_the_free_ways_and_stays_in_its_namespace(tmp_path):
    resctrl, sysfs = tree(tmp_path, "xeon-2s-cat")
    before = free_map(resctrl, sysfs)
    reserve(resctrl, sysfs, "rt1", "type=both,size=4608k,cache-id=1")
    assert free_map(resctrl, sysfs) != before
    assert release(resctrl, "rt1") is True
    assert free_map(resctrl, sysfs) == before
    assert release(resctrl, "rt1") is False
    assert release(resctrl, "batch") is False  # means hostagent-batch: batch is not ours
    assert Path(resctrl, "batch", "schemata").exists()
    with pytest.raises(RequestError, match="must not contain"):
        release(resctrl, "../batch")


# ----------------------------------------------------------------------------- carve


def test_carve_then_reserve(tmp_path):
    resctrl, sysfs = tree(tmp_path, "xeon-2s-cat")
    with pytest.raises(RequestError, match="need 4 ways"):
        reserve(resctrl, sysfs, "rt1", "type=both,size=9216k,cache-id=0", dry_run=True)
    plan = carve(resctrl, sysfs, 4, cache_id=0)
    assert plan.changed
    # the L3 line changes (keeping the kernel's padding), the MB line is kept byte for byte
    assert Path(resctrl, "schemata").read_text() == "    L3:0=700;1=7c0\n    MB:0=100;1=100\n"
    assert free_map(resctrl, sysfs)[("L3", 0)] == "0f0"
    r = reserve(resctrl, sysfs, "rt1", "type=both,size=9216k,cache-id=0")
    assert r.plan.schemata["L3"] == {0: "0f0", 1: "7c0"}
    assert free_map(resctrl, sysfs)[("L3", 0)] == "000"
    kernel_accepts(resctrl, sysfs)
    # carving again is a no-op only when the run exists; here it is taken: refused, unchanged
    with pytest.raises(RequestError, match="carve L3 cache 0"):
        carve(resctrl, sysfs, 4, cache_id=0)
    assert Path(resctrl, "schemata").read_text() == "    L3:0=700;1=7c0\n    MB:0=100;1=100\n"


def test_carve_keeps_other_lines_and_dry_run_writes_nothing(tmp_path):
    resctrl, sysfs = tree(tmp_path, "epyc-amd")
    for g in ("qemu-3-vnf1-vcpus_0-7", "scavenger", "sparse"):  # they hold every way of id 4
        shutil.rmtree(Path(resctrl, g))
    root = Path(resctrl, "schemata")
    original = root.read_text()
    plan = carve(resctrl, sysfs, 4, cache_id=4, dry_run=True)
    assert plan.changed and root.read_text() == original
    carve(resctrl, sysfs, 4, cache_id=4)
    lines = root.read_text().splitlines(keepends=True)
    assert lines[:2] == original.splitlines(keepends=True)[:2]  # SMBA and MB, byte for byte
    assert lines[2] == "    L3:0=ff00;2=ff00;4=0fff;6=ffff;8=ffff;10=ffff;12=ffff;14=ffff\n"
    mtime = root.stat().st_mtime_ns
    assert not carve(resctrl, sysfs, 4, cache_id=4).changed
    assert root.stat().st_mtime_ns == mtime


# ----------------------------------------------------------------------------- the lock


def _racer(resctrl, sysfs, name, barriers, locking, hook_barrier, out):
    resctrl_fs._LOCKING = locking
    broken = []
    if hook_barrier is not None:
        def hook(plan):
            try:
                hook_barrier.wait(timeout=0.5)
            except threading.BrokenBarrierError:
                broken.append(True)
        resctrl_fs._after_plan_hook = hook
    results = []
    try:
        for start, done in barriers:
            start.wait(timeout=30)
            try:
                r = reserve(resctrl, sysfs, name, "type=both,size=4608k,cache-id=1")
                results.append(r.plan.caches[0].mask)
            except RequestError:
                results.append(None)
            done.wait(timeout=30)
            release(resctrl, name)
    except BaseException as exc:  # let the other side and the parent go at once
        for pair in barriers:
            for b in pair:
                b.abort()
        out.put((name, repr(exc), 0))
        raise
    out.put((name, results, len(broken)))


def _race(tmp_path, iterations, locking, hook):
    resctrl, sysfs = tree(tmp_path, "xeon-2s-cat")
    ctx = multiprocessing.get_context("fork")
    barriers = [(ctx.Barrier(2), ctx.Barrier(2)) for _ in range(iterations)]
    hook_barrier = ctx.Barrier(2) if hook else None
    out = ctx.Queue()
    procs = [
        ctx.Process(target=_racer, args=(resctrl, sysfs, n, barriers, locking, hook_barrier, out))
        for n in ("a", "b")
    ]
    for p in procs:
        p.start()
    got = {name: (res, broken) for name, res, broken in (out.get(timeout=60) for _ in procs)}
    for p in procs:
        p.join(timeout=10)
    for name, (res, _) in got.items():
        assert isinstance(res, list), f"racer {name} failed: {res}"
    assert [p.exitcode for p in procs] == [0, 0]
    return got


def test_two_processes_never_get_overlapping_ways(tmp_path):
    # cache 1 has 3 free ways (01c); each asks for 2: exactly one may win each round
    got = _race(tmp_path, 25, locking=True, hook=False)
    a, b = got["a"][0], got["b"][0]
    for ma, mb in zip(a, b, strict=True):
        assert (ma is None) != (mb is None), (ma, mb)
        assert (ma or 0) & (mb or 0) == 0


def test_the_lock_holds_even_with_the_window_forced_open(tmp_path):
    # both stop between plan and mkdir waiting for each other: with the lock the other can
    # never get there (the wait times out), so the plans are serialized
    got = _race(tmp_path, 1, locking=True, hook=True)
    (ma,), (mb,) = got["a"][0], got["b"][0]
    assert (ma is None) != (mb is None)
    winner, loser = ("a", "b") if ma is not None else ("b", "a")
    # the winner waited in vain (timeout) inside the window; the loser could only plan
    # after the winner had written, found no room, and never reached the window
    assert (got[winner][1], got[loser][1]) == (1, 0)


def test_without_the_lock_the_race_is_real(tmp_path):
    got = _race(tmp_path, 2, locking=False, hook=True)
    assert got["a"][1] == got["b"][1] == 0  # both were in the window at once
    for ma, mb in zip(got["a"][0], got["b"][0], strict=True):
        assert ma == mb == 0x00C  # the same ways, twice: what the lock prevents


def test_snapshot_usage_caches_shows_the_new_group(tmp_path):
    from hostagent.config import config_from_dict
    from hostagent.snapshot import build_snapshot

    resctrl, sysfs = tree(tmp_path, "xeon-2s-cat")
    reserve(resctrl, sysfs, "rt1", "type=both,size=4608k,cache-id=1")
    snap = build_snapshot(probe_host(sysfs, resctrl), config_from_dict({}), [], host="h",
                          epoch="e", seq=1, now=0.0)
    entry = next(c for c in snap["usage"]["caches"] if c["id"] == 1)
    mine = [a for a in entry["allocations"] if a["group"] == "hostagent-rt1"]
    assert [(a["mask"], a["ways"], a["bytes"]) for a in mine] == [("00c", 2, 4718592)]
    assert entry["free_mask"] == "010"
