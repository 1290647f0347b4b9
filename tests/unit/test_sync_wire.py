"""The frame codec: round trips, and every kind of bad input raises WireError (never anything else)."""

import socket

import msgpack
import pytest
from hypothesis import given, settings, strategies as st

from statesync import wire
from statesync.wire import Frame, Hello, WireError

families = st.sampled_from([socket.AF_INET, socket.AF_INET6])
keys = st.binary(min_size=1, max_size=wire.MAX_KEY_BYTES)
upserts = st.tuples(st.just(wire.OP_UPSERT), families, keys, st.binary(min_size=1, max_size=600))
deletes = st.tuples(st.just(wire.OP_DELETE), families, keys, st.just(b""))
records = st.lists(st.one_of(upserts, deletes), max_size=40).map(tuple)
seqs = st.integers(0, wire.MAX_SEQ)
text = st.text(max_size=wire.MAX_TEXT)

frames = st.one_of(
    st.builds(Frame, st.just(wire.DATA), seqs, records, st.integers(0, 255)),
    st.builds(lambda s: Frame(wire.ACK, 0, s), seqs),
    st.builds(lambda a, b: Frame(wire.NACK, 0, (min(a, b), max(a, b))), seqs, seqs),
    st.builds(lambda s, i: Frame(wire.RESYNC_BEGIN, s, i), seqs, seqs),
    st.builds(lambda s, i, n: Frame(wire.RESYNC_END, s, (i, n)), seqs, seqs, seqs),
    st.builds(lambda s: Frame(wire.KEEPALIVE, s), seqs),
    st.just(Frame(wire.RESYNC_REQ)),
    st.just(Frame(wire.HELLO_OK)),
    st.builds(lambda r: Frame(wire.REFUSE, 0, r), text),
    st.builds(lambda *f: Frame(wire.HELLO, 0, Hello(*f)), text, text, text, text),
)


@given(frames)
def test_round_trip(frame):
    assert wire.decode(wire.encode(frame)) == frame


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_random_bytes_never_crash(buf):
    try:
        wire.decode(buf)
    except WireError:
        pass


any_msgpack = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.binary(max_size=20) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=20,
)


@settings(max_examples=300)
@given(st.lists(any_msgpack, min_size=5, max_size=5), st.sampled_from(sorted(wire.TYPE_NAMES)))
def test_structured_garbage_never_crashes(fields, ftype):
    # well-formed msgpack of the right shape but arbitrary contents: the checks must hold
    fields[0] = wire.WIRE_VERSION
    fields[1] = ftype
    try:
        frame = wire.decode(msgpack.packb(fields))
    except WireError:
        return
    assert frame.type == ftype  # accepted only if the payload really fits the type


def pack(*fields):
    return msgpack.packb(list(fields), use_bin_type=True)


@pytest.mark.parametrize(
    "buf, why",
    [
        (pack(2, wire.ACK, 0, 0, 5), "version"),
        (pack(1, 99, 0, 0, None), "unknown frame type"),
        (pack(1, wire.ACK, 0, 0), "5-element"),
        (pack(1, wire.ACK, 256, 0, 1), "flags"),
        (pack(1, wire.ACK, 0, -1, 1), "seq"),
        (pack(1, wire.ACK, 0, 0, True), "sequence"),
        (pack(1, wire.NACK, 0, 0, [5, 4]), "from > to"),
        (pack(1, wire.DATA, 0, 1, [[3, 2, b"k", b"a"]]), "op"),
        (pack(1, wire.DATA, 0, 1, [[1, 7, b"k", b"a"]]), "family"),
        (pack(1, wire.DATA, 0, 1, [[1, 2, b"", b"a"]]), "key"),
        (pack(1, wire.DATA, 0, 1, [[1, 2, "k", b"a"]]), "key"),
        (pack(1, wire.DATA, 0, 1, [[1, 2, b"k", b""]]), "upsert without attrs"),
        (pack(1, wire.DATA, 0, 1, [[1, 2, b"k"]]), "record"),
        (pack(1, wire.DATA, 0, 1, [[1, 2, b"k", b"x" * (wire.MAX_ATTRS_BYTES + 1)]]), "undecodable"),
        (pack(1, wire.HELLO, 0, 0, ["1", "fw1", "master"]), "4 fields"),
        (pack(1, wire.HELLO, 0, 0, ["1", "x" * 300, "master", "b"]), "hostname: text of at most 255"),
        (pack(1, wire.HELLO, 0, 0, ["1", "x" * (4 * wire.MAX_TEXT + 1), "master", "b"]), "undecodable"),
        (pack(1, wire.KEEPALIVE, 0, 0, 1), "nil"),
        (pack(1, wire.ACK, 0, 0, 1) + b"\x00", "undecodable"),
        (b"\xc1", "undecodable"),
        (b"", "undecodable"),
    ],
)
def test_malformed_frames_are_refused(buf, why):
    with pytest.raises(WireError, match=why):
        wire.decode(buf)


def test_caps_record_count_and_frame_size():
    too_many = pack(1, wire.DATA, 0, 1, [[1, 2, b"k", b"a"]] * (wire.MAX_RECORDS + 1))
    with pytest.raises(WireError):
        wire.decode(too_many)
    with pytest.raises(WireError, match="too large"):
        wire.decode(b"\x00" * (wire.MAX_FRAME_BYTES + 1))


def test_config_sync_can_register_its_types():
    with pytest.raises(ValueError):
        wire.register_type(wire.DATA, "X", lambda p: p)  # conntrack range is taken
    code = 63
    if code not in wire.TYPE_NAMES:
        wire.register_type(code, "TEST_CONFIG", lambda p: p if type(p) is bytes else (_ for _ in ()).throw(WireError("bytes")))
    assert wire.decode(pack(1, code, 0, 0, b"diff")).payload == b"diff"
    with pytest.raises(WireError):
        wire.decode(pack(1, code, 0, 0, 5))
    with pytest.raises(ValueError):
        wire.register_type(code, "AGAIN", lambda p: p)


_VALUES = st.one_of(st.integers(-1, 12), st.booleans(), st.binary(max_size=8), st.binary(min_size=500, max_size=600),
                    st.none(), st.text(max_size=3))


@settings(max_examples=400)
@given(st.lists(st.one_of(
    st.tuples(st.sampled_from([wire.OP_UPSERT, wire.OP_DELETE]), st.sampled_from([2, 10]),
              st.binary(min_size=1, max_size=60) | st.binary(min_size=500, max_size=600), st.binary(max_size=80)),
    st.tuples(_VALUES, _VALUES, _VALUES, _VALUES),
    st.tuples(_VALUES, _VALUES, _VALUES)), max_size=6))
def test_the_column_checks_accept_exactly_what_the_record_walk_accepts(records):
    payload = tuple(records)

    def verdict(check):
        try:
            check(payload)
            return True
        except wire.WireError:
            return False

    fast = verdict(wire._check_records)
    original = wire._records_fine
    wire._records_fine = lambda _payload: False  # the record-by-record walk alone
    try:
        assert fast == verdict(wire._check_records)
    finally:
        wire._records_fine = original


def test_a_hello_of_full_length_multibyte_text_round_trips():
    """MAX_TEXT counts characters; UTF-8 takes up to 4 bytes each (found by test_round_trip)."""
    text = "İ" * (wire.MAX_TEXT - 1) + "\U0001F600"
    frame = Frame(wire.HELLO, 0, wire.Hello(text, text, text, text))
    assert wire.decode(wire.encode(frame)) == frame
