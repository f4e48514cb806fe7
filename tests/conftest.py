"""Session-wide checks for the test suite (tests/fixture_trees.py has the helpers).

- The fixture trees (``fixtures/sysfs/<name>/sys``) are checked once: with ``CI=true`` a
  missing tree stops the run at once with one message naming the trees and how to write
  them; elsewhere the tests that need one are skipped and the summary says why.
- After each test that used a shared fixture copy (``fixture_trees.copy_of`` with changed
  paths), the copy is checked: a test that wrote into it fails, naming the paths.
"""

from __future__ import annotations

import pytest
from fixture_trees import check_shared_trees, in_ci, missing_fixtures, missing_message


def pytest_sessionstart(session: pytest.Session) -> None:
    missing = missing_fixtures()
    if missing and in_ci():
        pytest.exit(missing_message(missing) + " (CI=true: missing trees fail the run)",
                    returncode=pytest.ExitCode.TESTS_FAILED)


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
