"""``python -m build``: the sdist and the wheel build from the checkout, within a time limit.

The fixture trees under ``fixtures/sysfs`` are full of sysfs symlink cycles; any build step
that globs the whole project following symlinks never finishes (it did: flit_core's
default sdist excludes ``**/__pycache__`` are globbed over the whole project as soon as a
``[tool.flit.sdist]`` table exists). The build runs here exactly as an operator runs it,
``python -m build``, with ``--no-isolation`` so that nothing is downloaded (``build`` and
``flit_core`` are in the test extra). It runs in its own process group, killed as a whole
at the time limit: the build backend runs in a grandchild process.
"""

import importlib.util
import os
import signal
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: a build takes a few seconds; one that walks the fixtures' symlink cycles never ends
BUILD_TIME_LIMIT_SECONDS = 120


def run_build(*args: str, outdir: Path) -> subprocess.CompletedProcess[str]:
    """``python -m build --no-isolation ARGS --outdir OUTDIR ROOT``, killed (process group)
    after ``BUILD_TIME_LIMIT_SECONDS``; a timeout fails the test saying so."""
    missing = [m for m in ("build", "flit_core") if importlib.util.find_spec(m) is None]
    assert not missing, (f"{', '.join(missing)} not installed: they are in the test extra "
                         "(scripts/setup installs it: pip install -e '.[test]')")
    cmd = [sys.executable, "-m", "build", "--no-isolation", *args, "--outdir", str(outdir),
           str(ROOT)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=BUILD_TIME_LIMIT_SECONDS)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"{' '.join(cmd)} did not finish in {BUILD_TIME_LIMIT_SECONDS} s "
                             f"(walking the fixtures' symlink cycles?):\n{out[-2000:]}") from None
    assert proc.returncode == 0, out
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


def package_files() -> set[str]:
    """The files of the hostagent package in the checkout (no byte-code)."""
    return {
        p.relative_to(ROOT).as_posix() for p in (ROOT / "hostagent").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    }


def test_python_m_build_makes_the_sdist_and_the_wheel_in_time(tmp_path):
    run_build(outdir=tmp_path)  # sdist, then the wheel built from that sdist
    [sdist] = tmp_path.glob("hostagent-*.tar.gz")
    [wheel] = tmp_path.glob("hostagent-*.whl")
    with tarfile.open(sdist) as tf:
        top = f"{sdist.name.removesuffix('.tar.gz')}/"
        names = {m.name.removeprefix(top) for m in tf.getmembers() if m.isfile()}
    assert not [n for n in names if n.startswith("fixtures/")], sorted(names)
    assert {"pyproject.toml", "README.md", "PKG-INFO"} <= names
    assert package_files() <= names, sorted(package_files() - names)
    with zipfile.ZipFile(wheel) as zf:
        in_wheel = set(zf.namelist())
    assert package_files() <= in_wheel, sorted(package_files() - in_wheel)
    assert any(n.endswith(".dist-info/entry_points.txt") for n in in_wheel)
