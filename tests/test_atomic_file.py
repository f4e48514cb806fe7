"""atomic_file.write_atomically: the old content or the new, never a half or a leftover."""

import os
import stat

import pytest

from hostagent.atomic_file import write_atomically


def test_write_replaces_the_file_0600_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "claims.json"
    assert write_atomically(path, "one\n") == path
    assert path.read_text() == "one\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) & 0o027 == 0
    write_atomically(path, "two\n")
    assert path.read_text() == "two\n"
    assert os.listdir(path.parent) == ["claims.json"]


def test_a_failed_write_keeps_the_old_content_and_removes_the_temporary(tmp_path):
    path = tmp_path / "claims.json"
    path.write_text("old\n")
    with pytest.raises(UnicodeEncodeError):  # fails half way, after the temporary exists
        write_atomically(path, "new " + "\ud800")
    assert path.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["claims.json"]
