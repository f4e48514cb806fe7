"""The Nova peer of bench/fit.py and bench/nova_diff.py: the host as Nova's libvirt driver
would describe it, a clear message when Nova is missing, and — when an interpreter with
Nova is named in HOSTAGENT_NOVA_PYTHON — a short differential run in which every answer
that differs from Nova's is one docs/fit.md lists ("Where we differ from Nova")."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from fit_hosts import make_snapshot, make_topology

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from nova_real import find_nova_python, host_doc  # noqa: E402


def test_host_doc_is_novas_view_of_the_host():
    # 1 cell, cores (0,4) (1,5) (2,6) (3,7); 3 and 7 shared, 4 in neither set, 1 taken,
    # 2 MiB pool of 16 pages with 4 used
    topo = make_topology(1, 4, 2, memory_mib=1024, hugepages={2048: 16})
    snap = make_snapshot(topo, dedicated=[0, 1, 2, 5, 6], shared=[3, 7], taken={1: "g"},
                         pages_used={(0, 2048): 4}, memory_used_kib={0: 100 * 1024},
                         shared_used={0: 3}, cpu_ratio=2.0, ram_ratio=1.5)
    doc = host_doc(snap)
    (cell,) = doc["cells"]
    assert cell["pcpuset"] == [0, 1, 2, 5, 6] and cell["cpuset"] == [3, 7]
    assert cell["pinned_cpus"] == [1]
    # sibling sets cut to the configured threads, as Nova's libvirt driver does
    assert cell["siblings"] == [[0], [1, 5], [2, 6], [3, 7]]
    assert cell["memory"] == 1024 and cell["memory_usage"] == 100 + 8
    assert cell["cpu_usage"] == 3
    assert cell["mempages"] == [
        {"size_kb": 4, "total": (1024 - 32) * 256, "used": 100 * 256, "reserved": 0},
        {"size_kb": 2048, "total": 16, "used": 4, "reserved": 0}]
    assert (doc["cpu_allocation_ratio"], doc["ram_allocation_ratio"]) == (2.0, 1.5)


def test_missing_nova_is_said_clearly(tmp_path, monkeypatch):
    python, why = find_nova_python(str(tmp_path / "no-python"))
    assert python is None and "--nova-python" in why and "no-python" in why
    monkeypatch.delenv("HOSTAGENT_NOVA_PYTHON", raising=False)
    if subprocess.run([sys.executable, "-c", "import nova"], capture_output=True,
                      timeout=120).returncode == 0:
        pytest.skip("nova is importable here")
    python, why = find_nova_python(None)
    assert python is None and why.startswith("nova is not installed here; install it")


NOVA_PYTHON = os.environ.get("HOSTAGENT_NOVA_PYTHON")


@pytest.mark.skipif(not NOVA_PYTHON, reason="HOSTAGENT_NOVA_PYTHON names no interpreter "
                                            "with nova (docs/fit.md, Speed)")
def test_every_difference_from_the_real_nova_is_a_documented_one():
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "nova_diff.py"), "--nova-python", NOVA_PYTHON,
         "--cases", "300", "--seed", "3", "--show", "1"],
        capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "same answer" in out.stdout and "UNEXPLAINED" not in out.stdout
