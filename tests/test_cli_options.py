"""Option tables: the quick parser reads a plain command line exactly as argparse does,
and leaves every other line to argparse (``hostagent.commands.options``)."""


import pytest

from hostagent.cli import main
from hostagent.cli_parser import build_parser
from hostagent.commands import probe, snapshot
from hostagent.commands.options import Option, QuickArgs, quick_parse

PLAIN = [
    [],
    ["--json"],
    ["--sysfs-root", "/tmp/x"],
    ["--sysfs-root=/tmp/x", "--json"],
    ["--json", "--resctrl-root", "/r", "--sysfs-root", "/s"],
    ["--sysfs-root", "/a", "--sysfs-root", "/b"],  # the last one wins
    ["--sysfs-root=", "--json"],  # an empty value
    ["--sysfs-root=a=b"],  # split at the first "="
    ["--sysfs-root=-x"],  # after "=", a value may start with "-"
    ["--sysfs-root", "has space"],
]

NOT_PLAIN = [
    ["-h"],
    ["--help"],
    ["--json=yes"],
    ["--sysfs-root"],
    ["--sysfs-root", "--json"],
    ["--sysfs-root", "-"],
    ["--sys", "/x"],  # argparse accepts the abbreviation; the quick parser does not guess
    ["--unknown"],
    ["positional"],
    ["--", "--json"],
    [""],
]


def argparse_values(command, argv):
    args = build_parser(command).parse_args([command, *argv])
    values = vars(args)
    assert values.pop("command") == command
    assert values.pop("func").__module__ == f"hostagent.commands.{command}"
    return values


@pytest.mark.parametrize("argv", PLAIN, ids=repr)
def test_plain_lines_parse_as_argparse_does(argv):
    assert quick_parse(argv, probe.QUICK_OPTIONS) == argparse_values("probe", argv)


@pytest.mark.parametrize("argv", [
    [], ["--config", "c.toml", "--libvirt", "test:///default", "--host=h1", "--json"],
])
def test_snapshot_table_matches_its_parser(argv):
    assert quick_parse(argv, snapshot.QUICK_OPTIONS) == argparse_values("snapshot", argv)


@pytest.mark.parametrize("argv", NOT_PLAIN, ids=repr)
def test_other_lines_are_left_to_argparse(argv):
    assert quick_parse(argv, probe.QUICK_OPTIONS) is None


def test_help_and_errors_still_come_from_argparse(capsys):
    with pytest.raises(SystemExit) as info:
        main(["probe", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "--sysfs-root D" in out and "free_cache" in out
    with pytest.raises(SystemExit) as info:
        main(["probe", "--json=yes"])
    assert info.value.code == 2
    assert "--json: ignored explicit argument 'yes'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["probe", "--sysfs-root"])
    assert "expected one argument" in capsys.readouterr().err


def test_abbreviated_option_goes_through_argparse(capsys, tmp_path):
    rc = main(["probe", "--sysfs", str(tmp_path / "none")])
    assert rc == 2
    assert "not a directory" in capsys.readouterr().err


def test_option_table_entries_are_checked():
    with pytest.raises(ValueError, match="expected a long option"):
        Option("-j", None, "short options are not table options")
    with pytest.raises(ValueError, match="expected a long option"):
        Option("--a=b", "X", "no = in a name")
    assert Option("--sysfs-root", "D", "").dest == "sysfs_root"


def test_quick_args_read_like_argparse_namespace():
    from hostagent.cli import _quick_args

    args = _quick_args("probe", ["--json", "--sysfs-root=/x"])
    assert (args.json, args.sysfs_root, args.resctrl_root, args.command) == (
        True, "/x", None, "probe")
    assert args == QuickArgs(**vars(args)) and args != QuickArgs(json=True)
    assert repr(QuickArgs(json=True)) == "QuickArgs(json=True)"
