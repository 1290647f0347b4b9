"""Turn an entry captured from one kernel into requests another kernel accepts.

What ctnetlink on 6.18 takes, measured (tests/lab/test_ctnetlink.py::test_kernel_create_rules):

- CTA_STATUS must carry IPS_CONFIRMED, on create and update, else EBUSY.
- A NATed entry needs CTA_NAT_SRC / CTA_NAT_DST on create, and the reply tuple
  given *un-NATed* (the inverse of the original): the kernel derives the NAT
  status bits and the NATed reply tuple from the range. A NATed reply tuple
  alone is stored but the entry carries no IPS_SRC_NAT/IPS_DST_NAT, so packets
  would not be translated after failover. NAT attributes on an existing entry:
  EOPNOTSUPP.
- CTA_TUPLE_MASTER (related entries) only on create, with IPS_EXPECTED cleared
  (the kernel sets it); on update the status must keep IPS_EXPECTED and the
  master attribute must go (EOPNOTSUPP).
- The kernel reports TCP window-scale/SACK flags with a zero mask, which would
  set nothing; the mask is set to the flags (what conntrackd does) so the
  Backup's window tracking scales windows like the Master's.

So an entry has a create form and an update form. For a plain entry they are
the same bytes and one NLM_F_CREATE request (no NLM_F_EXCL) creates or updates;
for a NATed or related entry they differ and CtSocket.apply falls back from one
to the other on EEXIST / ENOENT.
"""

from __future__ import annotations

from .ctbuild import Tuple, encode_tuple, icmp_reply_type, nest, nla
from .ctconst import (
    BE16, BE32, CT_NEW, CTA_NAT_DST, CTA_NAT_SRC, CTA_PROTOINFO, CTA_PROTOINFO_TCP,
    CTA_PROTOINFO_TCP_FLAGS_ORIGINAL, CTA_PROTOINFO_TCP_FLAGS_REPLY, CTA_STATUS,
    CTA_TUPLE_MASTER, CTA_TUPLE_ORIG, CTA_TUPLE_REPLY, IPPROTO_ICMP, IPPROTO_ICMPV6,
    IPS_CONFIRMED, IPS_EXPECTED, KEPT_ATTRS, NFGEN_HDR, NFGEN_HDR_LEN, NLA_F_NESTED,
    NLA_HDR, NLA_TYPE_MASK, NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST,
)
from .ctmsg import MalformedMessage, _tuple_fields, iter_attrs

CTA_NAT_V4_MINIP = 1
CTA_NAT_V4_MAXIP = 2
CTA_NAT_PROTO = 3
CTA_NAT_V6_MINIP = 4
CTA_NAT_V6_MAXIP = 5
CTA_PROTONAT_PORT_MIN = 1
CTA_PROTONAT_PORT_MAX = 2
_PORT_PROTOS = frozenset({6, 17, 33, 132, 136})  # TCP, UDP, DCCP, SCTP, UDPLITE

_STATUS_HDR = NLA_HDR.pack(8, CTA_STATUS)
_REPLY_HDRS = {L: NLA_HDR.pack(44 + 2 * L, CTA_TUPLE_REPLY | NLA_F_NESTED) for L in (4, 16)}
# attribute headers of a port tuple as the kernel lays it out: (offset, bytes) per address length
_PORT_TUPLE_SHAPE = {
    L: ((8, NLA_HDR.pack(4 + L, 1 if L == 4 else 3)),
        (12 + L, NLA_HDR.pack(4 + L, 2 if L == 4 else 4)),
        (20 + 2 * L, NLA_HDR.pack(5, 1)),
        (28 + 2 * L, NLA_HDR.pack(6, 2)),
        (36 + 2 * L, NLA_HDR.pack(6, 3)))
    for L in (4, 16)
}
_TCP_FLAGS_AT_32 = NLA_HDR.pack(6, CTA_PROTOINFO_TCP_FLAGS_ORIGINAL)
_TCP_FLAGS_AT_40 = NLA_HDR.pack(6, CTA_PROTOINFO_TCP_FLAGS_REPLY)

CREATE_FLAGS = NLM_F_REQUEST | NLM_F_CREATE
CREATE_EXCL_FLAGS = NLM_F_REQUEST | NLM_F_CREATE | NLM_F_EXCL
UPDATE_FLAGS = NLM_F_REQUEST


def prepare(attrs: bytes) -> tuple[bytes, bytes | None]:
    """(create_body, update_body) for a captured entry.

    update_body is None when create_body serves for both (plain entry: send it
    with NLM_F_CREATE and no NLM_F_EXCL).
    """
    common: list[bytes] = []  # attributes both forms share, reply tuple excluded
    append = common.append
    unpack = NLA_HDR.unpack_from
    end = len(attrs)
    off = 0
    orig = reply = master = None
    status = None
    while off + 4 <= end:
        alen, atype = unpack(attrs, off)
        if alen < 4 or off + alen > end:
            raise MalformedMessage(f"attribute length {alen} at {off} overruns {end}")
        nxt = off + ((alen + 3) & ~3)
        t = atype & NLA_TYPE_MASK
        if t == CTA_TUPLE_ORIG:
            orig = attrs[off:nxt]
            append(orig)
        elif t == CTA_TUPLE_REPLY:
            reply = attrs[off:nxt]
        elif t == CTA_STATUS and alen == 8:
            status = BE32.unpack_from(attrs, off + 4)[0] | IPS_CONFIRMED
        elif t == CTA_PROTOINFO:
            append(_tcp_flags_masked(attrs[off:nxt]))
        elif t == CTA_TUPLE_MASTER:
            master = attrs[off:nxt]
        elif t in KEPT_ATTRS:
            append(attrs[off:nxt])
        off = nxt
    if orig is None or reply is None:
        raise MalformedMessage("entry without both tuples")
    nat = _nat_for_create(orig, reply)
    expected = status is not None and status & IPS_EXPECTED
    if nat is None and master is None and not expected:
        if status is not None:
            append(_STATUS_HDR + BE32.pack(status))
        append(reply)
        return b"".join(common), None
    update = common + [reply] if status is None else common + [reply, _STATUS_HDR + BE32.pack(status)]
    create = list(common)
    if status is not None:
        create.append(_STATUS_HDR + BE32.pack(status & ~IPS_EXPECTED))
    if nat is None:
        create.append(reply)
    else:
        create.extend(nat)  # un-NATed reply tuple + CTA_NAT_SRC/DST
    if master is not None:
        create.append(master)
    return b"".join(create), b"".join(update)


def to_create_message(family: int, attrs: bytes, seq: int, ack: bool = False) -> bytes:
    """The create request for a captured entry.

    For a plain entry this is create-or-update (NLM_F_CREATE without NLM_F_EXCL).
    For a NATed/related entry it only creates (NLM_F_EXCL): use
    to_update_message when the entry already exists (EEXIST).
    """
    create, update = prepare(attrs)
    flags = (CREATE_FLAGS if update is None else CREATE_EXCL_FLAGS) | (NLM_F_ACK if ack else 0)
    return NFGEN_HDR.pack(NFGEN_HDR_LEN + len(create), CT_NEW, flags, seq, 0, family, 0, 0) + create


def to_update_message(family: int, attrs: bytes, seq: int, ack: bool = False) -> bytes:
    """Update an existing entry (no NLM_F_CREATE: ENOENT if it is missing)."""
    create, update = prepare(attrs)
    body = create if update is None else update
    flags = UPDATE_FLAGS | (NLM_F_ACK if ack else 0)
    return NFGEN_HDR.pack(NFGEN_HDR_LEN + len(body), CT_NEW, flags, seq, 0, family, 0, 0) + body


# --- NAT ------------------------------------------------------------------------------

def _nat_for_create(orig: bytes, reply: bytes) -> list[bytes] | None:
    """[inverse-of-orig reply tuple, CTA_NAT_* ...] if the tuples show NAT, else None."""
    L = _port_tuple_addr_len(orig)
    if L and len(reply) == len(orig) and _port_tuple_addr_len(reply) == L:
        # fast path: compare raw slices of the kernel's fixed layout
        o_src, o_dst = orig[12:12 + L], orig[16 + L:16 + 2 * L]
        r_src, r_dst = reply[12:12 + L], reply[16 + L:16 + 2 * L]
        o_sp, o_dp = orig[32 + 2 * L:34 + 2 * L], orig[40 + 2 * L:42 + 2 * L]
        r_sp, r_dp = reply[32 + 2 * L:34 + 2 * L], reply[40 + 2 * L:42 + 2 * L]
        snat = r_dst != o_src or r_dp != o_sp
        dnat = r_src != o_dst or r_sp != o_dp
        if not (snat or dnat):
            return None
        inverse = (_REPLY_HDRS[L] + orig[4:12] + o_dst + orig[12 + L:16 + L] + o_src
                   + orig[16 + 2 * L:32 + 2 * L] + o_dp + orig[34 + 2 * L:40 + 2 * L] + o_sp
                   + orig[42 + 2 * L:])
        out = [inverse]
        if dnat:
            out.append(_nat_range(CTA_NAT_DST, r_src, r_sp))
        if snat:
            out.append(_nat_range(CTA_NAT_SRC, r_dst, r_dp))
        return out
    return _nat_for_create_slow(orig, reply)


def _port_tuple_addr_len(t: bytes) -> int:
    """4 or 16 if `t` is a tuple in the kernel's layout for a port protocol, else 0."""
    n = len(t)
    L = 4 if n == 52 else 16 if n == 76 else 0
    if not L:
        return 0
    for at, hdr in _PORT_TUPLE_SHAPE[L]:
        if t[at:at + 4] != hdr:
            return 0
    return L


def _nat_for_create_slow(orig: bytes, reply: bytes) -> list[bytes] | None:
    # ICMP and anything not in the fixed layout: decode, compare, re-encode
    o_proto, o_src, o_dst, o_sp, o_dp = _tuple_fields(orig, 4, NLA_HDR.unpack_from(orig)[0])
    _, r_src, r_dst, r_sp, r_dp = _tuple_fields(reply, 4, NLA_HDR.unpack_from(reply)[0])
    icmp = o_proto in (IPPROTO_ICMP, IPPROTO_ICMPV6)
    if icmp:  # ports are (id, type<<8|code): only the id can be remapped, and it sits in "sport" of both
        snat = r_dst != o_src or r_sp != o_sp
        dnat = r_src != o_dst
    else:
        snat = r_dst != o_src or r_dp != o_sp
        dnat = r_src != o_dst or r_sp != o_dp
    if not (snat or dnat):
        return None
    if icmp:
        inv = Tuple(o_proto, o_dst, o_src, o_sp, icmp_reply_type(o_proto, o_dp))
    else:
        inv = Tuple(o_proto, o_dst, o_src, o_dp, o_sp)
    has_ports = o_proto in _PORT_PROTOS or icmp
    out = [encode_tuple(CTA_TUPLE_REPLY, inv)]
    if dnat:
        out.append(_nat_range(CTA_NAT_DST, r_src, BE16.pack(r_sp) if has_ports and not icmp else None))
    if snat:
        port = (r_sp if icmp else r_dp) if has_ports else None
        out.append(_nat_range(CTA_NAT_SRC, r_dst, None if port is None else BE16.pack(port)))
    return out


def _nat_range(atype: int, addr: bytes, port: bytes | None) -> bytes:
    v6 = len(addr) == 16
    parts = [nla(CTA_NAT_V6_MINIP if v6 else CTA_NAT_V4_MINIP, addr),
             nla(CTA_NAT_V6_MAXIP if v6 else CTA_NAT_V4_MAXIP, addr)]
    if port is not None:
        parts.append(nest(CTA_NAT_PROTO, nla(CTA_PROTONAT_PORT_MIN, port), nla(CTA_PROTONAT_PORT_MAX, port)))
    return nest(atype, *parts)


# --- TCP flags ----------------------------------------------------------------------------

def _tcp_flags_masked(p: bytes) -> bytes:
    """CTA_PROTOINFO with each TCP flags mask set to its flags."""
    if len(p) == 52 and p[32:36] == _TCP_FLAGS_AT_32 and p[40:44] == _TCP_FLAGS_AT_40:
        if p[37] == p[36] and p[45] == p[44]:
            return p
        b = bytearray(p)
        b[37] = b[36]
        b[45] = b[44]
        return bytes(b)
    tcp = None
    for t, ps, pe, _, _ in iter_attrs(p, 4, len(p)):
        if t == CTA_PROTOINFO_TCP:
            tcp = (ps, pe)
    if tcp is None:
        return p
    b = bytearray(p)
    for t, ps, pe, _, _ in iter_attrs(p, *tcp):
        if t in (CTA_PROTOINFO_TCP_FLAGS_ORIGINAL, CTA_PROTOINFO_TCP_FLAGS_REPLY) and pe - ps >= 2:
            b[ps + 1] = b[ps]
    return bytes(b)
