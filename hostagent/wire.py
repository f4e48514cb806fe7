"""The wire format: msgpack packing, strict unpacking and the message shapes (docs/daemon.md §3).

Shared by the publisher, the subscriber library and request clients, so that every
socket that receives applies the same limits:

- ``unpack`` refuses anything over a byte limit, uses ``raw=False`` and
  ``strict_map_key=True``, bounds every string/bin/array/map length, rejects msgpack
  ext types (``Timestamp`` included) and, for requests (untrusted clients), nesting
  deeper than ``MAX_DEPTH`` (other messages rely on msgpack's own limit of about 1000
  levels: walking a 300 KiB snapshot in Python would cost more than decoding it).
  Every failure is a ``WireError`` whose message says what was wrong.
- stream messages are two frames ``[topic, msgpack(body)]`` with topic
  ``hostagent.<host>.`` and ``body = {v, kind, host, epoch, seq, time, data}``;
  ``decode_stream`` checks the frame count, the body's types and that the topic names
  the body's host. A snapshot whose msgpack ``data`` is at least ``COMPRESS_MIN_BYTES``
  travels compressed: ``data`` is then bin ``zlib(msgpack(snapshot))`` and the body has
  ``enc: "zlib"``; ``decode_stream`` inflates it (never beyond ``max_bytes``), so
  callers always get ``data`` as a map. Header fields stay readable without inflating.
  The publisher packs the topology once per re-probe (``PackCache``) and also keeps it
  as an independent deflate segment that it splices into each compressed snapshot
  (``zlib_chunks``): still one standard zlib stream of exactly ``msgpack(snapshot)``.
  The usage's ``threads`` and ``guests`` lists are packed element by element and
  deflated in blocks, so one guest's change re-packs and re-deflates only its part.
  Subscribers keep the last decoded topology/config and usage list elements per host
  (``DecodeCache``) and reuse those whose bytes are unchanged.
- requests are one msgpack map with a string ``op``; replies are
  ``{v: 1, ok: true, ...}`` or ``{v: 1, ok: false, error: "<what was wrong>"}``.
"""

from __future__ import annotations

import gc
import math
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import msgpack

VERSION = 1
TOPIC_PREFIX = b"hostagent."
KINDS = ("snapshot", "heartbeat")
#: The delta stream (opt-in by subscription, docs/wire.md §12): topic
#: ``hostagent-delta.<host>.``, which a ``hostagent.`` subscription does not match. It
#: carries full snapshots (on join, after a gap, when a change is big), heartbeats, and
#: ``delta`` messages holding only what changed since ``seq - 1``.
DELTA_PREFIX = b"hostagent-delta."
DELTA_KINDS = ("snapshot", "heartbeat", "delta")
#: A delta whose msgpack would be this large or more is not sent: the agent sends the
#: full (compressed) snapshot on the delta topic instead. Deltas are never compressed.
DELTA_MAX_BYTES = 16 * 1024
#: Snapshot parts whose lists a delta patches element-wise (``splice``); other top-level
#: keys are replaced whole when they change.
DELTA_PARTS = ("usage",)
#: Keys a delta never carries: they are the message's own (``host``, ``epoch``, ``seq``,
#: ``time`` of the rebuilt snapshot are the body's).
DELTA_HEADER_KEYS = ("host", "epoch", "seq", "time")

#: Requests are small (an op and a fit request): anything bigger gets an error reply.
MAX_REQUEST_BYTES = 64 * 1024
#: Default limit for stream messages and replies a client accepts (a 448-thread host with
#: 200 guests is ~50 KiB; this leaves room for much larger hosts).
DEFAULT_MAX_MESSAGE_BYTES = 8 * 1024 * 1024
#: Requests nesting deeper than this are refused (a snapshot is ~6 levels deep).
MAX_DEPTH = 32
#: Snapshot data packing to at least this many bytes is sent zlib-compressed.
COMPRESS_MIN_BYTES = 16 * 1024
ENCODINGS = ("zlib",)
#: Decoding a message this large runs with the cyclic garbage collector paused.
GC_PAUSE_BYTES = 64 * 1024
#: The largest ``seq`` a message may carry: 2**53 - 1, the largest integer a JSON reader
#: or a double holds exactly (a one-per-millisecond agent needs 285 000 years to get
#: there). msgpack could carry up to 2**64 - 1, which let one message make every later
#: snapshot of its host look like a duplicate.
MAX_SEQ = 2**53 - 1


class WireError(ValueError):
    """A message that cannot be accepted; the text says why (shown in error replies)."""


def topic(host: str) -> bytes:
    """The stream topic of one host: ``hostagent.<host>.`` (the trailing dot keeps
    ``h1`` from matching ``h10``)."""
    return TOPIC_PREFIX + host.encode() + b"."


def delta_topic(host: str) -> bytes:
    """The delta stream topic of one host: ``hostagent-delta.<host>.``."""
    return DELTA_PREFIX + host.encode() + b"."


def host_of_topic(raw: bytes, prefix: bytes = TOPIC_PREFIX) -> str:
    """The host name inside a topic frame; ``WireError`` if it is not a hostagent topic
    (``prefix``: ``TOPIC_PREFIX``, or ``DELTA_PREFIX`` for the delta stream)."""
    if not raw.startswith(prefix) or not raw.endswith(b".") or len(raw) <= len(prefix) + 1:
        raise WireError(f"topic {raw[:80]!r} is not {prefix.decode()}<host>.")
    try:
        return raw[len(prefix):-1].decode()
    except UnicodeDecodeError:
        raise WireError(f"topic {raw[:80]!r} is not UTF-8") from None


def stream_of_topic(raw: bytes) -> tuple[str, bool]:
    """(host, is the delta stream) of a topic frame of either stream; ``WireError``
    if it is neither."""
    if raw.startswith(DELTA_PREFIX):
        return host_of_topic(raw, DELTA_PREFIX), True
    return host_of_topic(raw), False


def pack(obj: Any) -> bytes:
    """msgpack bytes of a plain document (str keys, lists, ints, floats, None, bool)."""
    return msgpack.packb(obj, use_bin_type=True, datetime=False)


def _no_ext(code: int, data: bytes) -> Any:
    raise WireError(f"msgpack ext type {code} is not allowed")


def _depth(obj: Any, limit: int) -> None:
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            raise WireError(f"message nests deeper than {limit} levels")
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)


def unpack(payload: bytes, *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
           max_depth: int | None = None) -> Any:
    """Strictly decode one msgpack document of at most ``max_bytes`` bytes (and at most
    ``max_depth`` levels deep when given)."""
    size = len(payload)
    if size > max_bytes:
        raise WireError(f"message of {size} bytes is over the limit of {max_bytes} bytes")
    if size == 0:
        raise WireError("empty message")
    # A big snapshot is ~50k new containers: keep the cyclic collector from running
    # (repeatedly, over the caller's whole heap) in the middle of building them.
    pause_gc = size >= GC_PAUSE_BYTES and gc.isenabled()
    if pause_gc:
        gc.disable()
    try:
        obj = msgpack.unpackb(payload, **_unpack_options(size))
    except Exception as exc:
        raise _wire_error(exc) from None
    finally:
        if pause_gc:
            gc.enable()
    if max_depth is not None:
        _depth(obj, max_depth)
    return obj


def _unpack_options(size: int) -> dict[str, Any]:
    return {"raw": False, "strict_map_key": True, "use_list": True, "ext_hook": _no_ext,
            "timestamp": 0, "max_str_len": size, "max_bin_len": size,
            "max_array_len": size, "max_map_len": size, "max_ext_len": 0}


def _wire_error(exc: Exception) -> Exception:
    """The ``WireError`` for an exception raised while unpacking (others pass through)."""
    if isinstance(exc, WireError):
        return exc
    if isinstance(exc, msgpack.ExtraData):
        return WireError("trailing bytes after the msgpack document")
    if isinstance(exc, msgpack.StackError):
        return WireError("message nests deeper than msgpack allows")
    if isinstance(exc, UnicodeDecodeError):
        return WireError("a string is not valid UTF-8")
    if isinstance(exc, ValueError | TypeError):  # FormatError, bad map keys, truncation...
        text = str(exc) or type(exc).__name__
        if "max_ext_len" in text:
            text = "msgpack ext types are not allowed"
        return WireError(f"not valid msgpack: {text}")
    return exc


# --- packed parts: the unchanged topology is neither packed nor decoded again ---------

#: Snapshot keys whose packed bytes the publisher keeps while the value is the same
#: object (the daemon builds a new topology dict on every re-probe and a new usage dict
#: on every change, never edits one; it compares the usage bytes the cache packed).
PACK_CACHED_KEYS = ("topology", "usage")
#: Snapshot keys whose compressed bytes the publisher keeps too (see ``zlib_chunks``).
DEFLATE_CACHED_KEYS = ("topology",)
#: Snapshot keys packed in blocks (see ``PackCache.chunks``): their lists under
#: ``BLOCK_LISTS`` are packed element by element and deflated ``BLOCK_ELEMENTS`` at a time.
BLOCK_CACHED_KEYS = ("usage",)
BLOCK_LISTS = ("threads", "guests")
BLOCK_ELEMENTS = 128
#: Snapshot keys whose decoded value a subscriber reuses while their bytes are unchanged.
REUSE_KEYS = ("topology", "config")
#: Snapshot keys whose lists a subscriber rebuilds from the previous snapshot's elements.
ELEMENT_REUSE_KEYS = ("usage",)

#: Chunk tag of a block of list elements (its deflate segment is kept by content).
BLOCK = "\0block"


class PackCache:
    """What the publisher keeps between messages so that an event costs only its change.

    - the packed bytes of the last value seen under each of ``keys`` (by identity);
    - for ``deflate_keys`` also those bytes as an independent raw-deflate segment;
    - for ``block_keys`` (the usage) the bytes as chunks: a list under ``BLOCK_LISTS``
      (``threads``, ``guests``) is packed element by element, keeping each element's
      bytes while it is the same object (the tracker hands over the same dict for an
      unchanged entry), and its elements are grouped ``BLOCK_ELEMENTS`` at a time into
      blocks whose deflate segments are kept by content. On a 448-thread host with 200
      guests one guest's change then re-packs a few entries and deflates a few blocks
      instead of 210 KiB.
    """

    def __init__(self, keys: Sequence[str] = PACK_CACHED_KEYS,
                 deflate_keys: Sequence[str] = DEFLATE_CACHED_KEYS,
                 block_keys: Sequence[str] = BLOCK_CACHED_KEYS) -> None:
        self.keys = tuple(keys)
        self.deflate_keys = tuple(deflate_keys)
        self.block_keys = tuple(block_keys)
        self.parts: dict[str, tuple[Any, bytes]] = {}
        self.deflated: dict[str, tuple[bytes, bytes]] = {}  # key: (raw, segment)
        self.chunked: dict[str, tuple[Any, list[tuple[bytes, str | None]]]] = {}
        self.elements: dict[int, tuple[Any, bytes]] = {}  # id: (element, its bytes)
        self.blocks: dict[bytes, bytes] = {}  # block bytes: their deflate segment

    def packed(self, key: str, value: Any) -> bytes:
        if key not in self.keys:
            return pack(value)
        hit = self.parts.get(key)
        if hit is not None and hit[0] is value:
            return hit[1]
        if key in self.block_keys and isinstance(value, Mapping):
            chunks = self._block_chunks(value)
            self.chunked[key] = (value, chunks)
            raw = b"".join(c for c, _ in chunks)
        else:
            raw = pack(value)
        self.parts[key] = (value, raw)  # the value is held: its id cannot be reused
        return raw

    def chunks(self, key: str, value: Any) -> list[tuple[bytes, str | None]]:
        """``packed(key, value)`` as chunks (blocks tagged ``BLOCK``), or as one chunk."""
        raw = self.packed(key, value)
        hit = self.chunked.get(key)
        if hit is not None and hit[0] is value:
            return hit[1]
        return [(raw, key if key in self.deflate_keys else None)]

    def segment(self, key: str, raw: bytes) -> bytes:
        """``raw`` deflated on its own (see ``zlib_chunks``), kept while ``raw`` is."""
        hit = self.deflated.get(key)
        if hit is not None and hit[0] is raw:
            return hit[1]
        seg = _deflate_segment(raw, final=False)
        self.deflated[key] = (raw, seg)
        return seg

    def _block_chunks(self, data: Mapping[str, Any]) -> list[tuple[bytes, str | None]]:
        packer = msgpack.Packer(use_bin_type=True, datetime=False)
        old, new = self.elements, {}
        chunks: list[tuple[bytes, str | None]] = []
        run = [packer.pack_map_header(len(data))]
        for key, value in data.items():
            run.append(packer.pack(key))
            if key not in BLOCK_LISTS or value.__class__ is not list:
                run.append(packer.pack(value))
                continue
            run.append(packer.pack_array_header(len(value)))
            chunks.append((b"".join(run), None))
            run = []
            for start in range(0, len(value), BLOCK_ELEMENTS):
                block = []
                for item in value[start:start + BLOCK_ELEMENTS]:
                    hit = old.get(id(item))
                    raw = hit[1] if hit is not None and hit[0] is item else packer.pack(item)
                    new[id(item)] = (item, raw)  # held: ids stay unique while kept
                    block.append(raw)
                chunks.append((b"".join(block), BLOCK))
        chunks.append((b"".join(run), None))
        self.elements = new
        return chunks


def pack_map_chunks(data: Mapping[str, Any], cache: PackCache
                    ) -> list[tuple[bytes, str | None]]:
    """``pack(data)`` as consecutive chunks: each value of ``cache.deflate_keys`` is a
    chunk of its own, tagged with its key, and each block of a ``cache.block_keys``
    value one tagged ``BLOCK``; the bytes in between are joined, untagged."""
    packer = msgpack.Packer(use_bin_type=True, datetime=False)
    chunks: list[tuple[bytes, str | None]] = []
    run = [packer.pack_map_header(len(data))]
    for key, value in data.items():
        run.append(packer.pack(key))
        for raw, tag in cache.chunks(key, value):
            if tag is None:
                run.append(raw)
            else:
                chunks.append((b"".join(run), None))
                chunks.append((raw, tag))
                run = []
    chunks.append((b"".join(run), None))
    return chunks


def pack_map(data: Mapping[str, Any], cache: PackCache | None = None) -> bytes:
    """``pack(data)`` for a map, byte for byte, taking cached parts from ``cache``:
    a map header, then each packed key followed by its packed value."""
    if cache is None:
        return pack(data)
    return b"".join(c for c, _ in pack_map_chunks(data, cache))


#: zlib stream header: deflate, 32 KiB window, "fastest" level (RFC 1950).
_ZLIB_HEADER = b"\x78\x01"


def _deflate_segment(raw: bytes, *, final: bool) -> bytes:
    """``raw`` as raw deflate blocks from a fresh compressor (no reference to earlier
    data), ending byte-aligned (sync flush) or with the final block."""
    c = zlib.compressobj(1, zlib.DEFLATED, -15)
    return c.compress(raw) + c.flush(zlib.Z_FINISH if final else zlib.Z_SYNC_FLUSH)


def zlib_chunks(chunks: list[tuple[bytes, str | None]], cache: PackCache) -> bytes:
    """One valid zlib stream of the joined chunks (``zlib.decompress`` gives them back):
    a header, each chunk as independent deflate blocks (the tagged ones taken from
    ``cache``: by key, or for ``BLOCK`` chunks by their bytes), the last one final, then
    the Adler-32 of everything. Block segments not used by this message are dropped."""
    out = [_ZLIB_HEADER]
    adler = 1
    last = len(chunks) - 1
    old_blocks, blocks = cache.blocks, {}
    for i, (raw, key) in enumerate(chunks):
        adler = zlib.adler32(raw, adler)
        if key == BLOCK and i != last:
            seg = old_blocks.get(raw)
            if seg is None:
                seg = _deflate_segment(raw, final=False)
            blocks[raw] = seg
            out.append(seg)
        elif key is not None and i != last:
            out.append(cache.segment(key, raw))
        elif raw or i == last:
            out.append(_deflate_segment(raw, final=i == last))
    cache.blocks = blocks
    out.append(adler.to_bytes(4, "big"))
    return b"".join(out)


class DecodeCache:
    """Per host on the receiving side, from the last snapshot accepted:

    - the decoded value of each of ``keys`` (``topology``, ``config``) with its exact
      bytes; a value whose bytes are the same is taken from here instead of being
      decoded again (skipping and comparing 85 KiB costs a tenth of decoding it);
    - for each list inside each of ``element_keys`` (``usage``: threads, guests, cells,
      caches, ...), its elements by their exact bytes; an element with the same bytes is
      taken from here (the lookup compares the bytes themselves).

    So what a caller gets is always what the bytes say: no field the sender chooses can
    make it reuse a stale value. Reused objects are shared between snapshots."""

    def __init__(self, keys: Sequence[str] = REUSE_KEYS,
                 element_keys: Sequence[str] = ELEMENT_REUSE_KEYS,
                 shared: SharedDecoded | None = None) -> None:
        self.keys = tuple(keys)
        self.element_keys = tuple(element_keys)
        self.parts: dict[str, tuple[bytes, Any]] = {}
        self.elements: dict[tuple[str, str], dict[bytes, Any]] = {}
        self.shared = shared
        self.hits = 0
        self.misses = 0


#: Entries a ``SharedDecoded`` holds at most; when full it starts again empty (the hosts'
#: own caches keep what they use; only the sharing of new decodes restarts).
MAX_SHARED_DECODED = 200_000
#: Parts and elements shorter than this are not shared (not worth a table entry).
SHARED_MIN_BYTES = 64


class SharedDecoded:
    """Decoded values by their exact bytes, shared by the ``DecodeCache`` of every host
    of one subscriber: hosts of one shape share one decoded topology and config, and
    equal usage elements (a free thread's entry) are one object fleet-wide. As with
    ``DecodeCache``, only the bytes decide: a value is what its bytes decode to."""

    def __init__(self, max_entries: int = MAX_SHARED_DECODED) -> None:
        self.max_entries = max_entries
        self.values: dict[bytes, tuple[bytes, Any]] = {}
        self.hits = 0
        self.resets = 0

    def get(self, raw: bytes) -> tuple[bytes, Any] | None:
        """(the table's own copy of ``raw``, its value), or None."""
        hit = self.values.get(raw)
        if hit is not None:
            self.hits += 1
        return hit

    def put(self, raw: bytes, value: Any) -> None:
        if len(raw) < SHARED_MIN_BYTES:
            return
        if len(self.values) >= self.max_entries:
            self.values = {}
            self.resets += 1
        self.values[raw] = (raw, value)


def _is_map(first: int) -> bool:
    return 0x80 <= first <= 0x8F or first in (0xDE, 0xDF)


def _is_array(first: int) -> bool:
    return 0x90 <= first <= 0x9F or first in (0xDC, 0xDD)


def _str_key(key: Any) -> str:
    if not isinstance(key, str):
        raise WireError(f"not valid msgpack: {type(key).__name__} is not allowed for map "
                        "key when strict_map_key=True")
    return key


def unpack_map(payload: bytes, cache: DecodeCache, *,
               max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> Any:
    """``unpack(payload)``, reusing values from ``cache`` (see ``DecodeCache``); anything
    that is not a map at the top is decoded by ``unpack`` as usual."""
    size = len(payload)
    if size > max_bytes:
        raise WireError(f"message of {size} bytes is over the limit of {max_bytes} bytes")
    if size == 0 or not _is_map(payload[0]):
        return unpack(payload, max_bytes=max_bytes)
    options = _unpack_options(size)
    unpacker = msgpack.Unpacker(None, max_buffer_size=size, **options)
    unpacker.feed(payload)
    view = memoryview(payload)
    shared = cache.shared
    pause_gc = size >= GC_PAUSE_BYTES and gc.isenabled()
    if pause_gc:
        gc.disable()
    hits = misses = 0
    try:
        out: dict[str, Any] = {}
        seen: dict[str, tuple[bytes, Any]] = {}
        elements: dict[tuple[str, str], dict[bytes, Any]] = {}
        for _ in range(unpacker.read_map_header()):
            key = _str_key(unpacker.unpack())
            start = unpacker.tell()
            if key in cache.element_keys and start < size and _is_map(payload[start]):
                inner: dict[str, Any] = {}
                for _ in range(unpacker.read_map_header()):
                    sub = _str_key(unpacker.unpack())
                    at = unpacker.tell()
                    if at >= size or not _is_array(payload[at]):
                        inner[sub] = unpacker.unpack()
                        continue
                    known_items = cache.elements.get((key, sub), {})
                    items: dict[bytes, Any] = {}
                    values = []
                    for _ in range(unpacker.read_array_header()):
                        a = unpacker.tell()
                        unpacker.skip()
                        raw = view[a:unpacker.tell()].tobytes()
                        value = known_items.get(raw)
                        if value is None:
                            value = items.get(raw)
                        if value is None and shared is not None:
                            hit = shared.get(raw)
                            if hit is not None:
                                raw, value = hit
                        if value is None:
                            value = msgpack.unpackb(raw, **options)
                            misses += 1
                            if shared is not None:
                                shared.put(raw, value)
                        else:
                            hits += 1
                        items[raw] = value
                        values.append(value)
                    inner[sub] = values
                    elements[(key, sub)] = items
                out[key] = inner
                continue
            if key not in cache.keys:
                out[key] = unpacker.unpack()
                continue
            known = cache.parts.get(key)
            unpacker.skip()
            raw = view[start:unpacker.tell()].tobytes()
            if known is not None and raw == known[0]:
                raw, value = known
                hits += 1
            elif shared is not None and (hit := shared.get(raw)) is not None:
                raw, value = hit
                hits += 1
            else:
                value = msgpack.unpackb(raw, **options)
                misses += 1
                if shared is not None:
                    shared.put(raw, value)
            out[key] = value
            seen[key] = (raw, value)
        if unpacker.tell() != size:
            raise WireError("trailing bytes after the msgpack document")
    except msgpack.OutOfData:
        raise WireError("not valid msgpack: truncated data") from None
    except Exception as exc:
        raise _wire_error(exc) from None
    finally:
        if pause_gc:
            gc.enable()
    # only a fully accepted message updates the cache
    cache.parts, cache.elements = seen, elements
    cache.hits += hits
    cache.misses += misses
    return out


# --- stream messages -------------------------------------------------------------------

def make_body(kind: str, host: str, epoch: str, seq: int, time: float,
              data: Mapping[str, Any] | None) -> dict[str, Any]:
    """The body of one stream message (a heartbeat has ``data: None``)."""
    return {"v": VERSION, "kind": kind, "host": host, "epoch": epoch, "seq": seq,
            "time": time, "data": data}


def encode_stream(body: Mapping[str, Any], *,
                  compress_min: int | None = COMPRESS_MIN_BYTES,
                  cache: PackCache | None = None) -> list[bytes]:
    """The two frames ``[topic, msgpack(body)]`` of one stream message; a large
    snapshot's ``data`` is compressed (see the module docstring). ``cache`` keeps the
    packed topology between messages (the bytes are the same as without it)."""
    data = body.get("data")
    if data is not None and compress_min is not None:
        if cache is None:
            packed = pack(data)
            if len(packed) >= compress_min:
                return [topic(body["host"]),
                        pack({**body, "data": zlib.compress(packed, 1), "enc": "zlib"})]
        else:
            chunks = pack_map_chunks(data, cache)
            if sum(len(c) for c, _ in chunks) >= compress_min:
                return [topic(body["host"]),
                        pack({**body, "data": zlib_chunks(chunks, cache), "enc": "zlib"})]
    return [topic(body["host"]), pack(body)]


def inflate(body: dict[str, Any], max_bytes: int,
            cache: DecodeCache | None = None) -> dict[str, Any]:
    """Replace a compressed body's ``data`` by the decoded map (in place); with ``cache``,
    unchanged parts are reused (``unpack_map``)."""
    enc = body.pop("enc", None)
    if enc is None:
        return body
    if enc not in ENCODINGS:
        raise WireError(f"body.enc = {enc!r}: must be one of {', '.join(ENCODINGS)}")
    raw = body.get("data")
    if not isinstance(raw, bytes):
        raise WireError("body.data of a zlib body must be bin")
    d = zlib.decompressobj()
    try:
        packed = d.decompress(raw, max_bytes + 1)
    except zlib.error as exc:
        raise WireError(f"body.data is not valid zlib: {exc}") from None
    if len(packed) > max_bytes or d.unconsumed_tail:
        raise WireError(f"body.data inflates to over the limit of {max_bytes} bytes")
    if not d.eof:
        raise WireError("body.data is truncated zlib")
    if cache is None:
        body["data"] = unpack(packed, max_bytes=max_bytes)
    else:
        body["data"] = unpack_map(packed, cache, max_bytes=max_bytes)
    return body


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_body(body: Any, kinds: Sequence[str] = KINDS) -> dict[str, Any]:
    """Validate a decoded stream body (or a snapshot reply); ``WireError`` names the field.
    ``kinds``: those of the stream it came on (``DELTA_KINDS`` on the delta stream)."""
    if not isinstance(body, dict):
        raise WireError(f"body is a {type(body).__name__}, not a map")
    if body.get("v") != VERSION:
        raise WireError(f"body.v = {body.get('v')!r}: only version {VERSION} is understood")
    kind = body.get("kind")
    if kind not in kinds:
        raise WireError(f"body.kind = {kind!r}: must be one of {', '.join(kinds)}")
    for key in ("host", "epoch"):
        if not isinstance(body.get(key), str) or not body[key]:
            raise WireError(f"body.{key} = {body.get(key)!r}: must be a non-empty string")
    seq = body.get("seq")
    if not _is_int(seq) or not 0 <= seq <= MAX_SEQ:
        raise WireError(f"body.seq = {seq!r}: must be an integer from 0 to {MAX_SEQ}")
    t = body.get("time")
    if not isinstance(t, int | float) or isinstance(t, bool) or not math.isfinite(t):
        raise WireError(f"body.time = {t!r}: must be a number")
    data = body.get("data")
    if kind in ("snapshot", "delta") and not isinstance(data, dict):
        raise WireError(f"body.data of a {kind} must be a map")
    if kind == "delta" and seq < 2:
        raise WireError(f"body.seq = {seq} of a delta: must be at least 2 (a delta "
                        "applies to seq - 1)")
    if kind == "heartbeat" and data is not None:
        raise WireError("body.data of a heartbeat must be nil")
    return body


#: The snapshot shape a subscriber checks before it accepts a snapshot (docs/schema.md,
#: "What a subscriber accepts"): ``schema`` is 1 and these top-level maps are present...
SNAPSHOT_MAPS = ("topology", "config", "usage")
#: ... these keys, where present, are lists of maps ...
SNAPSHOT_MAP_LISTS = {
    "topology": ("cells", "cpus", "caches", "pci"),
    "config": ("reserved_hugepages",),
    "usage": ("cells", "threads", "caches", "guests", "claims", "conflicts", "pci",
              "floating_hugepages"),
}
#: ... these are lists (of CPU ids; not checked deeper) ...
SNAPSHOT_LISTS = {"config": ("dedicated_cpus", "shared_cpus", "online_cpus")}
#: ... and these are maps, or nil where marked.
SNAPSHOT_SUBMAPS = {"topology": (("resctrl", True),),
                    "config": (("reserved_memory_kib", False),)}


_DICT_ONLY = frozenset({dict})


def _kind(value: Any) -> str:
    return type(value).__name__


def check_snapshot(data: Any, body: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Check a snapshot's structure against schema v1 (not every field: the containers a
    reader walks, see ``SNAPSHOT_*``), and that its ``host``, ``epoch`` and ``seq``, where
    present, are those of the message ``body``; ``WireError`` names the first key found
    wrong. The lists are walked in C, a small part of decoding the snapshot (docs/daemon.md
    §3.2 has the figures)."""
    if not isinstance(data, dict):
        raise WireError(f"data is a {_kind(data)}, not a map")
    schema = data.get("schema")
    if not _is_int(schema) or schema != 1:
        raise WireError(f"data.schema = {schema!r}: only schema 1 is understood")
    for key in SNAPSHOT_MAPS:
        if key not in data:
            raise WireError(f"data.{key} is missing (a snapshot has "
                            f"{', '.join(SNAPSHOT_MAPS)})")
        if not isinstance(data[key], dict):
            raise WireError(f"data.{key} is a {_kind(data[key])}, not a map")
    for part, keys in SNAPSHOT_MAP_LISTS.items():
        for key in keys:
            items = data[part].get(key)
            if items is None and key not in data[part]:
                continue
            if not isinstance(items, list):
                raise WireError(f"data.{part}.{key} is a {_kind(items)}, not a list")
            if set(map(type, items)) <= _DICT_ONLY:  # the usual case, walked in C
                continue
            for i, item in enumerate(items):
                if not isinstance(item, dict):
                    raise WireError(f"data.{part}.{key}[{i}] is a {_kind(item)}, not a map")
    for part, keys in SNAPSHOT_LISTS.items():
        for key in keys:
            if key in data[part] and not isinstance(data[part][key], list):
                raise WireError(f"data.{part}.{key} is a {_kind(data[part][key])}, "
                                "not a list")
    for part, submaps in SNAPSHOT_SUBMAPS.items():
        for key, nil_ok in submaps:
            if key not in data[part]:
                continue
            value = data[part][key]
            if not isinstance(value, dict) and not (nil_ok and value is None):
                raise WireError(f"data.{part}.{key} is a {_kind(value)}, not a map"
                                + (" or nil" if nil_ok else ""))
    if "agent" in data and not isinstance(data["agent"], dict):
        raise WireError(f"data.agent is a {_kind(data['agent'])}, not a map")
    if body is not None:
        for key in ("host", "epoch", "seq"):
            if key in data and (data[key] != body[key] or _kind(data[key]) != _kind(
                    body[key])):
                raise WireError(f"data.{key} = {data[key]!r} but the message says "
                                f"{body[key]!r}")
    return data


def decode_stream(frames: Sequence[bytes], *,
                  max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                  cache: DecodeCache | None = None) -> dict[str, Any]:
    """Decode and validate one received stream message (a list of frames). ``cache``
    (one per host) lets a compressed snapshot reuse the previous one's unchanged
    topology and config objects; the result is equal to a decode without it."""
    if len(frames) != 2:
        raise WireError(f"stream message has {len(frames)} frames, expected 2")
    host, delta_stream = stream_of_topic(bytes(frames[0]))
    body = unpack(bytes(frames[1]), max_bytes=max_bytes)
    if isinstance(body, dict) and "enc" in body:
        if body.get("kind") == "delta":
            raise WireError("body.enc on a delta: deltas are never compressed")
        inflate(body, max_bytes, cache)
    body = check_body(body, DELTA_KINDS if delta_stream else KINDS)
    if body["host"] != host:
        raise WireError(f"topic names host {host!r} but the body says {body['host']!r}")
    return body


# --- deltas (the delta stream, docs/wire.md §12) ---------------------------------------

def _same(a: Any, b: Any) -> bool:
    return a is b or (type(a) is type(b) and a == b)


def _splices(old: list[Any], new: list[Any]) -> list[list[Any]]:
    """``[start, delete, items]`` steps turning ``old`` into ``new`` (applied in order,
    ``start`` counting in the list as already patched). Elements are matched by identity
    (the agent hands over the same object for an unchanged entry) or, at the same
    position, by equality; kept elements must stay in order, else one step replaces
    everything between the common prefix and suffix."""
    if len(old) == len(new) and all(a is b for a, b in zip(old, new, strict=True)):
        return []
    old_ids = {id(x) for x in old}
    new_ids = {id(x) for x in new}
    out: list[list[Any]] = []
    i = j = 0
    while i < len(old) or j < len(new):
        if i < len(old) and j < len(new) and _same(old[i], new[j]):
            i += 1
            j += 1
            continue
        d = i  # old elements that are gone (or changed)
        while d < len(old) and id(old[d]) not in new_ids:
            d += 1
        k = j  # new elements (or changed ones)
        while k < len(new) and id(new[k]) not in old_ids:
            k += 1
        if d == i and k == j:  # both survive elsewhere: kept elements out of order
            return _wide_splice(old, new)
        out.append([j, d - i, new[j:k]])
        i, j = d, k
    return out


def _wide_splice(old: list[Any], new: list[Any]) -> list[list[Any]]:
    p = 0
    while p < min(len(old), len(new)) and _same(old[p], new[p]):
        p += 1
    q = 0
    while q < min(len(old), len(new)) - p and _same(old[-1 - q], new[-1 - q]):
        q += 1
    return [[p, len(old) - p - q, new[p:len(new) - q]]]


def _part_patch(old: Mapping[str, Any], new: Mapping[str, Any], *, lists: bool
                ) -> dict[str, Any]:
    patch: dict[str, Any] = {}
    sets = {}
    splice = {}
    for key, value in new.items():
        if key in DELTA_HEADER_KEYS and not lists:
            continue
        before = old.get(key, _MISSING)
        if before is _MISSING or not _same(before, value):
            if lists and value.__class__ is list and before.__class__ is list:
                splice[key] = _splices(before, value)
            else:
                sets[key] = value
    gone = [k for k in old if k not in new]
    if sets:
        patch["set"] = sets
    if gone:
        patch["del"] = gone
    if splice:
        patch["splice"] = splice
    return patch


_MISSING = object()


def make_delta(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """The ``data`` of a delta message turning snapshot ``old`` into ``new`` (the next
    ``seq``): ``{set: {key: value}, del: [key], parts: {usage: {set, del, splice}}}``,
    each present only when not empty. Values are compared by identity first (the agent
    hands over the same objects for what did not change), then by equality."""
    top = _part_patch(old, new, lists=False)
    parts = {}
    for part in DELTA_PARTS:
        a, b = old.get(part), new.get(part)
        sets = top.get("set", {})
        if part in sets and isinstance(a, dict) and isinstance(b, dict):
            del sets[part]
            parts[part] = _part_patch(a, b, lists=True)
    if "set" in top and not top["set"]:
        del top["set"]
    if parts:
        top["parts"] = parts
    return top


def _patch_keys(where: str, patch: Any, known: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(patch, dict):
        raise WireError(f"{where} is a {_kind(patch)}, not a map")
    extra = sorted(set(patch) - set(known))
    if extra:
        raise WireError(f"{where} has unknown keys {extra[:4]} (known: {', '.join(known)})")
    return patch


def _apply_part(where: str, held: dict[str, Any], patch: dict[str, Any],
                splice_ok: bool) -> dict[str, Any]:
    out = dict(held)
    sets = patch.get("set", {})
    if not isinstance(sets, dict):
        raise WireError(f"{where}.set is a {_kind(sets)}, not a map")
    for key in sets:
        if not splice_ok and key in DELTA_HEADER_KEYS:
            raise WireError(f"{where}.set.{key}: the message's own field, not settable")
    gone = patch.get("del", [])
    if not isinstance(gone, list):
        raise WireError(f"{where}.del is a {_kind(gone)}, not a list")
    for key in gone:
        if not isinstance(key, str) or key not in out:
            raise WireError(f"{where}.del: {str(key)[:64]!r} is not a key of the held "
                            "snapshot")
        del out[key]
    out.update(sets)
    splices = patch.get("splice", {})
    if not isinstance(splices, dict):
        raise WireError(f"{where}.splice is a {_kind(splices)}, not a map")
    for key, steps in splices.items():
        items = out.get(key)
        if not isinstance(items, list):
            raise WireError(f"{where}.splice.{key}: the held value is not a list")
        if not isinstance(steps, list):
            raise WireError(f"{where}.splice.{key} is a {_kind(steps)}, not a list")
        items = list(items)
        for n, step in enumerate(steps):
            if not (isinstance(step, list) and len(step) == 3 and _is_int(step[0])
                    and _is_int(step[1]) and isinstance(step[2], list)):
                raise WireError(f"{where}.splice.{key}[{n}]: must be [start, delete, "
                                "[items]]")
            start, delete, new = step
            if not 0 <= start <= len(items) or not 0 <= delete <= len(items) - start:
                raise WireError(f"{where}.splice.{key}[{n}] = [{start}, {delete}, ...]: "
                                f"outside the list of {len(items)}")
            items[start:start + delete] = new
        out[key] = items
    return out


def apply_delta(held: Mapping[str, Any], delta: Any, body: Mapping[str, Any]
                ) -> dict[str, Any]:
    """The snapshot ``held`` (of ``seq - 1``) with ``delta`` (a delta message's
    ``data``) applied, and the body's ``host``, ``epoch``, ``seq`` and ``time``;
    ``held`` is not changed (unchanged parts are shared). ``WireError`` names what in
    the delta does not fit the held snapshot; the caller checks the result with
    ``check_snapshot``."""
    _patch_keys("delta", delta, ("set", "del", "parts"))
    out = _apply_part("delta", dict(held), delta, splice_ok=False)
    parts = delta.get("parts", {})
    if not isinstance(parts, dict):
        raise WireError(f"delta.parts is a {_kind(parts)}, not a map")
    for part, patch in parts.items():
        if part not in DELTA_PARTS:
            raise WireError(f"delta.parts.{str(part)[:64]}: only {', '.join(DELTA_PARTS)} "
                            "can be patched")
        _patch_keys(f"delta.parts.{part}", patch, ("set", "del", "splice"))
        if not isinstance(out.get(part), dict):
            raise WireError(f"delta.parts.{part}: the held {part} is not a map")
        out[part] = _apply_part(f"delta.parts.{part}", out[part], patch, splice_ok=True)
    for key in DELTA_HEADER_KEYS:
        out[key] = body[key]
    return out


# --- requests and replies --------------------------------------------------------------

def error_reply(message: str) -> dict[str, Any]:
    return {"v": VERSION, "ok": False, "error": message}


def ok_reply(**fields: Any) -> dict[str, Any]:
    return {"v": VERSION, "ok": True, **fields}


def decode_request(payload: bytes, *, max_bytes: int = MAX_REQUEST_BYTES) -> dict[str, Any]:
    """Decode one request: a map with a string ``op``; ``WireError`` otherwise."""
    req = unpack(payload, max_bytes=max_bytes, max_depth=MAX_DEPTH)
    if not isinstance(req, dict):
        raise WireError(f"request is a {type(req).__name__}, not a map with an 'op'")
    op = req.get("op")
    if not isinstance(op, str) or not op:
        raise WireError(f"request.op = {op!r}: must be a non-empty string")
    return req


def decode_reply(payload: bytes, *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
                 ) -> dict[str, Any]:
    """Decode one reply: a map with ``v`` and a boolean ``ok``."""
    rep = unpack(payload, max_bytes=max_bytes)
    if not isinstance(rep, dict) or rep.get("v") != VERSION or not isinstance(
        rep.get("ok"), bool
    ):
        raise WireError("reply is not a {v: 1, ok: bool, ...} map")
    if not rep["ok"] and not isinstance(rep.get("error"), str):
        raise WireError("error reply without an error message")
    return rep


def split_envelope(frames: Sequence[bytes], *, max_envelope: int = 8
                   ) -> tuple[list[bytes], bytes]:
    """Split a ROUTER message into (reply envelope, payload).

    A DEALER client sends ``[payload]`` (ROUTER sees ``[id, payload]``); a REQ client
    sends ``["", payload]`` (ROUTER sees ``[id, "", payload]``). Replies go back with
    the same envelope. Anything else is a ``WireError`` (the envelope is still usable
    for the error reply when it has the identity frame).
    """
    if len(frames) < 2:
        raise WireError("request without a payload frame")
    if len(frames) > max_envelope + 1:
        raise WireError(f"request has {len(frames)} frames; at most {max_envelope + 1}")
    envelope = [bytes(f) for f in frames[:-1]]
    return envelope, bytes(frames[-1])
