"""Real QEMU (TCG) guests with ``<numatune>`` and with hugepage-backed memory, through a real
``hostagent run`` on this machine's ``/sys`` following the real libvirtd, checked in the
published snapshot: the guest's cells (bound to host cell 0 by ``<memnode>``), the pages
it holds and the cell's hugepage pool.

Hugepages: scripts/setup-libvirtd sets ``LIBVIRTD_HUGEPAGES`` (64) 2 MiB pages and mounts
hugetlbfs BEFORE it starts libvirtd (libvirt looks for hugetlbfs only when it starts).
A CI run (``CI=true``) sets them up from scratch, so there the hugepage test must pass;
elsewhere it is skipped with the reason when the machine cannot give the pages, or when
the running libvirtd was started before hugetlbfs was mounted. Without libvirtd: fail in
CI, skip elsewhere (tests/test_real_libvirt.py).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from daemon_helpers import DaemonProc, config_text, wait_for
from real_libvirt import require_libvirtd
from test_real_libvirt import (
    GUEST_PREFIX,
    GUEST_TIMEOUT_SECONDS,
    QEMU,
    REACH_TIMEOUT_SECONDS,
    URI,
    _guest,
    _host_cpus,
)

MEMORY_KIB = 64 * 1024
PAGE_KIB = 2048
NR_HUGEPAGES = Path(f"/sys/kernel/mm/hugepages/hugepages-{PAGE_KIB}kB/nr_hugepages")
HUGETLBFS_MISSING = "hugetlbfs filesystem is not mounted"  # libvirt's error text


def numa_guest_xml(name: str, cpus: list[int], *, hugepages: bool) -> str:
    """2 vCPUs pinned to this machine's first and last CPU, one guest NUMA cell of 64 MiB
    bound (strict) to host cell 0, optionally backed by 2 MiB pages of cell 0."""
    backing = (f"<memoryBacking><hugepages><page size='{PAGE_KIB}' unit='KiB' "
               "nodeset='0'/></hugepages></memoryBacking>" if hugepages else "")
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <uuid>{uuid.uuid4()}</uuid>
  <memory unit='KiB'>{MEMORY_KIB}</memory>
  {backing}
  <vcpu placement='static'>2</vcpu>
  <cputune><vcpupin vcpu='0' cpuset='{cpus[0]}'/><vcpupin vcpu='1' cpuset='{cpus[-1]}'/>
    <emulatorpin cpuset='{cpus[0]}-{cpus[-1]}'/></cputune>
  <numatune><memory mode='strict' nodeset='0'/>
    <memnode cellid='0' mode='strict' nodeset='0'/></numatune>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <cpu><numa><cell id='0' cpus='0-1' memory='{MEMORY_KIB}' unit='KiB'/></numa></cpu>
  <on_poweroff>destroy</on_poweroff>
  <devices>
    <emulator>{QEMU}</emulator>
    <video><model type='none'/></video>
    <memballoon model='none'/>
  </devices>
</domain>
"""


@pytest.fixture(scope="module")
def conn() -> Iterator[Any]:
    require_libvirtd()
    import libvirt

    c = libvirt.open(URI)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def agent(conn: Any) -> Iterator[DaemonProc]:
    """``hostagent run`` on this machine's /sys, following the real libvirtd."""
    cpus = _host_cpus()
    d = DaemonProc(start=False)
    try:
        d.uri, d.sysfs = URI, Path("/sys")
        d.config.write_text(config_text(d.dir, d.sysfs, URI,
                                        dedicated=",".join(map(str, cpus))))
        d.start()
        d.wait_notify("READY=1", timeout=REACH_TIMEOUT_SECONDS)
        yield d
        assert d.stop() == 0, d.log_text()
    finally:
        d.close()


def _start(conn: Any, *, hugepages: bool) -> Any:
    name = f"{GUEST_PREFIX}{uuid.uuid4().hex[:10]}"
    return conn.createXML(numa_guest_xml(name, _host_cpus(), hugepages=hugepages), 0)


def _destroy(dom: Any) -> None:
    import libvirt

    try:
        dom.destroy()
    except libvirt.libvirtError:
        if dom.isActive():
            raise


def _pool(snap: dict[str, Any], cell: int) -> dict[str, Any] | None:
    pools = snap["usage"]["cells"][cell]["hugepages"]
    return next((p for p in pools if p["size_kib"] == PAGE_KIB), None)


def test_numatune_guest_has_its_cell_bound_to_host_cell_0(agent, conn):
    with agent.subscriber() as sub:
        sub.wait_snapshot("testhost", timeout=REACH_TIMEOUT_SECONDS)
        dom = _start(conn, hugepages=False)
        try:
            snap = wait_for(sub, lambda s: _guest(s, dom.name()) is not None,
                            timeout=GUEST_TIMEOUT_SECONDS)
            g = _guest(snap, dom.name())
            assert g["cells"] == [{"guest_cell": 0, "host_cell": 0, "host_cells": [0],
                                   "vcpus": 2, "memory_kib": MEMORY_KIB,
                                   "page_size_kib": None}]
            assert (g["memory_kib"], g["page_size_kib"]) == (MEMORY_KIB, None)
        finally:
            _destroy(dom)
        wait_for(sub, lambda s: _guest(s, dom.name()) is None, timeout=GUEST_TIMEOUT_SECONDS)


def _hugepages_unavailable() -> str | None:
    if not NR_HUGEPAGES.exists():
        return f"{NR_HUGEPAGES} does not exist: this kernel has no {PAGE_KIB} KiB pages"
    have = int(NR_HUGEPAGES.read_text())
    if have < MEMORY_KIB // PAGE_KIB:
        return (f"{NR_HUGEPAGES} is {have}, fewer than the {MEMORY_KIB // PAGE_KIB} pages "
                "the guest needs (scripts/setup-libvirtd sets LIBVIRTD_HUGEPAGES)")
    return None


def _not_here(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true and a hugepage guest is not possible: {reason}")
    pytest.skip(reason)


def test_hugepage_guest_holds_pages_of_cell_0(agent, conn):
    import libvirt

    reason = _hugepages_unavailable()
    if reason is not None:
        _not_here(reason)
    with agent.subscriber() as sub:
        sub.wait_snapshot("testhost", timeout=REACH_TIMEOUT_SECONDS)
        try:
            dom = _start(conn, hugepages=True)
        except libvirt.libvirtError as exc:
            if HUGETLBFS_MISSING in str(exc):
                _not_here(f"libvirtd was started before hugetlbfs was mounted ({exc}); "
                          "restart it: kill $(cat /run/libvirtd.pid); scripts/setup-libvirtd")
            raise
        pages = MEMORY_KIB // PAGE_KIB
        try:
            snap = wait_for(sub, lambda s: _guest(s, dom.name()) is not None,
                            timeout=GUEST_TIMEOUT_SECONDS)
            g = _guest(snap, dom.name())
            assert g["page_size_kib"] == PAGE_KIB
            assert g["cells"] == [{"guest_cell": 0, "host_cell": 0, "host_cells": [0],
                                   "vcpus": 2, "memory_kib": MEMORY_KIB,
                                   "page_size_kib": PAGE_KIB}]
            pool = _pool(snap, 0)
            total = int(NR_HUGEPAGES.read_text())  # one node: the node's pool is the total
            assert pool is not None and pool["total"] == total
            assert pool["used"] >= pages  # the tracker counts our guest's (others may run)
            assert pool["free"] == pool["total"] - pool["reserved"] - pool["used"]
            assert "HugePages_Total" in Path("/proc/meminfo").read_text()
        finally:
            _destroy(dom)
        after = wait_for(sub, lambda s: _guest(s, dom.name()) is None,
                         timeout=GUEST_TIMEOUT_SECONDS)
        assert _pool(after, 0)["used"] == pool["used"] - pages
