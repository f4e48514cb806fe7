"""Compact JSON text of plain data and model records, written without the ``json`` module.

Why: ``hostagent probe --json`` is a short command whose whole run is measured against
hwloc's ``lstopo`` (issue 2, docs/probe.md §Speed). Importing ``json`` loads ``re``,
``enum`` and ``functools``: about 5 ms of a 40 ms run on a 448-thread host, more than
encoding the document takes. The probe document holds few types, and this module writes
exactly those:

- model records (``hostagent.model``: a class with ``_fields``, whose instance
  ``__dict__`` holds those fields in order) as objects keyed by field name, ``class_``
  written as ``class`` (the schema's key, design §4.2);
- mappings (``dict``, or anything with ``keys()``, the rule ``dict()`` itself uses) as
  objects; keys may be ``str``, ``int``, ``float``, ``bool`` or ``None``;
- ``tuple`` and ``list`` as arrays; ``str``, ``int``, ``float``, ``bool`` and ``None``
  (subclasses too, as their base type).

The text is byte for byte what ``json.dumps(value, separators=(",", ":"))`` writes for the
same data (ASCII only, the same escapes, ``NaN``/``Infinity`` for those floats); tests
compare the two on every fixture and on hostile strings. Anything else raises
``TypeError`` naming its type, as ``json`` does. References are not checked for cycles
(``json``'s ``check_circular``): the model holds none, and a cycle ends in
``RecursionError``.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing is not imported at run time (start-up time)
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

__all__ = ["dumps"]

_ESCAPES = {
    '"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\b": "\\b", "\f": "\\f",
}
_RENAMES = {"class_": "class"}  # record field -> schema key (a Python keyword as a key)


def dumps(value: Any) -> str:
    """``value`` as compact JSON text: ``json.dumps(value, separators=(",", ":"))``."""
    return _writer(value)(value)


def _string(text: str) -> str:
    if text.isascii() and text.isprintable() and '"' not in text and "\\" not in text:
        return f'"{text}"'  # the common case: nothing to escape
    return '"' + "".join([_char(c) for c in text]) + '"'


def _char(c: str) -> str:
    escaped = _ESCAPES.get(c)
    if escaped is not None:
        return escaped
    n = ord(c)
    if 0x20 <= n < 0x7F:  # json escapes DEL too
        return c
    if n <= 0xFFFF:
        return f"\\u{n:04x}"
    n -= 0x10000  # outside the BMP: a UTF-16 surrogate pair, as json writes it
    return f"\\u{0xD800 | (n >> 10):04x}\\u{0xDC00 | (n & 0x3FF):04x}"


def _float(value: float) -> str:
    if value != value:
        return "NaN"
    if value in (float("inf"), float("-inf")):
        return "Infinity" if value > 0 else "-Infinity"
    return float.__repr__(value)


def _bool(value: bool) -> str:
    return "true" if value else "false"


def _null(value: None) -> str:
    return "null"


def _array(values: tuple[Any, ...] | list[Any]) -> str:
    if not values:
        return "[]"
    if values[0].__class__ is int and all(v.__class__ is int for v in values):
        return "[" + ",".join(map(int.__repr__, values)) + "]"  # CPU lists: the bulk
    get = _WRITERS.get
    return "[" + ",".join([get(v.__class__, _other)(v) for v in values]) + "]"


def _key(key: Any) -> str:
    cls = key.__class__
    if cls is str:
        return _string(key)
    if cls is int:
        return f'"{int.__repr__(key)}"'
    if cls in (bool, float) or key is None:
        return f'"{_WRITERS[cls](key)}"'
    for base in (str, int, float):  # subclasses, as their base type
        if isinstance(key, base):
            return _key(base(key))
    raise TypeError(f"keys must be str, int, float, bool or None, not {cls.__name__}")


def _object(mapping: Any) -> str:
    get = _WRITERS.get
    return "{" + ",".join(
        [_key(k) + ":" + get(v.__class__, _other)(v) for k, v in mapping.items()]
    ) + "}"


_RECORD_KEYS: dict[type, tuple[str, ...]] = {}  # record class -> its '"key":' texts


def _record(value: Any, keys: tuple[str, ...]) -> str:
    get = _WRITERS.get
    pairs = zip(keys, value.__dict__.values(), strict=True)
    return "{" + ",".join([k + get(v.__class__, _other)(v) for k, v in pairs]) + "}"


def _other(value: Any) -> str:
    """A record, a mapping or a subclass of a plain type (exact plain types have writers)."""
    cls = value.__class__
    keys = _RECORD_KEYS.get(cls)
    if keys is not None:
        return _record(value, keys)
    fields = getattr(cls, "_fields", None)
    if fields is not None and isinstance(getattr(value, "__dict__", None), dict):
        keys = tuple(_string(_RENAMES.get(n, n)) + ":" for n in fields)
        if list(value.__dict__) != list(fields):
            raise TypeError(f"{cls.__name__} record's attributes are not its fields")
        _RECORD_KEYS[cls] = keys
        return _record(value, keys)
    if hasattr(value, "keys"):
        return _object(value)
    if isinstance(value, bool):
        return _bool(value)
    for base in (str, int, float, tuple, list):
        if isinstance(value, base):
            return _WRITERS[base](base(value))
    raise TypeError(f"Object of type {cls.__name__} is not JSON serializable")


_WRITERS: dict[type, Callable[[Any], str]] = {
    str: _string,
    int: int.__repr__,
    bool: _bool,
    type(None): _null,
    float: _float,
    tuple: _array,
    list: _array,
    dict: _object,
}


def _writer(value: Any) -> Callable[[Any], str]:
    return _WRITERS.get(value.__class__, _other)
