"""CPU lists in the kernel's list format (``0-3,8,10-11``) and bitmask format.

Used for sysfs files (``cpulist``, ``shared_cpu_list``, ``cpus_list``), config options and
reservation requests. Parsing is strict: a malformed list raises ``ValueError`` with the
bad text, and callers wrap it in an error naming the file or option.

``parse_cpu_ranges`` is the one CPU-list parser: the kernel's lists (``parse_cpulist``),
libvirt's cpusets (``hostagent.guests.xml.parse_cpuset``) and Nova's CPU specs
(``hostagent.fit.request.parse_cpu_spec``) call it with their own bound and with ``^``
exclusions where their syntax has them.
"""

from __future__ import annotations

from hostagent.probe.limits import MAX_CPULIST_CHARS, MAX_CPUS

TYPE_CHECKING = False  # collections.abc is not imported at run time (start-up time)
if TYPE_CHECKING:
    from collections.abc import Iterable


# Why a CPU list was refused (``CpuListError.reason``).
BAD_ELEMENT = "element"  # an element that is not an id, a range or (if allowed) ^exclusion
BACKWARDS = "backwards"  # a range whose end is below its start
OUT_OF_RANGE = "range"  # an id above the caller's last one


class CpuListError(ValueError):
    """A CPU list that cannot be parsed; ``problem`` says why without quoting the text
    (for messages that show the text on their own, as ``ProbeError`` does).

    ``reason`` (``BAD_ELEMENT``, ``BACKWARDS``, ``OUT_OF_RANGE``, or ``""`` for the
    length), the ``element`` at fault, the ``cpu`` id out of range and the ``last`` id
    allowed let a caller with its own wording say the same thing (``reworded``).
    """

    def __init__(self, problem: str, text: str, detail: str = "", *, reason: str = "",
                 element: str = "", cpu: int = -1, last: int = -1) -> None:
        self.problem = problem
        self.reason = reason
        self.element = element
        self.cpu = cpu
        self.last = last
        super().__init__(f"{problem}: {text!r}{detail}")

    def reworded(self, words: dict[str, str]) -> str:
        """This error in a caller's own words: ``words[reason]`` formatted with
        ``element``, ``cpu`` and ``last``."""
        return words[self.reason].format(element=self.element, cpu=self.cpu, last=self.last)


def parse_cpu_ranges(text: str, *, last: int, exclusions: bool = False,
                     blanks: bool = False) -> tuple[int, ...]:
    """The CPU-list grammar every caller shares: ``"0-3,8,10-11"`` → sorted distinct ids.

    Elements are single ids and ``lo-hi`` ranges, separated by commas, with blanks
    around an element allowed; a blank text is ``()``. The callers' syntaxes differ
    only in the parameters:

    * ``last``: the highest id allowed (``MAX_CPUS - 1`` for the kernel's lists,
      libvirt's 16383 for a domain's cpuset, the last vCPU for a flavor's masks).
    * ``exclusions``: ``^id`` and ``^lo-hi`` remove ids (libvirt's cpuset, Nova's CPU
      specs); the kernel never prints them.
    * ``blanks``: blanks around ``-`` and after ``^`` are allowed (libvirt and Nova
      skip them; the kernel prints none).

    The first bad element raises ``CpuListError`` (its message in the kernel lists'
    wording, ``reworded`` for others). Ranges are merged, not expanded one by one: work
    and memory are bounded by the number of elements and ``last``.
    """
    if not text or text.isspace():
        return ()
    ranges: list[tuple[int, int]] = []
    excluded: list[tuple[int, int]] = []
    for raw in text.split(","):
        element = raw.strip()
        part = element
        negate = exclusions and part[:1] == "^"
        if negate:
            part = part[1:]
        lo, sep, hi = part.partition("-")
        if blanks:
            lo, hi = lo.strip(), hi.strip()
        try:
            if not lo.isdigit() or (sep and not hi.isdigit()):
                raise ValueError
            a = int(lo)
            b = int(hi) if sep else a
        except ValueError:  # a non-ASCII digit, or more digits than int() takes
            raise CpuListError("not a CPU list", text, reason=BAD_ELEMENT,
                               element=element) from None
        if b < a:
            raise CpuListError("not a CPU list", text, f" (range {element} runs backwards)",
                               reason=BACKWARDS, element=element)
        if b > last:
            raise CpuListError(f"CPU {b} out of range 0..{last}", text, reason=OUT_OF_RANGE,
                               element=element, cpu=b, last=last)
        (excluded if negate else ranges).append((a, b))
    if len(ranges) == 1 and not excluded:  # the common case: one range or one id
        a, b = ranges[0]
        return tuple(range(a, b + 1))
    cpus = _merged(ranges)
    if excluded:
        gone = set(_merged(excluded))
        cpus = [c for c in cpus if c not in gone]
    return tuple(cpus)


def _merged(ranges: list[tuple[int, int]]) -> list[int]:
    """The ids of inclusive ``(lo, hi)`` ranges, sorted, each once (overlaps merged)."""
    ranges.sort()
    out: list[int] = []
    last = -1
    for a, b in ranges:
        if b > last:
            out.extend(range(a if a > last else last + 1, b + 1))
            last = b
    return out


def parse_cpulist(text: str) -> tuple[int, ...]:
    """A kernel CPU list: ``"0-3,8,10-11"`` → ``(0, 1, 2, 3, 8, 10, 11)``; empty or
    whitespace → ``()``.

    The kernel prints only ranges and single ids in these files; anything else is refused
    (``CpuListError``). So is a CPU id of ``MAX_CPUS`` or more (no kernel has one) and a
    text longer than ``MAX_CPULIST_CHARS``, both before any list is built: the memory
    used is bounded by ``MAX_CPUS`` whatever the text says.
    """
    text = text.strip()
    if len(text) > MAX_CPULIST_CHARS:
        raise CpuListError(f"longer than {MAX_CPULIST_CHARS} characters, the longest CPU "
                           "list a kernel prints", text[:40] + "...")
    return parse_cpu_ranges(text, last=MAX_CPUS - 1)


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
