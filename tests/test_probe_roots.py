"""One rule for the resctrl root, in the config file and on the command line.

``resctrl_root`` (``--resctrl-root``) not given but ``sysfs_root`` (``--sysfs-root``) given:
resctrl is read at ``<sysfs_root>/fs/resctrl``, where it sits in a sysfs tree (a captured
tree or a fixture included). Neither given: ``/sys`` and ``/sys/fs/resctrl``. The daemon
logs at start which resctrl root it reads, or that none is mounted there.
"""

import json
from argparse import Namespace
from pathlib import Path

import pytest
from daemon_helpers import DaemonProc
from libvirt_helpers import FIXTURES, write_node

from hostagent.cli import main
from hostagent.commands.options import roots
from hostagent.config import config_from_dict, load_config
from hostagent.model import topology_to_dict
from hostagent.probe.host import probe_host
from hostagent.probe.roots import default_resctrl_root

XEON = FIXTURES / "xeon-2s-cat" / "sys"


@pytest.mark.parametrize(("sysfs", "resctrl"), [
    ("/sys", "/sys/fs/resctrl"),
    ("/srv/capture/sys", "/srv/capture/sys/fs/resctrl"),
    ("/srv/capture/sys/", "/srv/capture/sys/fs/resctrl"),
    ("relative/sys", "relative/sys/fs/resctrl"),
])
def test_default_resctrl_root_is_under_the_sysfs_root(sysfs, resctrl):
    assert default_resctrl_root(sysfs) == resctrl


def test_config_sysfs_root_alone_implies_its_resctrl_root():
    probe = config_from_dict({"probe": {"sysfs_root": "/srv/capture/sys"}}).probe
    assert (probe.sysfs_root, probe.resctrl_root) == (
        "/srv/capture/sys", "/srv/capture/sys/fs/resctrl")


def test_config_explicit_resctrl_root_and_the_defaults_stay():
    both = config_from_dict({"probe": {"sysfs_root": "/a/sys", "resctrl_root": "/r"}}).probe
    assert (both.sysfs_root, both.resctrl_root) == ("/a/sys", "/r")
    only_resctrl = config_from_dict({"probe": {"resctrl_root": "/r"}}).probe
    assert (only_resctrl.sysfs_root, only_resctrl.resctrl_root) == ("/sys", "/r")
    none = config_from_dict({}).probe
    assert (none.sysfs_root, none.resctrl_root) == ("/sys", "/sys/fs/resctrl")


@pytest.mark.parametrize("given", [
    {},
    {"sysfs_root": "/srv/capture/sys"},
    {"resctrl_root": "/r"},
    {"sysfs_root": "/srv/capture/sys", "resctrl_root": "/r"},
])
def test_config_and_command_line_give_the_same_roots(given):
    cfg = config_from_dict({"probe": given}).probe
    args = Namespace(sysfs_root=given.get("sysfs_root"), resctrl_root=given.get("resctrl_root"))
    assert roots(args) == (cfg.sysfs_root, cfg.resctrl_root)


def test_snapshot_with_a_config_naming_only_the_sysfs_root_reads_its_resctrl(
        tmp_path, capsys):
    topo = probe_host(XEON, XEON / "fs" / "resctrl")
    assert topo.resctrl is not None
    uri = write_node(tmp_path, topo)
    cfg = tmp_path / "hostagent.toml"
    cfg.write_text(f'[probe]\nsysfs_root = "{XEON}"\n')
    assert load_config(cfg).probe.resctrl_root == f"{XEON}/fs/resctrl"
    rc = main(["snapshot", "--config", str(cfg), "--libvirt", uri, "--json"])
    assert rc == 0
    snap = json.loads(capsys.readouterr().out)
    assert snap["topology"]["resctrl"] == json.loads(json.dumps(topology_to_dict(topo)))[
        "resctrl"]


def _agent_without_resctrl_root(fixture: str, **cfg) -> DaemonProc:
    d = DaemonProc(fixture, start=False, **cfg)
    text = d.config.read_text()
    line = f'resctrl_root = "{d.sysfs}/fs/resctrl"\n'
    assert line in text
    d.config.write_text(text.replace(line, ""))
    d.start()
    return d


def test_agent_logs_the_resctrl_root_it_reads_and_publishes_resctrl():
    d = _agent_without_resctrl_root("xeon-2s-cat")
    try:
        d.wait_notify("READY=1")
        log = d.wait_log("resctrl root")
        assert f"sysfs root {d.sysfs}, resctrl root {d.sysfs}/fs/resctrl (L3" in log, log
        with d.subscriber() as sub:
            snap = sub.wait_snapshot("testhost", timeout=10)
        assert snap["topology"]["resctrl"] is not None
        assert d.stop() == 0, d.log_text()
    finally:
        d.close()


def test_agent_logs_that_no_resctrl_is_mounted():
    assert not (FIXTURES / "vm-1s-nosmt" / "sys" / "fs").exists()
    d = _agent_without_resctrl_root("vm-1s-nosmt", dedicated=None)
    try:
        d.wait_notify("READY=1")
        log = d.wait_log("no resctrl mounted")
        resctrl = Path(d.sysfs) / "fs" / "resctrl"
        assert f"sysfs root {d.sysfs}; no resctrl mounted at {resctrl}" in log, log
        assert d.stop() == 0, d.log_text()
    finally:
        d.close()
