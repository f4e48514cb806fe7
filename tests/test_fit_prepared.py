"""A snapshot prepared once (``hostagent.fit.prepare``, what the agent does per snapshot)
gives the same answers as the snapshot itself, for every request, however often reused."""

from __future__ import annotations

import copy
import json

import pytest
from fit_hosts import flavor, make_snapshot, make_topology

from hostagent.errors import RequestError
from hostagent.fit import fit, prepare

REQUESTS = [
    flavor(4, 1024, cpu_policy="dedicated"),
    flavor(3, 1024, cpu_policy="dedicated"),
    flavor(8, 2048, cpu_policy="dedicated", numa_nodes=2),
    flavor(6, 2048, cpu_policy="dedicated", numa_nodes=2, mem_page_size="2MB"),
    flavor(2, 1024, cpu_policy="dedicated", cpu_thread_policy="isolate",
           emulator_threads_policy="isolate"),
    flavor(5, 1024, cpu_policy="dedicated", cpu_thread_policy="require"),
    flavor(4, 1024, cpu_policy="mixed", cpu_dedicated_mask="^0"),
    flavor(2, 1024, numa_nodes=1),
    flavor(2, 1024),
    flavor(40, 1024, cpu_policy="dedicated"),  # does not fit
    flavor(6, 3072, cpu_policy="dedicated", numa_nodes=3),  # 3 cells on a 2-cell host
]


def hosts():
    yield make_snapshot(make_topology(2, 4, 2, hugepages={2048: 1024}),
                        taken={0: "a", 9: "b", 12: "c"}, shared=[3, 11], dedicated=[
                            c for c in range(16) if c not in (3, 11)])
    yield make_snapshot(make_topology(4, 4, 2), taken={1: "a", 2: "a", 17: "b"})
    yield make_snapshot(make_topology(1, 8, 1))


@pytest.mark.parametrize("snap", list(hosts()))
def test_prepared_snapshot_gives_the_same_answers(snap):
    before = json.dumps(snap, sort_keys=True)
    view = prepare(snap)
    for _ in range(2):  # reused: what one fit works out is kept, never changed
        for request in REQUESTS:
            for strategy in ("spread", "pack"):
                want = fit(copy.deepcopy(snap), request, strategy=strategy)
                assert fit(view, request, strategy=strategy) == want, (request, strategy)
    assert json.dumps(snap, sort_keys=True) == before


def test_prepare_refuses_a_malformed_snapshot():
    with pytest.raises(RequestError, match="snapshot usage: missing or not an object"):
        prepare({"topology": {}, "config": {}})


def test_the_agent_reads_each_new_snapshot_for_its_fits():
    """The agent prepares a snapshot once for its fit requests; a guest started from a
    fit's XML shows in the next snapshot, and the next fit avoids its threads."""
    from daemon_helpers import DaemonProc, guest_names, wait_for

    request = {"vcpus": 4, "memory_mb": 1024, "extra_specs": {"hw:cpu_policy": "dedicated"}}
    d = DaemonProc()
    try:
        d.wait_notify("READY=1")
        with d.subscriber() as sub:
            sub.wait_snapshot("testhost")
            first = d.request({"op": "fit", "request": request})
            assert first["ok"] and first["result"]["fits"], first
            again = d.request({"op": "fit", "request": request})
            assert again["result"] == first["result"]  # the same snapshot, the same answer
            x = first["result"]["libvirt_xml"]
            xml = ("<domain type='test'><name>fitted</name><memory unit='MiB'>1024</memory>"
                   + "".join(x[k] for k in ("vcpu", "cputune", "numatune", "cpu") if k in x)
                   + "<os><type>hvm</type></os></domain>")
            assert d.request({"op": "test-domain", "action": "create", "xml": xml})["ok"]
            wait_for(sub, lambda s: guest_names(s) == ["fitted"])
            second = d.request({"op": "fit", "request": request})
        assert second["seq"] > first["seq"]
        taken = {c for cell in first["result"]["placement"]["cells"]
                 for c in cell["pinning"].values()}
        now = {c for cell in second["result"]["placement"]["cells"]
               for c in cell["pinning"].values()}
        assert now and not now & taken
        assert d.stop() == 0, d.log_text()
    finally:
        d.close()
