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

import struct

from .ctbuild import IP_CT_TCP_FLAG_BE_LIBERAL, Tuple, encode_tuple, icmp_reply_type
from .ctconst import (
    BE16, BE32, CT_NEW, CTA_NAT_DST, CTA_NAT_SRC, CTA_PROTOINFO, CTA_PROTOINFO_TCP,
    CTA_PROTOINFO_TCP_FLAGS_ORIGINAL, CTA_PROTOINFO_TCP_FLAGS_REPLY, CTA_PROTOINFO_TCP_STATE,
    CTA_PROTOINFO_TCP_WSCALE_ORIGINAL, CTA_PROTOINFO_TCP_WSCALE_REPLY, CTA_STATUS,
    CTA_TIMEOUT, CTA_TUPLE_MASTER, CTA_TUPLE_ORIG, CTA_TUPLE_REPLY, IPPROTO_ICMP, IPPROTO_ICMPV6,
    IPS_CONFIRMED, IPS_EXPECTED, KEPT_ATTRS, NFGEN_HDR, NFGEN_HDR_LEN, NLA_F_NESTED,
    NLA_HDR, NLA_TYPE_MASK, NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST,
)
from .ctmsg import MalformedMessage, _tuple_fields

CTA_NAT_V4_MINIP = 1
CTA_NAT_V4_MAXIP = 2
CTA_NAT_PROTO = 3
CTA_NAT_V6_MINIP = 4
CTA_NAT_V6_MAXIP = 5
CTA_PROTONAT_PORT_MIN = 1
CTA_PROTONAT_PORT_MAX = 2
_PORT_PROTOS = frozenset({6, 17, 33, 132, 136})  # TCP, UDP, DCCP, SCTP, UDPLITE

_STATUS_HDR = NLA_HDR.pack(8, CTA_STATUS)
_TIMEOUT_HDR = NLA_HDR.pack(8, CTA_TIMEOUT)
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

CREATE_FLAGS = NLM_F_REQUEST | NLM_F_CREATE
CREATE_EXCL_FLAGS = NLM_F_REQUEST | NLM_F_CREATE | NLM_F_EXCL
UPDATE_FLAGS = NLM_F_REQUEST


def prepare(attrs: bytes, hold: int = 0) -> tuple[bytes, bytes | None]:
    """(create_body, update_body) for a captured entry.

    update_body is None when create_body serves for both (plain entry: send it
    with NLM_F_CREATE and no NLM_F_EXCL). `hold`: CTA_TIMEOUT is raised to at least
    this many seconds (the Backup holds its copies: config sync.hold_timeout).
    """
    plan = _PLANS.get(len(attrs))
    if plan is None or plan.read_headers(attrs) != plan.headers:
        plan = _learn(attrs)
    # attributes both forms share, reply tuple excluded; CTA_PROTOINFO gets its flag masks set
    common = [attrs[sl] for sl in plan.common]
    if plan.protoinfo is not None:
        for i in plan.protoinfo:
            common[i] = _tcp_flags_masked(common[i])
    held = plan.timeout_piece
    if hold and held is not None and BE32.unpack_from(attrs, plan.common[held].start + 4)[0] < hold:
        common[held] = _TIMEOUT_HDR + BE32.pack(hold)
    orig = attrs[plan.orig]
    reply = attrs[plan.reply]
    status = None if plan.status is None else BE32.unpack_from(attrs, plan.status)[0] | IPS_CONFIRMED
    master = None if plan.master is None else attrs[plan.master]
    nat = _nat_for_create(orig, reply)
    expected = status is not None and status & IPS_EXPECTED
    if nat is None and master is None and not expected:
        if status is not None:
            common.append(_STATUS_HDR + BE32.pack(status))
        common.append(reply)
        return b"".join(common), None
    update = common + [reply] if status is None else common + [reply, _STATUS_HDR + BE32.pack(status)]
    create = common
    if status is not None:
        create.append(_STATUS_HDR + BE32.pack(status & ~IPS_EXPECTED))
    if nat is None:
        create.append(reply)
    else:
        create.extend(nat)  # un-NATed reply tuple + CTA_NAT_SRC/DST
    if master is not None:
        create.append(master)
    return b"".join(create), b"".join(update)


# --- layout plans ---------------------------------------------------------------------------
# A burst is thousands of entries of one layout (same attributes, same lengths, same order).
# The walk over the top-level attributes is done once per layout; later entries of that
# length are checked against it with one Struct read of every top-level header (types and
# lengths, so every decision the walk made holds) and cut with precomputed slices.

class _Plan:
    __slots__ = ("headers", "read_headers", "common", "protoinfo", "orig", "reply", "status", "master",
                 "timeout_piece")

    def __init__(self, offsets: list[int], headers: tuple[bytes, ...], common: list[slice],
                 protoinfo: tuple[int, ...] | None, orig: slice, reply: slice, status: int | None,
                 master: slice | None, timeout_piece: int | None = None):
        fmt, pos = ["="], 0
        for off in offsets:
            fmt.append(f"{off - pos}x4s")
            pos = off + 4
        self.read_headers = struct.Struct("".join(fmt)).unpack_from
        self.headers = headers
        self.common = common
        self.protoinfo = protoinfo
        self.orig, self.reply, self.status, self.master = orig, reply, status, master
        self.timeout_piece = timeout_piece  # index of CTA_TIMEOUT in common, None without one


_PLANS: dict[int, _Plan] = {}  # by attribute bytes length; a clash just relearns
_MAX_PLANS = 256


def _learn(attrs: bytes) -> _Plan:
    """Walk the top-level attributes once and remember what to cut where."""
    unpack = NLA_HDR.unpack_from
    end = len(attrs)
    off = 0
    offsets: list[int] = []
    common: list[slice] = []
    protoinfo: list[int] = []
    orig = reply = master = status = timeout_piece = None
    while off + 4 <= end:
        alen, atype = unpack(attrs, off)
        if alen < 4 or off + alen > end:
            raise MalformedMessage(f"attribute length {alen} at {off} overruns {end}")
        offsets.append(off)
        nxt = off + ((alen + 3) & ~3)
        t = atype & NLA_TYPE_MASK
        here = slice(off, nxt)
        if t == CTA_TIMEOUT and alen == 8:
            timeout_piece = len(common)
            common.append(here)
        elif t == CTA_TUPLE_ORIG:
            orig = here
            common.append(here)
        elif t == CTA_TUPLE_REPLY:
            reply = here
        elif t == CTA_STATUS and alen == 8:
            status = off + 4
        elif t == CTA_PROTOINFO:
            protoinfo.append(len(common))
            common.append(here)
        elif t == CTA_TUPLE_MASTER:
            master = here
        elif t in KEPT_ATTRS:
            common.append(here)
        off = nxt
    if orig is None or reply is None:
        raise MalformedMessage("entry without both tuples")
    plan = _Plan(offsets, tuple(attrs[o:o + 4] for o in offsets), common, tuple(protoinfo) or None,
                 orig, reply, status, master, timeout_piece)
    if len(_PLANS) >= _MAX_PLANS:
        _PLANS.clear()
    _PLANS[end] = plan
    return plan


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

class _PortTupleLayout:
    """Where things sit in a port-protocol tuple as the kernel lays it out, for one address
    length: a Struct that reads the five attribute headers in one call, and slices (built
    once, not per entry: the Backup runs this for every NATed entry)."""

    def __init__(self, L: int):
        self.size = 44 + 2 * L
        self.headers = tuple(hdr for _, hdr in _PORT_TUPLE_SHAPE[L])
        self.read_headers = struct.Struct(f"=8x4s{L}x4s{L + 4}x4s4x4s4x4s").unpack_from
        self.reply_hdr = _REPLY_HDRS[L]
        self.src, self.dst = slice(12, 12 + L), slice(16 + L, 16 + 2 * L)
        self.sport, self.dport = slice(32 + 2 * L, 34 + 2 * L), slice(40 + 2 * L, 42 + 2 * L)
        # the pieces around the values, for the inverse tuple
        self.head, self.mid = slice(4, 12), slice(12 + L, 16 + L)
        self.proto, self.between, self.tail = slice(16 + 2 * L, 32 + 2 * L), slice(34 + 2 * L, 40 + 2 * L), \
            slice(42 + 2 * L, None)

    def matches(self, t: bytes) -> bool:
        return len(t) == self.size and self.read_headers(t) == self.headers


_LAYOUTS = {52: _PortTupleLayout(4), 76: _PortTupleLayout(16)}  # by tuple attribute length


def _nat_for_create(orig: bytes, reply: bytes) -> list[bytes] | None:
    """[inverse-of-orig reply tuple, CTA_NAT_* ...] if the tuples show NAT, else None."""
    lay = _LAYOUTS.get(len(orig))
    if lay is not None and lay.matches(orig) and lay.matches(reply):
        # fast path: compare raw slices of the kernel's fixed layout
        o_src, o_dst, o_sp, o_dp = orig[lay.src], orig[lay.dst], orig[lay.sport], orig[lay.dport]
        r_src, r_dst, r_sp, r_dp = reply[lay.src], reply[lay.dst], reply[lay.sport], reply[lay.dport]
        snat = r_dst != o_src or r_dp != o_sp
        dnat = r_src != o_dst or r_sp != o_dp
        if not (snat or dnat):
            return None
        inverse = b"".join((lay.reply_hdr, orig[lay.head], o_dst, orig[lay.mid], o_src, orig[lay.proto], o_dp,
                            orig[lay.between], o_sp, orig[lay.tail]))
        out = [inverse]
        if dnat:
            out.append(_nat_range(CTA_NAT_DST, r_src, r_sp))
        if snat:
            out.append(_nat_range(CTA_NAT_SRC, r_dst, r_dp))
        return out
    return _nat_for_create_slow(orig, reply)


def _port_tuple_addr_len(t: bytes) -> int:
    """4 or 16 if `t` is a tuple in the kernel's layout for a port protocol, else 0."""
    lay = _LAYOUTS.get(len(t))
    return 0 if lay is None or not lay.matches(t) else (len(t) - 44) // 2


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
    """CTA_NAT_SRC/DST for one address (and port): precomputed headers around the values
    (this runs once per NATed entry on the Backup: no nla()/nest() calls)."""
    h0, h1, h2 = _NAT_RANGE_HDRS[atype, len(addr), port is not None]
    if port is None:
        return b"".join((h0, addr, h1, addr))
    return b"".join((h0, addr, h1, addr, h2, port, _PORT_MAX_HDR, port, b"\0\0"))


def _nat_range_hdrs(atype: int, L: int, with_port: bool) -> tuple[bytes, bytes, bytes]:
    v6 = L == 16
    ip = 4 + L
    proto = 4 + 8 + 8 if with_port else 0
    h0 = NLA_HDR.pack(4 + 2 * ip + proto, atype | NLA_F_NESTED) + NLA_HDR.pack(ip, CTA_NAT_V6_MINIP if v6 else CTA_NAT_V4_MINIP)
    h1 = NLA_HDR.pack(ip, CTA_NAT_V6_MAXIP if v6 else CTA_NAT_V4_MAXIP)
    h2 = NLA_HDR.pack(proto, CTA_NAT_PROTO | NLA_F_NESTED) + NLA_HDR.pack(6, CTA_PROTONAT_PORT_MIN)
    return h0, h1, h2


_NAT_RANGE_HDRS = {(a, L, p): _nat_range_hdrs(a, L, p)
                   for a in (CTA_NAT_SRC, CTA_NAT_DST) for L in (4, 16) for p in (False, True)}
_PORT_MAX_HDR = b"\0\0" + NLA_HDR.pack(6, CTA_PROTONAT_PORT_MAX)  # closes PORT_MIN's padding


# --- TCP flags ----------------------------------------------------------------------------

# CTA_PROTOINFO{TCP{state, wscale orig, wscale reply, flags orig, flags reply}} as the kernel
# writes it: the six headers after CTA_PROTOINFO's own
_read_tcp_headers = struct.Struct("=4x4s4s4x4s4x4s4x4s4x4s").unpack_from
_KERNEL_TCP_HEADERS = (
    NLA_HDR.pack(44, CTA_PROTOINFO_TCP | NLA_F_NESTED),
    NLA_HDR.pack(5, CTA_PROTOINFO_TCP_STATE),
    NLA_HDR.pack(5, CTA_PROTOINFO_TCP_WSCALE_ORIGINAL),
    NLA_HDR.pack(5, CTA_PROTOINFO_TCP_WSCALE_REPLY),
    NLA_HDR.pack(6, CTA_PROTOINFO_TCP_FLAGS_ORIGINAL),
    NLA_HDR.pack(6, CTA_PROTOINFO_TCP_FLAGS_REPLY),
)


def kernel_tcp_state(p: bytes) -> int | None:
    """The TCP state in a CTA_PROTOINFO of the kernel's own layout (one Struct read), else None."""
    if len(p) == 48 and _read_tcp_headers(p) == _KERNEL_TCP_HEADERS:
        return p[12]
    return None


def _tcp_flags_masked(p: bytes) -> bytes:
    """CTA_PROTOINFO with each direction's TCP flags marked BE_LIBERAL and its mask set to
    its flags.

    BE_LIBERAL: the window tracking this kernel would do needs the packets it never saw
    (the entry's windows start empty, or, on a former Master, stale). Liberal, only an RST
    must be in window: what the kernel itself does for a connection it picks up mid-stream.
    Without it the packets in flight at a takeover, some of them reordered, meet windows
    set up from whichever packet came first, and a bulk session was seen to die (lab: a
    10 MB/s session through two switchovers, 5 invalid drops, the sender timed out).
    The kernel's own layout (state, wscales, flags) is recognised with one Struct read;
    anything else is walked with plain loops. This runs once per TCP entry."""
    n = len(p)
    liberal = IP_CT_TCP_FLAG_BE_LIBERAL
    if n == 48 and _read_tcp_headers(p) == _KERNEL_TCP_HEADERS:
        fix = bytearray(p)
        fix[36] = fix[37] = p[36] | liberal
        fix[44] = fix[45] = p[44] | liberal
        return bytes(fix)
    unpack = NLA_HDR.unpack_from
    off = 4
    tcp_end = 0
    while off + 4 <= n:  # CTA_PROTOINFO's children: find CTA_PROTOINFO_TCP (the kernel's only one)
        alen, atype = unpack(p, off)
        if alen < 4 or off + alen > n:
            raise MalformedMessage(f"attribute length {alen} at {off} overruns {n}")
        if atype & NLA_TYPE_MASK == CTA_PROTOINFO_TCP:
            tcp_end = off + alen
            break
        off += (alen + 3) & ~3
    if not tcp_end:
        return p
    off += 4
    fix = None
    while off + 4 <= tcp_end:
        alen, atype = unpack(p, off)
        if alen < 4 or off + alen > tcp_end:
            raise MalformedMessage(f"attribute length {alen} at {off} overruns {tcp_end}")
        t = atype & NLA_TYPE_MASK
        if (t == CTA_PROTOINFO_TCP_FLAGS_ORIGINAL or t == CTA_PROTOINFO_TCP_FLAGS_REPLY) and alen >= 6:
            if fix is None:
                fix = bytearray(p)
            fix[off + 4] = fix[off + 5] = p[off + 4] | liberal
        off += (alen + 3) & ~3
    return p if fix is None else bytes(fix)
