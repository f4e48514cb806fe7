"""Fixture sysfs trees for tests: the committed trees, read only, and copies of only what a
test changes.

- ``FIXTURE_NAMES``: every tree ``fixtures/generate.py`` describes (``fixtures/hosts/``),
  whether or not it is on disk: a test parametrised over them never collects zero cases.
- ``need_fixture(name)``: ``fixtures/sysfs/<name>/sys``. When it is missing (an sdist
  leaves ``fixtures/sysfs`` out) the test fails in CI (``CI=true``) and is skipped
  elsewhere, both with a message saying how to write it; ``missing_fixtures()`` lists the
  missing trees (tests/conftest.py checks them once per session).
- ``copy_of(name, dest, *changed)``: a tree at ``dest/<name>/sys`` that reads like the
  fixture but where only the paths in ``changed`` (relative to ``sys/``, e.g.
  ``"fs/resctrl"``, ``"devices/system/cpu/online"``) and the directories on the way to
  them are the test's own: those directories hold copies of their files and symlinks,
  and every other directory is a symlink into a *shared* copy of the fixture made once
  per session (``shared_tree``). A changed path that is a directory is copied whole; one
  that does not exist yet may be created by the test. With no ``changed`` the whole tree
  is copied. A changed path reached through one of the tree's symlinks (e.g.
  ``bus/pci/devices/<addr>/numa_node``) is the test's own on both sides of the link.
- The shared copies are read only by convention: tests/conftest.py checks after each
  test that used one that it is unchanged, fails that test naming what it changed, and
  makes the copy afresh for the next test (``check_shared_trees``).

A ``copy_of`` with a few changed files costs tens of file entries instead of the whole
tree's (3,623 for xeon-2s-cat, 337 for vm-1s-nosmt).
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures" / "sysfs"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fixtures.generate import HOSTS  # noqa: E402

FIXTURE_NAMES: list[str] = sorted(HOSTS)
GENERATE_HINT = "`python fixtures/generate.py` writes them"


def in_ci() -> bool:
    """True when the ``CI`` environment variable says so (``true``, ``1``, ``yes``)."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def missing_fixtures() -> list[str]:
    """The names in ``FIXTURE_NAMES`` whose ``fixtures/sysfs/<name>/sys`` is missing."""
    return [n for n in FIXTURE_NAMES if not (FIXTURES / n / "sys").is_dir()]


def missing_message(names: list[str]) -> str:
    """One line naming the missing trees and how to write them."""
    return (f"fixture trees missing under {FIXTURES}: {', '.join(names)} (an sdist leaves "
            f"fixtures/sysfs out); {GENERATE_HINT}")


def need_fixture(name: str) -> Path:
    """``fixtures/sysfs/<name>/sys``; missing: fail in CI, skip elsewhere."""
    src = FIXTURES / name / "sys"
    if not src.is_dir():
        if in_ci():
            pytest.fail(missing_message([name]) + " (CI=true: missing trees fail)",
                        pytrace=False)
        pytest.skip(missing_message([name]))
    return src


# --- shared copies --------------------------------------------------------------------

_shared_dir: Path | None = None
_shared: dict[str, tuple[Path, dict[str, tuple[int, int, int]]]] = {}
_used: set[str] = set()


def _state(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every entry under ``root`` → (mode, size, mtime in ns), symlinks not followed."""
    out = {}
    for d, dirs, files in os.walk(root):
        for n in dirs + files:
            st = os.lstat(os.path.join(d, n))
            out[os.path.join(d, n)] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return out


def _remove_shared() -> None:
    if _shared_dir is not None:
        shutil.rmtree(_shared_dir, ignore_errors=True)


def shared_tree(name: str) -> Path:
    """This session's shared copy of fixture ``name``'s ``sys/`` tree (made on first use;
    never to be written)."""
    global _shared_dir
    _used.add(name)
    if name in _shared:
        return _shared[name][0]
    src = need_fixture(name)
    if _shared_dir is None:
        _shared_dir = Path(tempfile.mkdtemp(prefix="hostagent-shared-fixtures-"))
        atexit.register(_remove_shared)
    dst = _shared_dir / name / "sys"
    shutil.copytree(src, dst, symlinks=True)
    _shared[name] = (dst, _state(dst))
    return dst


def check_shared_trees() -> list[str]:
    """The paths of the shared copies used since the last call that changed (created,
    removed or written); each changed copy is made afresh."""
    changed: list[str] = []
    for name in sorted(_used):
        dst, before = _shared[name]
        after = _state(dst)
        diff = sorted(p for p in before.keys() | after.keys() if before.get(p) != after.get(p))
        if diff:
            changed += diff
            shutil.rmtree(dst)
            del _shared[name]
            shared_tree(name)
    _used.clear()
    return changed


# --- copies of what a test changes ------------------------------------------------------

_WHOLE = "whole"  # a trie leaf: the path itself is changed (copied whole)


def _add(trie: dict, rel: str) -> None:
    parts = [p for p in Path(rel).parts if p not in ("", ".")]
    if not parts:
        raise ValueError("copy_of: a changed path must name something below sys/")
    node = trie
    for part in parts[:-1]:
        if node.get(part) == _WHOLE:
            return  # an ancestor is copied whole
        node = node.setdefault(part, {})
    node[parts[-1]] = _WHOLE


def _copy_entry(src: Path, dst: Path) -> None:
    if src.is_symlink():
        os.symlink(os.readlink(src), dst)
    elif src.is_dir():
        shutil.copytree(src, dst, symlinks=True)
    else:
        shutil.copy2(src, dst)


def _build(shared: Path, dst: Path, trie: dict) -> None:
    """``dst`` a real directory mirroring ``shared``: entries named in ``trie`` built
    further (or copied whole), other directories symlinked into ``shared``, files and
    symlinks copied."""
    dst.mkdir()
    with os.scandir(shared) as it:
        entries = sorted(it, key=lambda e: e.name)
    for e in entries:
        src, out = Path(e.path), dst / e.name
        sub = trie.get(e.name)
        if e.is_symlink() or sub == _WHOLE or not e.is_dir():
            _copy_entry(src, out)
        elif sub is None:
            os.symlink(src, out)  # not changed: the shared copy
        else:
            _build(src, out, sub)


def copy_of(name: str, dest: Path, *changed: str) -> Path:
    """``dest/<name>/sys``: fixture ``name``'s tree where only ``changed`` (paths relative
    to ``sys/``) is the test's own (see the module docstring); all of it without
    ``changed``."""
    dst = Path(dest) / name / "sys"
    if not changed:
        src = need_fixture(name)
        shutil.copytree(src, dst, symlinks=True)
        return dst
    shared = shared_tree(name)
    real_root = os.path.realpath(shared)
    trie: dict = {}
    for rel in changed:
        _add(trie, rel)
        # the same path with the tree's own symlinks resolved: a change written through
        # bus/pci/devices/<addr>/ lands in devices/pci.../<addr>/, which must be ours too
        real = os.path.relpath(os.path.realpath(shared / rel), real_root)
        if real != os.path.normpath(rel) and not real.startswith(".."):
            _add(trie, real)
    dst.parent.mkdir(parents=True, exist_ok=True)
    _build(shared, dst, trie)
    return dst
