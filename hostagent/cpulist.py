"""CPU lists in the kernel's list format (``0-3,8,10-11``) and bitmask format.

Used for sysfs files (``cpulist``, ``shared_cpu_list``, ``cpus_list``), config options and
reservation requests. Parsing is strict: a malformed list raises ``ValueError`` with the
bad text, and callers wrap it in an error naming the file or option.
"""

from __future__ import annotations

from hostagent.probe.limits import MAX_CPULIST_CHARS, MAX_CPUS

TYPE_CHECKING = False  # collections.abc is not imported at run time (start-up time)
if TYPE_CHECKING:
    from collections.abc import Iterable


class CpuListError(ValueError):
    """A CPU list that cannot be parsed; ``problem`` says why without quoting the text
    (for messages that show the text on their own, as ``ProbeError`` does)."""

    def __init__(self, problem: str, text: str, detail: str = "") -> None:
        self.problem = problem
        super().__init__(f"{problem}: {text!r}{detail}")


def parse_cpulist(text: str) -> tuple[int, ...]:
    """``"0-3,8,10-11"`` → ``(0, 1, 2, 3, 8, 10, 11)``; empty or whitespace → ``()``.

    The kernel prints only ranges and single ids in these files; anything else is refused
    (``CpuListError``). So is a CPU id of ``MAX_CPUS`` or more (no kernel has one) and a
    text longer than ``MAX_CPULIST_CHARS``, both before any list is built: the memory
    used is bounded by ``MAX_CPUS`` whatever the text says.
    """
    text = text.strip()
    if not text:
        return ()
    if len(text) > MAX_CPULIST_CHARS:
        raise CpuListError(f"longer than {MAX_CPULIST_CHARS} characters, the longest CPU "
                           "list a kernel prints", text[:40] + "...")
    ranges: list[tuple[int, int]] = []
    for part in text.split(","):
        part = part.strip()
        lo, sep, hi = part.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise CpuListError("not a CPU list", text)
        try:
            a = int(lo)
            b = int(hi) if sep else a
        except ValueError:  # a non-ASCII digit, or more digits than int() takes
            raise CpuListError("not a CPU list", text) from None
        if b < a:
            raise CpuListError("not a CPU list", text, f" (range {part} runs backwards)")
        if b >= MAX_CPUS:
            raise CpuListError(f"CPU {b} out of range 0..{MAX_CPUS - 1}", text)
        ranges.append((a, b))
    if len(ranges) > 1:
        ranges.sort()  # overlapping ranges are merged: the work is bounded by MAX_CPUS too
    out: list[int] = []
    last = -1
    for a, b in ranges:
        if b > last:
            out.extend(range(a if a > last else last + 1, b + 1))
            last = b
    return tuple(out)


def format_cpulist(cpus: Iterable[int]) -> str:
    """``(0, 1, 2, 3, 8)`` → ``"0-3,8"`` (the kernel's compact form)."""
    ids = sorted(set(cpus))
    parts: list[str] = []
    i = 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        parts.append(str(ids[i]) if i == j else f"{ids[i]}-{ids[j]}")
        i = j + 1
    return ",".join(parts)


def parse_cpumask(text: str) -> tuple[int, ...]:
    """A kernel bitmask (``"ff,00000000"``, comma-separated 32-bit words) → CPU ids."""
    t = text.strip().replace(",", "")
    if not t:
        return ()
    try:
        value = int(t, 16)
    except ValueError:
        raise ValueError(f"not a CPU mask: {text!r}") from None
    return tuple(i for i in range(value.bit_length()) if (value >> i) & 1)
