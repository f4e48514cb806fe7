"""Groups of our namespace left by a ``reserve`` that was killed (hardening issue, item 12).

A real ``hostagent resctrl reserve`` runs in a child process against a fixture copy and
stops itself (SIGSTOP) at a chosen point: right after the ``mkdir`` of the group, or
right after the write of its ``schemata``. The stop is injected from outside the code
under test: the child wraps ``os.mkdir`` or ``resctrl_fs._write`` before calling the
CLI's ``main``. The test then kills it with SIGKILL, as ``kill -9`` would, and checks
that ``free`` reports what is left, that ``release`` removes it, and that the next
``reserve`` of that name replaces it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from test_resctrl_fs import kernel_accepts, tree

from hostagent.cli import main
from hostagent.probe.host import probe_host
from hostagent.resctrl_fs import find_leftovers

SPEC = "type=both,size=4608k,cache-id=1"

STOP_AFTER = r"""
import os, signal, sys
from hostagent import resctrl_fs
from hostagent.cli import main

step = sys.argv[1]
real_mkdir, real_write = os.mkdir, resctrl_fs._write

def stop():
    os.kill(os.getpid(), signal.SIGSTOP)

def mkdir(path, *args, **kw):
    real_mkdir(path, *args, **kw)
    if step == "mkdir" and os.path.basename(path).startswith("hostagent-"):
        stop()

def write(path, text, **kw):
    real_write(path, text, **kw)
    if os.path.basename(path) == step:
        stop()

os.mkdir = mkdir
resctrl_fs._write = write
sys.exit(main(sys.argv[2:]))
"""


def kill_reserve_after(step: str, resctrl: str, sysfs: str, *extra: str) -> None:
    """Run ``hostagent resctrl reserve rt1 SPEC`` until it stops after ``step``, then
    SIGKILL it."""
    proc = subprocess.Popen(
        [sys.executable, "-c", STOP_AFTER, step, "resctrl", "reserve", "rt1", SPEC,
         "--resctrl-root", resctrl, "--sysfs-root", sysfs, *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while True:  # wait for the stop (or an early exit), bounded
            pid, status = os.waitpid(proc.pid, os.WNOHANG | os.WUNTRACED)
            if pid:
                assert os.WIFSTOPPED(status), (
                    f"reserve ended before {step}: {proc.stderr.read().decode()}")
                break
            assert time.monotonic() < deadline, f"reserve did not stop after {step}"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        assert proc.returncode == -signal.SIGKILL
    finally:
        if proc.returncode is None:
            proc.kill()
            proc.wait(timeout=60)
        proc.stdout.close()
        proc.stderr.close()


def cli(capsys, resctrl: str, sysfs: str, *argv: str) -> tuple[int, str, str]:
    code = main(["resctrl", *argv, "--resctrl-root", resctrl, "--sysfs-root", sysfs])
    out, err = capsys.readouterr()
    return code, out, err


def test_killed_after_mkdir(tmp_path, capsys):
    resctrl, sysfs = tree(tmp_path, "xeon-2s-cat")
    kill_reserve_after("mkdir", resctrl, sysfs, "--cpus", "12-13")
    group = Path(resctrl, "hostagent-rt1")
    assert group.is_dir() and list(group.iterdir()) == []  # a plain directory: no files

    code, out, _ = cli(capsys, resctrl, sysfs, "free")
    assert code == 0
    assert (
        "warning: hostagent-rt1 is incomplete: it has no schemata file (a reserve stopped "
        "after its mkdir); 'hostagent resctrl release rt1' removes it, and the next "
        "'hostagent resctrl reserve rt1 ...' replaces it"
    ) in out.splitlines()
    code, out, _ = cli(capsys, resctrl, sysfs, "free", "--json")
    assert json.loads(out)["leftovers"] == [
        {"group": "hostagent-rt1", "path": str(group), "state": "incomplete",
         "detail": "it has no schemata file (a reserve stopped after its mkdir)"}
    ]

    # the next reserve of that name replaces it (it used to fail with "File exists")
    code, out, err = cli(capsys, resctrl, sysfs, "reserve", "rt1", SPEC, "--cpus", "12-13")
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0] == f"group hostagent-rt1: created ({group})"
    assert (f"cleaned: {group} was incomplete: it has no schemata file (a reserve stopped "
            "after its mkdir); removed") in lines
    assert (group / "schemata").read_text() == "L3:0=7c0;1=00c\n"
    assert (group / "cpus_list").read_text() == "12-13\n"
    kernel_accepts(resctrl, sysfs)
    code, out, _ = cli(capsys, resctrl, sysfs, "free", "--json")
    assert json.loads(out)["leftovers"] == []


def test_killed_after_mkdir_then_released(tmp_path, capsys):
    resctrl, sysfs = tree(tmp_path, "xeon-2s-cat")
    kill_reserve_after("mkdir", resctrl, sysfs)
    code, out, _ = cli(capsys, resctrl, sysfs, "release", "rt1")
    assert (code, out) == (0, "group hostagent-rt1: removed\n")
    assert not Path(resctrl, "hostagent-rt1").exists()
    assert "warning" not in cli(capsys, resctrl, sysfs, "free")[1]


def test_killed_after_the_schemata_write(tmp_path, capsys):
    resctrl, sysfs = tree(tmp_path, "xeon-2s-cat")
    kill_reserve_after("schemata", resctrl, sysfs, "--cpus", "12-13")
    group = Path(resctrl, "hostagent-rt1")
    assert (group / "schemata").read_text() == "L3:0=7c0;1=00c\n"
    assert not (group / "cpus_list").exists()  # it never got its CPUs

    code, out, _ = cli(capsys, resctrl, sysfs, "free")
    assert code == 0
    assert (
        "warning: hostagent-rt1 is unused: it alone holds L3:1=00c but has no CPUs and no "
        "tasks (a reserve stopped before attaching them, or one made without --cpus/--tasks); "
        "'hostagent resctrl release rt1' removes it, or 'hostagent resctrl reserve rt1 ...' "
        "completes it"
    ) in out.splitlines()
    code, out, _ = cli(capsys, resctrl, sysfs, "free", "--json")
    doc = json.loads(out)
    assert [(x["group"], x["state"]) for x in doc["leftovers"]] == [("hostagent-rt1", "unused")]
    assert doc["caches"][1]["free_mask"] == "010"  # its ways stay held meanwhile

    # the next reserve of that name completes it in place
    code, out, err = cli(capsys, resctrl, sysfs, "reserve", "rt1", SPEC, "--cpus", "12-13")
    assert (code, err) == (0, "")
    assert out.startswith(f"group hostagent-rt1: updated ({group})")
    assert "  L3:1=00c  2 ways = 4.5 MiB (kept)" in out
    assert (group / "cpus_list").read_text() == "12-13\n"
    kernel_accepts(resctrl, sysfs)
    assert find_leftovers(resctrl, probe_host(sysfs, resctrl)) == []


def test_a_truncated_schemata_is_incomplete_and_replaced(tmp_path, capsys):
    # killed between the truncating open and the write: an empty schemata file
    resctrl, sysfs = tree(tmp_path, "xeon-2s-cat")
    group = Path(resctrl, "hostagent-rt1")
    group.mkdir()
    (group / "schemata").write_text("")
    (found,) = find_leftovers(resctrl, probe_host(sysfs, resctrl))
    assert (found.state, found.detail) == (
        "incomplete",
        "its schemata has no L3 line (a reserve stopped or failed while writing it)")
    code, out, _ = cli(capsys, resctrl, sysfs, "reserve", "rt1", SPEC)
    assert code == 0 and out.startswith("group hostagent-rt1: created")
    assert (group / "schemata").read_text() == "L3:0=7c0;1=00c\n"


def test_only_our_namespace_is_reported_or_cleaned(tmp_path, capsys):
    resctrl, sysfs = tree(tmp_path, "xeon-2s-cat")
    Path(resctrl, "stray").mkdir()  # not ours: never reported, never removed
    link = Path(resctrl, "hostagent-link")
    link.symlink_to(Path(resctrl, "stray"))  # a symlink is not a group directory
    assert find_leftovers(resctrl, probe_host(sysfs, resctrl)) == []
    # the fixture's own groups (batch: no CPUs, 3 tasks; qemu-...: no CPUs) are not ours
    assert "warning" not in cli(capsys, resctrl, sysfs, "free")[1]
    assert Path(resctrl, "stray").is_dir() and link.is_symlink()


def test_a_group_in_use_with_a_truncated_schemata_is_updated_not_removed(tmp_path):
    # its tasks and CPUs must not be dropped: the next reserve rewrites its schemata
    from hostagent.resctrl_fs import reserve

    resctrl, sysfs = tree(tmp_path, "xeon-2s-cat")
    reserve(resctrl, sysfs, "rt1", SPEC, cpus="12-13")
    group = Path(resctrl, "hostagent-rt1")
    (group / "schemata").write_text("")
    (found,) = find_leftovers(resctrl, probe_host(sysfs, resctrl))
    assert found.state == "incomplete"
    r = reserve(resctrl, sysfs, "rt1", SPEC)
    assert (r.action, r.cleaned) == ("updated", None)
    assert (group / "schemata").read_text() == "L3:0=7c0;1=00c\n"
    assert (group / "cpus_list").read_text() == "12-13\n"
    assert find_leftovers(resctrl, probe_host(sysfs, resctrl)) == []
