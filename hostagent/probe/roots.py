"""The probe's two roots and the one rule that ties them, for the config and the CLI.

``sysfs_root`` defaults to ``/sys``. ``resctrl_root`` not given defaults to
``<sysfs_root>/fs/resctrl``, where resctrl is mounted in a sysfs tree: ``/sys/fs/resctrl``
for ``/sys``, and the captured resctrl for a tree written by ``hostagent capture`` (or a
fixture). ``[probe]`` in the config file and ``--sysfs-root``/``--resctrl-root`` follow
this same rule (docs/probe.md, "One rule for the roots").
"""

from __future__ import annotations

DEFAULT_SYSFS_ROOT = "/sys"
RESCTRL_UNDER_SYSFS = "fs/resctrl"


def default_resctrl_root(sysfs_root: str) -> str:
    """``<sysfs_root>/fs/resctrl``: the resctrl root when only the sysfs root is given."""
    return f"{sysfs_root.rstrip('/')}/{RESCTRL_UNDER_SYSFS}"
