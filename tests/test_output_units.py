"""Text output a person reads (issue "Output a person reads", items 15 and 16): one unit
style (IEC, ``4.5 MiB``) and correct plurals in every command; ``probe``'s legends only
for what the host has; way-map letters derived from the group name, the same in
``probe``, ``resctrl free`` and ``show`` and on every run."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from libvirt_helpers import FIXTURES, probe_fixture

from hostagent.cli import main
from hostagent.commands.show import way_maps
from hostagent.config import Config
from hostagent.probe.report import GROUP_LETTERS, group_letters, way_legend
from hostagent.snapshot import build_snapshot
from hostagent.units import format_kib, format_size, plural

NAMES = sorted(p.name for p in FIXTURES.iterdir() if (p / "sys").is_dir())
# a number glued to a unit ("4608KiB", "2M:"), or a plural left to the reader
GLUED = re.compile(r"\d(?:KiB|MiB|GiB|TiB|[KMG]\b)|\w\(s\)")


def run(capsys, *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    code = main(list(argv))
    return code, capsys.readouterr().out


def test_sizes_are_iec_with_a_space_and_exact_unless_asked():
    assert [format_size(n) for n in (0, 1000, 1024, 4718592, 1 << 30, 2359296, 1441792,
                                      1049600, 3 << 39)] == [
        "0 B", "1000 B", "1 KiB", "4.5 MiB", "1 GiB", "2.25 MiB", "1.375 MiB", "1025 KiB",
        "1.5 TiB"]
    assert format_size(16694788096, approx=True) == "15.5 GiB"
    assert format_kib(2048) == "2 MiB" and format_kib(1048576, sep="") == "1GiB"
    assert (plural(1, "way"), plural(0, "way"), plural(2, "task")) == (
        "1 way", "0 ways", "2 tasks")


@pytest.mark.parametrize("name", NAMES)
def test_probe_report_has_one_unit_style_and_real_plurals(name, capsys):
    code, out = run(capsys, "probe", "--sysfs-root", str(FIXTURES / name / "sys"))
    assert code == 0
    assert not GLUED.findall(out), GLUED.findall(out)


def test_probe_report_sizes_and_counts(capsys):
    _, out = run(capsys, "probe", "--sysfs-root", str(FIXTURES / "xeon-2s-cat/sys"))
    assert "L3   24.75 MiB 11-way: 2" in out
    assert "L3: 11 ways of 2.25 MiB, min 1 way, 16 CLOSIDs" in out
    assert "free 3 ways (6.75 MiB), largest run 3 ways (6.75 MiB)" in out
    assert ": exclusive, 1 task, cpus 8-9,32-33" in out
    assert "socket 0 die 0 (cell 0): 12 cores, 2 threads each" in out


def test_resctrl_free_sizes_and_counts(capsys, tmp_path):
    dst = tmp_path / "resctrl"
    shutil.copytree(FIXTURES / "xeon-2s-cat/sys/fs/resctrl", dst, symlinks=True)
    code, out = run(capsys, "resctrl", "free", "--resctrl-root", str(dst), "--sysfs-root",
                    str(FIXTURES / "xeon-2s-cat/sys"))
    assert code == 0 and not GLUED.findall(out)
    assert "free 2 ways (4.5 MiB), largest run 2 ways (4.5 MiB), free mask 030" in out
    assert ": exclusive, 1 task, cpus 8-9,32-33" in out


def test_probe_legend_describes_this_hosts_cores(capsys):
    _, out = run(capsys, "probe", "--sysfs-root", str(FIXTURES / "vm-1s-nosmt/sys"))
    assert "  (core=thread; 0-3=0-3 is core 0 = thread 0, core 1 = 1, ...)" in out
    assert "threads" not in out and "224" not in out
    _, out = run(capsys, "probe", "--sysfs-root", str(FIXTURES / "xeon-2s-cat/sys"))
    assert "  (core=threads; 0-5=0-5/24-29 is core 0 = threads 0,24, core 1 = 1,25, ...)" \
        in out


def test_way_legend_names_only_the_symbols_shown(capsys):
    assert way_legend(["**DDD..ggzz"]) == (
        ". free, D the default group, * held by several groups, letters: the groups listed")
    assert way_legend(["--DD"]) == "- free but shared with I/O (shareable_bits), " \
        "D the default group"
    _, out = run(capsys, "probe", "--sysfs-root", str(FIXTURES / "epyc-amd/sys"))
    (legend,) = [ln for ln in out.splitlines() if "legend:" in ln]
    assert legend == "  legend: . free, * held by several groups, letters: the groups listed"
    _, out = run(capsys, "probe", "--sysfs-root", str(FIXTURES / "vm-1s-nosmt/sys"))
    assert "legend" not in out  # no resctrl, no way map, no legend


def test_group_letters_come_from_the_names_not_the_order():
    names = ["batch", "nfv-excl", "qemu-1-rt1-vcpus_2-3", "sparse", "scavenger"]
    letters = group_letters(names)
    assert letters == group_letters(reversed(names)) == group_letters(["", *names, "batch"])
    assert letters[""] == "D" and "D" not in GROUP_LETTERS
    assert (letters["batch"], letters["nfv-excl"], letters["qemu-1-rt1-vcpus_2-3"]) == (
        "s", "g", "z")
    # another group (sorting first) leaves the others' letters alone
    assert {k: v for k, v in group_letters(["aaa-first", *names]).items()
            if k != "aaa-first"} == letters
    # two names wanting one letter: the first in sorted order keeps it, the next moves on
    clash = [n for n in (f"g{i}" for i in range(400))
             if group_letters([n])[n] == letters["batch"]][:2]
    both = group_letters(clash)
    assert both[clash[0]] == "s" and both[clash[1]] != "s"
    # more groups than letters: the rest are '?'
    many = group_letters(f"grp{i}" for i in range(len(GROUP_LETTERS) + 2))
    assert sorted(many.values()).count("?") == 2


def test_probe_free_and_show_draw_a_group_with_one_letter(capsys, tmp_path):
    dst = tmp_path / "resctrl"
    shutil.copytree(FIXTURES / "xeon-2s-cat/sys/fs/resctrl", dst, symlinks=True)
    # a group whose name sorts first: with letters by position every other one moved
    shutil.copytree(dst / "batch", dst / "aaa-first", symlinks=True)
    (dst / "aaa-first" / "schemata").write_text("L3:0=600;1=020\nMB:0=30;1=30\n")
    sysfs = FIXTURES / "xeon-2s-cat/sys"
    _, probe = run(capsys, "probe", "--sysfs-root", str(sysfs), "--resctrl-root", str(dst))
    assert "group g nfv-excl: exclusive" in probe and "group s batch: shareable" in probe
    _, free = run(capsys, "resctrl", "free", "--json", "--sysfs-root", str(sysfs),
                  "--resctrl-root", str(dst))
    letters = {g["name"]: g["letter"] for g in json.loads(free)["groups"]}
    assert letters == group_letters(letters) and letters["nfv-excl"] == "g"
    topo = probe_fixture("xeon-2s-cat")
    snap = json.loads(json.dumps(build_snapshot(topo, Config(), [], host="h", epoch="e",
                                                seq=1, now=0.0)))
    drawn = "\n".join(way_maps(snap))
    assert "L3#0   **DDD..ggzz  free 2 ways, largest run 2 ways" in drawn
    assert "    g nfv-excl" in drawn and "    s batch" in drawn
    assert "(most significant first; . free, D the default group, * held by several " \
        "groups, letters: the groups listed)" in drawn


def test_show_and_snapshot_summary_use_the_same_units(tmp_path):
    from hostagent.commands.show import render as show

    topo = probe_fixture("xeon-2s-cat")
    snap = json.loads(json.dumps(build_snapshot(topo, Config(), [], host="h", epoch="e",
                                                seq=1, now=0.0)))
    out = show(snap)
    assert "2 MiB 0/2048, 1 GiB 0/32" in out  # per-cell hugepages used/free
    assert "  c0  1 GiB: total 32" in out
    assert not GLUED.findall(out), GLUED.findall(out)


def test_reserve_and_its_errors_print_sizes_as_iec(capsys, tmp_path):
    dst = tmp_path / "resctrl"
    shutil.copytree(FIXTURES / "xeon-2s-cat/sys/fs/resctrl", dst, symlinks=True)
    roots = ["--resctrl-root", str(dst), "--sysfs-root", str(FIXTURES / "xeon-2s-cat/sys")]
    code, out = run(capsys, "resctrl", "reserve", "rt1", "type=both,size=4608k", *roots)
    assert code == 0 and "  L3:1=00c  2 ways = 4.5 MiB" in out
    code = main(["resctrl", "reserve", "rt2", "type=both,size=2m", *roots])
    err = capsys.readouterr().err
    assert code == 2 and "size 2 MiB is not a whole number of L3 ways (one way = 2.25 MiB " \
        "= 2359296 bytes); nearest valid sizes: 2.25 MiB (1 way) and 4.5 MiB (2 ways)" in err


def test_no_command_text_keeps_its_own_size_formatter():
    """One helper: the old formatters (``human_bytes``, ``exact_size``, ``_size``) are gone
    from the modules that print for a person."""
    root = Path(__file__).resolve().parent.parent / "hostagent"
    for rel in ("probe/report.py", "commands/show.py", "commands/watch.py",
                "commands/snapshot.py", "commands/resctrl.py", "resctrl.py", "fit/explain.py"):
        text = (root / rel).read_text()
        assert not re.search(r"def (human_bytes|exact_size|_size)\(", text), rel
