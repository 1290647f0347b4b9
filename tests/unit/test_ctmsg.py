"""Pure tests of the ctnetlink codec: encode -> decode round trips, keys, header rewrite."""

import ipaddress
import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from statesync import ctbuild as cb
from statesync import ctcreate, ctmsg
from statesync.ctconst import (
    CT_DELETE, CT_NEW, CTA_COUNTERS_ORIG, CTA_ID, CTA_NAT_DST, CTA_NAT_SRC,
    CTA_TIMESTAMP, CTA_TUPLE_MASTER, CTA_TUPLE_ORIG, CTA_TUPLE_REPLY, CTA_USE, CTA_ZONE,
    EV_DESTROY, EV_NEW, EV_UPDATE, IPS_ASSURED, IPS_CONFIRMED, IPS_EXPECTED, IPS_SEEN_REPLY,
    NFGEN_HDR, NLM_F_CREATE, NLM_F_EXCL, NLM_F_MULTI, NLM_F_REQUEST,
)

PROTOS = [6, 17, 1, 58, 132]


def v4_addr(prefix):
    return st.integers(0, 0xFFFF).map(lambda i: str(ipaddress.ip_address(prefix) + i))


@st.composite
def tuples(draw, family=None):
    family = family or draw(st.sampled_from([socket.AF_INET, socket.AF_INET6]))
    proto = draw(st.sampled_from(PROTOS))
    if family == socket.AF_INET and proto == 58:
        proto = 1
    if family == socket.AF_INET6 and proto == 1:
        proto = 58
    base = ("198.18.0.0", "198.19.0.0", "203.0.113.0") if family == socket.AF_INET else (
        "2001:db8:18::", "2001:db8:19::", "2001:db8:203::")
    src = str(ipaddress.ip_address(base[0]) + draw(st.integers(0, 0xFFFF)))
    dst = str(ipaddress.ip_address(base[1]) + draw(st.integers(0, 0xFFFF)))
    if proto in (1, 58):
        typ = 8 if proto == 1 else 128
        return cb.Tuple(proto, src, dst, draw(st.integers(0, 0xFFFF)), typ << 8)
    return cb.Tuple(proto, src, dst, draw(st.integers(1, 0xFFFF)), draw(st.integers(1, 0xFFFF)))


@st.composite
def entries(draw):
    orig = draw(tuples())
    nat = draw(st.booleans())
    reply = None
    if nat:
        nat_ip = "203.0.113.1" if orig.family == socket.AF_INET else "2001:db8:203::1"
        sp = orig.sport if orig.proto in (1, 58) else orig.dport
        rtype = cb.icmp_reply_type(orig.proto, orig.dport) if orig.proto in (1, 58) else draw(st.integers(1, 0xFFFF))
        if orig.proto in (1, 58):
            reply = cb.Tuple(orig.proto, orig.dst, nat_ip, draw(st.integers(0, 0xFFFF)), rtype)
        else:
            reply = cb.Tuple(orig.proto, orig.dst, nat_ip, sp, rtype)
    kw = dict(
        status=draw(st.sampled_from([IPS_CONFIRMED, IPS_SEEN_REPLY | IPS_ASSURED | IPS_CONFIRMED,
                                     IPS_SEEN_REPLY | IPS_ASSURED])),
        timeout=draw(st.integers(0, 2**32 - 1)),
        mark=draw(st.none() | st.integers(0, 2**32 - 1)),
        zone=draw(st.none() | st.integers(1, 0xFFFF)),
        tcp_state=draw(st.integers(0, 9)),
        sctp=(draw(st.integers(1, 7)), draw(st.integers(0, 2**32 - 1)), draw(st.integers(0, 2**32 - 1))),
    )
    return orig, reply, kw


def tuple_dict(t: cb.Tuple):
    d = {"proto": t.proto, "src": str(ipaddress.ip_address(t.src)), "dst": str(ipaddress.ip_address(t.dst))}
    if t.proto in (1, 58):
        d.update(id=t.sport, type=t.dport >> 8, code=t.dport & 0xFF)
    else:
        d.update(sport=t.sport, dport=t.dport)
    return d


def attr_types(attrs):
    return [t for t, *_ in ctmsg.iter_attrs(attrs)]


def attr_bytes(attrs, atype):
    return [attrs[a0:a1] for t, _, _, a0, a1 in ctmsg.iter_attrs(attrs) if t == atype]


@settings(max_examples=300)
@given(entries())
def test_encode_decode_round_trip(e):
    orig, reply, kw = e
    family, attrs = cb.encode_entry(orig, reply, **kw)
    d = ctmsg.decode_entry(family, attrs)
    assert d["orig"] == tuple_dict(orig)
    if reply is not None:
        assert d["reply"] == tuple_dict(reply)
    else:  # inverse of orig
        assert d["reply"]["src"] == d["orig"]["dst"] and d["reply"]["dst"] == d["orig"]["src"]
    assert d["status"] == kw["status"]
    assert d["timeout"] == kw["timeout"]
    assert d.get("mark") == kw["mark"]
    assert d.get("zone") == kw["zone"]
    assert ctmsg.status_of(attrs) == kw["status"]
    assert ctmsg.mark_of(attrs) == kw["mark"]
    assert ctmsg.timeout_of(attrs) == kw["timeout"]
    assert ctmsg.zone_of(attrs) == (kw["zone"] or 0)
    if orig.proto == 6:
        assert d["protoinfo"]["tcp"]["state"] == kw["tcp_state"]
        assert ctmsg.tcp_state_of(attrs) == kw["tcp_state"]
    elif orig.proto == 132:
        state, vo, vr = kw["sctp"]
        assert d["protoinfo"]["sctp"] == {"state": state, "vtag_orig": vo, "vtag_reply": vr}
    else:
        assert "protoinfo" not in d


@settings(max_examples=300)
@given(entries())
def test_key_is_orig_tuple_plus_zone_and_tuple_info_reads_it(e):
    orig, reply, kw = e
    family, attrs = cb.encode_entry(orig, reply, **kw)
    key = ctmsg.key_of(attrs)
    expected = cb.encode_tuple(CTA_TUPLE_ORIG, orig) + (cb.be16(CTA_ZONE, kw["zone"]) if kw["zone"] else b"")
    assert key == expected
    proto, src, dst, sport, dport = ctmsg.tuple_info(key)
    assert (proto, sport, dport) == (orig.proto, orig.sport, orig.dport)
    assert src == ipaddress.ip_address(orig.src).packed and dst == ipaddress.ip_address(orig.dst).packed
    # the same key whatever order the attributes come in (full-walk fallback)
    shuffled = b"".join(reversed([attrs[a0:a1] for *_, a0, a1 in ctmsg.iter_attrs(attrs)]))
    assert ctmsg.key_of(shuffled) == key


def event_message(kind, family, attrs, seq=1):
    mtype = CT_DELETE if kind == EV_DESTROY else CT_NEW
    flags = (NLM_F_CREATE | NLM_F_EXCL) if kind == EV_NEW else 0
    return NFGEN_HDR.pack(20 + len(attrs), mtype, flags, seq, 0, family, 0, 0) + attrs


@settings(max_examples=100)
@given(st.lists(st.tuples(entries(), st.sampled_from([EV_NEW, EV_UPDATE, EV_DESTROY])), min_size=1, max_size=20))
def test_parse_batch_of_events(items):
    buf = b""
    want = []
    for (orig, reply, kw), kind in items:
        family, attrs = cb.encode_entry(orig, reply, **kw)
        buf += event_message(kind, family, attrs)
        want.append((kind, family, ctmsg.key_of(attrs), attrs))
    events, bad, done = ctmsg.parse_messages_counted(buf)
    assert bad == 0 and not done
    assert [(e.kind, e.family, e.key, e.attrs) for e in events] == want


@settings(max_examples=500)
@given(st.binary(max_size=400))
def test_garbage_never_raises(data):
    events, bad, _ = ctmsg.parse_messages_counted(data)
    assert isinstance(events, list) and bad >= 0


@settings(max_examples=300)
@given(entries(), st.integers(0, 200), st.integers(0, 40))
def test_corrupted_event_is_counted_not_raised(e, pos, value):
    orig, reply, kw = e
    family, attrs = cb.encode_entry(orig, reply, **kw)
    msg = bytearray(event_message(EV_NEW, family, attrs))
    # break an attribute length inside the body
    pos = 20 + (pos % (len(msg) - 20))
    msg[pos] = value
    events, bad, _ = ctmsg.parse_messages_counted(bytes(msg))
    assert len(events) + bad <= 1


def test_error_messages_are_reported():
    err = struct.pack("=IHHII", 36, 2, 0, 7, 0) + struct.pack("=i", -17) + b"\0" * 16
    errors = []
    events, bad, _ = ctmsg.parse_messages_counted(err, errors=errors)
    assert events == [] and bad == 0 and errors == [(7, 17)]


def test_dump_flags_mean_update_kind_and_done_is_seen():
    family, attrs = cb.encode_entry(cb.Tuple(6, "198.18.0.1", "198.19.0.1", 1000, 80))
    msg = NFGEN_HDR.pack(20 + len(attrs), CT_NEW, NLM_F_MULTI, 1, 0, family, 0, 0) + attrs
    done = struct.pack("=IHHII", 20, 3, NLM_F_MULTI, 1, 0) + b"\0" * 4
    events, bad, seen_done = ctmsg.parse_messages_counted(msg + done)
    assert [e.kind for e in events] == [EV_UPDATE] and seen_done and bad == 0


# --- create / update forms ---------------------------------------------------------------

def with_kernel_only_attrs(attrs):
    """What an event adds that the create path must not receive."""
    return (attrs + cb.be32(CTA_ID, 1234) + cb.be32(CTA_USE, 1)
            + cb.nest(CTA_COUNTERS_ORIG, cb.nla(1, struct.pack(">Q", 5)), cb.nla(2, struct.pack(">Q", 300)))
            + cb.nest(CTA_TIMESTAMP, cb.nla(1, struct.pack(">Q", 99))))


def test_plain_entry_single_form_status_confirmed_and_kernel_attrs_stripped():
    family, attrs = cb.encode_entry(cb.Tuple(6, "198.18.0.1", "198.19.0.1", 1000, 80),
                                    status=IPS_SEEN_REPLY | IPS_ASSURED, mark=9)
    create, update = ctcreate.prepare(with_kernel_only_attrs(attrs))
    assert update is None
    types = attr_types(create)
    assert CTA_ID not in types and CTA_USE not in types and CTA_COUNTERS_ORIG not in types
    assert CTA_TIMESTAMP not in types
    assert ctmsg.status_of(create) == IPS_SEEN_REPLY | IPS_ASSURED | IPS_CONFIRMED
    d_in, d_out = ctmsg.decode_entry(family, attrs), ctmsg.decode_entry(family, create)
    for k in ("orig", "reply", "mark", "timeout"):
        assert d_in[k] == d_out[k]
    # kernel-style flags (mask 0) get mask = flags so the receiver sets them
    assert d_out["protoinfo"]["tcp"]["flags_orig"][1] == d_out["protoinfo"]["tcp"]["flags_orig"][0]
    msg = ctcreate.to_create_message(family, attrs, seq=42)
    mlen, mtype, flags, seq, _, fam, _, _ = NFGEN_HDR.unpack_from(msg)
    assert (mlen, mtype, seq, fam) == (len(msg), CT_NEW, 42, family)
    assert flags == NLM_F_REQUEST | NLM_F_CREATE


@settings(max_examples=300)
@given(entries())
def test_nat_entry_create_form_has_range_and_unnatted_reply(e):
    orig, reply, kw = e
    family, attrs = cb.encode_entry(orig, reply, **kw)
    create, update = ctcreate.prepare(attrs)
    if reply is None:
        assert update is None
        return
    assert update is not None
    dc, du = ctmsg.decode_entry(family, create), ctmsg.decode_entry(family, update)
    assert du["reply"] == ctmsg.decode_entry(family, attrs)["reply"]  # update keeps the NATed reply
    assert CTA_NAT_SRC in attr_types(create) and CTA_NAT_SRC not in attr_types(update)
    assert CTA_NAT_DST not in attr_types(create)
    # create's reply is the inverse of the original
    assert dc["reply"]["src"] == dc["orig"]["dst"] and dc["reply"]["dst"] == dc["orig"]["src"]
    nat_addr = ipaddress.ip_address(reply.dst).packed
    assert nat_addr in attr_bytes(create, CTA_NAT_SRC)[0]
    assert ctmsg.status_of(create) & IPS_CONFIRMED and ctmsg.status_of(update) & IPS_CONFIRMED
    assert CTA_TUPLE_REPLY in attr_types(create)
    msg = ctcreate.to_create_message(family, attrs, seq=1)
    assert NFGEN_HDR.unpack_from(msg)[2] == NLM_F_REQUEST | NLM_F_CREATE | NLM_F_EXCL
    assert NFGEN_HDR.unpack_from(ctcreate.to_update_message(family, attrs, seq=1))[2] == NLM_F_REQUEST


def test_dnat_gives_nat_dst():
    orig = cb.Tuple(17, "192.0.2.10", "203.0.113.1", 5555, 53)
    reply = cb.Tuple(17, "198.19.0.5", "192.0.2.10", 5353, 5555)
    family, attrs = cb.encode_entry(orig, reply)
    create, _ = ctcreate.prepare(attrs)
    nat = attr_bytes(create, CTA_NAT_DST)
    assert nat and ipaddress.ip_address("198.19.0.5").packed in nat[0] and struct.pack(">H", 5353) in nat[0]
    assert CTA_NAT_SRC not in attr_types(create)


@settings(max_examples=200)
@given(entries())
def test_fast_nat_path_matches_slow_path(e):
    orig, reply, kw = e
    if reply is None or orig.proto in (1, 58):
        return
    o = cb.encode_tuple(CTA_TUPLE_ORIG, orig)
    r = cb.encode_tuple(CTA_TUPLE_REPLY, reply)
    assert ctcreate._port_tuple_addr_len(o) in (4, 16)
    assert ctcreate._nat_for_create(o, r) == ctcreate._nat_for_create_slow(o, r)


def test_related_entry_master_only_on_create_expected_only_on_update():
    master = cb.encode_tuple(CTA_TUPLE_MASTER, cb.Tuple(6, "198.18.0.1", "198.18.0.2", 1000, 21))
    family, attrs = cb.encode_entry(cb.Tuple(6, "198.18.0.2", "198.18.0.1", 20, 40000),
                                    status=IPS_EXPECTED | IPS_SEEN_REPLY | IPS_ASSURED | IPS_CONFIRMED)
    create, update = ctcreate.prepare(attrs + master)
    assert CTA_TUPLE_MASTER in attr_types(create) and CTA_TUPLE_MASTER not in attr_types(update)
    assert not ctmsg.status_of(create) & IPS_EXPECTED
    assert ctmsg.status_of(update) & IPS_EXPECTED


def test_delete_message_carries_the_key():
    family, attrs = cb.encode_entry(cb.Tuple(6, "198.18.0.1", "198.19.0.1", 1000, 80), zone=4)
    key = ctmsg.key_of(attrs)
    msg = ctmsg.to_delete_message(family, key, seq=3)
    mlen, mtype, flags, seq, _, fam, _, _ = NFGEN_HDR.unpack_from(msg)
    assert (mlen, mtype, flags, seq, fam) == (len(msg), CT_DELETE, NLM_F_REQUEST, 3, family)
    assert msg[20:] == key and attr_types(key) == [CTA_TUPLE_ORIG, CTA_ZONE]


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
def test_synthetic_entries_distinct_and_kernel_shaped(family):
    ents = cb.synthetic_entries(70_000, family=family)
    assert len({ctmsg.key_of(a) for _, a in ents}) == 70_000
    replies = {attr_bytes(a, CTA_TUPLE_REPLY)[0] for _, a in ents}
    assert len(replies) == 70_000  # the kernel refuses a reply-tuple clash
    for i in (0, 1, 65_536, 69_999):
        fam, attrs = ents[i]
        d = ctmsg.decode_entry(fam, attrs)
        assert fam == family
        assert d["protoinfo"]["tcp"]["state_name"] == "ESTABLISHED"
        assert d["status"] & (IPS_SEEN_REPLY | IPS_ASSURED | IPS_CONFIRMED) == IPS_SEEN_REPLY | IPS_ASSURED | IPS_CONFIRMED
        assert d["timeout"] == 600
        if family == socket.AF_INET:
            assert ipaddress.ip_address(d["orig"]["src"]) in ipaddress.ip_network("198.18.0.0/15")
            assert ipaddress.ip_address(d["orig"]["dst"]) in ipaddress.ip_network("198.18.0.0/15")
            assert d["reply"]["dst"] == "203.0.113.1"
        # byte-identical to the general encoder
        o, r = d["orig"], d["reply"]
        _, again = cb.encode_entry(cb.Tuple(6, o["src"], o["dst"], o["sport"], o["dport"]),
                                   cb.Tuple(6, r["src"], r["dst"], r["sport"], r["dport"]),
                                   status=d["status"], timeout=600)
        assert again == attrs


def test_expectation_key_and_create_form():
    from statesync import ctexp
    master = cb.Tuple(6, "198.18.0.1", "198.19.0.1", 40000, 21)
    expected = cb.Tuple(6, "198.19.0.1", "198.18.0.1", 0, 50000)
    mask = cb.Tuple(6, "255.255.255.255", "255.255.255.255", 0, 0xFFFF)
    family, attrs = ctexp.encode_expectation(master, expected, mask, 300, helper="ftp")
    attrs += cb.be32(ctexp.CTA_EXPECT_ID, 77)
    key = ctexp.expectation_key(attrs)
    assert key == cb.encode_tuple(ctexp.CTA_EXPECT_TUPLE, expected)
    assert ctmsg.tuple_info(key) == (6, bytes([198, 19, 0, 1]), bytes([198, 18, 0, 1]), 0, 50000)
    body = ctexp.expectation_create_attrs(attrs)
    assert ctexp.CTA_EXPECT_ID not in attr_types(body)
    assert attr_types(body) == [ctexp.CTA_EXPECT_TUPLE, ctexp.CTA_EXPECT_MASK, ctexp.CTA_EXPECT_MASTER,
                                ctexp.CTA_EXPECT_TIMEOUT, ctexp.CTA_EXPECT_HELP_NAME]
    msg = ctexp.to_expectation_create_message(family, attrs, 5)
    assert NFGEN_HDR.unpack_from(msg)[1] == (2 << 8) and msg[20:] == body
