"""The SIGUSR1 debug dump: what the agent is doing, as one JSON file written atomically.

``process_info()`` reads the agent's own footprint (psutil); ``thread_stacks()`` formats
every Python thread's stack; ``write_dump(dir, doc)`` writes ``hostagent-dump.json`` in
``dir`` through a temporary file in the same directory (mode 0600, fsync, rename), so a
reader never sees a half-written dump. The document's keys are listed in
``docs/daemon.md``; the daemon assembles it (``Agent.dump_document``).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
import traceback
from pathlib import Path
from typing import Any

DUMP_NAME = "hostagent-dump.json"


def process_info() -> dict[str, Any]:
    """RSS, CPU time, threads and open files of this process."""
    import psutil

    p = psutil.Process()
    with p.oneshot():
        mem = p.memory_info()
        cpu = p.cpu_times()
        info = {"pid": p.pid, "rss_bytes": mem.rss, "vms_bytes": mem.vms,
                "cpu_user_seconds": round(cpu.user, 3),
                "cpu_system_seconds": round(cpu.system, 3),
                "threads": p.num_threads(), "started": p.create_time()}
        try:
            info["open_fds"] = p.num_fds()
        except (psutil.Error, AttributeError):
            pass
    return info


def thread_stacks() -> dict[str, list[str]]:
    """``"<name> (<ident>)" -> stack lines`` for every Python thread."""
    names = {t.ident: t.name for t in threading.enumerate()}
    out = {}
    for ident, frame in sys._current_frames().items():
        key = f"{names.get(ident, '?')} ({ident})"
        out[key] = [line.rstrip("\n") for line in traceback.format_stack(frame)]
    return out


def write_dump(directory: str | os.PathLike[str], doc: dict[str, Any]) -> Path:
    """Write ``doc`` as ``<directory>/hostagent-dump.json`` atomically; return the path.

    ``OSError`` if the directory cannot be created or written (the caller logs it).
    """
    d = Path(directory)
    d.mkdir(mode=0o750, parents=True, exist_ok=True)
    target = d / DUMP_NAME
    fd, tmp = tempfile.mkstemp(prefix=".hostagent-dump.", suffix=".tmp", dir=d)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(doc, fh, indent=1, sort_keys=True, default=_default)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return target


def _default(obj: Any) -> Any:
    if isinstance(obj, set | frozenset | tuple):
        return sorted(obj) if isinstance(obj, set | frozenset) else list(obj)
    if isinstance(obj, bytes):
        return obj.decode("utf-8", "replace")
    return str(obj)
