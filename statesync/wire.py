"""Frame codec of the replication channel: msgpack arrays, strictly checked.

A frame is `[version, type, flags, seq, payload]` (one ZeroMQ message each).
`seq` numbers the *stream* frames (DATA, RESYNC_BEGIN, RESYNC_END) that the
receiver applies in order; control frames carry seq 0 or, for KEEPALIVE, the
sender's last stream seq (so a receiver notices losses at the tail, as
conntrack-tools' ftfw ALIVE message does).

Everything arriving from the network goes through `decode`, which raises
`WireError` for anything malformed or oversized; callers drop and count it.
Type codes 1..31 belong to conntrack sync; 32..63 are kept for config sync,
which adds its own payload checks with `register_type`.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import msgpack

WIRE_VERSION = 1

# frame types (conntrack sync); 32..63 reserved for config sync (issue 4)
HELLO = 1
HELLO_OK = 2
REFUSE = 3
DATA = 4
ACK = 5
NACK = 6
RESYNC_REQ = 7
RESYNC_BEGIN = 8
RESYNC_END = 9
KEEPALIVE = 10
CONFIG_TYPES = range(32, 64)

STREAM_TYPES = frozenset({DATA, RESYNC_BEGIN, RESYNC_END})

# flags (bit set; unknown bits are ignored so later versions can add some)
FLAG_SNAPSHOT = 0x01  # DATA frame of snapshot records (counted against RESYNC_END's count)

# DATA record ops
OP_UPSERT = 1
OP_DELETE = 2

# limits: a frame past these is dropped, whatever it claims to be
MAX_FRAME_BYTES = 8 << 20
MAX_RECORDS = 65536
MAX_KEY_BYTES = 512  # a CTA_TUPLE_ORIG nest is ~60 bytes (IPv6 + ports)
MAX_ATTRS_BYTES = 4096  # a whole conntrack message is well under 1 KiB
MAX_TEXT = 255
MAX_SEQ = (1 << 64) - 1
FAMILIES = frozenset({socket.AF_INET, socket.AF_INET6})

# per-record msgpack overhead estimate used for batch sizing (array hdr, 2 ints, 2 bin hdrs)
RECORD_OVERHEAD = 10


class WireError(ValueError):
    """A frame that is not a valid protocol frame: drop it and count it."""


@dataclass(frozen=True, slots=True)
class Frame:
    type: int
    seq: int = 0
    payload: Any = None
    flags: int = 0


@dataclass(frozen=True, slots=True)
class Hello:
    software_version: str
    hostname: str
    role: str
    boot_id: str


Record = tuple  # (op, family, key: bytes, attrs: bytes); attrs is b"" for a delete


# -- encoding -------------------------------------------------------------------------------

def encode(frame: Frame) -> bytes:
    payload = frame.payload
    if frame.type == HELLO:
        payload = (payload.software_version, payload.hostname, payload.role, payload.boot_id)
    # tuples pack as msgpack arrays: DATA records go out without copying
    return msgpack.packb([WIRE_VERSION, frame.type, frame.flags, frame.seq, payload], use_bin_type=True)


def data_frame(seq: int, records: Iterable[Record], flags: int = 0) -> Frame:
    return Frame(DATA, seq, tuple(records), flags)


def record_size(key: bytes, attrs: bytes) -> int:
    """Approximate encoded size of one record (for batch sizing without encoding twice)."""
    return len(key) + len(attrs) + RECORD_OVERHEAD


# -- decoding -------------------------------------------------------------------------------


def _is_uint(v: Any, limit: int = MAX_SEQ) -> bool:
    return type(v) is int and 0 <= v <= limit


def _text(v: Any, what: str) -> str:
    if type(v) is not str or len(v) > MAX_TEXT:
        raise WireError(f"{what}: text of at most {MAX_TEXT} chars expected")
    return v


def _check_none(payload: Any) -> None:
    if payload is not None:
        raise WireError("payload must be nil")


def _check_hello(payload: Any) -> Hello:
    if type(payload) is not tuple or len(payload) != 4:
        raise WireError("HELLO: 4 fields expected")
    return Hello(*(_text(v, name) for v, name in zip(payload, ("version", "hostname", "role", "boot_id"))))


def _check_reason(payload: Any) -> str:
    return _text(payload, "REFUSE reason")


def _check_seq(payload: Any) -> int:
    if not _is_uint(payload):
        raise WireError("sequence number expected")
    return payload


def _check_range(payload: Any) -> tuple[int, int]:
    if type(payload) is not tuple or len(payload) != 2 or not all(_is_uint(v) for v in payload):
        raise WireError("NACK: [from, to] expected")
    first, last = payload
    if first > last:
        raise WireError("NACK: from > to")
    return payload


def _check_resync_end(payload: Any) -> tuple[int, int]:
    if type(payload) is not tuple or len(payload) != 2 or not all(_is_uint(v) for v in payload):
        raise WireError("RESYNC_END: [id, count] expected")
    return payload


def _check_records(payload: Any) -> tuple[Record, ...]:
    if type(payload) is not tuple:
        raise WireError("DATA: record list expected")
    if len(payload) > MAX_RECORDS:
        raise WireError("DATA: too many records")
    if payload and _records_fine(payload):
        return payload
    for rec in payload:  # something is off: find it and say what
        # one tight check per record: this is the hot path of the Backup
        if type(rec) is not tuple or len(rec) != 4:
            raise WireError("DATA: record must be [op, family, key, attrs]")
        op, family, key, attrs = rec
        if family not in FAMILIES or type(family) is not int:
            raise WireError("DATA: unknown address family")
        if type(key) is not bytes or not 0 < len(key) <= MAX_KEY_BYTES:
            raise WireError("DATA: bad key")
        if type(attrs) is not bytes or len(attrs) > MAX_ATTRS_BYTES:
            raise WireError("DATA: bad attrs")
        if type(op) is not int:
            raise WireError("DATA: unknown op")
        if op == OP_UPSERT:
            if not attrs:
                raise WireError("DATA: upsert without attrs")
        elif op != OP_DELETE:
            raise WireError("DATA: unknown op")
    return payload


_UPSERT_ONLY = frozenset({OP_UPSERT})
_OPS = frozenset({OP_UPSERT, OP_DELETE})
_INT, _BYTES = frozenset({int}), frozenset({bytes})


def _records_fine(payload: tuple) -> bool:
    """The per-record checks of _check_records, column at a time (the Backup's hot path: the
    loops run in C). False sends the frame through the record-by-record walk."""
    if set(map(type, payload)) != {tuple} or set(map(len, payload)) != {4}:
        return False
    ops, families, keys, attrs = zip(*payload)
    if set(map(type, ops)) != _INT or set(map(type, families)) != _INT or not set(families) <= FAMILIES:
        return False
    if set(map(type, keys)) != _BYTES or set(map(type, attrs)) != _BYTES:
        return False
    key_lens, attrs_lens = list(map(len, keys)), list(map(len, attrs))
    if not (0 < min(key_lens) and max(key_lens) <= MAX_KEY_BYTES and max(attrs_lens) <= MAX_ATTRS_BYTES):
        return False
    op_set = set(ops)
    if op_set == _UPSERT_ONLY:
        return min(attrs_lens) > 0
    if not op_set <= _OPS:
        return False
    return all(n for op, n in zip(ops, attrs_lens) if op == OP_UPSERT)


_PAYLOAD_CHECKS: dict[int, Callable[[Any], Any]] = {
    HELLO: _check_hello,
    HELLO_OK: _check_none,
    REFUSE: _check_reason,
    DATA: _check_records,
    ACK: _check_seq,
    NACK: _check_range,
    RESYNC_REQ: _check_none,
    RESYNC_BEGIN: _check_seq,
    RESYNC_END: _check_resync_end,
    KEEPALIVE: _check_none,
}
TYPE_NAMES = {
    HELLO: "HELLO", HELLO_OK: "HELLO_OK", REFUSE: "REFUSE", DATA: "DATA", ACK: "ACK", NACK: "NACK",
    RESYNC_REQ: "RESYNC_REQ", RESYNC_BEGIN: "RESYNC_BEGIN", RESYNC_END: "RESYNC_END", KEEPALIVE: "KEEPALIVE",
}


def register_type(code: int, name: str, check: Callable[[Any], Any]) -> None:
    """Add a frame type (config sync uses 32..63). `check` validates the decoded payload
    (msgpack arrays arrive as tuples) and returns the value to put in Frame.payload."""
    if code not in CONFIG_TYPES:
        raise ValueError(f"frame type {code} outside the reserved range {CONFIG_TYPES}")
    if code in _PAYLOAD_CHECKS:
        raise ValueError(f"frame type {code} already registered")
    _PAYLOAD_CHECKS[code] = check
    TYPE_NAMES[code] = name


def decode(buf: bytes) -> Frame:
    """Parse and check one frame. Raises WireError for anything not a valid frame."""
    if len(buf) > MAX_FRAME_BYTES:
        raise WireError("frame too large")
    try:
        obj = msgpack.unpackb(
            buf,
            use_list=False,
            raw=False,
            strict_map_key=True,
            max_array_len=MAX_RECORDS,
            max_map_len=64,
            max_bin_len=MAX_ATTRS_BYTES,
            max_str_len=MAX_TEXT * 4,  # bytes: MAX_TEXT characters of UTF-8 (checked as chars below)
            max_ext_len=0,
        )
    except WireError:
        raise
    except Exception as e:  # msgpack raises a zoo of types (ExtraData, ValueError, UnicodeDecodeError...)
        raise WireError(f"undecodable: {type(e).__name__}") from None
    if type(obj) is not tuple or len(obj) != 5:
        raise WireError("frame must be a 5-element array")
    version, ftype, flags, seq, payload = obj
    if version != WIRE_VERSION or type(version) is not int:
        raise WireError(f"wire version {version!r} unsupported")
    check = _PAYLOAD_CHECKS.get(ftype) if type(ftype) is int else None
    if check is None:
        raise WireError(f"unknown frame type {ftype!r}")
    if not _is_uint(flags, 0xFF):
        raise WireError("bad flags")
    if not _is_uint(seq):
        raise WireError("bad seq")
    return Frame(ftype, seq, check(payload), flags)
