"""PCI functions: ``bus/pci/devices/<address>/`` (symlinks into ``devices/``, followed).

Per device: ``numa_node`` (missing → -1, the kernel's "unknown"), ``class``, ``vendor``,
``device`` (hex strings as the kernel prints them, e.g. ``0x020000``, ``0x8086``; missing →
``""``) and ``sriov_totalvfs`` (missing → 0: the device has no SR-IOV). A ``numa_node`` of
``MAX_NODES`` or more, or more than ``MAX_SRIOV_VFS`` VFs, is an error.
Devices are sorted by address; no ``bus/pci`` at all means no devices.
"""

from __future__ import annotations

from hostagent.model import PciDevice
from hostagent.probe.limits import MAX_NODES, MAX_SRIOV_VFS, MIN_C_INT
from hostagent.probe.reader import FileReader, hex_str, to_count, to_int


def _hex(reader: FileReader, path: str) -> str:
    text = reader.read(path)
    return "" if text is None else hex_str(path, text)


def read_pci(reader: FileReader, sysfs_root: str) -> tuple[PciDevice, ...]:
    base = f"{sysfs_root}/bus/pci/devices"
    names = reader.listdir(base)
    if not names:
        return ()
    out = []
    for name in sorted(names):
        d = f"{base}/{name}/"
        text = reader.read(d + "numa_node")
        node = -1 if text is None else to_int(d + "numa_node", text, MIN_C_INT, MAX_NODES - 1)
        text = reader.read(d + "sriov_totalvfs")
        vfs = 0 if text is None else to_count(d + "sriov_totalvfs", text, MAX_SRIOV_VFS)
        out.append(
            PciDevice(
                address=name,
                numa_node=node if node >= 0 else -1,
                class_=_hex(reader, d + "class"),
                vendor=_hex(reader, d + "vendor"),
                device=_hex(reader, d + "device"),
                sriov_totalvfs=vfs,
            )
        )
    return tuple(out)
