"""The hot-path shortcuts (layout plans, Struct reads, slices) give what the plain walks give."""

import socket

from hypothesis import given, settings
from hypothesis import strategies as st

from statesync import ctbuild as cb
from statesync import ctcreate, ctmsg, protocol, wire
from statesync.ctconst import (
    CTA_PROTOINFO, CTA_PROTOINFO_TCP, CTA_PROTOINFO_TCP_FLAGS_ORIGINAL,
    CTA_PROTOINFO_TCP_FLAGS_REPLY, CTA_TUPLE_ORIG, CTA_ZONE, EV_DESTROY, EV_NEW,
)
from statesync.ctnetlink import is_tcp_key
from statesync.filter import EntryFilter, fast_key_fields
from tests.unit.test_ctmsg import entries, tuples


def cold_prepare(attrs):
    ctcreate._PLANS.clear()
    return ctcreate.prepare(attrs)


@settings(max_examples=300)
@given(entries(), entries())
def test_a_learnt_plan_never_changes_what_prepare_gives(a, b):
    # b prepared after a (whose plan may sit under the same length) equals b prepared cold
    _, attrs_a = cb.encode_entry(a[0], a[1], **a[2])
    _, attrs_b = cb.encode_entry(b[0], b[1], **b[2])
    want = cold_prepare(attrs_b)
    ctcreate._PLANS.clear()
    ctcreate.prepare(attrs_a)
    assert ctcreate.prepare(attrs_b) == want


def test_same_length_other_layout_relearns():
    t = cb.Tuple(6, "198.18.0.1", "198.19.0.1", 1000, 80)
    _, with_mark = cb.encode_entry(t, mark=7)
    _, with_zone = cb.encode_entry(t, zone=7)
    assert len(with_mark) == len(with_zone)  # a u32 and a padded u16: both 8 bytes
    want = cold_prepare(with_zone)
    assert ctmsg.zone_of(want[0]) == 7 and ctmsg.mark_of(want[0]) is None
    ctcreate._PLANS.clear()
    ctcreate.prepare(with_mark)
    got = ctcreate.prepare(with_zone)
    assert got == want
    assert ctmsg.mark_of(ctcreate.prepare(with_mark)[0]) == 7


def test_truncated_entry_is_malformed_even_with_a_plan_of_its_length():
    _, attrs = cb.encode_entry(cb.Tuple(6, "198.18.0.1", "198.19.0.1", 1000, 80))
    ctcreate.prepare(attrs)
    broken = bytearray(attrs)
    broken[0:2] = (len(attrs) + 4).to_bytes(2, "little")  # the first attribute overruns the buffer
    try:
        ctcreate.prepare(bytes(broken))
    except ctmsg.MalformedMessage:
        pass
    else:
        raise AssertionError("an overrunning attribute was accepted")


def walked_tcp_flags(p: bytes) -> bytes:
    """The reference: walk CTA_PROTOINFO_TCP, mark each direction's flags BE_LIBERAL and set
    each mask to its flags."""
    b = bytearray(p)
    for t, ps, pe, _, _ in ctmsg.iter_attrs(p, 4, len(p)):
        if t == CTA_PROTOINFO_TCP:
            for tt, ts, te, _, _ in ctmsg.iter_attrs(p, ps, pe):
                if tt in (CTA_PROTOINFO_TCP_FLAGS_ORIGINAL, CTA_PROTOINFO_TCP_FLAGS_REPLY) and te - ts >= 2:
                    b[ts] = b[ts + 1] = b[ts] | cb.IP_CT_TCP_FLAG_BE_LIBERAL
    return bytes(b)


@given(st.integers(0, 9), st.binary(min_size=4, max_size=4), st.booleans())
def test_tcp_flags_fast_path_matches_the_walk(state, flag_bytes, reorder):
    p = bytearray(cb.encode_tcp_protoinfo(state))
    p[36:38], p[44:46] = flag_bytes[:2], flag_bytes[2:]
    p = bytes(p)
    if reorder:  # not the kernel's layout: the walk runs
        tcp = p[4:]
        children = [tcp[4 + 8 * i:12 + 8 * i] for i in range(5)]
        body = b"".join(reversed(children))
        p = cb.nest(CTA_PROTOINFO, cb.nest(CTA_PROTOINFO_TCP, body))
    assert ctcreate._tcp_flags_masked(p) == walked_tcp_flags(p)


@settings(max_examples=300)
@given(tuples(), st.none() | st.integers(1, 0xFFFF))
def test_filter_fast_fields_match_tuple_info(t, zone):
    key = cb.encode_tuple(CTA_TUPLE_ORIG, t) + (cb.be16(CTA_ZONE, zone) if zone else b"")
    fields = fast_key_fields(key)
    assert fields is not None  # the encoder writes the kernel's layout
    assert fields == ctmsg.tuple_info(key)[:3]
    for cut in range(0, len(key), 7):  # a short key either walks or reads consistently, never crashes
        EntryFilter().accepts(key[:cut])


@given(tuples(), st.none() | st.integers(1, 0xFFFF), st.booleans())
def test_is_tcp_key_fast_path_matches_the_walk(t, zone, nested_first):
    key = cb.encode_tuple(CTA_TUPLE_ORIG, t) + (cb.be16(CTA_ZONE, zone) if zone else b"")
    if nested_first:  # another layout (proto nest first): the slices refuse it, the walk reads it
        body = key[4:len(cb.encode_tuple(CTA_TUPLE_ORIG, t))]
        ip_len = ctmsg.NLA_HDR.unpack_from(body)[0]
        ip, rest = body[:(ip_len + 3) & ~3], body[(ip_len + 3) & ~3:]
        key = key[:4] + rest + ip + key[4 + len(body):]
        assert fast_key_fields(key) is None
    assert is_tcp_key(key) == (ctmsg.tuple_info(key)[0] == socket.IPPROTO_TCP)


def test_filter_fast_path_still_ignores_networks_and_protocols():
    _, attrs = cb.encode_entry(cb.Tuple(17, "198.51.100.1", "198.51.100.2", 3780, 3780), mark=1)
    key = ctmsg.key_of(attrs)
    assert not EntryFilter(["198.51.100.0/30"]).accepts(key)
    assert not EntryFilter(ignore_protocols=["udp"]).accepts(key)
    assert EntryFilter(["198.18.0.0/15"], ["tcp"]).accepts(key)


def test_sender_frames_every_staged_change_once_in_order_across_batches():
    evs = [ctmsg.CtEvent(EV_NEW, socket.AF_INET, ctmsg.key_of(a), a) for _, a in cb.synthetic_entries(5000)]
    sender = protocol.Sender(destroy_kind=EV_DESTROY, max_batch_bytes=4096, window_frames=10_000)
    sender.on_events(evs)
    sender.on_events([ctmsg.CtEvent(EV_DESTROY, socket.AF_INET, evs[10].key, b"")])  # coalesces
    keys = []
    for buf in sender.next_frames(0.0):
        frame = wire.decode(buf)
        assert frame.type == wire.DATA
        keys.extend((rec[0], rec[2]) for rec in frame.payload)
    want = [(wire.OP_UPSERT, e.key) for e in evs]
    want[10] = (wire.OP_DELETE, evs[10].key)
    assert keys == want and not sender.pending


@settings(max_examples=200)
@given(entries(), st.permutations(range(4)), st.booleans())
def test_parse_changes_cuts_the_key_key_of_finds(entry, order, shuffle):
    # the kernel's order takes the fixed reads; any other order (a zone second, the orig
    # tuple not first) must give what the walk gives
    _, attrs = cb.encode_entry(entry[0], entry[1], **entry[2])
    if shuffle:
        spans = [(a0, a1) for _, _, _, a0, a1 in ctmsg.iter_attrs(attrs)]
        head = [attrs[a0:a1] for a0, a1 in spans[:4]]
        attrs = b"".join(head[i] for i in order if i < len(head)) + b"".join(attrs[a0:a1] for a0, a1 in spans[4:])
    msg = ctmsg.NFGEN_HDR.pack(ctmsg.NFGEN_HDR_LEN + len(attrs), ctmsg.CT_NEW, 0, 1, 0, socket.AF_INET, 0, 0) + attrs
    try:
        want = ctmsg.key_of(attrs)
    except ctmsg.MalformedMessage:
        assert ctmsg.parse_changes(msg)[:2] == ([], 1)
        return
    (change,), bad, _ = ctmsg.parse_changes(msg)
    assert bad == 0 and change[2] == want and change[3] == attrs
