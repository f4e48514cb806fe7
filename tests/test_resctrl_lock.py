"""Waiting for the resctrl lock is bounded and reported (hardening issue, item 12).

A real holder process takes ``flock`` on a fixture copy's resctrl root, as libvirt or
another hostagent would, and either stops itself (SIGSTOP: a stuck holder) or waits to
be told to let go. The commands run as real ``hostagent`` processes with a short
``--lock-timeout``. Nothing asserts on durations: only on what was printed, the exit
code, and that each command ended within a generous bound.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from test_resctrl_fs import tree

from hostagent.cli import main
from hostagent.resctrl_fs import lock_holders

HOLDER = r"""
import fcntl, os, signal, sys
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)
fcntl.flock(fd, fcntl.LOCK_SH if sys.argv[2] == "shared" else fcntl.LOCK_EX)
sys.stdout.write("locked\n")
sys.stdout.flush()
if sys.argv[3] == "stop":
    os.kill(os.getpid(), signal.SIGSTOP)
else:
    sys.stdin.readline()  # let go when told
"""

BOUND = 120  # seconds: a generous bound on any one command here, never asserted as timing


def read_line(stream, what: str) -> str:
    ready, _, _ = select.select([stream], [], [], BOUND)
    assert ready, f"no {what} within {BOUND} s"
    return stream.readline()


@contextmanager
def holder(root: str, mode: str = "exclusive", then: str = "stop") -> Iterator[subprocess.Popen]:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, root, mode, then],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert read_line(proc.stdout, "lock") == "locked\n"
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=BOUND)
        proc.stdin.close()
        proc.stdout.close()


def hostagent(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hostagent.cli", *argv],
                          capture_output=True, text=True, timeout=BOUND)


def test_a_stopped_holder_makes_free_and_reserve_fail_after_the_timeout(tmp_path):
    resctrl, sysfs = tree(tmp_path, "xeon-2s-cat")
    roots = ["--resctrl-root", resctrl, "--sysfs-root", sysfs]
    commands = (["free"], ["reserve", "rt1", "type=both,size=4608k", "--cpus", "12"],
                ["release", "rt1"], ["carve", "--ways", "4"])
    with holder(resctrl) as h:
        assert lock_holders(resctrl) == [h.pid]
        # the four wait at once (each for its own 2 s), so the test waits 2 s, not 8
        waiting = [subprocess.Popen([sys.executable, "-m", "hostagent.cli", "resctrl", *argv,
                                     *roots, "--lock-timeout", "2"],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                   for argv in commands]
        for argv, waiter in zip(commands, waiting, strict=True):
            out, err = waiter.communicate(timeout=BOUND)
            proc = subprocess.CompletedProcess(waiter.args, waiter.returncode, out, err)
            assert (proc.returncode, proc.stdout) == (2, ""), argv
            lines = proc.stderr.splitlines()
            assert lines[0].startswith(
                f"hostagent: waiting for the resctrl lock on {resctrl}, held by pid {h.pid} (")
            assert lines[-1].startswith(
                f"hostagent: {resctrl}: the resctrl lock is held by pid {h.pid} (")
            assert lines[-1].endswith(
                "and was not let go within 2 s (--lock-timeout); nothing was done")
            assert len(lines) == 2
        assert not Path(resctrl, "hostagent-rt1").exists()
    assert lock_holders(resctrl) == []
    assert hostagent("resctrl", "free", *roots, "--lock-timeout", "0").returncode == 0


def test_the_waiter_goes_on_once_the_holder_lets_go(tmp_path):
    resctrl, sysfs = tree(tmp_path, "xeon-2s-cat")
    with holder(resctrl, then="wait") as h:
        waiter = subprocess.Popen(
            [sys.executable, "-m", "hostagent.cli", "resctrl", "reserve", "rt1",
             "type=both,size=4608k,cache-id=1", "--resctrl-root", resctrl,
             "--sysfs-root", sysfs, "--lock-timeout", "600"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            notice = read_line(waiter.stderr, "notice")
            assert notice.startswith(f"hostagent: waiting for the resctrl lock on {resctrl}, "
                                     f"held by pid {h.pid} (")
            assert not Path(resctrl, "hostagent-rt1").exists()
            h.stdin.write("go\n")
            h.stdin.flush()
            out, err = waiter.communicate(timeout=BOUND)
        finally:
            if waiter.poll() is None:
                waiter.kill()
                waiter.communicate(timeout=BOUND)
    assert waiter.returncode == 0 and err == ""
    assert out.startswith("group hostagent-rt1: created")
    assert Path(resctrl, "hostagent-rt1", "schemata").read_text() == "L3:0=7c0;1=00c\n"


def test_shared_holders_do_not_block_free_but_block_changes(tmp_path):
    resctrl, sysfs = tree(tmp_path, "xeon-2s-cat")
    roots = ["--resctrl-root", resctrl, "--sysfs-root", sysfs]
    with holder(resctrl, mode="shared") as h:
        assert hostagent("resctrl", "free", *roots, "--lock-timeout", "0").returncode == 0
        proc = hostagent("resctrl", "reserve", "rt1", "type=both,size=4608k", *roots,
                         "--lock-timeout", "0")
        assert proc.returncode == 2
        assert proc.stderr == (
            f"hostagent: {resctrl}: the resctrl lock is held by pid {h.pid} "
            f"({_comm(h.pid)}) and was not let go within 0 s (--lock-timeout); "
            "nothing was done\n"
        )


def _comm(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


@pytest.mark.parametrize("value", ["-1", "abc", "nan", "inf", "3601"])
def test_bad_lock_timeouts(tmp_path, capsys, value):
    resctrl, sysfs = tree(tmp_path, "xeon-2s-cat")
    code = main(["resctrl", "free", "--resctrl-root", resctrl, "--sysfs-root", sysfs,
                 f"--lock-timeout={value}"])
    out, err = capsys.readouterr()
    assert (code, out) == (2, "")
    assert err == (f"hostagent: --lock-timeout {value!r}: give a number of seconds from 0 "
                   "to 3600\n")


def test_a_killed_holder_lets_go(tmp_path):
    # the holder's name comes from /proc/<pid>/comm; a holder that dies meanwhile just
    # lets go of the lock, so the waiter goes on (no error about a vanished pid)
    resctrl, sysfs = tree(tmp_path, "xeon-2s-cat")
    with holder(resctrl) as h:
        os.kill(h.pid, signal.SIGKILL)
        h.wait(timeout=BOUND)
        deadline = time.monotonic() + BOUND
        while lock_holders(resctrl):  # the kernel drops the lock as the process dies
            assert time.monotonic() < deadline
            time.sleep(0.01)
        proc = hostagent("resctrl", "free", "--resctrl-root", resctrl, "--sysfs-root", sysfs,
                         "--lock-timeout", "0")
        assert proc.returncode == 0 and proc.stderr == ""
