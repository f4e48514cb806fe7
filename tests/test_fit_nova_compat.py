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
