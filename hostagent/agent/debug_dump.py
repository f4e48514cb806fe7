"""The SIGUSR1 debug dump: what the agent is doing, as one JSON file written atomically.

``process_info()`` reads the agent's own footprint (psutil); ``thread_stacks()`` formats
every Python thread's stack; ``write_dump(dir, doc)`` writes ``hostagent-dump.json`` in
``dir`` through a temporary file in the same directory (mode 0600, fsync, rename), so a
reader never sees a half-written dump. The document's keys are listed in
``docs/daemon.md``; the daemon assembles it (``Agent.dump_document``).

Times in the dump are ISO-8601 strings in UTC with their offset and milliseconds
(``2026-01-01T09:30:00.250+00:00``): ``with_iso_times`` converts the fields listed in
``TIME_FIELDS`` (the agent keeps them as ``time.time()`` floats). The ``snapshot`` in the
dump is left as published (its ``time`` is the schema's float).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from hostagent.atomic_file import write_atomically

DUMP_NAME = "hostagent-dump.json"

#: the dump's time fields, as paths of keys ("*": every element of a list)
TIME_FIELDS: tuple[tuple[str, ...], ...] = (
    ("written",),
    ("started",),
    ("errors", "*", "time"),
    ("libvirt", "connected_since"),
    ("libvirt", "last_events", "*", "time"),
    ("process", "started"),
)


def iso_time(t: float | None) -> str | None:
    """``time.time()`` seconds as ISO-8601 in UTC with milliseconds; ``None`` stays."""
    if t is None:
        return None
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds")


def with_iso_times(doc: dict[str, Any]) -> dict[str, Any]:
    """A copy of the dump document with every ``TIME_FIELDS`` number as ``iso_time``
    (``doc`` is not changed; fields that are absent or not numbers are left alone)."""

    def convert(value: Any, path: tuple[str, ...]) -> Any:
        if not path:
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            return iso_time(value) if ok else value
        head, rest = path[0], path[1:]
        if head == "*":
            return [convert(v, rest) for v in value] if isinstance(value, list) else value
        if not isinstance(value, dict) or head not in value:
            return value
        return {**value, head: convert(value[head], rest)}

    out = doc
    for path in TIME_FIELDS:
        out = convert(out, path)
    return out


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
    text = json.dumps(doc, indent=1, sort_keys=True, default=_default) + "\n"
    return write_atomically(Path(directory) / DUMP_NAME, text)


def _default(obj: Any) -> Any:
    if isinstance(obj, set | frozenset | tuple):
        return sorted(obj) if isinstance(obj, set | frozenset) else list(obj)
    if isinstance(obj, bytes):
        return obj.decode("utf-8", "replace")
    return str(obj)
