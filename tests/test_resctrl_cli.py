"""``hostagent resctrl free|reserve|release|carve``: outputs, --json documents, exit codes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from fixture_trees import need_fixture

from hostagent.cli import main

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "sysfs"


@pytest.fixture
def roots(tmp_path) -> list[str]:
    dst = tmp_path / "resctrl"
    shutil.copytree(need_fixture("xeon-2s-cat") / "fs/resctrl", dst, symlinks=True)
    return ["--resctrl-root", str(dst), "--sysfs-root", str(FIXTURES / "xeon-2s-cat/sys")]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_free_json_maps_every_way(capsys, roots):
    code, out, _ = run(capsys, "resctrl", "free", "--json", *roots)
    assert code == 0
    doc = json.loads(out)
    assert doc["closids"] == {"used": 4, "limit": 8}
    # letters come from the group names (hostagent.probe.report.group_letters)
    assert [g["letter"] for g in doc["groups"]] == ["D", "s", "g", "z"]
    c0 = doc["caches"][0]
    assert (c0["resource"], c0["id"]) == ("L3", 0)
    assert (c0["free_mask"], c0["largest_free_run"]) == ("030", 2)
    # way 10..0: batch+default (shareable I/O ways), default x3, free x2, nfv-excl x2, rt1 x2
    assert c0["map"] == "**DDD..ggzz"
    assert c0["ways"][0] == {"way": 10, "owners": ["", "batch"], "shareable": True}
    assert c0["ways"][5] == {"way": 5, "owners": [], "shareable": False}
    assert c0["granularity_bytes"] == 2359296
    assert doc["mb"] == {"unit": "percent", "bandwidth_gran": 10, "min_bandwidth": 10,
                         "num_closids": 8}


def test_free_text(capsys, roots):
    code, out, _ = run(capsys, "resctrl", "free", *roots)
    assert code == 0
    assert ("L3:1  *****s...gg  free 3 ways (6.75 MiB), largest run 3 ways (6.75 MiB), "
            "free mask 01c") in out
    assert "groups 4 of 8 CLOSIDs" in out


def test_reserve_release_round_trip(capsys, roots):
    code, out, _ = run(capsys, "resctrl", "reserve", "rt1", "type=both,size=4608k",
                       "--cpus", "12-13", "--json", *roots)
    assert code == 0
    doc = json.loads(out)
    assert doc["action"] == "created" and doc["group"] == "hostagent-rt1"
    assert doc["cpus"] == [12, 13] and doc["tasks"] is None
    assert doc["plan"]["schemata_text"] == "L3:0=7c0;1=00c\n"
    assert doc["plan"]["caches"] == [{"resource": "L3", "level": 3, "type": "both",
                                      "cache_id": 1, "ways": 2, "bytes": 4718592,
                                      "mask": "00c", "reused": False}]
    code, out, _ = run(capsys, "resctrl", "reserve", "rt1", "type=both,size=4608k",
                       "--cpus", "12-13", *roots)
    assert out.startswith("group hostagent-rt1: unchanged (")
    assert "  L3:1=00c  2 ways = 4.5 MiB (kept)" in out
    code, out, _ = run(capsys, "resctrl", "free", "--json", *roots)
    assert "hostagent-rt1" in [g["name"] for g in json.loads(out)["groups"]]
    code, out, _ = run(capsys, "resctrl", "release", "rt1", "--json", *roots)
    assert json.loads(out) == {"group": "hostagent-rt1", "removed": True}
    code, out, _ = run(capsys, "resctrl", "release", "rt1", *roots)
    assert code == 0 and out == "group hostagent-rt1: not present, nothing to release\n"


def test_dry_run_text(capsys, roots):
    code, out, _ = run(capsys, "resctrl", "reserve", "rt1", "type=both,size=2304k;mb=40",
                       "--cpus", "0", "--dry-run", *roots)
    assert code == 0
    assert out.splitlines()[:4] == [
        f"group hostagent-rt1: dry-run ({roots[1]}/hostagent-rt1)",
        "schemata:",
        "  L3:0=010;1=7c0",
        "  MB:0=40;1=100",
    ]
    assert not Path(roots[1], "hostagent-rt1").exists()


def test_carve_json_and_text(capsys, roots):
    code, out, _ = run(capsys, "resctrl", "carve", "--ways", "4", "--cache-id", "0",
                       "--dry-run", *roots)
    assert out == ("default group: would change\n"
                   "  L3:0 7c0 -> 700  free 030 -> 0f0 (largest run 4 ways)\n")
    code, out, _ = run(capsys, "resctrl", "carve", "--ways", "4", "--cache-id", "0", "--json",
                       *roots)
    doc = json.loads(out)
    assert doc["changed"] and not doc["dry_run"]
    assert doc["schemata_text"] == "L3:0=700;1=7c0\n"
    assert doc["changes"][0]["freed"] == "0c0"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["reserve", "rt1", "type=both,size=2mb"],
         "hostagent: reservation item 'type=both,size=2mb': size 2 MiB is not a whole number"),
        (["reserve", "a/b", "type=both,size=2304k"],
         "hostagent: group name 'a/b': must not contain '/'"),
        (["reserve", "rt1", "type=both,size=2304k", "--cpus", "x"],
         "hostagent: --cpus: not a CPU list: 'x'"),
        (["carve", "--ways", "40"], "hostagent: carve: --ways 40 is out of range: give 1 to 10"),
    ],
)
def test_errors_exit_2_with_the_message(capsys, roots, argv, message):
    code, out, err = run(capsys, "resctrl", *argv, *roots)
    assert code == 2 and out == ""
    assert err.startswith(message)


def test_cpus_and_tasks_are_exclusive(capsys, roots):
    with pytest.raises(SystemExit) as exc:
        main(["resctrl", "reserve", "g", "type=both,size=2304k", "--cpus", "1", "--tasks", "1"])
    assert exc.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err
