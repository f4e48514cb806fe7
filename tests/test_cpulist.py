"""Kernel CPU list and mask formats."""

import pytest

from hostagent.cpulist import format_cpulist, parse_cpulist, parse_cpumask


def test_parse_and_format_round_trip():
    assert parse_cpulist("0-3,8,10-11\n") == (0, 1, 2, 3, 8, 10, 11)
    assert format_cpulist([11, 10, 8, 3, 2, 1, 0]) == "0-3,8,10-11"
    assert parse_cpulist("") == ()
    assert format_cpulist([]) == ""


@pytest.mark.parametrize("bad", ["0-", "-1", "a", "3-1", "1,,2", "0x3"])
def test_parse_refuses_garbage(bad):
    with pytest.raises(ValueError, match="not a CPU list"):
        parse_cpulist(bad)


def test_cpumask():
    assert parse_cpumask("00000000,00000101") == (0, 8)
    with pytest.raises(ValueError, match="not a CPU mask"):
        parse_cpumask("zz")
