"""Sizes and counts as a person reads them: one style for every command's text output.

Sizes are IEC (binary) units with a space: ``512 B``, ``4 KiB``, ``4.5 MiB``, ``1 GiB``.
``format_size`` is exact by default (the largest unit in which the size has at most
``MAX_DECIMALS`` decimals, else a smaller one), so a printed cache size can be given back
as a ``size=`` value; ``approx=True`` rounds to one decimal for amounts such as a cell's
memory. Counts take their noun in the right number: ``plural(1, "way")`` is ``1 way``.
JSON outputs keep their raw numbers (bytes, KiB); only text uses these.
"""

from __future__ import annotations

#: the IEC units, largest first
IEC_UNITS = (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10))
#: at most this many decimals in an exact size (2.25 MiB, 1.375 MiB); more: a smaller unit
MAX_DECIMALS = 3


def _trim(value: str) -> str:
    return value.rstrip("0").rstrip(".") if "." in value else value


def format_size(nbytes: int, *, approx: bool = False, sep: str = " ") -> str:
    """``4718592`` → ``"4.5 MiB"``; ``1 << 30`` → ``"1 GiB"``; ``1000`` → ``"1000 B"``.

    Exact (the default): the largest unit in which ``nbytes`` has at most
    ``MAX_DECIMALS`` decimals (``1441792`` → ``"1.375 MiB"``, ``1049600`` →
    ``"1025 KiB"``). ``approx``: the largest unit the size reaches, one decimal at most
    (``16694788096`` → ``"15.5 GiB"``). ``sep`` goes between number and unit (``""`` in
    compact tokens such as ``2MiB:4096``).
    """
    n = int(nbytes)
    if n < 0:
        return "-" + format_size(-n, approx=approx, sep=sep)
    for unit, scale in IEC_UNITS:
        if n < scale:
            continue
        if approx:
            return f"{_trim(f'{n / scale:.1f}')}{sep}{unit}"
        scaled, rest = divmod(n * 10**MAX_DECIMALS, scale)
        if rest == 0:
            whole, frac = divmod(scaled, 10**MAX_DECIMALS)
            return f"{_trim(f'{whole}.{frac:0{MAX_DECIMALS}d}')}{sep}{unit}"
    return f"{n}{sep}B"


def format_kib(kib: int, *, approx: bool = False, sep: str = " ") -> str:
    """``format_size`` of a size given in KiB (hugepage sizes, memory counters)."""
    return format_size(int(kib) * 1024, approx=approx, sep=sep)


def plural(count: int, noun: str, nouns: str | None = None) -> str:
    """``plural(1, "way")`` → ``"1 way"``; ``plural(2, "way")`` → ``"2 ways"``;
    ``nouns`` for an irregular plural."""
    return f"{count} {noun if count == 1 else (nouns or noun + 's')}"
