"""systemd/hostagent.service: the settings the daemon relies on, and systemd's own check."""

import configparser
import shutil
import subprocess
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "hostagent.service"


def _unit() -> configparser.ConfigParser:
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str  # keys are case-sensitive
    cp.read(UNIT)
    return cp


def test_service_settings():
    svc = _unit()["Service"]
    assert svc["Type"] == "notify"
    assert svc["ExecStart"].endswith("hostagent run --config /etc/hostagent/hostagent.toml")
    assert svc["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert svc["Restart"] == "on-failure" and svc["WatchdogSec"] == "30s"
    assert svc["RuntimeDirectory"] == "hostagent"  # /run/hostagent: the dump directory
    # reads /sys, writes only /sys/fs/resctrl; udev needs netlink; no PrivateNetwork
    assert svc["ProtectKernelTunables"] == "yes"
    assert svc["ReadWritePaths"] == "-/sys/fs/resctrl"
    assert "AF_NETLINK" in svc["RestrictAddressFamilies"].split()
    assert "PrivateNetwork" not in svc and "DynamicUser" not in svc


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_analyze_verify(tmp_path):
    unit = tmp_path / "hostagent.service"
    exe = shutil.which("true")
    unit.write_text(UNIT.read_text().replace("/opt/hostagent/bin/hostagent", exe))
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "hostagent.service" not in r.stderr, r.stderr
