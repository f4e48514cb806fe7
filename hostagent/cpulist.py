"""CPU lists in the kernel's list format (``0-3,8,10-11``) and bitmask format.

Used for sysfs files (``cpulist``, ``shared_cpu_list``, ``cpus_list``), config options and
reservation requests. Parsing is strict: a malformed list raises ``ValueError`` with the
bad text, and callers wrap it in an error naming the file or option.
"""

from __future__ import annotations

TYPE_CHECKING = False  # collections.abc is not imported at run time (start-up time)
if TYPE_CHECKING:
    from collections.abc import Iterable


def parse_cpulist(text: str) -> tuple[int, ...]:
    """``"0-3,8,10-11"`` → ``(0, 1, 2, 3, 8, 10, 11)``; empty or whitespace → ``()``.

    The kernel prints only ranges and single ids in these files; anything else is refused.
    """
    text = text.strip()
    if not text:
        return ()
    out: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        lo, sep, hi = part.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"not a CPU list: {text!r}")
        a = int(lo)
        b = int(hi) if sep else a
        if b < a:
            raise ValueError(f"not a CPU list: {text!r} (range {part} runs backwards)")
        out.update(range(a, b + 1))
    return tuple(sorted(out))


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
