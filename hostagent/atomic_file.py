"""Writing a file so that a reader sees the old content or the new, never a half.

``write_atomically(path, text)``: the text goes to a temporary file in the same directory
(mode 0600, as ``tempfile.mkstemp`` makes it), which is fsynced and renamed over ``path``;
then the directory is fsynced, so the rename itself survives a crash. A failure removes
the temporary file and raises ``OSError``; ``path`` keeps what it had. Used for the
claims file (docs/claims.md) and the debug dump (docs/daemon.md §7.2).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomically(path: str | os.PathLike[str], text: str) -> Path:
    """Replace ``path`` with ``text`` atomically (its directory is made 0750 if missing);
    returns the path. ``OSError`` if it cannot, with ``path`` unchanged."""
    p = Path(path)
    p.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, p)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    dfd = os.open(p.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return p
