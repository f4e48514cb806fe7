"""Compact JSON text of plain data and model records, written without the ``json`` module.

Why: ``hostagent probe --json`` is a short command whose whole run is measured against
hwloc's ``lstopo`` (docs/probe.md §Speed, with the figures). Importing ``json`` loads
``re``, ``enum`` and ``functools``, which takes longer than encoding the document. The
probe document holds few types, and this module writes exactly those:

- model records (``hostagent.model``: a class with ``_fields``, whose instance
  ``__dict__`` holds those fields in order, and ``_keys``, each field's key in the
  schema, docs/schema.md) as objects with those keys (without ``_keys``, the field names);
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


def dumps(value: Any) -> str:
    """``value`` as compact JSON text: ``json.dumps(value, separators=(",", ":"))``."""
    return _WRITERS.get(value.__class__, _other)(value)


# Each writer takes a value of one exact type and returns its text. ``_other`` handles the
# rest and adds a writer for each record class it meets, so a record costs one call plus
# one per field that is not written by a C function (strings repeat, and are looked up).


def _quote(text: str) -> str:
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


class _Quoted(dict):  # type: ignore[type-arg]
    """str → its JSON text. A miss is quoted, and kept while there are few (cache types,
    group names, PCI addresses and masks repeat; a lookup is cheaper than ``_quote``)."""

    def __missing__(self, text: str) -> str:
        quoted = _quote(text)
        if len(self) < _QUOTED_MAX and len(text) <= 64:
            self[text] = quoted
        return quoted


_QUOTED_MAX = 4096
_string = _Quoted().__getitem__


def _float(value: float) -> str:
    if value != value:
        return "NaN"
    if value in (float("inf"), float("-inf")):
        return "Infinity" if value > 0 else "-Infinity"
    return float.__repr__(value)


_INT_ONLY = {int}


def _array(values: tuple[Any, ...] | list[Any]) -> str:
    if not values:
        return "[]"
    if set(map(type, values)) == _INT_ONLY:  # CPU lists: the bulk of the text
        return "[" + ",".join(map(int.__repr__, values)) + "]"
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


def _record_writer(keys: tuple[str, ...]) -> Callable[[Any], str]:
    """The writer of one record class whose fields' keys are ``keys``: one ``%`` template
    for the whole object, filled with its values' texts."""
    get = _WRITERS.get
    template = "{" + ",".join(_string(k).replace("%", "%%") + ":%s" for k in keys) + "}"
    count = len(keys)

    def write(value: Any) -> str:
        texts = tuple([get(v.__class__, _other)(v) for v in value.__dict__.values()])
        if len(texts) != count:
            raise TypeError(f"{value.__class__.__name__} record's attributes are not its fields")
        return template % texts

    return write


def _other(value: Any) -> str:
    """A record, a mapping or a subclass of a plain type (exact plain types have writers)."""
    cls = value.__class__
    fields = getattr(cls, "_fields", None)
    if fields is not None and isinstance(getattr(value, "__dict__", None), dict):
        if list(value.__dict__) != list(fields):
            raise TypeError(f"{cls.__name__} record's attributes are not its fields")
        write = _WRITERS[cls] = _record_writer(getattr(cls, "_keys", fields))
        return write(value)
    if hasattr(value, "keys"):
        return _object(value)
    for base in (str, int, float, tuple, list):  # bool cannot be subclassed
        if isinstance(value, base):
            return _WRITERS[base](base(value))
    raise TypeError(f"Object of type {cls.__name__} is not JSON serializable")


_WRITERS: dict[type, Callable[[Any], str]] = {
    str: _string,
    int: int.__repr__,
    bool: {True: "true", False: "false"}.__getitem__,
    type(None): {None: "null"}.__getitem__,
    float: _float,
    tuple: _array,
    list: _array,
    dict: _object,
}
