"""The default group's schemata is required in full, and no plan holds a mask below
``min_cbm_bits`` (hardening issue, item 13).

An empty root ``schemata`` used to read as "the default group holds nothing", so every
way looked free: ``reserve`` planned ``L3:0=1f0;1=000``, over the default group's real
mask and with an empty mask below ``min_cbm_bits``. A missing or unparsable line (or
cache id) of a cache resource is now an error naming the file, the resource and the
text, in ``free``, ``reserve`` and ``carve``; and the planner checks every mask it
returns, the copied ones included.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from test_resctrl_fs import tree
from test_resctrl_plan import host, plan

from hostagent.cli import main
from hostagent.errors import HostagentError, RequestError
from hostagent.model import replace
from hostagent.probe.host import probe_host
from hostagent.resctrl import plan_carve
from hostagent.resctrl_fs import reserve


def cli(capsys, resctrl: str, sysfs: str, *argv: str) -> tuple[int, str, str]:
    code = main(["resctrl", *argv, "--resctrl-root", resctrl, "--sysfs-root", sysfs])
    out, err = capsys.readouterr()
    return code, out, err


def listing(root: str) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in Path(root).rglob("*"))


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "the default group has no L3 line"),
        ("    MB:0=100;1=100\n", "the default group has no L3 line"),
        ("    L3:0=7c0\n    MB:0=100;1=100\n", "the default group's L3 line has no mask for "
         "cache id 1 (cache ids: 0, 1)"),
        ("    L3:\n    MB:0=100;1=100\n", "the default group's L3 line has no mask for "
         "cache ids 0, 1"),
    ],
)
def test_incomplete_root_schemata_is_an_error_everywhere(tmp_path, capsys, text, problem):
    resctrl, sysfs = tree(tmp_path, "xeon-2s-cat")
    root_schemata = Path(resctrl, "schemata")
    root_schemata.write_text(text)
    before = listing(resctrl)
    for argv in (
        ["free"],
        ["free", "--json"],
        ["reserve", "rt1", "type=both,size=4608k", "--dry-run"],
        ["reserve", "rt1", "type=both,size=4608k", "--cpus", "12-13"],
        ["carve", "--ways", "4"],
    ):
        code, out, err = cli(capsys, resctrl, sysfs, *argv)
        assert (code, out) == (2, ""), argv
        assert err.startswith(f"hostagent: {resctrl}/schemata: {problem}"), (argv, err)
        assert f"(read {text.strip()!r})" in err, err  # the text that was read
        assert "every way would look free" in err
        assert listing(resctrl) == before  # nothing was created or written
        assert root_schemata.read_text() == text


def test_unparsable_root_line_names_the_file_and_the_text(tmp_path):
    resctrl, sysfs = tree(tmp_path, "xeon-2s-cat")
    Path(resctrl, "schemata").write_text("    L3:0=7c0;1=zz\n")
    with pytest.raises(HostagentError) as exc:
        reserve(resctrl, sysfs, "rt1", "type=both,size=4608k", dry_run=True)
    assert str(exc.value) == f"{resctrl}/schemata: bad L3 mask for cache id 1 (read '1=zz')"


def test_cdp_root_needs_both_code_and_data_lines(tmp_path):
    resctrl, sysfs = tree(tmp_path, "xeon-2s-cdp")
    Path(resctrl, "schemata").write_text("L3DATA:0=7c0;1=7c0\n    MB:0=100;1=100\n")
    with pytest.raises(HostagentError, match=r"/schemata: the default group has no L3CODE "):
        reserve(resctrl, sysfs, "rt", "type=code,size=2304k;type=data,size=2304k",
                dry_run=True)
    assert not os.path.exists(os.path.join(resctrl, "hostagent-rt"))


# ----------------------------------------------------------------------------- planner


def test_planner_refuses_a_default_group_without_a_mask_for_a_cache_id():
    # the pure planner gets topologies from anywhere (the fitter, snapshots): it must not
    # read a missing default mask as "all free" either
    t = host(groups=[("", "shareable", {"L3": {0: 0x00f, 1: 0x00f}})])

    def with_default(schemata):
        default = replace(t.resctrl.groups[0], schemata=schemata)
        return replace(t, resctrl=replace(t.resctrl, groups=(default,)))

    with pytest.raises(RequestError) as exc:
        plan(with_default({"L3": {0: "00f"}}), "type=both,size=2m,cache-id=0")
    assert str(exc.value) == (
        "the default group's schemata has no L3 mask for cache id 1; without it every way "
        "would look free (read the default group's schemata again)"
    )
    with pytest.raises(RequestError, match="has no L3 mask for cache id 0"):
        plan(with_default({}), "type=both,size=2m,cache-id=1")
    with pytest.raises(RequestError, match="has no L3 mask for cache id 0"):
        plan_carve(with_default({}), 2)


def test_a_copied_default_mask_below_min_cbm_bits_is_refused_not_written():
    # cache 1 is not requested, so the plan copies the default group's mask there: an
    # empty (or too short) mask must stop the plan instead of being written as 0 ways
    t = host(min_bits=2, groups=[("", "shareable", {"L3": {0: 0x00f, 1: 0x000}})])
    with pytest.raises(RequestError) as exc:
        plan(t, "type=both,size=2m,cache-id=0")
    assert str(exc.value) == (
        "the default group's L3:1 mask 000 cannot be copied into group g: mask 0 out of "
        "range (cbm_mask fff) (min_cbm_bits 2); fix the default group's schemata first"
    )
    t = host(min_bits=2, groups=[("", "shareable", {"L3": {0: 0x00f, 1: 0x001}})])
    with pytest.raises(RequestError, match="L3:1 mask 001 cannot be copied into group g: "
                       "mask 1: need at least 2 consecutive bits"):
        plan(t, "type=both,size=2m,cache-id=0")
    # where min_cbm_bits is 0 (AMD) an empty default mask is valid and copied as is
    t = host(min_bits=0, groups=[("", "shareable", {"L3": {0: 0x00f, 1: 0x000}})])
    assert plan(t, "type=both,size=2m,cache-id=0").schemata["L3"] == {0: "030", 1: "000"}


def test_every_written_mask_of_a_fixture_plan_passes_min_cbm_bits(tmp_path):
    from hostagent.resctrl_cbm import parse_mask, popcount

    for name in ("xeon-2s-cat", "xeon-2s-cdp", "epyc-amd"):
        resctrl, sysfs = tree(tmp_path / name, name)
        spec = ("type=code,size=2304k;type=data,size=2304k" if name == "xeon-2s-cdp"
                else "type=both,size=2m,cache-id=2" if name == "epyc-amd"
                else "type=both,size=2304k")
        r = reserve(resctrl, sysfs, "g", spec)
        rc = probe_host(sysfs, resctrl).resctrl
        for res in rc.resources:
            for mask in r.plan.schemata[res.name].values():
                assert popcount(parse_mask(mask)) >= res.min_cbm_bits, (name, res.name, mask)
