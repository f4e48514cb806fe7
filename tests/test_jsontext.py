"""``hostagent.jsontext``: the same text as ``json.dumps`` (compact) for every type it takes."""

import collections
import enum
import json
import math

import pytest

from hostagent.jsontext import dumps
from hostagent.model import Cache, HugepagePool, PciDevice


def compact(value):
    return json.dumps(value, separators=(",", ":"))


HOSTILE_STRINGS = [
    "",
    "plain",
    'quote " and backslash \\',
    "controls \x00\x01\x08\x09\x0a\x0c\x0d\x1b\x1f",
    "DEL \x7f and NBSP \xa0",
    "latin é, euro €, CJK 中",
    "astral 😀 𝄞",
    "lone surrogate \ud800",
    "</script>",
]


@pytest.mark.parametrize("text", HOSTILE_STRINGS, ids=repr)
def test_strings_are_escaped_as_json_escapes_them(text):
    assert dumps(text) == compact(text)
    assert json.loads(dumps(text)) == text
    assert dumps({text: [text]}) == compact({text: [text]})


@pytest.mark.parametrize("value", [
    0, -1, 10**40, True, False, None, 0.1, -0.0, 1e300, 5e-324, math.nan, math.inf, -math.inf,
    [], (), {}, [[], {}, ()], [1, "a", None, [2, 3], {"k": (4,)}], (1, 2, 3),
    {"a": {"b": {"c": [True, False]}}},
    {2: "int key", 2.5: "float key", True: "bool key", None: "null key", "s": "str"},
], ids=repr)
def test_plain_values_match_json(value):
    assert dumps(value) == compact(value)


def test_subclasses_are_written_as_their_base_type():
    class Level(enum.IntEnum):
        L3 = 3

    class Name(str):
        pass

    Pair = collections.namedtuple("Pair", "x y")
    value = {
        Level.L3: [Level.L3, Name('say "hi"'), Pair(1, "z")],
        Name("k"): collections.OrderedDict(a=1.5),
    }
    assert dumps(value) == compact(value) == '{"3":[3,"say \\"hi\\"",[1,"z"]],"k":{"a":1.5}}'


def test_records_are_objects_keyed_by_field_with_the_schema_names():
    pool = HugepagePool(size_kib=2048, total=4, free=3, surplus=0)
    assert dumps(pool) == '{"size_kib":2048,"total":4,"free":3,"surplus":0}'
    dev = PciDevice(address="0000:3b:00.0", numa_node=-1, class_="0x020000",
                    vendor="0x8086", device="0x1592", sriov_totalvfs=0)
    assert json.loads(dumps([dev]))[0]["class"] == "0x020000"  # class_ -> class
    cache = Cache(level=3, id=0, type="unified", size_bytes=1 << 20, ways=16, line_bytes=64,
                  cpus=(0, 1))
    assert json.loads(dumps({"c": cache})) == {"c": {
        "level": 3, "id": 0, "type": "unified", "size_bytes": 1 << 20, "ways": 16,
        "line_bytes": 64, "cpus": [0, 1]}}


def test_a_record_whose_attributes_are_not_its_fields_is_refused():
    class Odd:
        _fields = ("a", "b")

        def __init__(self):
            self.b, self.a = 2, 1  # wrong order: the text would swap the keys' values

    with pytest.raises(TypeError, match="Odd record's attributes are not its fields"):
        dumps(Odd())


@pytest.mark.parametrize("value, message", [
    (object(), "Object of type object is not JSON serializable"),
    ({1, 2}, "Object of type set is not JSON serializable"),
    ([b"bytes"], "Object of type bytes is not JSON serializable"),
    ({(1, 2): 3}, "keys must be str, int, float, bool or None, not tuple"),
], ids=["object", "set", "bytes", "tuple key"])
def test_other_types_are_refused_naming_the_type(value, message):
    with pytest.raises(TypeError, match=message):
        dumps(value)
    with pytest.raises(TypeError):
        compact(value)  # json refuses them too
