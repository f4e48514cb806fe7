"""The process's resident memory, and giving freed heap memory back to the kernel.

When a peer goes away, libzmq frees what it held (queued messages, subscription trie
nodes, frames of an unfinished message), but glibc keeps most of it in its arenas: many
small chunks scattered over the heap are never returned by ``free`` alone (measured: 470
MB of trie nodes freed, RSS unchanged). ``malloc_trim(0)`` returns every free page of
every arena (``madvise``); it costs microseconds when little is free.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from functools import cache
from typing import Any


def rss_bytes() -> int:
    """This process's resident set size in bytes (0 where /proc is unavailable)."""
    try:
        with open("/proc/self/statm", "rb") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


@cache
def _malloc_trim() -> Any:
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    except OSError:
        return None


def trim() -> bool:
    """``malloc_trim(0)``: give free heap pages back; False where it does not exist (not
    glibc) or nothing was returned."""
    fn = _malloc_trim()
    return bool(fn(0)) if fn is not None else False
