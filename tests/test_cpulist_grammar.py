"""One CPU-list grammar (``hostagent.cpulist.parse_cpu_ranges``) behind the three syntaxes:
the kernel's lists, libvirt's cpusets and Nova's CPU specs, each with its own bound, its
own ``^`` rule and its own error wording."""

import pytest

from hostagent.cpulist import (
    BACKWARDS,
    BAD_ELEMENT,
    OUT_OF_RANGE,
    CpuListError,
    parse_cpu_ranges,
    parse_cpulist,
)
from hostagent.fit.request import CpuBeyondLimit, parse_cpu_spec
from hostagent.fit_limits import MAX_VCPUS
from hostagent.guests.xml import MAX_CPU_ID, parse_cpuset
from hostagent.probe.limits import MAX_CPUS

BAD = object()  # refused


def cpus(top, last):
    """``0-top`` read with ``last`` as the bound: the ids, or refused."""
    return tuple(range(top + 1)) if top <= last else BAD


def nova(top, first=0):
    """``first-top`` as a Nova spec with no limit given: bounded by MAX_VCPUS."""
    return set(range(first, top + 1)) if top < MAX_VCPUS else BAD


# text: (kernel list, libvirt cpuset, Nova spec)
FORMS = {
    "0-3,8-11": ((0, 1, 2, 3, 8, 9, 10, 11),) * 2 + ({0, 1, 2, 3, 8, 9, 10, 11},),
    " 0 ": ((0,), (0,), {0}),
    "3,1,2,1-2": ((1, 2, 3), (1, 2, 3), {1, 2, 3}),
    "0-3,^2": (BAD, (0, 1, 3), {0, 1, 3}),
    "1-4,^3, 6": (BAD, (1, 2, 4, 6), {1, 2, 4, 6}),
    "^ 2,0-3": (BAD, (0, 1, 3), {0, 1, 3}),
    "0 - 3": (BAD, (0, 1, 2, 3), {0, 1, 2, 3}),
    "0,^0": (BAD, BAD, set()),  # libvirt refuses a set with no id left; Nova's callers decide
    "": ((), BAD, BAD),
    "1,,2": (BAD, BAD, BAD),
    "5-3": (BAD, BAD, BAD),
    "0x3": (BAD, BAD, BAD),
    "\u00b2": (BAD, BAD, BAD),  # a superscript: isdigit() but not a decimal digit
    # the bounds: MAX_CPUS (kernel), MAX_CPU_ID (libvirt), MAX_VCPUS (Nova, no limit given)
    f"0-{MAX_CPUS - 1}": (tuple(range(MAX_CPUS)), tuple(range(MAX_CPUS)), nova(MAX_CPUS - 1)),
    f"0-{MAX_CPUS}": (BAD, tuple(range(MAX_CPUS + 1)), nova(MAX_CPUS)),
    f"{MAX_CPU_ID}": (BAD, (MAX_CPU_ID,), nova(MAX_CPU_ID, MAX_CPU_ID)),
    f"{MAX_CPU_ID + 1}": (BAD, BAD, nova(MAX_CPU_ID + 1, MAX_CPU_ID + 1)),
    f"0-{MAX_VCPUS - 1}": (cpus(MAX_VCPUS - 1, MAX_CPUS - 1), cpus(MAX_VCPUS - 1, MAX_CPU_ID),
                           set(range(MAX_VCPUS))),
}


def outcome(parse, text):
    try:
        return parse(text)
    except ValueError:
        return BAD


@pytest.mark.parametrize("text", FORMS)
def test_each_syntax_accepts_its_forms(text):
    kernel, cpuset, spec = FORMS[text]
    assert outcome(parse_cpulist, text) == kernel
    assert outcome(parse_cpuset, text) == cpuset
    assert outcome(parse_cpu_spec, text) == spec


@pytest.mark.parametrize(
    ("text", "kernel", "cpuset", "spec"),
    [
        ("1-x", "not a CPU list: '1-x'", "bad element '1-x'",
         "'1-x' is not a CPU id, range or ^exclusion"),
        ("0, 5-3", "not a CPU list: '0, 5-3' (range 5-3 runs backwards)",
         "range '5-3' runs backwards", "range '5-3' runs backwards"),
        ("0-99999", f"CPU 99999 out of range 0..{MAX_CPUS - 1}: '0-99999'",
         f"id 99999 above the maximum {MAX_CPU_ID}", "CPU 99999 is beyond the last vCPU 3"),
    ],
)
def test_each_syntax_keeps_its_wording(text, kernel, cpuset, spec):
    for parse, words in ((parse_cpulist, kernel), (parse_cpuset, cpuset),
                         (lambda t: parse_cpu_spec(t, limit=3), spec)):
        with pytest.raises(ValueError) as info:
            parse(text)
        assert str(info.value) == words


def test_a_spec_beyond_its_limit_is_cpu_beyond_limit():
    with pytest.raises(CpuBeyondLimit) as info:
        parse_cpu_spec("0-2,^1,9", limit=7)
    assert (info.value.cpu, str(info.value)) == (9, "CPU 9 is beyond the last vCPU 7")


def test_the_error_says_why_in_fields():
    for text, reason, element, cpu in [("0,^1", BAD_ELEMENT, "^1", -1),
                                       ("0, 4-2 ", BACKWARDS, "4-2", -1),
                                       ("0,9", OUT_OF_RANGE, "9", 9)]:
        with pytest.raises(CpuListError) as info:
            parse_cpu_ranges(text, last=7)
        assert (info.value.reason, info.value.element, info.value.cpu) == (reason, element, cpu)


@pytest.mark.parametrize("text", ["\u00b2", "0-3\u00b2", "1" * 5000, "0-" + "9" * 5000])
def test_a_number_int_cannot_read_is_a_bad_element_not_pythons_message(text):
    """A superscript digit passes ``str.isdigit`` and a 5000-digit number passes it too,
    but ``int()`` refuses both: the message names the element, not ``int()``'s text."""
    with pytest.raises(ValueError, match="^bad element '"):
        parse_cpuset(text)
    with pytest.raises(ValueError, match="is not a CPU id, range or \\^exclusion$"):
        parse_cpu_spec(text, limit=3)
    with pytest.raises(ValueError, match="^not a CPU list: '"):
        parse_cpulist(text)


def test_repeated_whole_ranges_are_merged_not_expanded():
    """A cpuset naming every id a thousand times is one pass over the ids it names."""
    text = ",".join([f"0-{MAX_CPU_ID}"] * 1000 + [f"^1-{MAX_CPU_ID}"] * 1000)
    assert parse_cpuset(text) == (0,)
