"""``scripts/install`` refuses an interpreter the unit hides from the service (issue 22).

The unit has ``ProtectHome=yes`` and ``PrivateTmp=yes``: a venv made with an interpreter
under /home, /root, /run/user, /tmp or /var/tmp fails to start under systemd with status
``203/EXEC``, in a restart loop (seen under a real systemd: scripts/systemd-test). The
install refuses it up front, with exit 2, one line and nothing written.
"""

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SYSTEM_PYTHON = Path("/usr/bin/python3")


@pytest.mark.skipif(not SYSTEM_PYTHON.exists(), reason="no /usr/bin/python3 to copy")
def test_an_interpreter_under_tmp_is_refused_before_anything_is_written():
    # a real interpreter whose own path is under /tmp (a copy of the binary, not a link)
    tmp = Path(tempfile.mkdtemp(prefix="ha-python-", dir="/tmp"))
    try:
        interp = tmp / "bin" / "python3"
        interp.parent.mkdir()
        shutil.copy2(SYSTEM_PYTHON.resolve(), interp)
        refused(interp, tmp / "root")
    finally:
        shutil.rmtree(tmp)


def refused(interp: Path, root: Path) -> None:
    env = {**os.environ, "DESTDIR": str(root), "PYTHON": str(interp),
           "PIP_NO_INDEX": "1", "PIP_NO_DEPS": "1"}
    r = subprocess.run([str(ROOT / "scripts" / "install"), str(ROOT)], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    [line] = r.stderr.splitlines()
    assert line.startswith(f"install: the interpreter {interp} is under a directory the "
                           "unit hides"), line
    assert "203/EXEC" in line and "PYTHON=/usr/bin/python3" in line, line
    assert not root.exists()
