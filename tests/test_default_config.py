"""Without ``--config``, ``run``, ``watch``, ``show`` and ``snapshot`` read the same file.

That file is ``/etc/hostagent/hostagent.toml`` when it exists (else the built-in
defaults); ``HOSTAGENT_DEFAULT_CONFIG`` moves that default path (tests never touch /etc).
A one-shot ``hostagent snapshot`` on a production host thus shows the configuration the
daemon publishes.
"""

import json
import socket
import subprocess
import sys

from daemon_helpers import ROOT, DaemonProc
from libvirt_helpers import FIXTURES, write_node

from hostagent.cli import main
from hostagent.config import DEFAULT_PATH, DEFAULT_PATH_ENV, config_path
from hostagent.probe.host import probe_host

XEON = FIXTURES / "xeon-2s-cat" / "sys"


def test_config_path_rule(tmp_path, monkeypatch):
    monkeypatch.delenv(DEFAULT_PATH_ENV, raising=False)
    assert config_path("/given.toml") == "/given.toml"
    assert DEFAULT_PATH == "/etc/hostagent/hostagent.toml"
    cfg = tmp_path / "hostagent.toml"
    monkeypatch.setenv(DEFAULT_PATH_ENV, str(cfg))
    assert config_path(None) is None  # the default file does not exist: built-in defaults
    cfg.write_text("# defaults\n")
    assert config_path(None) == str(cfg)
    assert config_path("/given.toml") == "/given.toml"


def test_snapshot_without_config_reads_the_default_config_file(tmp_path, monkeypatch, capsys):
    uri = write_node(tmp_path, probe_host(XEON, XEON / "fs" / "resctrl"))
    cfg = tmp_path / "hostagent.toml"
    cfg.write_text(f'[host]\nname = "from-default-file"\n[probe]\nsysfs_root = "{XEON}"\n'
                   f'[libvirt]\nuri = "{uri}"\n[resources]\ndedicated_cpus = "2-11"\n')
    monkeypatch.setenv(DEFAULT_PATH_ENV, str(cfg))
    assert main(["snapshot", "--json"]) == 0
    snap = json.loads(capsys.readouterr().out)
    assert snap["host"] == "from-default-file"
    assert snap["config"]["dedicated_cpus"] == list(range(2, 12))
    assert len(snap["topology"]["cpus"]) == 48 and snap["topology"]["resctrl"] is not None


def test_snapshot_without_config_and_no_default_file_uses_the_defaults(
        tmp_path, monkeypatch, capsys):
    uri = write_node(tmp_path, probe_host(XEON, XEON / "fs" / "resctrl"))
    monkeypatch.setenv(DEFAULT_PATH_ENV, str(tmp_path / "absent.toml"))
    assert main(["snapshot", "--sysfs-root", str(XEON), "--libvirt", uri, "--json"]) == 0
    snap = json.loads(capsys.readouterr().out)
    assert snap["host"] == socket.gethostname() and snap["config"]["dedicated_cpus"] == []


def test_run_watch_and_snapshot_without_config_read_the_same_file():
    d = DaemonProc(start=False)
    d.env[DEFAULT_PATH_ENV] = str(d.config)
    try:
        with open(d.log, "ab") as fh:
            d.proc = subprocess.Popen([sys.executable, "-m", "hostagent.cli", "run"],
                                      stdout=fh, stderr=fh, env=d.env, cwd=ROOT)
        d.wait_notify("READY=1")
        watch = subprocess.run(
            [sys.executable, "-m", "hostagent.cli", "watch", "--json", "--count", "1",
             "--seconds", "30"], capture_output=True, text=True, env=d.env, timeout=60)
        assert watch.returncode == 0, watch.stderr
        published = json.loads(watch.stdout.splitlines()[0])
        assert published["host"] == "testhost"
        one_shot = subprocess.run(
            [sys.executable, "-m", "hostagent.cli", "snapshot", "--json"],
            capture_output=True, text=True, env=d.env, timeout=60)
        assert one_shot.returncode == 0, one_shot.stderr
        snap = json.loads(one_shot.stdout)
        assert snap["host"] == published["host"]
        assert snap["config"] == published["config"]
        assert snap["topology"] == published["topology"]
        assert d.stop() == 0, d.log_text()
    finally:
        d.close()
