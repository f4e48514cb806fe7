"""The shipped units verify after the documented install steps (``scripts/install``).

``scripts/install`` runs for real with ``DESTDIR`` = a temporary root: it creates the
virtualenv ``/opt/hostagent`` there (``python -m venv``, no download), pip installs a
wheel of this checkout into it (built with ``python -m build --no-isolation``; the
dependencies are left out with ``PIP_NO_DEPS``, nothing is fetched: ``PIP_NO_INDEX``) and
installs the units (the agent's and the forwarder's), the documentation and the configs
(``hostagent.toml``, the forwarder's example ``forward.toml``). ``systemd-analyze verify
--root`` then checks each unit **as shipped** (its text untouched) inside that root, which
also holds what a Debian host has there: systemd's own units and ``/bin/kill``.
"""

import configparser
import os
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlparse

import pytest
from test_packaging import run_build

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "hostagent.service"
FORWARD_UNIT = ROOT / "systemd" / "hostagent-forward.service"
SYSTEM_UNITS = Path("/usr/lib/systemd/system")  # systemd's own units (sysinit.target, ...)
# the venv's interpreter: scripts/install refuses one under /home, /root or /tmp (which the
# unit hides), as the test's own interpreter may be (e.g. pyenv in /root)
INSTALL_PYTHON = "/usr/bin/python3"


def unit(path: Path = UNIT) -> configparser.ConfigParser:
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str  # keys are case-sensitive
    cp.read(path)
    return cp


def exec_paths(path: Path = UNIT) -> list[str]:
    svc = unit(path)["Service"]
    return [svc[k].split()[0] for k in ("ExecStart", "ExecReload") if k in svc]


def doc_paths(path: Path = UNIT) -> list[str]:
    urls = unit(path)["Unit"]["Documentation"].split()
    assert all(u.startswith("file:///") for u in urls), urls
    return [urlparse(u).path for u in urls]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A root with the documented install done (scripts/install, DESTDIR)."""
    tmp = tmp_path_factory.mktemp("install")
    run_build("--wheel", outdir=tmp / "dist")
    [wheel] = (tmp / "dist").glob("hostagent-*.whl")
    root = tmp / "root"
    env = {**os.environ, "DESTDIR": str(root), "PYTHON": INSTALL_PYTHON,
           "PIP_NO_INDEX": "1", "PIP_NO_DEPS": "1"}
    r = subprocess.run([str(ROOT / "scripts" / "install"), str(wheel)], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert all(line.startswith("install: ") for line in r.stderr.splitlines()), r.stderr
    return root


def test_the_install_puts_every_file_the_unit_names(installed):
    for path in exec_paths():
        assert os.access(installed / path.lstrip("/"), os.X_OK) or path == "/bin/kill", path
    for path in doc_paths():
        assert (installed / path.lstrip("/")).is_file(), path
    svc = unit()["Service"]
    config = svc["ExecStart"].split("--config", 1)[1].split()[0]
    assert (installed / config.lstrip("/")).read_text() == (
        ROOT / "etc" / "hostagent.toml").read_text()
    assert (installed / "etc/systemd/system/hostagent.service").read_text() == UNIT.read_text()


def test_the_install_puts_the_forwarder_unit_and_its_example_config(installed):
    """systemd/hostagent-forward.service beside the agent's unit, running the same venv's
    command; etc/forward.toml where its ExecStart= looks, a config the forwarder loads."""
    from hostagent.forward import load_forward_config

    [exe] = exec_paths(FORWARD_UNIT)
    assert exe == exec_paths()[0] and os.access(installed / exe.lstrip("/"), os.X_OK), exe
    for path in doc_paths(FORWARD_UNIT):
        assert (installed / path.lstrip("/")).is_file(), path
    args = unit(FORWARD_UNIT)["Service"]["ExecStart"].split()
    assert args[1:3] == ["forward", "--config"], args
    config = installed / args[3].lstrip("/")
    assert config.read_text() == (ROOT / "etc" / "forward.toml").read_text()
    assert load_forward_config(config).runtime_dir == \
        f"/run/{unit(FORWARD_UNIT)['Service']['RuntimeDirectory']}"
    assert (installed / "etc/systemd/system" / FORWARD_UNIT.name).read_text() == \
        FORWARD_UNIT.read_text()


def test_the_installed_command_is_this_package(installed):
    exe = installed / exec_paths()[0].lstrip("/")
    first = exe.read_text().splitlines()[0]
    assert first.startswith(f"#!{installed}/opt/hostagent/bin/python"), first
    site = list((installed / "opt/hostagent/lib").glob("python3*/site-packages/hostagent"))
    assert len(site) == 1 and (site[0] / "cli.py").read_text() == (
        ROOT / "hostagent" / "cli.py").read_text()


def test_the_install_keeps_an_existing_config(installed):
    """Both configs (the agent's, the forwarder's) edited by the operator survive a
    second install."""
    cfgs = [installed / "etc/hostagent/hostagent.toml", installed / "etc/hostagent/forward.toml"]
    originals = [cfg.read_text() for cfg in cfgs]
    try:
        for cfg in cfgs:
            cfg.write_text(f"# {cfg.name} edited by the operator\n")
        env = {**os.environ, "DESTDIR": str(installed), "PYTHON": INSTALL_PYTHON,
               "PIP_NO_INDEX": "1", "PIP_NO_DEPS": "1"}
        [wheel] = (installed.parent / "dist").glob("hostagent-*.whl")
        r = subprocess.run([str(ROOT / "scripts" / "install"), str(wheel)], env=env,
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr
        for cfg in cfgs:
            assert f"install: keeping the config {cfg}" in r.stderr.splitlines()
            assert cfg.read_text() == f"# {cfg.name} edited by the operator\n"
    finally:
        for cfg, original in zip(cfgs, originals, strict=True):
            cfg.write_text(original)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None or not SYSTEM_UNITS.is_dir(),
                    reason="no systemd-analyze or no systemd units on this machine")
@pytest.mark.parametrize("name", [UNIT.name, FORWARD_UNIT.name])
def test_systemd_analyze_verify_passes_on_the_unit_as_shipped(installed, name):
    # what the host itself provides, below the same root
    units = installed / "usr/lib/systemd/system"
    if not units.exists():
        shutil.copytree(SYSTEM_UNITS, units, symlinks=True)
        (installed / "usr/bin").mkdir(parents=True, exist_ok=True)
        shutil.copy2("/usr/bin/kill", installed / "usr/bin/kill")
        (installed / "bin").symlink_to("usr/bin")
        (installed / "lib").symlink_to("usr/lib")
    r = subprocess.run(["systemd-analyze", "verify", f"--root={installed}",
                        name], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert name not in r.stderr, r.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None or not SYSTEM_UNITS.is_dir(),
                    reason="no systemd-analyze or no systemd units on this machine")
def test_systemd_analyze_verify_fails_without_the_install(tmp_path):
    """The check above is a real one: the same root without the venv does not verify."""
    shutil.copytree(SYSTEM_UNITS, tmp_path / "usr/lib/systemd/system", symlinks=True)
    (tmp_path / "usr/bin").mkdir(parents=True)
    shutil.copy2("/usr/bin/kill", tmp_path / "usr/bin/kill")
    (tmp_path / "bin").symlink_to("usr/bin")
    (tmp_path / "etc/systemd/system").mkdir(parents=True)
    shutil.copy2(UNIT, tmp_path / "etc/systemd/system/hostagent.service")
    r = subprocess.run(["systemd-analyze", "verify", f"--root={tmp_path}",
                        "hostagent.service"], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert f"Command {exec_paths()[0]} is not executable" in r.stderr, r.stderr
