"""Logical CPUs: ``devices/system/cpu/{online,isolated}`` and each online CPU's ``topology/``.

Files read (under ``<sysfs_root>/devices/system/cpu``):

- the ``cpuN`` directory names (every CPU the kernel registered, online or not) and
  ``online`` (missing: every listed CPU is online; empty: an error, a running kernel has
  at least one online CPU); ``isolated`` (missing: none);
- per *core* (once, at its lowest online thread): ``topology/thread_siblings_list``
  (missing: the CPU alone), ``core_id`` and ``cluster_id``. The other threads of the core
  take the same values without being read: siblings share core, cluster, die and package;
- per *package*: ``physical_package_id`` and ``package_cpus_list`` (older kernels:
  ``core_siblings_list``), whose CPUs all take that id without being read;
- per *die*: ``die_id`` and ``die_cpus_list`` likewise (without ``die_cpus_list``, ``die_id``
  is read once per core).

Fallbacks: a missing or negative ``physical_package_id`` becomes the package's ordinal
(0, 1, ... in order of its lowest CPU); a missing or negative ``die_id`` becomes 0 (the
package is one die, as on kernels before 5.2); a missing or negative ``cluster_id``, or
65535 (x86's "no cluster" value), becomes -1; a missing or negative ``core_id`` becomes the
lowest CPU of the core's thread siblings. CPU ids are below ``MAX_CPUS`` and the ids
read are C ``int`` values (``hostagent.probe.limits``): anything else is an error. Offline
CPUs have no topology: socket, die,
cluster and core are -1 and siblings are empty; their cell is the node that lists them, if
any, else -1.
"""

from __future__ import annotations

import os

from hostagent.errors import ProbeError
from hostagent.model import Cpu
from hostagent.probe.limits import MAX_CPUS
from hostagent.probe.reader import FileReader, numbered, to_cpus, to_int

TYPE_CHECKING = False  # collections.abc is not imported at run time (start-up time)
if TYPE_CHECKING:
    from collections.abc import Mapping

IS_CPU = numbered("cpu")
NO_CLUSTER = 65535
_CORE_FILES = ("thread_siblings_list", "core_id", "cluster_id")  # read once per core


def cpu_dir(sysfs_root: str) -> str:
    return f"{sysfs_root}/devices/system/cpu"


def read_cpu_ids(reader: FileReader, sysfs_root: str) -> tuple[list[int], set[int]]:
    """(every CPU id, sorted; the set of online CPU ids)."""
    base = cpu_dir(sysfs_root)
    names = reader.listdir(base, IS_CPU)
    if names is None:
        reader.need(base)  # raises: the tree has no devices/system/cpu
        names = []
    listed = {int(n[3:]) for n in names}
    if listed and max(listed) >= MAX_CPUS:
        raise ProbeError(f"{base}/cpu{max(listed)}", f"CPU id out of range 0..{MAX_CPUS - 1}")
    path = f"{base}/online"
    text = reader.read(path)
    if text is None:
        online = set(listed)
    else:
        online = set(to_cpus(path, text))
        if not online:
            raise ProbeError(path, "no online CPU (an empty list)")
    return sorted(listed | online), online


def read_isolated(reader: FileReader, sysfs_root: str) -> set[int]:
    path = f"{cpu_dir(sysfs_root)}/isolated"
    text = reader.read(path)
    return set(to_cpus(path, text)) if text is not None else set()


def _opt_int(reader: FileReader, path: str, dfd: int | None, rel: str) -> int | None:
    text = reader.read_static(path, dfd, rel)
    return None if text is None else to_int(path, text)


def _members(
    reader: FileReader, paths: tuple[str, ...], online: set[int], dfd: int | None, rel: str
) -> list[int] | None:
    """CPUs of the first list file that exists, restricted to online CPUs."""
    for path in paths:
        text = reader.read(path, dfd, rel + path.rpartition("/")[2])
        if text is not None:
            return [c for c in to_cpus(path, text) if c in online]
    return None


def read_cpus(
    reader: FileReader,
    sysfs_root: str,
    all_ids: list[int],
    online: set[int],
    cell_of: Mapping[int, int],
) -> tuple[Cpu, ...]:
    """One ``Cpu`` per id in ``all_ids`` (see the module docstring for what is read)."""
    base = cpu_dir(sysfs_root)
    isolated = read_isolated(reader, sysfs_root)
    out: dict[int, Cpu] = {}
    dfd = reader.open_dir(base) if online else None  # topology files are opened relative to it
    try:
        _online_cpus(reader, base, dfd, online, isolated, cell_of, out)
    finally:
        if dfd is not None:
            os.close(dfd)
    for cpu in all_ids:
        if cpu not in out:
            out[cpu] = Cpu(
                id=cpu,
                online=False,
                cell=cell_of.get(cpu, -1),
                socket=-1,
                die=-1,
                cluster=-1,
                core=-1,
                siblings=(),
                isolated=cpu in isolated,
            )
    return tuple(out[c] for c in sorted(out))


def _online_cpus(
    reader: FileReader,
    base: str,
    dfd: int | None,
    online: set[int],
    isolated: set[int],
    cell_of: Mapping[int, int],
    out: dict[int, Cpu],
) -> None:
    """Fill ``out`` with a ``Cpu`` per online CPU (topology read once per core)."""
    pkg_of: dict[int, int] = {}
    die_of: dict[int, int] = {}
    packages = 0
    die_lists = True  # False once a die_cpus_list turned out missing: don't retry per core
    for cpu in sorted(online):
        if cpu in out:
            continue
        t = f"{base}/cpu{cpu}/topology/"
        r = f"cpu{cpu}/topology/"
        path = t + "thread_siblings_list"
        if reader.static is None:
            text, core_text, cluster_text = reader.read_many(t, _CORE_FILES, dfd, r)
        else:  # the ids are static: taken from the memo when it has them
            text = reader.read(path, dfd, r + "thread_siblings_list")
            core_text = reader.read_static(t + "core_id", dfd, r + "core_id")
            cluster_text = reader.read_static(t + "cluster_id", dfd, r + "cluster_id")
        siblings = [c for c in to_cpus(path, text) if c in online] if text is not None else []
        if cpu not in siblings:
            siblings = sorted({*siblings, cpu})
        sib = tuple(siblings)

        core = None if core_text is None else to_int(t + "core_id", core_text)
        if core is None or core < 0:
            core = sib[0]
        cluster = None if cluster_text is None else to_int(t + "cluster_id", cluster_text)
        if cluster is None or cluster < 0 or cluster == NO_CLUSTER:
            cluster = -1

        socket = pkg_of.get(cpu)
        if socket is None:
            socket = _opt_int(reader, t + "physical_package_id", dfd, r + "physical_package_id")
            if socket is None or socket < 0:
                socket = packages
            packages += 1
            members = _members(
                reader, (t + "package_cpus_list", t + "core_siblings_list"), online, dfd, r
            )
            for m in members or sib:
                pkg_of.setdefault(m, socket)
        die = die_of.get(cpu)
        if die is None:
            die = _opt_int(reader, t + "die_id", dfd, r + "die_id")
            if die is None or die < 0:
                die = 0
            members = None
            if die_lists:
                members = _members(reader, (t + "die_cpus_list",), online, dfd, r)
            die_lists = members is not None
            for m in members or sib:
                die_of.setdefault(m, die)

        for s in sib:
            if s not in out:
                out[s] = Cpu(
                    id=s,
                    online=True,
                    cell=cell_of.get(s, -1),
                    socket=socket,
                    die=die,
                    cluster=cluster,
                    core=core,
                    siblings=sib,
                    isolated=s in isolated,
                )
