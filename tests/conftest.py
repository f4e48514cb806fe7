"""Session-wide checks for the test suite (tests/fixture_trees.py has the helpers).

- The fixture trees (``fixtures/sysfs/<name>/sys``) are checked once: with ``CI=true`` a
  missing tree stops the run at once with one message naming the trees and how to write
  them; elsewhere the tests that need one are skipped and the summary says why.
- After each test that used a shared fixture copy (``fixture_trees.copy_of`` with changed
  paths), the copy is checked: a test that wrote into it fails, naming the paths.
- ``scripts/test`` runs the tests in parallel worker processes (pytest-xdist,
  ``--dist loadgroup``). Tests that use the machine-wide libvirtd (``qemu:///system``: every
  ``tests/test_real_libvirt*.py``, and any test marked ``real_libvirtd``) share one
  ``xdist_group`` and so run one after another in one worker: one of them kills and restarts
  libvirtd. They are also put first, as the longest chain, so the other workers take the
  rest of the suite meanwhile.
- The tests of one module that share a module-scoped fixture of that module (a running
  agent, an installed root) also form one group, so that the fixture is made once, not
  once per worker.
"""

from __future__ import annotations

import pytest
from fixture_trees import check_shared_trees, in_ci, missing_fixtures, missing_message


def pytest_sessionstart(session: pytest.Session) -> None:
    missing = missing_fixtures()
    if missing and in_ci():
        pytest.exit(missing_message(missing) + " (CI=true: missing trees fail the run)",
                    returncode=pytest.ExitCode.TESTS_FAILED)


REAL_LIBVIRTD_GROUP = "real-libvirtd"


def _uses_real_libvirtd(item: pytest.Item) -> bool:
    module = getattr(item, "module", None)
    name = getattr(module, "__name__", "").rpartition(".")[2]
    return name.startswith("test_real_libvirt") or item.get_closest_marker("real_libvirtd")


def _shares_a_module_fixture(item: pytest.Item) -> bool:
    info = getattr(item, "_fixtureinfo", None)
    module = item.nodeid.partition("::")[0]
    return info is not None and any(
        defs and defs[-1].scope == "module" and defs[-1].baseid == module
        for defs in info.name2fixturedefs.values())


def pytest_itemcollected(item: pytest.Item) -> None:
    """The groups are marked as each test is collected: xdist reads the marks in its own
    ``pytest_collection_modifyitems``, which may run before ours."""
    if _uses_real_libvirtd(item):
        item.add_marker(pytest.mark.xdist_group(REAL_LIBVIRTD_GROUP))
    elif _shares_a_module_fixture(item):
        item.add_marker(pytest.mark.xdist_group(item.nodeid.partition("::")[0]))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    real = [item for item in items if _uses_real_libvirtd(item)]
    chosen = set(map(id, real))
    items[:] = real + [item for item in items if id(item) not in chosen]


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    missing = missing_fixtures()
    if missing:
        terminalreporter.write_line(missing_message(missing)
                                    + "; the tests that need them were skipped", yellow=True)


@pytest.fixture(autouse=True)
def _shared_fixture_trees_unchanged():
    """Fail the test that wrote into a shared fixture copy (it is made afresh)."""
    yield
    changed = check_shared_trees()
    if changed:
        shown = ", ".join(changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5
                                          else "")
        pytest.fail(f"the test changed the shared read-only fixture copy: {shown}; name "
                    "what it changes in copy_of(name, dest, *changed)", pytrace=False)
