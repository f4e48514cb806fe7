"""hostagent: a per-host tracker of NUMA cells, threads, hugepages and cache ways for KVM hosts."""

__version__ = "0.1.0"
