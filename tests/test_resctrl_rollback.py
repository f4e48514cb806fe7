"""A failed write tells the truth about what is left (hardening issue, item 14).

The kernel's ``schemata`` ignores ``O_TRUNC`` and refuses a bad write whole; a plain
file (a fixture copy) is truncated by the open, so a write that then fails leaves it
empty. The outcome in the error message is now read back from the file after the
failure (and after writing the previous content back), so it is true in both cases.

Failures are injected two ways: in a child process with ``RLIMIT_FSIZE`` 0, a real
write to a plain file fails with ``EFBIG`` after the truncating open (any write,
the write-back too: a full disk behaves alike); in-process, ``_write`` is replaced by
one shaped like the kernel (``EINVAL`` + ``info/last_cmd_status``, file untouched) or
like a plain file (truncated, then ``ENOSPC``).
"""

from __future__ import annotations

import errno
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
from test_resctrl_fs import kernel_accepts, tree

from hostagent import resctrl_fs
from hostagent.errors import HostagentError
from hostagent.resctrl_fs import ResctrlApplyError, carve, reserve


def hostagent_without_file_space(*argv: str) -> subprocess.CompletedProcess[str]:
    """``hostagent ARGV`` in a child that may not write a byte to a regular file."""

    def no_file_space() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.RLIM_INFINITY))

    return subprocess.run(
        [sys.executable, "-m", "hostagent.cli", *argv],
        capture_output=True, text=True, timeout=120, preexec_fn=no_file_space,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )


def test_failed_update_on_a_plain_file_says_what_the_file_now_holds(tmp_path):
    resctrl, sysfs = tree(tmp_path, "xeon-2s-cat")
    reserve(resctrl, sysfs, "rt1", "type=both,size=2304k,cache-id=1")
    schemata = Path(resctrl, "hostagent-rt1", "schemata")
    before = schemata.read_text()
    assert before == "L3:0=7c0;1=004\n"
    proc = hostagent_without_file_space(
        "resctrl", "reserve", "rt1", "type=both,size=4608k,cache-id=1",
        "--resctrl-root", resctrl, "--sysfs-root", sysfs)
    assert proc.returncode == 2 and proc.stdout == ""
    after = schemata.read_text()
    assert after == ""  # the open truncated it, and neither write could put anything back
    err = proc.stderr
    assert err.count("\n") == 1
    assert err.startswith(f"hostagent: writing {schemata} failed: File too large; ")
    assert "was not changed" not in err and "keeps its previous" not in err
    assert err.rstrip("\n").endswith(
        f"group hostagent-rt1: writing its previous schemata back failed too (File too "
        f"large); {schemata} now reads '' (before: 'L3:0=7c0;1=004\\n'); reserve it "
        "again or release it"
    )
    # with room again the same request succeeds: the emptied group (no CPUs, no tasks)
    # is an incomplete leftover, replaced
    r = reserve(resctrl, sysfs, "rt1", "type=both,size=4608k,cache-id=1")
    assert r.action == "created" and schemata.read_text() == "L3:0=7c0;1=00c\n"
    assert r.cleaned == (f"{schemata.parent} was incomplete: its schemata has no L3 line "
                         "(a reserve stopped or failed while writing it); removed")
    kernel_accepts(resctrl, sysfs)


def test_failed_carve_on_a_plain_file_says_what_the_file_now_holds(tmp_path):
    resctrl, sysfs = tree(tmp_path, "xeon-2s-cat")
    root = Path(resctrl, "schemata")
    before = root.read_text()
    proc = hostagent_without_file_space(
        "resctrl", "carve", "--ways", "4", "--cache-id", "0",
        "--resctrl-root", resctrl, "--sysfs-root", sysfs)
    assert proc.returncode == 2
    assert root.read_text() == ""
    assert "was not changed" not in proc.stderr
    assert proc.stderr.rstrip("\n").endswith(
        f"the default group: writing its previous schemata back failed too (File too "
        f"large); {root} now reads '' (before: {before!r}); write it back by hand"
    )
    # and the empty root schemata is never read as "every way free" (item 13)
    with pytest.raises(HostagentError, match="the default group has no L3 line"):
        reserve(resctrl, sysfs, "rt1", "type=both,size=4608k", dry_run=True)


def _plain_file_failure(fail_on: str, err: int = errno.ENOSPC):
    """A ``_write`` that fails like a plain file on a full disk: truncated, then an error
    (first write to ``fail_on`` only)."""
    real = resctrl_fs._write
    calls: list[str] = []

    def write(path, text, *, append=False):
        calls.append(os.path.basename(path))
        if os.path.basename(path) == fail_on and calls.count(fail_on) == 1:
            os.truncate(path, 0)
            raise OSError(err, os.strerror(err))
        real(path, text, append=append)

    return write, calls


def test_failed_update_truncated_then_written_back(tmp_path, monkeypatch):
    resctrl, sysfs = tree(tmp_path, "xeon-2s-cat")
    reserve(resctrl, sysfs, "rt1", "type=both,size=2304k,cache-id=1")
    schemata = Path(resctrl, "hostagent-rt1", "schemata")
    before = schemata.read_text()
    write, calls = _plain_file_failure("schemata")
    monkeypatch.setattr(resctrl_fs, "_write", write)
    with pytest.raises(ResctrlApplyError) as exc:
        reserve(resctrl, sysfs, "rt1", "type=both,size=4608k,cache-id=1")
    assert str(exc.value) == (
        f"writing {schemata} failed: No space left on device; "
        "group hostagent-rt1 keeps its previous schemata (written back)"
    )
    assert schemata.read_text() == before and calls == ["schemata", "schemata"]


def test_kernel_refusal_leaves_the_file_and_writes_nothing_back(tmp_path, monkeypatch):
    resctrl, sysfs = tree(tmp_path, "xeon-2s-cat")
    reserve(resctrl, sysfs, "rt1", "type=both,size=2304k,cache-id=1")
    schemata = Path(resctrl, "hostagent-rt1", "schemata")
    before = schemata.read_text()
    calls = []

    def kernel_write(path, text, *, append=False):  # EINVAL; the file is not touched
        calls.append(os.path.basename(path))
        Path(resctrl, "info", "last_cmd_status").write_text("mask 7f has non-consecutive\n")
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(resctrl_fs, "_write", kernel_write)
    with pytest.raises(ResctrlApplyError) as exc:
        reserve(resctrl, sysfs, "rt1", "type=both,size=4608k,cache-id=1")
    assert str(exc.value) == (
        f"writing {schemata} failed: Invalid argument; info/last_cmd_status says: mask 7f "
        "has non-consecutive; group hostagent-rt1 keeps its previous schemata"
    )
    assert calls == ["schemata"]  # read back, found unchanged: nothing written back
    assert schemata.read_text() == before


def test_failed_cpus_write_of_an_update_writes_the_schemata_back(tmp_path, monkeypatch):
    resctrl, sysfs = tree(tmp_path, "xeon-2s-cat")
    reserve(resctrl, sysfs, "rt1", "type=both,size=2304k,cache-id=1", cpus="14")
    group = Path(resctrl, "hostagent-rt1")
    before = (group / "schemata").read_text()
    write, calls = _plain_file_failure("cpus_list", errno.EINVAL)
    monkeypatch.setattr(resctrl_fs, "_write", write)
    with pytest.raises(ResctrlApplyError) as exc:
        reserve(resctrl, sysfs, "rt1", "type=both,size=4608k,cache-id=1", cpus="15")
    assert str(exc.value) == (
        f"writing {group}/cpus_list failed: Invalid argument; "
        "group hostagent-rt1 keeps its previous schemata (written back)"
    )
    assert (group / "schemata").read_text() == before
    assert calls == ["schemata", "cpus_list", "schemata"]


def test_failed_carve_written_back(tmp_path, monkeypatch):
    resctrl, sysfs = tree(tmp_path, "xeon-2s-cat")
    root = Path(resctrl, "schemata")
    before = root.read_text()
    write, _ = _plain_file_failure("schemata")
    monkeypatch.setattr(resctrl_fs, "_write", write)
    with pytest.raises(ResctrlApplyError) as exc:
        carve(resctrl, sysfs, 4, cache_id=0)
    assert str(exc.value) == (
        f"writing {root} failed: No space left on device; "
        "the default group keeps its previous schemata (written back)"
    )
    # written back without the kernel's padding
    assert before == "    L3:0=7c0;1=7c0\n    MB:0=100;1=100\n"
    assert root.read_text() == "L3:0=7c0;1=7c0\nMB:0=100;1=100\n"


def test_failed_task_write_of_an_update_names_the_tasks_already_moved(tmp_path, monkeypatch):
    resctrl, sysfs = tree(tmp_path, "xeon-2s-cat")
    reserve(resctrl, sysfs, "rt1", "type=both,size=2304k,cache-id=1")
    group = Path(resctrl, "hostagent-rt1")
    before = (group / "schemata").read_text()
    real = resctrl_fs._write
    me, parent = os.getpid(), os.getppid()

    def write(path, text, *, append=False):  # the kernel refuses the second task
        if os.path.basename(path) == "tasks" and text == f"{parent}\n":
            raise OSError(errno.ESRCH, "No such process")
        real(path, text, append=append)

    monkeypatch.setattr(resctrl_fs, "_write", write)
    with pytest.raises(ResctrlApplyError) as exc:
        reserve(resctrl, sysfs, "rt1", "type=both,size=4608k,cache-id=1", tasks=[me, parent])
    assert str(exc.value) == (
        f"writing {group}/tasks failed: No such process; group hostagent-rt1 keeps its "
        f"previous schemata (written back); tasks already moved into it stay there: {me}"
    )
    assert (group / "schemata").read_text() == before
    assert (group / "tasks").read_text() == f"{me}\n"
