"""``hostagent capture``: the files the probe read, written so that probing them gives the same."""

import os
from pathlib import Path

import pytest
from fixture_trees import need_fixture

from hostagent.cli import main
from hostagent.commands.capture import capture
from hostagent.errors import HostagentError, ProbeError
from hostagent.probe.host import FileReader, probe_host, probe_json

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "sysfs"
# big-448 is left out only for time: writing its ~5600 files takes seconds on a slow disk;
# it takes the same code paths as large-8cell.
NAMES = ["vm-1s-nosmt", "xeon-2s-cat", "xeon-2s-cdp", "epyc-amd", "large-8cell",
         "no-node-dir"]


def fixture_root(name):
    return need_fixture(name)


def files_under(top):
    out = set()
    for dirpath, _dirs, files in os.walk(top):
        out.update(os.path.relpath(os.path.join(dirpath, f), top) for f in files)
    return out


@pytest.fixture(scope="module")
def captured(tmp_path_factory):
    """``captured(name)``: (out dir, topology, reader) of a capture of fixture ``name``,
    made once for this module; tests only read it."""
    done = {}

    def get(name):
        if name not in done:
            root = fixture_root(name)
            out = tmp_path_factory.mktemp(f"capture-{name}") / "out"
            done[name] = (out, *capture(str(out), str(root), str(root / "fs" / "resctrl")))
        return done[name]
    return get


@pytest.mark.parametrize("name", NAMES)
def test_capture_of_fixture_probes_the_same(name, captured):
    out, topo, reader = captured(name)
    again = FileReader()
    back = probe_host(out / "sys", out / "sys" / "fs" / "resctrl", reader=again)
    assert probe_json(back) == probe_json(topo)
    assert back == topo
    # exactly the files the probe read: no more, and the re-probe reads all of them
    written = files_under(out)
    assert len(written) == len(reader.files)
    real_out = os.path.realpath(out)
    reread = {os.path.relpath(os.path.realpath(p), real_out) for p in again.files}
    assert reread == written


def test_capture_keeps_pci_symlinks(captured):
    root = fixture_root("xeon-2s-cat")
    out = captured("xeon-2s-cat")[0]
    link = out / "sys/bus/pci/devices/0000:af:00.0"
    assert link.is_symlink()
    assert os.readlink(link) == os.readlink(root / "bus/pci/devices/0000:af:00.0")
    assert (link / "sriov_totalvfs").read_text() == "128\n"
    assert not (link / "subsystem_vendor").exists()  # not read by the probe, not copied


def test_capture_keeps_offline_cpu_directories(captured):
    out = captured("large-8cell")[0]
    assert (out / "sys/devices/system/cpu/cpu127").is_dir()
    back = probe_host(out / "sys", None)
    assert [c.id for c in back.cpus if not c.online] == [63, 124, 125, 126, 127]


def test_capture_this_machine(tmp_path):
    if not Path("/sys/devices/system/cpu").is_dir():
        pytest.skip("no /sys here")
    out = tmp_path / "out"
    topo, reader = capture(str(out), "/sys", "/sys/fs/resctrl")
    back = probe_host(out / "sys", out / "sys" / "fs" / "resctrl")
    # the capture holds the very text the probe read, so moving values (MemFree) agree
    assert probe_json(back) == probe_json(topo)
    assert len(files_under(out)) == len(reader.files)


def test_capture_refuses_non_empty_outdir(tmp_path, capsys):
    root = fixture_root("vm-1s-nosmt")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("mine\n")
    with pytest.raises(HostagentError, match="not an empty directory"):
        capture(str(out), str(root), str(root / "fs" / "resctrl"))
    rc = main(["capture", str(out), "--sysfs-root", str(root)])
    assert rc == 2
    assert capsys.readouterr().err.startswith(f"hostagent: {out}: exists and is not an empty")
    assert os.listdir(out) == ["keep"]
    (tmp_path / "file").write_text("x")
    assert main(["capture", str(tmp_path / "file"), "--sysfs-root", str(root)]) == 2


def test_capture_into_empty_dir_via_cli(tmp_path, capsys):
    root = fixture_root("vm-1s-nosmt")
    out = tmp_path / "out"
    out.mkdir()
    assert main(["capture", str(out), "--sysfs-root", str(root)]) == 0
    text = capsys.readouterr().out
    assert f"into {out}/sys" in text and f"--sysfs-root {out}/sys" in text
    assert main(["probe", "--sysfs-root", str(out / "sys"), "--json"]) == 0


def test_failed_probe_leaves_nothing(tmp_path):
    root = fixture_root("vm-1s-nosmt")
    bad = tmp_path / "bad"
    capture(str(bad), str(root), str(root / "fs" / "resctrl"))
    (bad / "sys/devices/system/node/node0/cpulist").write_text("0-\n")
    out = tmp_path / "out"
    with pytest.raises(ProbeError, match="'0-'"):
        capture(str(out), str(bad / "sys"), str(bad / "sys" / "fs" / "resctrl"))
    assert sorted(os.listdir(tmp_path)) == ["bad"]


def test_separate_resctrl_root_lands_under_sys_fs_resctrl(tmp_path):
    root = fixture_root("xeon-2s-cat")
    first = tmp_path / "first"
    capture(str(first), str(root), str(root / "fs" / "resctrl"))
    # probe a sysfs tree without resctrl plus a resctrl tree elsewhere
    rc_elsewhere = tmp_path / "rc"
    os.rename(first / "sys" / "fs" / "resctrl", rc_elsewhere)
    out = tmp_path / "out"
    topo, _ = capture(str(out), str(first / "sys"), str(rc_elsewhere))
    assert topo.resctrl is not None
    back = probe_host(out / "sys", out / "sys" / "fs" / "resctrl")
    assert back == topo
