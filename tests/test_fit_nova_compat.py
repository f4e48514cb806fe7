"""Nova compatibility of the fitter (issue "Nova compatibility", items 8, 9 and 11).

- An image property that conflicts with the flavor's placement-form keys
  (``resources:PCPU`` / ``resources:VCPU``, ``trait:HW_CPU_HYPERTHREADING``) is refused,
  as Nova's ``numa_get_constraints`` refuses it, never silently overridden.
- ``require`` with a vCPU count that is not a multiple of the host's threads per core
  fits, as on Nova: the last core of a guest cell is partly used, its other threads are
  kept idle, and the guest topology shows no siblings that are not host siblings.
- ``prefer`` keeps its promise: the free threads of broken cores are used before whole
  cores, and only as many whole cores are touched as the vCPUs need.
"""

from __future__ import annotations

import pytest
from fit_hosts import flavor, make_snapshot, make_topology

from hostagent.errors import RequestError
from hostagent.fit import fit, parse_request
from hostagent.fit.cellfit import pin_prefer
from hostagent.model import Cell, Cpu, HostTopology

# ----------------------------------------------------------------------------- item 8


def _req(extra: dict[str, str], image: dict[str, str] | None = None, vcpus: int = 4):
    out = {"vcpus": vcpus, "memory_mb": 1024, "extra_specs": extra}
    if image is not None:
        out["image_properties"] = image
    return out


CONFLICTS = [
    # (extra specs, image properties, what the message must say)
    ({"resources:PCPU": "4"}, {"hw_cpu_policy": "shared"},
     "extra_specs resources:PCPU='4': cannot be combined with image_properties "
     "hw_cpu_policy='shared'"),
    ({"resources:VCPU": "4"}, {"hw_cpu_policy": "dedicated"},
     "extra_specs resources:VCPU='4': cannot be combined with image_properties "
     "hw_cpu_policy='dedicated'"),
    # Nova refuses the pair even when both say the same thing: "use one or the other"
    ({"resources:PCPU": "4"}, {"hw_cpu_policy": "dedicated"},
     "extra_specs resources:PCPU='4': cannot be combined with image_properties "
     "hw_cpu_policy='dedicated'"),
    ({"resources:PCPU": "4", "trait:HW_CPU_HYPERTHREADING": "forbidden"},
     {"hw_cpu_thread_policy": "require"},
     "extra_specs trait:HW_CPU_HYPERTHREADING='forbidden': cannot be combined with "
     "image_properties hw_cpu_thread_policy='require'"),
    ({"resources:PCPU": "4", "trait:HW_CPU_HYPERTHREADING": "required"},
     {"hw_cpu_thread_policy": "require"},
     "extra_specs trait:HW_CPU_HYPERTHREADING='required': cannot be combined with "
     "image_properties hw_cpu_thread_policy='require'"),
    # the image's own placement form: trait:HW_CPU_HYPERTHREADING=required
    ({"hw:cpu_policy": "dedicated", "hw:cpu_thread_policy": "isolate"},
     {"trait:HW_CPU_HYPERTHREADING": "required"},
     "image_properties trait:HW_CPU_HYPERTHREADING='required': cannot be combined with "
     "extra_specs hw:cpu_thread_policy='isolate'"),
    ({"hw:cpu_policy": "dedicated"},
     {"trait:HW_CPU_HYPERTHREADING": "required", "hw_cpu_thread_policy": "prefer"},
     "image_properties trait:HW_CPU_HYPERTHREADING='required': cannot be combined with "
     "image_properties hw_cpu_thread_policy='prefer'"),
    ({"resources:PCPU": "4", "trait:HW_CPU_HYPERTHREADING": "forbidden"},
     {"trait:HW_CPU_HYPERTHREADING": "required"},
     "image_properties trait:HW_CPU_HYPERTHREADING='required': conflicts with "
     "extra_specs trait:HW_CPU_HYPERTHREADING='forbidden'"),
]


@pytest.mark.parametrize("extra,image,message", CONFLICTS)
def test_image_conflicting_with_placement_form_is_refused(extra, image, message):
    with pytest.raises(RequestError) as info:
        parse_request(_req(extra, image))
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_placement_form_without_image_conflict_still_parses():
    r = parse_request(_req({"resources:PCPU": "4"}, {"hw_cpu_thread_policy": "require"}))
    assert r.cpu_policy == "dedicated" and r.thread_policy == "require"
    r = parse_request(_req({"resources:VCPU": "4"}, {"hw_numa_nodes": "2"}))
    assert r.cpu_policy == "shared" and len(r.cells) == 2
    r = parse_request(_req({"hw:cpu_policy": "dedicated"}, {"hw_cpu_policy": "shared"}))
    assert r.cpu_policy == "dedicated"  # a flavor `dedicated` wins (Nova's rule)


def test_image_trait_required_means_require():
    r = parse_request(_req({"resources:PCPU": "4"}, {"trait:HW_CPU_HYPERTHREADING": "required"}))
    assert r.cpu_policy == "dedicated" and r.thread_policy == "require"
    # Nova reads only "required" from an image's traits; other values are ignored
    r = parse_request(_req({"resources:PCPU": "4"}, {"trait:HW_CPU_HYPERTHREADING": "no"}))
    assert r.thread_policy == "prefer"
    with pytest.raises(RequestError) as info:
        parse_request(_req({}, {"trait:HW_CPU_HYPERTHREADING": "required"}))
    assert str(info.value) == ("image_properties trait:HW_CPU_HYPERTHREADING='required': a "
                               "thread policy needs hw:cpu_policy=dedicated or mixed")


def test_a_trait_on_a_shared_guest_names_the_trait():
    with pytest.raises(RequestError) as info:
        parse_request(_req({"resources:VCPU": "4", "trait:HW_CPU_HYPERTHREADING": "required"}))
    assert str(info.value) == ("extra_specs trait:HW_CPU_HYPERTHREADING='required': a thread "
                               "policy needs hw:cpu_policy=dedicated or mixed")


# ----------------------------------------------------------------------------- item 11


def pair_host(cores: int = 4, taken: dict[int, str] | None = None) -> dict:
    """One cell, ``cores`` cores whose siblings are adjacent ids (0,1), (2,3), ... (AMD and
    arm64 number threads this way)."""
    cpus = tuple(Cpu(id=2 * k + t, online=True, cell=0, socket=0, die=0, cluster=k, core=k,
                     siblings=(2 * k, 2 * k + 1), isolated=False)
                 for k in range(cores) for t in range(2))
    cell = Cell(id=0, cpus=tuple(c.id for c in cpus), memory_kib=16 << 20,
                memory_free_kib=16 << 20, distances={0: 10}, hugepages=())
    topo = HostTopology(cells=(cell,), cpus=cpus, caches=(), resctrl=None, pci=())
    return make_snapshot(topo, taken=taken)


def pins(answer: dict) -> dict[int, int]:
    return {int(v): c for cell in answer["placement"]["cells"]
            for v, c in cell["pinning"].items()}


def test_prefer_issue_example_fills_lone_threads_before_a_whole_core():
    # pairs (0,1) (2,3) (4,5) (6,7); 0, 2 and 5 taken: lone threads 1, 3, 4; (6,7) whole
    snap = pair_host(taken={0: "a", 2: "b", 5: "c"})
    a = fit(snap, flavor(3, 512, cpu_policy="dedicated"))
    assert a["fits"] and pins(a) == {0: 1, 1: 3, 2: 4}
    # the whole core is still there for a later isolate or require guest
    after = pair_host(taken={0: "a", 2: "b", 5: "c", 1: "d", 3: "d", 4: "d"})
    for policy in ("isolate", "require"):
        b = fit(after, flavor(1 if policy == "isolate" else 2, 512, cpu_policy="dedicated",
                              cpu_thread_policy=policy))
        assert b["fits"], (policy, b["reasons"])


@pytest.mark.parametrize("free,n,expected", [
    # the issue's example: lone 1, 3, 4 and the whole core (6,7)
    ({1, 3, 4, 6, 7}, 3, [1, 3, 4]),
    # more than the lone threads: one whole core, taken whole (siblings), then lone ones
    ({1, 3, 4, 6, 7}, 4, [6, 7, 1, 3]),
    ({1, 3, 4, 6, 7}, 5, [6, 7, 1, 3, 4]),
    # 2 vCPUs, 1 lone thread: one whole core must be touched either way; take it whole
    ({1, 4, 5, 6, 7}, 2, [4, 5]),
    # 1 vCPU: the lone thread, never a whole core
    ({1, 4, 5, 6, 7}, 1, [1]),
    # no broken core: whole cores, the last one split only when the count is odd
    ({0, 1, 2, 3, 4, 5, 6, 7}, 3, [0, 1, 2]),
    # only broken cores
    ({1, 3, 5}, 2, [1, 3]),
    # not enough threads
    ({1, 3}, 3, None),
])
def test_prefer_thread_choice_on_pairs(free, n, expected):
    cores = [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert pin_prefer(cores, frozenset(free), n) == expected


def test_prefer_on_four_thread_cores_uses_broken_cores_best_fit():
    cores = [(0, 1, 2, 3), (4, 5, 6, 7), (8, 9, 10, 11)]
    # core 0 has 3 free, core 1 has 1 free, core 2 whole
    free = frozenset({1, 2, 3, 7, 8, 9, 10, 11})
    assert pin_prefer(cores, free, 3) == [1, 2, 3]  # the broken core that holds them all
    assert pin_prefer(cores, free, 1) == [7]
    assert pin_prefer(cores, free, 4) == [1, 2, 3, 7]  # both broken cores, no whole one
    # one whole core, then the best fit for 1: the lone 7 (core 0 keeps its 3 together)
    assert pin_prefer(cores, free, 5) == [8, 9, 10, 11, 7]


def test_prefer_counts_a_core_with_a_non_dedicated_thread_as_broken():
    # make_topology: cores (0,4) (1,5) (2,6) (3,7); 4 is a shared thread, so core (0,4)
    # can never be whole for isolate/require: its dedicated thread 0 is used first
    snap = make_snapshot(make_topology(1, 4, 2), dedicated=[0, 1, 2, 3, 5, 6, 7])
    a = fit(snap, flavor(1, 512, cpu_policy="dedicated"))
    assert pins(a) == {0: 0}


# ----------------------------------------------------------------------------- item 9


def require(vcpus: int, memory: int = 512, **specs):
    return flavor(vcpus, memory, cpu_policy="dedicated", cpu_thread_policy="require", **specs)


def one_cell(cores: int = 8, threads: int = 2, **kw) -> dict:
    # make_topology numbering: cores (0,8) (1,9) ... (7,15) for 8 cores x 2 threads
    return make_snapshot(make_topology(1, cores, threads), **kw)


def test_require_with_an_odd_count_fits_as_on_nova():
    """9 vCPUs on 2-thread cores: 4 whole cores and the last one half used (Nova places
    it the same way); the half-used core's other thread is kept idle."""
    a = fit(one_cell(), require(9))
    assert a["fits"], a["reasons"]
    assert pins(a) == {0: 0, 1: 8, 2: 1, 3: 9, 4: 2, 5: 10, 6: 3, 7: 11, 8: 4}
    cell = a["placement"]["cells"][0]
    assert cell["reserved_cpus"] == [12]
    assert '<hostagent:idle cpus="12" />' in a["libvirt_xml"]["metadata"]
    # 9 is no multiple of 2: the guest cannot be shown 2 threads on every core, so it is
    # shown none rather than siblings the host does not have
    assert a["placement"]["topology"] == {"sockets": 9, "cores": 1, "threads": 1}


def test_require_odd_count_refused_only_without_enough_whole_cores():
    snap = one_cell(cores=5, taken={0: "a"})  # 4 whole cores left
    a = fit(snap, require(9))
    assert not a["fits"]
    assert [r["message"] for r in a["reasons"] if r["resource"] == "sibling_threads"] == [
        "require needs 5 cores with 2 free sibling threads, the cell has 4"]
    assert fit(snap, require(7))["fits"]


def test_require_guest_cells_of_odd_size_fit_and_the_topology_follows():
    # 6 vCPUs over 2 guest cells of 3: each cell takes 2 cores, the second half used
    a = fit(make_snapshot(make_topology(2, 4, 2)), require(6, 1024, numa_nodes=2))
    assert a["fits"], a["reasons"]
    cells = a["placement"]["cells"]
    assert [len(c["reserved_cpus"]) for c in cells] == [1, 1]
    # guest core (2,3) would span two guest cells: the topology shows 1 thread per core
    assert a["placement"]["topology"]["threads"] == 1
    # cells that are multiples of the host's threads keep 2 threads per guest core
    b = fit(make_snapshot(make_topology(2, 4, 2)), require(8, 1024, numa_nodes=2))
    assert b["placement"]["topology"]["threads"] == 2
    assert all(c["reserved_cpus"] == [] for c in b["placement"]["cells"])


def test_require_mixed_guest_with_an_odd_dedicated_count():
    snap = make_snapshot(make_topology(1, 8, 2), dedicated=list(range(2, 8)) + list(
        range(10, 16)))  # cores (0,8) and (1,9) shared
    a = fit(snap, flavor(4, 512, cpu_policy="mixed", cpu_dedicated_mask="0-2",
                         cpu_thread_policy="require"))
    assert a["fits"], a["reasons"]
    assert pins(a) == {0: 2, 1: 10, 2: 3}
    assert a["placement"]["cells"][0]["reserved_cpus"] == [11]
    assert a["placement"]["topology"]["threads"] == 1


def test_require_with_a_topology_limit_of_one_thread_fits():
    """Nova's guest topology ignores the pinning, so ``hw:cpu_max_threads=1`` with require
    boots there; here the guest is pinned on siblings and shown 1 thread per core."""
    a = fit(one_cell(), require(4, cpu_max_threads=1))
    assert a["fits"], a["reasons"]
    assert pins(a) == {0: 0, 1: 8, 2: 1, 3: 9}
    assert a["placement"]["topology"]["threads"] == 1


def test_require_odd_count_lets_the_isolated_emulator_thread_use_the_idle_sibling():
    a = fit(one_cell(), require(3, emulator_threads_policy="isolate"))
    assert a["fits"], a["reasons"]
    assert pins(a) == {0: 0, 1: 8, 2: 1}
    assert a["placement"]["emulator_cpus"] == [9]
    assert a["placement"]["cells"][0]["reserved_cpus"] == []


def test_require_on_four_thread_cores_shows_the_threads_that_share_a_host_core():
    # 4 cores x 4 threads: (0,4,8,12) (1,5,9,13) ...; 6 vCPUs -> one whole core and one
    # half used; guest cores of 2 lie on one host core each
    a = fit(one_cell(cores=4, threads=4), require(6))
    assert a["fits"], a["reasons"]
    assert pins(a) == {0: 0, 1: 4, 2: 8, 3: 12, 4: 1, 5: 5}
    assert a["placement"]["cells"][0]["reserved_cpus"] == [9, 13]
    assert a["placement"]["topology"]["threads"] == 2


def test_require_idle_sibling_is_held_by_the_tracker_and_kept_from_other_guests():
    from hostagent.config import Config, ResourcesConfig
    from hostagent.guests.source import record_from_xml
    from hostagent.snapshot import build_snapshot

    topo = make_topology(1, 8, 2)
    config = Config(resources=ResourcesConfig(dedicated_cpus=tuple(range(16))))
    first = fit(build_snapshot(topo, config, [], host="t", epoch="e", seq=0, now=0.0),
                require(9))
    x = first["libvirt_xml"]
    uuid = "00000000-0000-4000-8000-000000000009"
    xml = (f"<domain type='kvm'><name>r9</name><uuid>{uuid}</uuid>"
           "<memory unit='MiB'>512</memory>"
           + "".join(x[k] for k in ("vcpu", "cputune", "numatune", "cpu", "metadata") if k in x)
           + "</domain>")
    guest = record_from_xml(xml, uuid=uuid, name="r9")
    snap = build_snapshot(topo, config, [guest], host="t", epoch="e", seq=1, now=0.0)
    held = {t["cpu"]: t["held_by"] for t in snap["usage"]["threads"] if t["held_by"]}
    assert list(held) == [12]
    # 16 threads: 9 pinned, 1 idle, so a prefer guest of 6 fits, of 7 does not
    assert fit(snap, flavor(6, 512, cpu_policy="dedicated"))["fits"]
    b = fit(snap, flavor(7, 512, cpu_policy="dedicated"))
    assert not b["fits"]
    assert 12 not in pins(fit(snap, flavor(6, 512, cpu_policy="dedicated"))).values()


def test_pcpu_counts_of_request_groups_add_up_as_in_nova():
    r = parse_request(_req({"resources1:PCPU": "2", "resources2:PCPU": "2"}))
    assert r.cpu_policy == "dedicated"
    with pytest.raises(RequestError) as info:
        parse_request(_req({"resources1:PCPU": "2", "resources2:PCPU": "1"}))
    assert str(info.value) == ("extra_specs resources1:PCPU + resources2:PCPU = 3: must equal "
                               "the vCPU count (4)")
