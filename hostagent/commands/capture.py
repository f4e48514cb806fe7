"""``hostagent capture OUTDIR``: copy exactly the files the probe reads into a fixture tree.

The probe runs once with a recording ``FileReader``; every file it read is written with
the very text it read (so values that move, such as ``MemFree``, match the probe's result),
and every directory it listed is recreated with the entries it kept. Files under the sysfs
root go to ``OUTDIR/sys/...``, files under the resctrl root to ``OUTDIR/sys/fs/resctrl/...``,
so ``hostagent probe --sysfs-root OUTDIR/sys`` reads the same host back.

Symlinks the probe went through (``bus/pci/devices/<addr>`` → ``../../../devices/...``) are
recreated as the same relative symlinks, with their targets copied; a symlink with an
absolute target is copied as a plain directory. The tree is written into a temporary
directory next to ``OUTDIR`` and renamed into place, so a failure leaves nothing behind.
``OUTDIR`` must not exist or be empty.
"""

from __future__ import annotations

import argparse
import os

from hostagent.commands.options import add_root_options, roots
from hostagent.errors import HostagentError, RequestError


class _Tree:
    """Recreates paths of one source root below one destination root."""

    def __init__(self, src_root: str, dst_root: str) -> None:
        self.src = src_root
        self.dst = dst_root
        self._done: dict[str, str] = {}  # relative dir -> resolved relative dir

    def resolve_dir(self, rel: str) -> str:
        """Create the directory ``rel`` (and symlinks on the way) in dst; its resolved path."""
        if rel in self._done:
            return self._done[rel]
        pending = [p for p in rel.split("/") if p]
        cur: list[str] = []
        hops = 0
        while pending:
            comp = pending.pop(0)
            if comp == ".":
                continue
            if comp == "..":
                if cur:
                    cur.pop()
                continue
            src = os.path.join(self.src, *cur, comp)
            dst = os.path.join(self.dst, *cur, comp)
            if os.path.islink(src):
                target = os.readlink(src)
                if not os.path.isabs(target) and hops < 40:
                    hops += 1
                    if not os.path.lexists(dst):
                        os.symlink(target, dst)
                    pending = [p for p in target.split("/") if p] + pending
                    continue
            cur.append(comp)
            if not os.path.isdir(dst):
                os.makedirs(dst, exist_ok=True)
        out = "/".join(cur)
        self._done[rel] = out
        return out

    def write_file(self, rel: str, text: str) -> None:
        parent, _, name = rel.rpartition("/")
        where = self.resolve_dir(parent)
        with open(os.path.join(self.dst, where, name), "w") as f:
            f.write(text)

    def make_entries(self, rel: str, names: tuple[str, ...]) -> None:
        self.resolve_dir(rel)
        for name in names:
            if os.path.isdir(os.path.join(self.src, rel, name)):
                self.resolve_dir(f"{rel}/{name}" if rel else name)


def _relative(path: str, root: str) -> str | None:
    root = root.rstrip("/")
    if path == root:
        return ""
    if path.startswith(root + "/"):
        return path[len(root) + 1 :]
    return None


def capture(outdir: str, sysfs_root: str = "/sys", resctrl_root: str = "/sys/fs/resctrl"):
    """Probe and write the capture; returns (topology, reader). Raises ``HostagentError``."""
    from hostagent.probe.host import probe_host
    from hostagent.probe.reader import FileReader

    outdir = os.path.abspath(outdir)
    if os.path.lexists(outdir) and (not os.path.isdir(outdir) or os.listdir(outdir)):
        raise RequestError(f"{outdir}: exists and is not an empty directory; capture refuses")
    reader = FileReader()
    topo = probe_host(sysfs_root, resctrl_root, reader=reader)

    import shutil
    import tempfile

    parent = os.path.dirname(outdir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".capture-", dir=parent)
    try:
        sys_dst = os.path.join(tmp, "sys")
        sys_src = os.path.abspath(sysfs_root)
        rc_src = os.path.abspath(resctrl_root)
        trees = [
            (rc_src, _Tree(rc_src, os.path.join(sys_dst, "fs", "resctrl"))),
            (sys_src, _Tree(sys_src, sys_dst)),
        ]
        if len(rc_src) < len(sys_src):
            trees.reverse()  # the longer (more specific) root first

        def place(path: str) -> tuple[_Tree, str]:
            for src_root, tree in trees:
                rel = _relative(os.path.abspath(path), src_root)
                if rel is not None:
                    return tree, rel
            raise HostagentError(f"{path}: read outside the sysfs and resctrl roots")

        os.makedirs(sys_dst)
        for path, names in reader.dirs.items():
            tree, rel = place(path)
            tree.make_entries(rel, names)
        for path, text in reader.files.items():
            tree, rel = place(path)
            tree.write_file(rel, text)
        if os.path.isdir(outdir):
            os.rmdir(outdir)
        os.rename(tmp, outdir)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise HostagentError(f"{outdir}: capture failed: {exc}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return topo, reader


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "capture",
        help="copy the sysfs/resctrl files the probe reads into a fixture tree",
        description="Copy exactly the files `hostagent probe` reads into OUTDIR/sys/..., "
        "so that `hostagent probe --sysfs-root OUTDIR/sys` shows the same host.",
    )
    p.add_argument("outdir", metavar="OUTDIR", help="new or empty directory to write")
    add_root_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    sysfs, resctrl = roots(args)
    _, reader = capture(args.outdir, sysfs, resctrl)
    out = os.path.abspath(args.outdir)
    print(
        f"captured {len(reader.files)} files and {len(reader.dirs)} directory listings "
        f"into {out}/sys\nread it back with: hostagent probe --sysfs-root {out}/sys"
    )
    return 0
