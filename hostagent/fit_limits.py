"""Bounds on every fit request field: no host has more than this (docs/fit.md, "Limits").

A fit request comes from clients of the agent's request endpoint and from files; a value
beyond what any host can have cannot fit anywhere, so it is refused while parsing (one
line naming the field, the value and the limit) instead of building structures of that
size. Each bound is generous: what the largest Linux hosts can have, not what is common.
The fit search's step budget lives here too. A module of its own (not in
``hostagent.fit``), so that the configuration can read the defaults without importing
the fitter.
"""

from __future__ import annotations

#: vCPUs of a guest and any CPU id in a vCPU list: Linux's largest ``NR_CPUS``
#: (``CONFIG_MAXSMP`` on x86-64); no host has more threads (KVM allows 4096 vCPUs).
MAX_VCPUS = 8192

#: ``memory_mb`` and ``hw:numa_mem.N``: 4 PiB in MiB, the 52-bit physical address space
#: of x86-64 and arm64.
MAX_MEMORY_MB = 1 << 32

#: Guest NUMA cells (``hw:numa_nodes``): QEMU's ``MAX_NODES``.
MAX_GUEST_CELLS = 128

#: ``hw:mem_page_size`` in KiB: 16 GiB, the largest hugepage size Linux has (POWER,
#: arm64 with 64 KiB pages); x86-64 has 2 MiB and 1 GiB.
MAX_PAGE_SIZE_KIB = 16 << 20

#: The count in ``hw:pci_devices`` (per VENDOR:DEVICE): the functions of one PCI
#: segment, 256 buses x 32 devices x 8 functions.
MAX_PCI_DEVICES = 65536

#: Keys in ``extra_specs`` and in ``image_properties`` (each); 128 guest cells need 256
#: ``hw:numa_cpus.N`` / ``hw:numa_mem.N`` keys.
MAX_SPEC_KEYS = 512

#: Characters of one key: Nova's limit for extra spec and image property keys.
MAX_KEY_CHARS = 255

#: Characters of one value (Nova stores at most 255 for an extra spec; image properties
#: may carry longer text).
MAX_VALUE_CHARS = 4096

#: An integer given as a spec value (turned into text) must fit in 64 bits, as over the
#: wire (msgpack).
MAX_INT_BITS = 64

#: Search steps one fit may take (``hostagent.fit.place`` says what a step is);
#: ``[fit] search_steps`` overrides it. Typical requests take under 100 steps; the worst
#: case in the tests (every complete placement refused by its cache reservations on an
#: 8-cell host) is stopped by it after 0.3-1 s on a loaded 2-core machine.
STEP_BUDGET = 5000

#: The largest ``[fit] search_steps`` accepted (a fit of that many steps takes about a
#: minute of one core).
MAX_SEARCH_STEPS = 1_000_000


def size_text(kib: int) -> str:
    """``16777216`` -> ``"16 GiB"`` (a limit in KiB, for messages)."""
    for unit, shift in (("TiB", 30), ("GiB", 20), ("MiB", 10)):
        if kib >= 1 << shift and kib % (1 << shift) == 0:
            return f"{kib >> shift} {unit}"
    return f"{kib} KiB"
