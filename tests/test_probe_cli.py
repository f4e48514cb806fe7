"""``hostagent probe``: the readable report, ``--json``, root options, light imports."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from fixture_trees import need_fixture

from hostagent.cli import main
from hostagent.probe.host import probe_host, probe_json

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "sysfs"


def root_of(name):
    return need_fixture(name)


def run_cli(capsys, *argv):
    capsys.readouterr()
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_json_is_probe_json_with_default_resctrl_under_sysfs_root(capsys):
    root = root_of("xeon-2s-cat")
    rc, out, err = run_cli(capsys, "probe", "--sysfs-root", str(root), "--json")
    assert rc == 0 and err == ""
    doc = json.loads(out)
    assert doc == json.loads(json.dumps(probe_json(probe_host(root, root / "fs" / "resctrl"))))
    assert doc["resctrl"]["groups"][0]["schemata"] == {"L3": {"0": "7c0", "1": "7c0"}}
    assert {w["id"]: w["free_ways"] for w in doc["free_cache"]} == {0: 2, 1: 3}


def test_explicit_resctrl_root(capsys, tmp_path):
    root = root_of("xeon-2s-cat")
    rc, out, _ = run_cli(capsys, "probe", "--sysfs-root", str(root), "--resctrl-root",
                         str(tmp_path / "none"), "--json")
    assert rc == 0 and json.loads(out)["resctrl"] is None and json.loads(out)["free_cache"] == []


def test_report_sections(capsys):
    root = root_of("large-8cell")
    rc, out, _ = run_cli(capsys, "probe", "--sysfs-root", str(root))
    assert rc == 0
    assert "cell 4: cpus -  memory 32 GiB" in out
    assert "2 MiB: 4096/1024/0" in out  # cell 1's pool: total/free/surplus
    assert "offline 63,124-127" in out
    assert "socket 1 die 0 (cell 2,3): 31 cores, 1 or 2 threads each" in out
    assert "0-7=0-7/64-71" in out  # cores 0-7 with threads 0-7 and 64-71
    assert "L3   75 MiB 15-way: 2" in out and "id 0=0-31,64-95" in out
    assert "L2   2 MiB 16-way: 63, one per core" in out
    assert "resctrl: not mounted" in out
    assert "0000:98:00.0 0x15b3:0x101d class 0x020000 cell 2: SR-IOV, up to 16 VFs" in out


def test_report_on_amd_with_sparse_masks(capsys):
    rc, out, _ = run_cli(capsys, "probe", "--sysfs-root", str(root_of("epyc-amd")))
    assert rc == 0
    assert "L3: 16 ways of 1 MiB, min 0 ways, 16 CLOSIDs, sparse masks" in out
    assert "MB (amd, granularity 1, min 0, 16 CLOSIDs)" in out
    assert "L3:0 = ********....bbbb  free 4 ways" in out


def test_this_machine_report_and_json(capsys):
    if not Path("/sys/devices/system/cpu").is_dir():
        pytest.skip("no /sys here")
    rc, out, _ = run_cli(capsys, "probe")
    assert rc == 0 and out.startswith("Cells\n") and "Caches" in out
    rc, out, _ = run_cli(capsys, "probe", "--json")
    assert rc == 0 and json.loads(out)["cpus"]


@pytest.mark.parametrize("fixture, rc", [("vm-1s-nosmt", 0), (None, 2)])
def test_probe_path_imports_no_heavy_libraries(fixture, rc):
    """``probe --json`` loads none of the modules that cost its start-up time (docs/probe.md
    §Speed), nor does its error path (a root that is not there). The harness itself
    imports only ``os`` and ``sys``, loaded at start-up anyway."""
    root = root_of(fixture) if fixture else "/nonexistent"
    code = (
        "import os, sys\n"
        "from hostagent.cli import main\n"
        "real, sys.stdout = sys.stdout, open(os.devnull, 'w')\n"
        "sys.stderr = open(os.devnull, 'w')\n"
        f"rc = main(['probe', '--json', '--sysfs-root', {str(root)!r}])\n"
        "heavy = {'libvirt', 'zmq', 'psutil', 'pyudev', 'msgpack', 'dataclasses', 'inspect',\n"
        "         'typing', 'shutil', 'argparse', 'json', 're', 'enum', 'functools',\n"
        "         'collections', 'operator', 'types'}\n"
        "print(rc, sorted(m for m in sys.modules if m.split('.')[0] in heavy), file=real)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == f"{rc} []"


def test_in_process_probe_leaves_the_garbage_collector_as_it_was(capsys):
    """The probe command pauses the cyclic collector while it runs (``hostagent probe`` as
    a program also freezes what is left at exit); called as a function it restores it."""
    import gc

    root = root_of("vm-1s-nosmt")
    assert gc.isenabled()
    frozen = gc.get_freeze_count()
    assert run_cli(capsys, "probe", "--sysfs-root", str(root))[0] == 0
    assert gc.isenabled() and gc.get_freeze_count() == frozen
    gc.disable()
    try:
        assert run_cli(capsys, "probe", "--sysfs-root", str(root), "--json")[0] == 0
        assert not gc.isenabled()
    finally:
        gc.enable()
