"""Reading sysfs files for the probe: one ``FileReader`` that records what it read.

Every probe module reads through a ``FileReader``. It opens files with ``os.open`` /
``os.read`` (no pathlib, no text-layer objects: a 448-thread host means thousands of tiny
files), turns every failure other than "missing" into a ``ProbeError`` that names the path,
and remembers each file's text and each directory listing it used. ``hostagent capture``
replays that record into a fixture tree; ``bench/probe`` counts it.

Only regular files are read: sysfs and resctrl (kernfs) attributes are regular files, and
a FIFO, device or socket in their place (in a tree given with ``--sysfs-root``) is an error
naming it, never a hang nor an endless read. Files are opened with ``O_NONBLOCK`` (opening
a FIFO for reading would wait for a writer) and ``O_NOCTTY``. ``read`` checks the type with
``fstat`` before reading. ``read_many``, the hot path (cache and core topology files,
thousands on a big host), reads with ``pread``, which fails on FIFOs, sockets and terminals
without consuming anything, and hands every file whose first read is not an ordinary one
(an error, nothing, or a full 4 KiB) to ``read`` and its check. No file is read past
``MAX_FILE_BYTES``.

The parse helpers here (integers, hex, sizes such as ``36608K``, CPU lists) are tolerant of
the whitespace and newlines the kernel prints and raise ``ProbeError(path, problem, value)``
for anything else, including a value outside the bounds of ``hostagent.probe.limits``
(what a kernel can print there).
"""

from __future__ import annotations

import os
from stat import S_ISCHR, S_ISDIR, S_ISFIFO, S_ISREG, S_ISSOCK

from hostagent.cpulist import parse_cpulist
from hostagent.errors import ProbeError
from hostagent.probe.limits import MAX_C_INT, MAX_CPUS, MAX_FILE_BYTES, MAX_U32, MIN_C_INT

TYPE_CHECKING = False  # typing is not imported at run time: `hostagent probe` starts faster
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable
    from typing import Any

_BIG = 4096  # kernfs attributes are at most a page; a read this long may be a seq_file
_MISSING = (FileNotFoundError, NotADirectoryError)
# O_NONBLOCK: opening a FIFO does not wait for a writer; O_NOCTTY: a terminal in the tree
# does not become the daemon's controlling terminal
_RDONLY = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY
_open, _read, _pread, _close, _fstat = os.open, os.read, os.pread, os.close, os.fstat


def _snippet(text: str, limit: int = 80) -> str:
    text = text.strip()
    return text if len(text) <= limit else text[:limit] + "..."


def _not_regular(path: str, mode: int) -> ProbeError:
    """The error for a file of type ``mode`` (not a regular file) at ``path``."""
    if S_ISDIR(mode):
        return ProbeError(path, "is a directory, expected a file")
    kind = ("a FIFO" if S_ISFIFO(mode) else "a socket" if S_ISSOCK(mode)
            else "a character device" if S_ISCHR(mode) else "a block device")
    return ProbeError(path, f"not a regular file ({kind})")


def _open_failed(path: str, exc: OSError) -> ProbeError:
    """The error for a file that exists but cannot be opened (a socket: ENXIO)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        mode = 0
    if mode and not S_ISREG(mode):
        return _not_regular(path, mode)
    return ProbeError(path, f"cannot open ({exc.strerror})")


class FileReader:
    """Reads files and lists directories, recording both (see module docstring).

    ``files`` maps each path read to the exact text read; ``dirs`` maps each directory
    listed to the entry names the probe kept; ``opens`` counts every open attempt,
    including those of optional files that turned out to be missing.

    ``static`` is an optional memo shared between readers of successive probes of the same
    host: files read with ``read_static`` (attributes fixed by the hardware while it runs:
    cache level, type, id, size, ways, line size; package, die, cluster and core ids) are
    taken from it instead of being opened again. They are still recorded in ``files``.
    """

    __slots__ = ("_files", "_batches", "dirs", "opens", "static")

    def __init__(self, static: dict[str, Any] | None = None) -> None:
        self._files: dict[str, str] = {}
        # (directory, names, texts) of each read_many call, added to ``files`` when asked
        # for: the command that only probes never pays for building thousands of paths
        self._batches: list[tuple[str, tuple[str, ...], list[str | None]]] = []
        self.dirs: dict[str, tuple[str, ...]] = {}
        self.opens = 0
        self.static = static

    @property
    def files(self) -> dict[str, str]:
        """Each path read → the exact text read."""
        batches = self._batches
        if batches:
            files = self._files
            for d, names, texts in batches:
                for n, text in zip(names, texts, strict=True):
                    if text is not None:
                        files[d + n] = text
            batches.clear()
        return self._files

    def read_static(self, path: str, dir_fd: int | None = None, name: str = "") -> str | None:
        """``read`` for a file that does not change while the host runs (see the class)."""
        memo = self.static
        if memo is None:
            return self.read(path, dir_fd, name)
        if path in memo:
            text = memo[path]
            if text is not None:
                self._files[path] = text
            return text
        text = memo[path] = self.read(path, dir_fd, name)
        return text

    def read(self, path: str, dir_fd: int | None = None, name: str = "") -> str | None:
        """The file's text, or ``None`` when it does not exist (an optional file).

        With ``dir_fd`` (from ``open_dir(d)``), ``path`` is ``d + name`` and the file is
        opened relative to the directory: the kernel does not walk the whole path again.
        Only a regular file is read, and only up to ``MAX_FILE_BYTES``: anything else is a
        ``ProbeError`` naming ``path`` (see the module docstring).
        """
        self.opens += 1
        try:
            fd = _open(path, _RDONLY) if dir_fd is None else _open(name, _RDONLY, dir_fd=dir_fd)
        except _MISSING:
            return None
        except OSError as exc:
            raise _open_failed(path, exc) from None
        try:
            mode = _fstat(fd).st_mode
            if not S_ISREG(mode):
                raise _not_regular(path, mode)
            data = _read(fd, 65536)
            if len(data) >= _BIG:
                chunks = [data]
                size = len(data)
                while chunk := _read(fd, 65536):
                    size += len(chunk)
                    if size > MAX_FILE_BYTES:
                        raise ProbeError(path, f"larger than {MAX_FILE_BYTES} bytes, more than "
                                         "a kernel writes in any file the probe reads")
                    chunks.append(chunk)
                data = b"".join(chunks)
        except OSError as exc:
            raise ProbeError(path, f"cannot read ({exc.strerror})") from None
        finally:
            _close(fd)
        try:
            text = self._files[path] = data.decode()
        except UnicodeDecodeError:
            raise ProbeError(path, "is not text", data[:40]) from None
        return text

    def read_many(
        self, d: str, names: tuple[str, ...], dir_fd: int | None = None, rel: str = ""
    ) -> list[str | None]:
        """``[read(d + n, dir_fd, rel + n) for n in names]`` in one tight loop.

        The probe reads seven files per cache directory and three per core's
        ``topology/``, thousands on a big host; one call per directory instead of one per
        file takes about a third off the Python side of it, and the paths for ``files``
        are built only when someone asks for them. Errors are ``read``'s: a file that
        cannot be read or decoded raises ``ProbeError`` naming it (and the later names are
        not read).

        Each file is read once with ``pread`` and no ``fstat`` (a system call per file
        saved). ``pread`` fails on a FIFO, socket or terminal without taking anything from
        it; a file whose read fails, gives nothing or fills ``_BIG`` bytes is read again by
        ``read``, which checks its type. What can get through unchecked is only a seekable
        character device that answers a first read with 1 to 4095 bytes (see docs/probe.md).
        """
        out: list[str | None] = []
        append = out.append
        self.opens += len(names)
        for n in names:
            try:
                fd = _open(d + n, _RDONLY) if dir_fd is None else _open(
                    rel + n, _RDONLY, dir_fd=dir_fd)
            except _MISSING:
                append(None)
                continue
            except OSError:
                fd = -1
            data = None
            if fd >= 0:
                try:
                    data = _pread(fd, _BIG, 0)
                except OSError:
                    pass
                finally:
                    _close(fd)
            if not data or len(data) >= _BIG:
                # cannot open or read it, empty, or a long file: ``read`` again, which
                # checks the file's type and raises the error naming it, or reads it all
                self.opens -= 1
                append(self.read(d + n, dir_fd, rel + n))
                continue
            try:
                append(data.decode())
            except UnicodeDecodeError:
                raise ProbeError(d + n, "is not text", data[:40]) from None
        self._batches.append((d, names, out))
        return out

    def open_dir(self, path: str) -> int | None:
        """A descriptor of directory ``path`` for ``read(..., dir_fd=)``; ``None`` if missing.

        The caller closes it with ``os.close``.
        """
        self.opens += 1
        try:
            return os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        except _MISSING:
            return None
        except OSError as exc:
            raise ProbeError(path, f"cannot open directory ({exc.strerror})") from None

    def need(self, path: str) -> str:
        """The file's text; a missing file is an error."""
        text = self.read(path)
        if text is None:
            raise ProbeError(path, "missing")
        return text

    def listdir(
        self, path: str, keep: Callable[[str], bool] | None = None, *, dirs_only: bool = False
    ) -> list[str] | None:
        """Entry names for which ``keep`` is true, or ``None`` if ``path`` is missing.

        With ``dirs_only`` only directories (or symlinks to directories) are kept.
        """
        self.opens += 1
        try:
            with os.scandir(path) as it:
                names = [
                    e.name
                    for e in it
                    if (keep is None or keep(e.name)) and (not dirs_only or e.is_dir())
                ]
        except _MISSING:
            return None
        except OSError as exc:
            raise ProbeError(path, f"cannot list directory ({exc.strerror})") from None
        self.dirs[path] = tuple(names)
        return names


def numbered(prefix: str) -> Callable[[str], bool]:
    """A ``listdir`` filter for ``<prefix><ASCII digits>`` names (``cpu12``, ``node3``)."""
    n = len(prefix)

    def keep(name: str) -> bool:
        return name.startswith(prefix) and name[n:].isdigit() and name.isascii()

    return keep


# ------------------------------------------------------------------ parse helpers


def out_of_range(path: str, text: str, lo: int, hi: int, unit: str = "") -> ProbeError:
    """The error for a value outside ``lo..hi`` (the bounds of ``hostagent.probe.limits``)."""
    return ProbeError(path, f"out of range {lo}..{hi}{unit}", _snippet(text))


def to_int(path: str, text: str, lo: int = MIN_C_INT, hi: int = MAX_C_INT) -> int:
    """A decimal integer in ``lo..hi`` (``"-1\\n"`` → -1); by default a C ``int``, which is
    what the kernel prints ids from."""
    try:
        value = int(text)
    except ValueError:
        raise ProbeError(path, "not an integer", _snippet(text)) from None
    if lo <= value <= hi:
        return value
    raise out_of_range(path, text, lo, hi)


def to_count(path: str, text: str, hi: int = MAX_U32) -> int:
    """A non-negative decimal integer up to ``hi`` (by default an unsigned 32-bit value)."""
    try:
        value = int(text)
    except ValueError:
        raise ProbeError(path, "not an integer", _snippet(text)) from None
    if 0 <= value <= hi:
        return value
    if value < 0:
        raise ProbeError(path, "negative count", _snippet(text))
    raise out_of_range(path, text, 0, hi)


def to_hex(path: str, text: str, hi: int = MAX_U32) -> int:
    """A hex value as the kernel prints it (``"fffff"``, ``"0x8086"``, commas between
    words), up to ``hi`` (by default an unsigned 32-bit value)."""
    t = text.strip().lower().replace(",", "")
    if t.startswith("0x"):
        t = t[2:]
    try:
        if not t or t[0] in "+-":
            raise ValueError
        value = int(t, 16)
    except ValueError:
        raise ProbeError(path, "not a hex value", _snippet(text)) from None
    if value <= hi:
        return value
    raise ProbeError(path, f"out of range 0..{hi:#x}", _snippet(text))


_SIZE_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}


def to_size(path: str, text: str, hi: int = MAX_U32) -> int:
    """A cache size in bytes, up to ``hi``, as sysfs prints it (``"36608K"``; ``M``/``G``
    and bare bytes accepted)."""
    t = text.strip()
    unit = t[-1:].upper() if t[-1:].isalpha() else ""
    digits = t[:-1] if unit else t
    if unit not in _SIZE_UNITS:
        raise ProbeError(path, "not a size", _snippet(text))
    if digits.startswith("-") and digits[1:].isdigit():
        raise ProbeError(path, "negative size", _snippet(text))
    if not (digits.isdigit() and digits.isascii()):
        raise ProbeError(path, "not a size", _snippet(text))
    try:
        size = int(digits) * _SIZE_UNITS[unit]
    except ValueError:  # more digits than int() takes
        raise ProbeError(path, "not a size", _snippet(text)) from None
    if size <= hi:
        return size
    raise out_of_range(path, text, 0, hi, " bytes")


_CPULISTS: dict[str, tuple[int, ...]] = {}  # text -> parsed: the same lists recur a lot


def to_cpus(path: str, text: str) -> tuple[int, ...]:
    """A CPU list (``"0-3,8-11"``; empty or ``"\\n"`` → ``()``); ids below ``MAX_CPUS``."""
    hit = _CPULISTS.get(text)
    if hit is not None:
        return hit
    try:
        cpus = parse_cpulist(text)
    except ValueError as exc:
        problem = getattr(exc, "problem", "not a CPU list")
        raise ProbeError(path, problem, _snippet(text)) from None
    if len(_CPULISTS) >= 8192:
        _CPULISTS.clear()
    _CPULISTS[text] = cpus
    return cpus


def first_cpu(path: str, text: str) -> int:
    """The lowest CPU of a CPU list without parsing all of it (lists are sorted)."""
    head = text.lstrip().split(",", 1)[0].split("-", 1)[0].strip()
    if not (head.isdigit() and head.isascii() and len(head) < 6):
        raise ProbeError(path, "not a CPU list", _snippet(text))
    cpu = int(head)
    if cpu >= MAX_CPUS:
        raise ProbeError(path, f"CPU {cpu} out of range 0..{MAX_CPUS - 1}", _snippet(text))
    return cpu


def hex_str(path: str, text: str) -> str:
    """Hex text as the kernel prints it, stripped and lowercased (``"0x020000"``); checked
    like ``to_hex``."""
    to_hex(path, text)
    return text.strip().lower()


def sorted_ids(names: Iterable[str], prefix_len: int) -> list[int]:
    """``["node1", "node0"]`` → ``[0, 1]`` for names already matched by a ``\\d+`` pattern."""
    return sorted(int(n[prefix_len:]) for n in names)
