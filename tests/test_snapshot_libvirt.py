"""Guests read from libvirt's real test:/// driver, tracked step by step, and the
``hostagent snapshot`` command end to end (fixture sysfs tree + custom node file)."""

from __future__ import annotations

import json
import subprocess
import sys

import libvirt
import pytest
from libvirt_helpers import (
    ROOT,
    domain_xml,
    open_test,
    pools_free,
    probe_fixture,
    uuid_for,
    write_node,
)

from hostagent.cli import main
from hostagent.config import config_from_dict, resolve_resources
from hostagent.guests.source import GuestRecord, read_guest, read_guests
from hostagent.tracker import compute_usage

XEON = ROOT / "fixtures" / "sysfs" / "xeon-2s-cat" / "sys"
DEDICATED = "2-11,14-23,26-35,38-47"
SHARED = "0-1,12-13,24-25,36-37"


@pytest.fixture(scope="module")
def xeon():
    # pools wholly free in the kernel's count: the guests here are the only page users
    return pools_free(probe_fixture("xeon-2s-cat"))


@pytest.fixture(scope="module")
def res(xeon):
    cfg = config_from_dict({"resources": {"dedicated_cpus": DEDICATED, "shared_cpus": SHARED}})
    return resolve_resources(cfg.resources, xeon)


def usage_of(conn, xeon, res) -> dict:
    return compute_usage(xeon, res, read_guests(conn))


def thread(u, cpu):
    return u["threads"][cpu]


def cell(u, cid):
    return u["cells"][cid]


def rt1_xml() -> str:
    # two guest cells on two host cells, 1G pages, one cachetune: libvirt names its group
    # qemu-1-rt1-vcpus_2-3, which the fixture's resctrl tree holds
    return domain_xml(
        "rt1", vcpus=4, memory_kib=4 * 1048576,
        vcpupin={0: "2", 1: "26", 2: "14", 3: "38"}, emulatorpin="3",
        cells=[("0-1", 2 * 1048576), ("2-3", 2 * 1048576)], memnodes={0: "0", 1: "1"},
        hugepages=[(1048576, None)], vcpusched=[("0-3", "fifo", 1)],
        cachetunes=[("2-3", [(0, 3, "both", 2304)])],
    )


def test_define_start_destroy_step_by_step(tmp_path, xeon, res):
    conn = open_test(write_node(tmp_path, xeon))
    try:
        u = usage_of(conn, xeon, res)
        assert u["guests"] == [] and cell(u, 0)["free_pcpus"] == 20

        # defined but not started: holds nothing and is not listed
        rt1 = conn.defineXML(rt1_xml())
        u = usage_of(conn, xeon, res)
        assert u["guests"] == [] and read_guest(rt1).spec is None

        rt1.create()
        assert rt1.ID() == 1
        u = usage_of(conn, xeon, res)
        uid = uuid_for("rt1")
        assert [g["name"] for g in u["guests"]] == ["rt1"]
        assert (thread(u, 2)["guest"], thread(u, 2)["vcpu"]) == (uid, 0)
        assert (thread(u, 3)["guest"], thread(u, 3)["emulator"]) == (uid, True)
        assert cell(u, 0)["pinned_cpus"] == [2, 3, 26]
        assert cell(u, 1)["pinned_cpus"] == [14, 38]
        assert (cell(u, 0)["free_pcpus"], cell(u, 0)["free_cores"]) == (17, 8)
        assert (cell(u, 1)["free_pcpus"], cell(u, 1)["free_cores"]) == (18, 9)
        one_g = [h for h in cell(u, 0)["hugepages"] if h["size_kib"] == 1048576][0]
        assert (one_g["used"], one_g["free"]) == (2, 30)
        groups = {a["group"]: a["guest"] for c in u["caches"] for a in c["allocations"]}
        assert groups["qemu-1-rt1-vcpus_2-3"] == uid and groups["batch"] is None
        g = u["guests"][0]
        assert g["cache"][0]["mask"] == "003" and g["state"] == "running"
        assert g["vcpusched"][0]["scheduler"] == "fifo"
        assert u["conflicts"] == []

        # a shared guest on the shared threads with default-size hugepages
        web = conn.defineXML(domain_xml(
            "web", vcpus=3, memory_kib=1048576, cpuset=SHARED, emulatorpin=SHARED,
            numa_memory=("strict", "1"), hugepages=[]))
        web.create()
        u = usage_of(conn, xeon, res)
        assert cell(u, 1)["shared_vcpus"] == 3
        assert uuid_for("web") in thread(u, 36)["shared_guests"]
        two_m = [h for h in cell(u, 1)["hugepages"] if h["size_kib"] == 2048][0]
        assert two_m["used"] == 512
        assert u["conflicts"] == []

        # a guest pinned onto rt1's thread: a conflict, nothing else breaks
        bad = conn.defineXML(domain_xml("bad", vcpus=1, vcpupin={0: "26"}, emulatorpin="0-1",
                                        numa_memory=("strict", "0")))
        bad.create()
        u = usage_of(conn, xeon, res)
        (c,) = u["conflicts"]
        assert c["kind"] == "dedicated_overlap" and c["cpus"] == [26]
        assert c["guests"] == sorted([uid, uuid_for("bad")])
        bad.destroy()
        assert usage_of(conn, xeon, res)["conflicts"] == []

        # paused guests still hold their resources
        rt1.suspend()
        u = usage_of(conn, xeon, res)
        assert u["guests"][0]["state"] == "paused" and thread(u, 2)["guest"] == uid

        # destroyed: threads and pages come back, the group is nobody's
        rt1.destroy()
        u = usage_of(conn, xeon, res)
        assert [g["name"] for g in u["guests"]] == ["web"]
        assert thread(u, 2)["guest"] is None and cell(u, 0)["free_pcpus"] == 20
        one_g = [h for h in cell(u, 0)["hugepages"] if h["size_kib"] == 1048576][0]
        assert one_g["used"] == 0
        groups = {a["group"]: a["guest"] for c in u["caches"] for a in c["allocations"]}
        assert groups["qemu-1-rt1-vcpus_2-3"] is None
    finally:
        conn.close()


def test_read_guests_skips_domains_that_vanish(tmp_path, xeon):
    conn = open_test(write_node(tmp_path, xeon, [domain_xml("a", running=True)]))
    try:
        (dom,) = conn.listAllDomains(1)

        class Gone(libvirt.libvirtError):
            def get_error_code(self):
                return libvirt.VIR_ERR_NO_DOMAIN

        class Vanishing:
            def __getattr__(self, name):
                return getattr(dom, name)

            def XMLDesc(self, flags=0):  # noqa: N802 - libvirt's name
                raise Gone("domain not found")

        class Conn:
            def listAllDomains(self, flags=0):  # noqa: N802
                return [Vanishing(), dom]

        recs = read_guests(Conn())
        assert [r.name for r in recs] == ["a"]
        assert isinstance(recs[0], GuestRecord) and recs[0].spec is not None
    finally:
        conn.close()


def _node_with_guests(tmp_path, xeon) -> str:
    return write_node(tmp_path, xeon, [
        domain_xml("rt1", vcpus=4, vcpupin={0: "2", 1: "26", 2: "14", 3: "38"},
                   emulatorpin="3", cells=[("0-1", 1048576), ("2-3", 1048576)],
                   memnodes={0: "0", 1: "1"}, hugepages=[(1048576, None)],
                   cachetunes=[("2-3", [(0, 3, "both", 2304)])], running=True),
        domain_xml("twin", vcpus=1, vcpupin={0: "26"}, emulatorpin="0-1", running=True),
        domain_xml("parked", vcpus=2, vcpupin={0: "4", 1: "5"}, running=False),
    ])


def _config(tmp_path) -> str:
    path = tmp_path / "hostagent.toml"
    path.write_text(f'[host]\nname = "node-7"\n[resources]\ndedicated_cpus = "{DEDICATED}"\n'
                    f'shared_cpus = "{SHARED}"\nreserved_memory_kib = 1048576\n')
    return str(path)


def test_snapshot_command_json(tmp_path, xeon, capsys):
    uri = _node_with_guests(tmp_path, xeon)
    rc = main(["snapshot", "--config", _config(tmp_path), "--sysfs-root", str(XEON),
               "--libvirt", uri, "--json"])
    assert rc == 0
    snap = json.loads(capsys.readouterr().out)
    assert (snap["schema"], snap["host"], snap["seq"]) == (1, "node-7", 0)
    assert snap["config"]["reserved_memory_kib"] == {"0": 1048576, "1": 1048576}
    u = snap["usage"]
    assert sorted(g["name"] for g in u["guests"]) == ["rt1", "twin"]  # parked is shut off
    # the fixture tree's kernel counts pages in use by no guest on three pools
    assert [c["kind"] for c in u["conflicts"]] == ["dedicated_overlap"] + [
        "hugepages_untracked"] * 3
    assert u["threads"][26]["guest"] in (uuid_for("rt1"), uuid_for("twin"))
    assert u["threads"][4]["guest"] is None
    rt1 = next(g for g in u["guests"] if g["name"] == "rt1")
    assert rt1["pinning"] == {"0": 2, "1": 26, "2": 14, "3": 38}
    assert rt1["cache"][0]["group"] == "qemu-1-rt1-vcpus_2-3"
    assert snap["topology"]["cells"][0]["id"] == 0


def test_snapshot_command_summary(tmp_path, xeon, capsys):
    uri = _node_with_guests(tmp_path, xeon)
    rc = main(["snapshot", "--config", _config(tmp_path), "--sysfs-root", str(XEON),
               "--libvirt", uri])
    out = capsys.readouterr().out
    assert rc == 0
    assert "free pCPUs" in out and "hugepages used/free" in out
    lines = out.splitlines()
    cell0 = next(line for line in lines if line.startswith("0 "))
    assert "17/20" in cell0 and "2-3,26" in cell0  # threads 2, 3 and 26 taken
    assert "1 GiB 1/31" in cell0
    assert any(line.strip().startswith("rt1") and "L3#0:003" in line for line in lines)
    assert "conflicts: 4" in out and "dedicated_overlap: dedicated CPU 26" in out
    assert "hugepages_untracked: cell 1: 11 pages of 1048576 KiB" in out


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--libvirt", "test:///no/such/node.xml"], "cannot connect to libvirt at "
         "test:///no/such/node.xml"),
        (["--config", "/no/such.toml"], "/no/such.toml: no such config file"),
        (["--sysfs-root", "/no/such/tree"], "/no/such/tree"),
    ],
)
def test_snapshot_command_errors(tmp_path, xeon, capsys, args, needle):
    base = {"--sysfs-root": str(XEON), "--libvirt": write_node(tmp_path, xeon)}
    for i in range(0, len(args), 2):
        base[args[i]] = args[i + 1]
    argv = ["snapshot"] + [x for kv in base.items() for x in kv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("hostagent: ") and needle in err
    assert "Traceback" not in err


def test_snapshot_command_bad_config_value(tmp_path, xeon, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('[resources]\ndedicated_cpus = "2-x"\n')
    assert main(["snapshot", "--config", str(bad), "--sysfs-root", str(XEON),
                 "--libvirt", write_node(tmp_path, xeon)]) == 2
    err = capsys.readouterr().err
    assert "resources.dedicated_cpus = '2-x'" in err


def test_snapshot_command_as_a_process(tmp_path, xeon):
    uri = _node_with_guests(tmp_path, xeon)
    proc = subprocess.run(
        [sys.executable, "-m", "hostagent.cli", "snapshot", "--sysfs-root", str(XEON),
         "--libvirt", uri, "--json"], capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # libvirt's default error printer stays quiet
    snap = json.loads(proc.stdout)
    # default config: nothing dedicated, so pinned guests are pin_not_dedicated conflicts
    assert snap["config"]["dedicated_cpus"] == []
    assert "pin_not_dedicated" in {c["kind"] for c in snap["usage"]["conflicts"]}
    bad = subprocess.run(
        [sys.executable, "-m", "hostagent.cli", "snapshot", "--sysfs-root", str(XEON),
         "--libvirt", "test:///nowhere.xml"], capture_output=True, text=True, timeout=60,
    )
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.strip() == ("hostagent: cannot connect to libvirt at test:///nowhere.xml"
                                  ": no such node XML file /nowhere.xml")
