"""Sysfs and resctrl readers: one module per area, assembled by ``probe_host``."""
