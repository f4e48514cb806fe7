"""The largest values a Linux kernel can print in the files the probe reads.

A number outside its bound cannot come from a kernel. Refusing it (``ProbeError`` naming
the file) keeps a hostile or corrupt tree from making the probe allocate without limit
(the CPU list ``0-4000000000``) and keeps every integer of the snapshot inside msgpack's
64 bits. Each bound is the kernel's own: a Kconfig maximum, or the C type the kernel
prints the value from. docs/probe.md ("Limits") lists them with their sources.
"""

from __future__ import annotations

# CPU ids are below NR_CPUS. CONFIG_NR_CPUS is at most 8192 on every architecture:
# NR_CPUS_RANGE_END on x86_64 (MAXSMP), "range 2 8192" on powerpc; 4096 on arm64.
MAX_CPUS = 8192
# The longest CPU list the kernel prints for NR_CPUS CPUs: CPULIST_FILE_MAX_BYTES
# (include/linux/cpumask.h), NR_CPUS * 7 / 2.
MAX_CPULIST_CHARS = MAX_CPUS * 7 // 2
# NUMA node ids are below MAX_NUMNODES = 1 << NODES_SHIFT; NODES_SHIFT is at most 10
# (x86_64, arm64, riscv "range 1 10").
MAX_NODES = 1024
# physical_package_id, die_id, cluster_id, core_id, a node's distance values and a PCI
# device's numa_node are printed with "%d" from a C int.
MIN_C_INT = -(2**31)
MAX_C_INT = 2**31 - 1
# Cache level, id, size (in bytes), ways and line size are `unsigned int` fields of
# struct cacheinfo; resctrl's masks, CLOSIDs, minimums and bandwidth values are u32.
MAX_U32 = 2**32 - 1
# Memory: no architecture addresses more than 2**56 bytes of physical memory
# (MAX_PHYSMEM_BITS is 52 on x86_64 and arm64, 56 on riscv64). Node MemTotal/MemFree,
# a hugepage size, the memory a pool's pages hold, and the no-NUMA memory total stay
# at or below it (in kB, as sysfs counts them).
MAX_MEMORY_KIB = 2**56 // 1024
# sriov_totalvfs: the SR-IOV capability's TotalVFs is a 16-bit field.
MAX_SRIOV_VFS = 2**16 - 1
# The longest file the probe reads whole: a resctrl group's `tasks`, one pid per line,
# pids below PID_MAX_LIMIT (4,194,304): at most 4,194,304 lines of 8 bytes = 32 MiB.
# sysfs attributes are one page at most. Twice the largest, for margin.
MAX_FILE_BYTES = 64 * 1024 * 1024
