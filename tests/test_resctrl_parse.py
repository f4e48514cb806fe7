"""Reservation text: the syntax, sizes and every parse error (hostagent.resctrl)."""

import pytest

from hostagent.errors import RequestError
from hostagent.resctrl import BandwidthItem, CacheItem, parse_reservation, parse_size
from hostagent.units import format_size


def test_operator_syntax_parses_items_in_order():
    spec = parse_reservation(
        "type=both,size=10mb,cache-id=2;type=code,size=2mb,cache-id=1;"
        "type=data,size=10mb,cache-id=1"
    )
    assert spec.caches == (
        CacheItem("both", 10 << 20, 3, 2, "type=both,size=10mb,cache-id=2"),
        CacheItem("code", 2 << 20, 3, 1, "type=code,size=2mb,cache-id=1"),
        CacheItem("data", 10 << 20, 3, 1, "type=data,size=10mb,cache-id=1"),
    )
    assert spec.bandwidth == ()
    assert [c.resource for c in spec.caches] == ["L3", "L3CODE", "L3DATA"]


def test_cacheid_spelling_level_and_bandwidth_items():
    spec = parse_reservation(
        " TYPE=Both , Size=768KiB , cacheid=0 ; type=both,size=1m,level=2 ; mb=50,node=1 ; mb=70;"
    )
    first = CacheItem("both", 768 << 10, 3, 0, "TYPE=Both , Size=768KiB , cacheid=0")
    assert spec.caches[0] == first
    assert spec.caches[1].level == 2 and spec.caches[1].cache_id is None
    assert spec.caches[1].resource == "L2"
    assert spec.bandwidth == (
        BandwidthItem(50, 1, "mb=50,node=1"),
        BandwidthItem(70, None, "mb=70"),
    )


def test_default_level_applies_when_level_missing():
    assert parse_reservation("type=both,size=1m", default_level=2).caches[0].level == 2


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("4096", 4096), ("4096b", 4096), ("4096B", 4096),
        ("2k", 2048), ("2KB", 2048), ("2kib", 2048), ("2KiB", 2048),
        ("3m", 3 << 20), ("3Mb", 3 << 20), ("3MiB", 3 << 20),
        ("1g", 1 << 30), ("1GB", 1 << 30), ("1gib", 1 << 30),
        ("1.5m", 3 << 19), ("0.5k", 512), (" 7 mb ", 7 << 20),
    ],
)
def test_sizes_are_binary_and_case_insensitive(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("10xb", "size '10xb' has an unknown unit 'xb' (valid: b, k, kb, kib, m, mb, mib, g, gb"),
        ("mb", "size 'mb' is not a number with an optional unit"),
        ("-1m", "size '-1m' is not a number"),
        ("0.3b", "size '0.3b' is not a whole number of bytes"),
        ("", "size '' is not a number"),
    ],
)
def test_bad_sizes(text, message):
    with pytest.raises(ValueError, match=None) as exc:
        parse_size(text)
    assert message in str(exc.value)


def test_printed_sizes_are_exact_and_read_back():
    # the planner's messages print sizes with hostagent.units.format_size (IEC, exact)
    assert format_size(2359296) == "2.25 MiB"
    assert format_size(10 << 20) == "10 MiB"
    assert format_size(1 << 30) == "1 GiB"
    assert format_size(1000) == "1000 B"
    assert format_size(0) == "0 B"
    assert parse_size(format_size(2359296)) == 2359296


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty reservation: give items such as 'type=both,size=2mb,cache-id=0'"),
        (" ; ;", "empty reservation ' ; ;': give at least one item"),
        ("type=both,size", "reservation item 1 'type=both,size': 'size' is not key=value"),
        ("type=both,=3", "reservation item 1 'type=both,=3': '=3' is not key=value"),
        ("type=both,size=1m,type=code",
         "reservation item 1 'type=both,size=1m,type=code': type is given twice"),
        ("type=both,size=1m,cache-id=0,cacheid=1",
         "reservation item 1 'type=both,size=1m,cache-id=0,cacheid=1': cache-id is given twice"),
        ("type=both,size=1m,colour=red",
         "unknown key 'colour' (valid: type, size, cache-id, level; or mb, node for bandwidth)"),
        ("size=1m", "reservation item 1 'size=1m': type= is missing (one of both, code, data)"),
        ("type=unified,size=1m",
         "reservation item 1 'type=unified,size=1m': type 'unified' is not one of "
         "both, code, data"),
        ("type=both", "reservation item 1 'type=both': size= is missing (e.g. size=2mb)"),
        ("type=both,size=2xb",
         "reservation item 1 'type=both,size=2xb': size '2xb' has an unknown unit 'xb'"),
        ("type=both,size=1m,cache-id=x",
         "reservation item 1 'type=both,size=1m,cache-id=x': cache-id 'x' is not a cache id"),
        ("type=both,size=1m,cache-id=-1", "cache-id '-1' is not a cache id"),
        ("type=both,size=1m,level=L3", "level 'L3' is not a cache level such as 2 or 3"),
        ("type=both,size=1m,level=0", "level '0' is not a cache level such as 2 or 3"),
        ("mb=50,size=1m", "'size' does not belong in a bandwidth item (valid: mb, node)"),
        ("mb=fifty", "reservation item 1 'mb=fifty': mb 'fifty' is not a whole number"),
        ("mb=50,node=a", "node 'a' is not an MB domain id"),
        ("type=both,size=1m;type=both,size=2m,level=3",
         "reservation items 'type=both,size=1m' and 'type=both,size=2m,level=3' both ask for "
         "type=both on L3 (no cache-id)"),
        ("type=both,size=1m,cache-id=1;type=both,size=1m,cache-id=1",
         "both ask for type=both on L3 cache 1"),
        ("type=both,size=1m,cache-id=1;type=data,size=1m,cache-id=1",
         "reservation items 'type=both,size=1m,cache-id=1' and 'type=data,size=1m,cache-id=1' "
         "collide: type=both cannot be combined with type=data on L3 cache 1"),
        ("type=code,size=1m,cache-id=1",
         "reservation item 'type=code,size=1m,cache-id=1': type=code must be paired with "
         "type=data for the same cache (L3 cache 1), e.g. "
         "'type=code,size=1m,cache-id=1;type=data,size=...'"),
        ("type=code,size=1m,cache-id=1;type=data,size=1m,cache-id=2",
         "type=code must be paired with type=data for the same cache (L3 cache 1)"),
        ("type=code,size=1m;type=data,size=1m,level=2",
         "type=code must be paired with type=data for the same cache (L3 (no cache-id))"),
        ("mb=50,node=0;mb=60,node=0",
         "reservation items 'mb=50,node=0' and 'mb=60,node=0': two bandwidth values for node 0"),
        ("mb=50;mb=60", "two bandwidth values with no node"),
        ("type=both,size=1m;mb=50;bogus", "reservation item 3 'bogus': 'bogus' is not key=value"),
    ],
)
def test_parse_errors_quote_the_item_and_say_what_is_valid(text, message):
    with pytest.raises(RequestError) as exc:
        parse_reservation(text)
    assert message in str(exc.value)


def test_data_without_code_is_allowed():
    spec = parse_reservation("type=data,size=1m,cache-id=0")
    assert [c.type for c in spec.caches] == ["data"]
