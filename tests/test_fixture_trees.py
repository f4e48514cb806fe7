"""tests/fixture_trees.py and tests/conftest.py: copies of only what a test changes, the
shared copies kept unchanged, and missing fixture trees failing in CI, skipped elsewhere."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from fixture_trees import (
    FIXTURE_NAMES,
    FIXTURES,
    check_shared_trees,
    copy_of,
    need_fixture,
    shared_tree,
)

from hostagent.probe.host import probe_host, probe_json

ROOT = Path(__file__).resolve().parent.parent
CPU = "devices/system/cpu"
NODE0 = "devices/system/node/node0"


def entries(top: Path) -> int:
    """File entries under ``top`` (symlinked directories not followed)."""
    return sum(len(d) + len(f) for _, d, f in os.walk(top))


def probe_text(root: Path) -> dict:
    return probe_json(probe_host(root, root / "fs" / "resctrl"))


def test_fixture_names_are_the_trees_on_disk():
    on_disk = sorted(p.name for p in FIXTURES.iterdir() if (p / "sys").is_dir())
    assert FIXTURE_NAMES == on_disk and len(FIXTURE_NAMES) == 7


def test_copy_of_makes_only_the_changed_paths_the_tests_own(tmp_path):
    rel = "fs/resctrl/batch/schemata"
    root = copy_of("xeon-2s-cat", tmp_path, rel)
    assert probe_text(root) == probe_text(need_fixture("xeon-2s-cat"))
    # the changed file and every directory above it are real; the rest is shared
    path = root / rel
    assert path.is_file() and not path.is_symlink()
    for parent in path.relative_to(root).parents:
        assert not (root / parent).is_symlink()
    assert (root / "devices").is_symlink()
    assert entries(tmp_path) < 60 < 3600 < entries(need_fixture("xeon-2s-cat"))
    path.write_text("    L3:0=6x0;1=020\n")
    assert "0=600" in (FIXTURES / "xeon-2s-cat/sys" / rel).read_text()
    assert "0=600" in (shared_tree("xeon-2s-cat") / rel).read_text()
    assert check_shared_trees() == []


def test_a_changed_directory_is_copied_whole_and_new_paths_can_be_made(tmp_path):
    root = copy_of("vm-1s-nosmt", tmp_path, f"{CPU}/cpu0/cache", f"{CPU}/cpu9")
    cache = root / CPU / "cpu0/cache"
    assert not any(p.is_symlink() for p in cache.rglob("*"))
    assert len(list(cache.rglob("*"))) == len(list(
        (need_fixture("vm-1s-nosmt") / CPU / "cpu0/cache").rglob("*")))
    (root / CPU / "cpu9").mkdir()
    shutil.rmtree(cache / "index3")
    assert check_shared_trees() == []
    assert (shared_tree("vm-1s-nosmt") / CPU / "cpu0/cache/index3").is_dir()


def test_a_change_through_a_symlink_of_the_tree_is_the_tests_own(tmp_path):
    """bus/pci/devices/<addr> is a link into devices/pci0000:00/: both sides are real."""
    rel = "bus/pci/devices/0000:00:03.0/numa_node"
    root = copy_of("vm-1s-nosmt", tmp_path, rel)
    assert os.path.realpath(root / rel).startswith(os.path.realpath(tmp_path))
    (root / rel).write_text("0\n")
    [dev] = [d for d in probe_text(root)["pci"] if d["address"] == "0000:00:03.0"]
    assert dev["numa_node"] == 0  # the fixture says -1
    assert check_shared_trees() == []
    assert (shared_tree("vm-1s-nosmt") / rel).read_text() == "-1\n"


def test_a_write_into_the_shared_copy_is_found_and_undone(tmp_path):
    root = copy_of("vm-1s-nosmt", tmp_path, f"{CPU}/online")
    meminfo = root / NODE0 / "meminfo"  # not named: it is the shared copy's
    good = meminfo.read_text()
    meminfo.write_text("garbage\n")
    shared = shared_tree("vm-1s-nosmt")
    assert check_shared_trees() == [str(shared / NODE0 / "meminfo")]
    assert (shared / NODE0 / "meminfo").read_text() == good  # made afresh
    assert (FIXTURES / "vm-1s-nosmt/sys" / NODE0 / "meminfo").read_text() == good


def test_copy_of_without_changed_paths_copies_everything(tmp_path):
    root = copy_of("vm-1s-nosmt", tmp_path)
    assert entries(root) == entries(need_fixture("vm-1s-nosmt"))
    real_root = os.path.realpath(root)
    for d, dirs, files in os.walk(root):  # the tree's own links stay inside the copy
        for n in dirs + files:
            assert os.path.realpath(os.path.join(d, n)).startswith(real_root + "/")


# ---- the suite's conftest, in a project like an sdist (fixtures/sysfs left out) --------


def project(tmp_path: Path, *, trees: bool) -> Path:
    """pyproject.toml, fixtures/ (its sysfs trees only if ``trees``: a link to ours),
    tests/conftest.py and tests/fixture_trees.py."""
    proj = tmp_path / "proj"
    shutil.copytree(ROOT / "fixtures", proj / "fixtures",
                    ignore=shutil.ignore_patterns("sysfs", "__pycache__"))
    if trees:
        (proj / "fixtures/sysfs").symlink_to(FIXTURES)
    (proj / "tests").mkdir()
    for name in ("conftest.py", "fixture_trees.py"):
        shutil.copy(ROOT / "tests" / name, proj / "tests" / name)
    shutil.copy(ROOT / "pyproject.toml", proj / "pyproject.toml")
    return proj


NEEDS_TREES = '''
import pytest
from fixture_trees import FIXTURE_NAMES, need_fixture


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_reads_a_tree(name):
    assert (need_fixture(name) / "devices/system/cpu").is_dir()


def test_needs_no_tree():
    pass
'''


WRITES_INTO_SHARED = '''
from fixture_trees import copy_of


def test_writes_what_it_did_not_name(tmp_path):
    root = copy_of("vm-1s-nosmt", tmp_path, "devices/system/cpu/online")
    (root / "devices/system/node/node0/distance").write_text("10 20\\n")


def test_next_sees_the_fixture(tmp_path):
    root = copy_of("vm-1s-nosmt", tmp_path, "devices/system/cpu/online")
    assert (root / "devices/system/node/node0/distance").read_text() == "10\\n"
'''

EMPTY_PARAMETERS = '''
import pytest


@pytest.mark.parametrize("name", [])
def test_each(name):
    pass
'''


def run_pytest(proj: Path, *args: str, ci: bool) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci:
        env["CI"] = "true"
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "-p", "no:hypothesispytest",
                           f"--basetemp={proj.parent / 'basetemp'}", *args], cwd=proj,
                          env=env, capture_output=True, text=True, timeout=120)


def test_missing_trees_are_skipped_with_how_to_write_them(tmp_path):
    proj = project(tmp_path, trees=False)
    (proj / "tests/test_needs.py").write_text(NEEDS_TREES)
    r = run_pytest(proj, "-rs", ci=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 passed, 7 skipped" in r.stdout, r.stdout
    # each skip says how to write the trees, and so does the summary
    assert r.stdout.count("`python fixtures/generate.py` writes them") == 8, r.stdout
    assert "writes them; the tests that need them were skipped" in r.stdout


def test_missing_trees_fail_the_run_in_ci(tmp_path):
    proj = project(tmp_path, trees=False)
    (proj / "tests/test_needs.py").write_text(NEEDS_TREES)
    r = run_pytest(proj, ci=True)
    assert r.returncode == 1, r.stdout + r.stderr
    out = r.stdout + r.stderr
    assert "fixture trees missing under" in out and "big-448" in out, out
    assert "CI=true: missing trees fail the run" in out and " passed" not in out, out


def test_with_the_trees_ci_runs_and_the_conftest_catches_mistakes(tmp_path):
    """In CI with the trees: the tests that need them run; a test that writes into the
    shared copy fails (at teardown) and the next one sees the fixture again; an empty
    parameter list is a collection error."""
    proj = project(tmp_path, trees=True)
    (proj / "tests/test_needs.py").write_text(NEEDS_TREES)
    (proj / "tests/test_writes.py").write_text(WRITES_INTO_SHARED)
    (proj / "tests/test_empty.py").write_text(EMPTY_PARAMETERS)
    r = run_pytest(proj, "--continue-on-collection-errors", ci=True)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "10 passed, 2 errors" in r.stdout, r.stdout
    assert "ERROR tests/test_empty.py" in r.stdout and "Empty parameter set" in r.stdout
    assert "ERROR at teardown of test_writes_what_it_did_not_name" in r.stdout
    assert "the test changed the shared read-only fixture copy: " in r.stdout
    assert "node0/distance; name what it changes in copy_of" in r.stdout
