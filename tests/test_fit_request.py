"""Fit requests: parsing, Nova's rules, image narrowing, and every refusal message."""

from __future__ import annotations

import pytest
from fit_hosts import flavor

from hostagent.errors import RequestError
from hostagent.fit import parse_request
from hostagent.fit.request import TOPOLOGY_MAX, parse_page_size


def req(vcpus=4, mem=4096, image=None, **specs):
    r = flavor(vcpus, mem, **specs)
    if image is not None:
        r["image_properties"] = image
    return r


def test_plain_shared_guest_floats():
    r = parse_request(req())
    assert r.numa is False and r.cpu_policy == "shared" and r.thread_policy is None
    assert [c.vcpus for c in r.cells] == [(0, 1, 2, 3)]
    assert r.cells[0].shared == (0, 1, 2, 3) and r.cells[0].dedicated == ()


def test_dedicated_auto_split_over_cells():
    r = parse_request(req(8, 4096, cpu_policy="dedicated", numa_nodes=2))
    assert r.numa and r.thread_policy == "prefer"
    assert [c.dedicated for c in r.cells] == [(0, 1, 2, 3), (4, 5, 6, 7)]
    assert [c.memory_mib for c in r.cells] == [2048, 2048]


def test_manual_cells():
    r = parse_request(req(6, 3072, numa_nodes=2, numa_cpus_0="0,2,4", numa_mem_0=1024,
                          numa_cpus_1="1,3,5", numa_mem_1=2048))
    assert [c.vcpus for c in r.cells] == [(0, 2, 4), (1, 3, 5)]
    assert [c.memory_mib for c in r.cells] == [1024, 2048]


def test_manual_cells_with_exclusion():
    r = parse_request(req(4, 2048, numa_nodes=2, numa_cpus_0="0-3,^2,^3", numa_mem_0=1024,
                          numa_cpus_1="2-3", numa_mem_1=1024))
    assert r.cells[0].vcpus == (0, 1)


def test_mixed_with_dedicated_mask():
    r = parse_request(req(4, 2048, cpu_policy="mixed", cpu_dedicated_mask="^0-1"))
    assert r.cells[0].dedicated == (2, 3) and r.cells[0].shared == (0, 1)


def test_mixed_with_realtime_mask_makes_rt_dedicated():
    r = parse_request(req(4, 2048, cpu_policy="mixed", cpu_realtime="yes",
                          cpu_realtime_mask="^0"))
    assert r.realtime == (1, 2, 3) and r.cells[0].dedicated == (1, 2, 3)


def test_dedicated_realtime_all_rt_needs_emulator_policy():
    r = parse_request(req(2, 2048, cpu_policy="dedicated", cpu_realtime="true",
                          emulator_threads_policy="isolate"))
    assert r.realtime == (0, 1) and r.emulator_policy == "isolate"


def test_resources_pcpu_and_trait():
    r = parse_request({"vcpus": 2, "memory_mb": 1024, "extra_specs": {
        "resources:PCPU": "2", "trait:HW_CPU_HYPERTHREADING": "forbidden"}})
    assert r.cpu_policy == "dedicated" and r.thread_policy == "isolate"
    r = parse_request({"vcpus": 2, "memory_mb": 1024, "extra_specs": {
        "resources:PCPU": "3", "hw:emulator_threads_policy": "isolate"}})
    assert r.cpu_policy == "dedicated"


def test_ints_and_bools_accepted_as_values():
    r = parse_request({"vcpus": 2, "memory_mb": 1024,
                       "extra_specs": {"hw:numa_nodes": 1, "hw:cpu_policy": "dedicated"}})
    assert r.numa and len(r.cells) == 1


def test_unrelated_keys_ignored():
    r = parse_request({"vcpus": 1, "memory_mb": 512,
                       "extra_specs": {"quota:cpu_shares": "10", "hw:watchdog_action": "reset"},
                       "image_properties": {"hw_disk_bus": "scsi", "os_type": "linux"}})
    assert r.numa is False


@pytest.mark.parametrize("text,kib", [
    ("small", "small"), ("large", "large"), ("ANY", "any"), ("2048", 2048), ("2MB", 2048),
    ("2M", 2048), ("2mib", 2048), ("1GB", 1048576), ("1G", 1048576), ("4096KB", 4096),
    ("2097152b", 2048),
])
def test_page_sizes(text, kib):
    assert parse_page_size(text) == kib


def test_image_narrows_page_size():
    assert parse_request(req(mem_page_size="any", image={"hw_mem_page_size": "1GB"})
                         ).page_size == 1048576
    assert parse_request(req(mem_page_size="large", image={"hw_mem_page_size": "2048"})
                         ).page_size == 2048
    assert parse_request(req(mem_page_size="large", image={"hw_mem_page_size": "large"})
                         ).page_size == "large"


def test_image_topology_replaces_flavor_preferences():
    r = parse_request(req(8, cpu_sockets=2, cpu_max_sockets=4,
                          image={"hw_cpu_cores": "4", "hw_cpu_max_sockets": "2"}))
    assert (r.topology.sockets, r.topology.cores, r.topology.threads) == (0, 4, 0)
    assert r.topology.max_sockets == 2 and r.topology.max_cores == TOPOLOGY_MAX


def test_image_thread_policy_applies_under_prefer():
    r = parse_request(req(cpu_policy="dedicated", cpu_thread_policy="prefer",
                          image={"hw_cpu_thread_policy": "isolate"}))
    assert r.thread_policy == "isolate"


def test_flavor_dedicated_wins_over_image_shared():
    r = parse_request(req(cpu_policy="dedicated", image={"hw_cpu_policy": "shared"}))
    assert r.cpu_policy == "dedicated"


def test_image_policy_when_flavor_silent():
    r = parse_request(req(image={"hw_cpu_policy": "dedicated", "hw_numa_nodes": "2"}))
    assert r.cpu_policy == "dedicated" and len(r.cells) == 2


def test_pci_and_cache_keys():
    r = parse_request(req(pci_devices="8086:154d:2,15B3:1017", pci_numa_affinity_policy="socket",
                          cpu_policy="dedicated"))
    assert [(p.vendor, p.device, p.count) for p in r.pci] == [("8086", "154d", 2),
                                                             ("15b3", "1017", 1)]
    assert r.pci_policy == "socket"
    assert parse_request(req()).pci_policy == "legacy"


# ------------------------------------------------------------------------ refusals

REFUSALS = [
    ({"vcpus": 0, "memory_mb": 1}, "request vcpus=0: must be an integer >= 1"),
    ({"vcpus": True, "memory_mb": 1}, "request vcpus=True: must be an integer >= 1"),
    ({"memory_mb": 1}, "request: vcpus is missing"),
    ({"vcpus": 1, "memory_mb": "1"}, "request memory_mb='1': must be an integer >= 1"),
    ({"vcpus": 1, "memory_mb": 1, "flavor": "x"}, "request flavor='x': unknown key"),
    ({"vcpus": 1, "memory_mb": 1, "extra_specs": []}, "request extra_specs=[]: must be an object"),
    ({"vcpus": 1, "memory_mb": 1, "extra_specs": {"hw:numa_nodes": 1.5}},
     "extra_specs hw:numa_nodes=1.5: values must be strings"),
    (req(numa_nodes="0"), "extra_specs hw:numa_nodes='0': must be an integer between 1 and 128"),
    (req(numa_nodes="two"), "extra_specs hw:numa_nodes='two': must be an integer"),
    (req(numa_nodes="8"), "extra_specs hw:numa_nodes='8': more guest cells than vCPUs (4)"),
    (req(3, 4096, numa_nodes="2"), "hw:numa_nodes='2': 3 vCPUs and 4096 MiB cannot be split"),
    (req(cpu_policy="pinned"), "extra_specs hw:cpu_policy='pinned': must be one of shared, "
                               "dedicated, mixed"),
    (req(cpu_policy="dedicated", cpu_thread_policy="never"),
     "extra_specs hw:cpu_thread_policy='never': must be one of prefer, isolate, require"),
    (req(cpu_thread_policy="isolate"),
     "extra_specs hw:cpu_thread_policy='isolate': a thread policy needs hw:cpu_policy=dedicated"),
    (req(emulator_threads_policy="isolate"),
     "extra_specs hw:emulator_threads_policy='isolate': isolated emulator threads need"),
    (req(cpu_policy="dedicated", emulator_threads_policy="both"),
     "hw:emulator_threads_policy='both': must be one of share, isolate"),
    (req(cpu_policy="dedicated", cpu_dedicated_mask="0"),
     "hw:cpu_dedicated_mask='0': a dedicated mask needs hw:cpu_policy=mixed"),
    (req(cpu_policy="mixed"), "hw:cpu_policy='mixed': needs hw:cpu_dedicated_mask or"),
    (req(cpu_policy="mixed", cpu_dedicated_mask="0-3"),
     "hw:cpu_dedicated_mask='0-3': a mixed guest needs at least one dedicated and one shared"),
    (req(cpu_policy="mixed", cpu_dedicated_mask="^0-3"),
     "hw:cpu_dedicated_mask='^0-3': a mixed guest needs at least one dedicated and one shared"),
    (req(cpu_policy="mixed", cpu_dedicated_mask="0-7"),
     "hw:cpu_dedicated_mask='0-7': not a valid vCPU mask: CPU 7 is beyond the last vCPU 3"),
    (req(cpu_policy="mixed", cpu_dedicated_mask="0-x"),
     "hw:cpu_dedicated_mask='0-x': not a valid vCPU mask: '0-x' is not a CPU id"),
    (req(cpu_policy="mixed", cpu_dedicated_mask="3-1"), "range '3-1' runs backwards"),
    (req(cpu_policy="mixed", cpu_dedicated_mask="0", cpu_realtime="yes",
         cpu_realtime_mask="^0"),
     "hw:cpu_dedicated_mask='0': give either hw:cpu_dedicated_mask or a realtime mask"),
    (req(cpu_realtime="yes"), "hw:cpu_realtime='yes': realtime needs hw:cpu_policy=dedicated"),
    (req(cpu_policy="dedicated", cpu_realtime="maybe"), "hw:cpu_realtime='maybe': must be a "
                                                        "boolean"),
    (req(cpu_policy="dedicated", cpu_realtime="yes"),
     "hw:cpu_realtime='yes': every vCPU is realtime"),
    (req(cpu_policy="dedicated", cpu_realtime="yes", cpu_realtime_mask="0-3"),
     "hw:cpu_realtime_mask='0-3': every vCPU is realtime"),
    (req(cpu_policy="dedicated", cpu_realtime="yes", cpu_realtime_mask="^0-3"),
     "hw:cpu_realtime_mask='^0-3': selects no vCPU"),
    (req(cpu_policy="dedicated", cpu_realtime_mask="^0"),
     "hw:cpu_realtime_mask='^0': a realtime mask needs hw:cpu_realtime=true"),
    (req(mem_page_size="huge"), "hw:mem_page_size='huge': must be small, large, any or a size"),
    (req(mem_page_size="-2"), "hw:mem_page_size='-2': must be small, large, any or a size"),
    (req(mem_page_size="3b"), "hw:mem_page_size='3b': must be a positive whole number of KiB"),
    (req(mem_page_size="0"), "hw:mem_page_size='0': must be a positive whole number of KiB"),
    (req(image={"hw_mem_page_size": "2MB"}),
     "image_properties hw_mem_page_size='2MB': the flavor sets no hw:mem_page_size to narrow"),
    (req(mem_page_size="large", image={"hw_mem_page_size": "small"}),
     "hw_mem_page_size='small': would widen the flavor's hw:mem_page_size=large"),
    (req(mem_page_size="2MB", image={"hw_mem_page_size": "1GB"}),
     "hw_mem_page_size='1GB': would widen the flavor's hw:mem_page_size=2048"),
    (req(cpu_policy="shared", image={"hw_cpu_policy": "dedicated"}),
     "image_properties hw_cpu_policy='dedicated': the flavor's hw:cpu_policy=shared forbids"),
    (req(cpu_policy="mixed", cpu_dedicated_mask="0", image={"hw_cpu_policy": "dedicated"}),
     "hw_cpu_policy='dedicated': the flavor's hw:cpu_policy=mixed forbids dedicated"),
    (req(cpu_policy="dedicated", cpu_thread_policy="require",
         image={"hw_cpu_thread_policy": "isolate"}),
     "hw_cpu_thread_policy='isolate': the flavor's hw:cpu_thread_policy=require forbids it"),
    (req(cpu_policy="dedicated", emulator_threads_policy="share",
         image={"hw_emulator_threads_policy": "isolate"}),
     "hw_emulator_threads_policy='isolate': the flavor's hw:emulator_threads_policy=share"),
    (req(numa_nodes=2, image={"hw_numa_nodes": "1"}),
     "image_properties hw_numa_nodes='1': the flavor already sets hw:numa_nodes"),
    (req(numa_nodes=2, numa_cpus_0="0-1", numa_mem_0="2048", numa_cpus_1="2-3",
         numa_mem_1="2048", image={"hw_numa_cpus.0": "0"}),
     "hw_numa_cpus.0='0': the flavor already sets hw:numa_cpus/hw:numa_mem"),
    (req(numa_cpus_0="0-3", numa_mem_0="4096"), "hw:numa_cpus.0='0-3': needs hw:numa_nodes"),
    (req(numa_nodes=2, numa_cpus_0="0-1", numa_mem_0="2048"),
     "extra_specs hw:numa_cpus.1 is missing: CPU and memory must be given for every guest cell"),
    (req(numa_nodes=2, numa_cpus_0="0-1", numa_mem_0="2048", numa_cpus_1="2-3"),
     "extra_specs hw:numa_mem.1 is missing"),
    (req(numa_nodes=1, numa_cpus_0="0-3", numa_mem_0="4096", numa_cpus_3="0", numa_mem_3="1"),
     "hw:numa_cpus.3='0': guest cell 3 does not exist (hw:numa_nodes=1)"),
    (req(numa_nodes=2, numa_cpus_0="0-4", numa_mem_0="2048", numa_cpus_1="2-3",
         numa_mem_1="2048"), "hw:numa_cpus.0='0-4': vCPU 4 is beyond the last vCPU 3"),
    (req(numa_nodes=2, numa_cpus_0="0-2", numa_mem_0="2048", numa_cpus_1="2-3",
         numa_mem_1="2048"), "hw:numa_cpus.1='2-3': vCPU 2 is already in guest cell 0"),
    (req(numa_nodes=2, numa_cpus_0="0", numa_mem_0="2048", numa_cpus_1="2-3",
         numa_mem_1="2048"), "extra_specs hw:numa_cpus.*: vCPUs 1 are in no guest cell"),
    (req(numa_nodes=2, numa_cpus_0="0-1", numa_mem_0="2048", numa_cpus_1="2-3",
         numa_mem_1="1024"), "hw:numa_mem.*: 3072 MiB given over the cells, but memory_mb is 4096"),
    (req(numa_nodes=2, numa_cpus_0="0-1", numa_mem_0="0", numa_cpus_1="2-3",
         numa_mem_1="4096"), "hw:numa_mem.0='0': must be an integer >= 1"),
    (req(numa_nodes=2, numa_cpus_0="^0", numa_mem_0="2048", numa_cpus_1="0-3",
         numa_mem_1="2048"), "hw:numa_cpus.0='^0': selects no vCPU"),
    (req(cpu_sockets="x"), "extra_specs hw:cpu_sockets='x': must be an integer >= 1"),
    (req(cpu_sockets="4", cpu_max_sockets="2"),
     "extra_specs hw:cpu_sockets='4': exceeds the limit hw:cpu_max_sockets=2"),
    (req(cpu_max_cores="2", image={"hw_cpu_max_cores": "4"}),
     "image_properties hw_cpu_max_cores='4': exceeds the flavor's hw:cpu_max_cores=2"),
    (req(cpu_max_threads="1", image={"hw_cpu_threads": "2"}),
     "image_properties hw_cpu_threads='2': exceeds the limit hw:cpu_max_threads=1"),
    (req(pci_numa_affinity_policy="strict"),
     "hw:pci_numa_affinity_policy='strict': must be one of required, preferred, legacy, socket"),
    (req(pci_numa_affinity_policy="required", image={"hw_pci_numa_affinity_policy": "legacy"}),
     "hw_pci_numa_affinity_policy='legacy': the flavor's hw:pci_numa_affinity_policy=required"),
    (req(pci_devices="8086-154d"), "hw:pci_devices='8086-154d': '8086-154d' is not "
                                   "VENDOR:DEVICE[:COUNT]"),
    (req(pci_devices="8086:154d:0"), "hw:pci_devices='8086:154d:0': '8086:154d:0': the count"),
    (req(pci_devices="8086:154d,8086:154D:2"),
     "hw:pci_devices='8086:154d,8086:154D:2': 8086:154d is listed twice"),
    (req(cpu_polcy="dedicated"), "extra_specs hw:cpu_polcy='dedicated': unknown hw: key"),
    (req(pmem="2GB"), "extra_specs hw:pmem='2GB': persistent memory (vPMEM) is not placed"),
    (req(image={"hw_cpu_realtime": "yes"}),
     "image_properties hw_cpu_realtime='yes': only the flavor may set this"),
    (req(image={"hw_cpu_dedicated_mask": "0"}), "hw_cpu_dedicated_mask='0': only the flavor"),
    ({"vcpus": 2, "memory_mb": 1, "extra_specs": {"resources:PCPU": "2",
                                                  "hw:cpu_policy": "dedicated"}},
     "extra_specs resources:PCPU='2': cannot be combined with hw:cpu_policy"),
    ({"vcpus": 2, "memory_mb": 1, "extra_specs": {"resources:PCPU": "1",
                                                  "resources:VCPU": "1"}},
     "resources:PCPU and resources:VCPU cannot both be given"),
    ({"vcpus": 2, "memory_mb": 1, "extra_specs": {"resources:PCPU": "3"}},
     "extra_specs resources:PCPU='3': must equal the vCPU count (2)"),
    ({"vcpus": 2, "memory_mb": 1, "extra_specs": {"resources:PCPU": "2",
                                                  "trait:HW_CPU_HYPERTHREADING": "maybe"}},
     "trait:HW_CPU_HYPERTHREADING='maybe': must be required or forbidden"),
    ({"vcpus": 2, "memory_mb": 1, "extra_specs": {
        "resources:PCPU": "2", "trait:HW_CPU_HYPERTHREADING": "required",
        "hw:cpu_thread_policy": "require"}},
     "trait:HW_CPU_HYPERTHREADING='required': cannot be combined with hw:cpu_thread_policy"),
    (req(cpu_policy="dedicated", cache_reservation="type=both,size=2mb"),
     "hw:cache_reservation='type=both,size=2mb': 'type=both,size=2mb': each reservation "
     "starts with vcpus=LIST:"),
    (req(cpu_policy="dedicated", cache_reservation="vcpus=0-1:type=both,size=2mb;"),
     "has an empty item"),
    (req(cpu_policy="dedicated", cache_reservation="vcpus=0-9:type=both,size=2mb"),
     "vcpus=0-9: CPU 9 is beyond the last vCPU 3"),
    (req(cpu_policy="dedicated", cache_reservation="vcpus=0:type=both,size=2mb,cache-id=1"),
     "cache-id is chosen by the fit"),
    (req(cpu_policy="dedicated", cache_reservation="vcpus=0:mb=50,node=0"),
     "memory bandwidth is not placed by the fit"),
    (req(cpu_policy="mixed", cpu_dedicated_mask="2-3",
         cache_reservation="vcpus=1-2:type=both,size=2mb"),
     "vCPUs 1 are not dedicated; cache reservations need pinned vCPUs"),
    (req(cpu_policy="dedicated",
         cache_reservation="vcpus=0-1:type=both,size=2mb;vcpus=1:type=both,size=1mb"),
     "vCPU 1 is in two reservations"),
]


@pytest.mark.parametrize("request_,message", REFUSALS)
def test_refusals(request_, message):
    with pytest.raises(RequestError) as info:
        parse_request(request_)
    assert message in str(info.value)


def test_request_must_be_an_object():
    with pytest.raises(RequestError, match="request must be a JSON object, got list"):
        parse_request([1])
