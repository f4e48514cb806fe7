"""``hostagent resctrl carve`` keeps every line of the root ``schemata`` it does not change
byte for byte (issue "Output a person reads", item 18; docs/resctrl.md, Carving): the
kernel's padding, the order, other resources (MB, SMBA, L2), blank lines, the end."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from hostagent.cli import main
from hostagent.resctrl_fs import carve

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "sysfs"
SYSFS = str(FIXTURES / "xeon-2s-cat/sys")


@pytest.fixture
def root(tmp_path) -> Path:
    dst = tmp_path / "resctrl"
    shutil.copytree(FIXTURES / "xeon-2s-cat/sys/fs/resctrl", dst, symlinks=True)
    return dst


def test_only_the_carved_line_changes_and_it_keeps_its_padding(root):
    # the kernel pads names to one width; MB values padded too; MB first; an L2 line of a
    # resource this host cannot allocate, an SMBA line, a blank line, trailing blanks on
    # one line and a CRLF ending on another
    original = ("    MB:0= 100;1= 100\n"
                "  SMBA:0=2048;1=2048\r\n"
                "\n"
                "    L2:0=ff;1=ff  \n"
                "    L3:0=7c0;1=7c0\n")
    (root / "schemata").write_bytes(original.encode())
    plan = carve(str(root), SYSFS, 4, cache_id=0)
    assert plan.changed
    assert (root / "schemata").read_bytes().decode() == original.replace(
        "    L3:0=7c0;1=7c0\n", "    L3:0=700;1=7c0\n")


def test_a_file_without_a_final_newline_stays_without_one(root):
    (root / "schemata").write_bytes(b"MB:0=100;1=100\nL3:0=7c0;1=7c0")
    carve(str(root), SYSFS, 4, cache_id=0)
    assert (root / "schemata").read_bytes() == b"MB:0=100;1=100\nL3:0=700;1=7c0"


def test_the_command_and_the_kernels_own_layout(root, capsys):
    # the fixture's root file is as the kernel prints it: "    L3:0=7c0;1=7c0"
    before = (root / "schemata").read_text()
    assert before.startswith("    L3:") and "    MB:0=100;1=100\n" in before
    assert main(["resctrl", "carve", "--ways", "4", "--cache-id", "0", "--resctrl-root",
                 str(root), "--sysfs-root", SYSFS]) == 0
    assert "largest run 4 ways" in capsys.readouterr().out
    assert (root / "schemata").read_text() == before.replace("L3:0=7c0;", "L3:0=700;")
