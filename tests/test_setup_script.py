"""``scripts/setup`` says what it is doing: one ``setup: ...`` line per step on stderr.

Run on a copy of the script in a temporary project (its ``pyproject.toml``, a ``.venv``
whose install stamp matches), so nothing is installed: the Debian packages are present
(skipped otherwise: the script would call apt-get), and the venv is either there or
created for real (``python -m venv``, no download).
"""

import os
import re
import shutil
import subprocess
import sys
from hashlib import sha256
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SETUP = ROOT / "scripts" / "setup"


def debian_packages() -> list[str]:
    [line] = [x for x in SETUP.read_text().splitlines() if x.startswith("PKGS=(")]
    return re.findall(r"[\w.+-]+", line[len("PKGS=("):].rstrip(")"))


def all_installed(pkgs: list[str]) -> bool:
    if shutil.which("dpkg-query") is None:
        return False
    for p in pkgs:
        r = subprocess.run(["dpkg-query", "-W", "-f=${Status}", p], capture_output=True,
                           text=True, timeout=30)
        if "install ok installed" not in r.stdout:
            return False
    return True


@pytest.fixture
def project(tmp_path):
    pkgs = debian_packages()
    if not all_installed(pkgs):
        pytest.skip("a Debian package of scripts/setup is missing: it would run apt-get")
    proj = tmp_path / "proj"
    (proj / "scripts").mkdir(parents=True)
    shutil.copy2(SETUP, proj / "scripts" / "setup")
    shutil.copy2(ROOT / "pyproject.toml", proj / "pyproject.toml")
    venv = proj / ".venv"
    venv.mkdir()
    stamp = sha256((proj / "pyproject.toml").read_bytes()).hexdigest()
    (venv / ".hostagent-installed").write_text(stamp + "\n")
    return proj, pkgs


def run_setup(proj: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHON": sys.executable}
    r = subprocess.run([str(proj / "scripts" / "setup")], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    return r


def test_every_step_is_one_line_when_nothing_is_to_do(project):
    proj, pkgs = project
    (proj / ".venv" / "bin").mkdir()
    (proj / ".venv" / "bin" / "python").symlink_to(sys.executable)
    r = run_setup(proj)
    assert r.stdout == ""
    assert r.stderr.splitlines() == [
        f"setup: Debian packages present ({' '.join(pkgs)})",
        "setup: .venv present",
        "setup: hostagent[test] in .venv up to date (pyproject.toml unchanged since the "
        "last install)",
        "setup: ready: .venv/bin/hostagent",
    ]


def test_the_venv_step_says_it_creates_the_venv(project):
    proj, _ = project
    r = run_setup(proj)
    lines = r.stderr.splitlines()
    assert lines[1] == f"setup: creating .venv ({sys.executable} -m venv)"
    assert (proj / ".venv" / "bin" / "python").exists()
    assert lines[2].startswith("setup: hostagent[test] in .venv up to date")
    assert all(line.startswith("setup: ") for line in lines), lines
