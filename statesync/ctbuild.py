"""Build ctnetlink attribute bytes by hand: entries for tests, benchmarks and injection.

The inverse of ctmsg's decoder, byte-compatible with what the kernel emits
(nested attributes flagged NLA_F_NESTED, values big-endian, 4-byte padding), so
an entry built here and one captured from the kernel key and apply the same way.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

from .ctconst import (
    BE16, BE32, NLA_F_NESTED, NLA_HDR,
    CTA_IP_V4_DST, CTA_IP_V4_SRC, CTA_IP_V6_DST, CTA_IP_V6_SRC, CTA_MARK,
    CTA_PROTO_DST_PORT, CTA_PROTO_ICMP_CODE, CTA_PROTO_ICMP_ID, CTA_PROTO_ICMP_TYPE,
    CTA_PROTO_ICMPV6_CODE, CTA_PROTO_ICMPV6_ID, CTA_PROTO_ICMPV6_TYPE, CTA_PROTO_NUM,
    CTA_PROTO_SRC_PORT, CTA_PROTOINFO, CTA_PROTOINFO_SCTP, CTA_PROTOINFO_SCTP_STATE,
    CTA_PROTOINFO_SCTP_VTAG_ORIGINAL, CTA_PROTOINFO_SCTP_VTAG_REPLY, CTA_PROTOINFO_TCP,
    CTA_PROTOINFO_TCP_FLAGS_ORIGINAL, CTA_PROTOINFO_TCP_FLAGS_REPLY, CTA_PROTOINFO_TCP_STATE,
    CTA_PROTOINFO_TCP_WSCALE_ORIGINAL, CTA_PROTOINFO_TCP_WSCALE_REPLY, CTA_STATUS,
    CTA_TIMEOUT, CTA_TUPLE_IP, CTA_TUPLE_ORIG, CTA_TUPLE_PROTO, CTA_TUPLE_REPLY, CTA_ZONE,
    IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_SCTP, IPPROTO_TCP, IPS_ASSURED, IPS_CONFIRMED,
    IPS_SEEN_REPLY, IPS_SRC_NAT, IPS_SRC_NAT_DONE, IPS_DST_NAT_DONE,
    TCP_CONNTRACK_ESTABLISHED,
)

CtEntry = tuple[int, bytes]  # (family, attribute bytes): what the Backup applies

# TCP window-scaling / SACK flags as conntrack keeps them (nf_conntrack_tcp.h)
IP_CT_TCP_FLAG_WINDOW_SCALE = 0x01
IP_CT_TCP_FLAG_SACK_PERM = 0x02
IP_CT_TCP_FLAG_BE_LIBERAL = 0x08
_TCP_FLAGS_KEPT = IP_CT_TCP_FLAG_WINDOW_SCALE | IP_CT_TCP_FLAG_SACK_PERM


def nla(atype: int, payload: bytes) -> bytes:
    n = 4 + len(payload)
    return NLA_HDR.pack(n, atype) + payload + b"\0" * (-n & 3)


def nest(atype: int, *children: bytes) -> bytes:
    body = b"".join(children)
    return NLA_HDR.pack(4 + len(body), atype | NLA_F_NESTED) + body


def u8(atype: int, v: int) -> bytes:
    return nla(atype, bytes((v,)))


def be16(atype: int, v: int) -> bytes:
    return nla(atype, BE16.pack(v))


def be32(atype: int, v: int) -> bytes:
    return nla(atype, BE32.pack(v))


@dataclass(frozen=True, slots=True)
class Tuple:
    """One direction of a connection. For ICMP, sport is the id and dport is type << 8 | code."""

    proto: int
    src: str | bytes  # text or packed (4 or 16 bytes)
    dst: str | bytes
    sport: int = 0
    dport: int = 0

    @property
    def family(self) -> int:
        v6 = len(self.src) == 16 if isinstance(self.src, bytes) else ":" in self.src
        return socket.AF_INET6 if v6 else socket.AF_INET


def encode_tuple(atype: int, t: Tuple) -> bytes:
    """A CTA_TUPLE_ORIG / CTA_TUPLE_REPLY / CTA_TUPLE_MASTER nest."""
    v6 = t.family == socket.AF_INET6
    src = ipaddress.ip_address(t.src).packed
    dst = ipaddress.ip_address(t.dst).packed
    ip = nest(CTA_TUPLE_IP,
              nla(CTA_IP_V6_SRC if v6 else CTA_IP_V4_SRC, src),
              nla(CTA_IP_V6_DST if v6 else CTA_IP_V4_DST, dst))
    return nest(atype, ip, encode_proto(t))


def encode_proto(t: Tuple) -> bytes:
    if t.proto == IPPROTO_ICMP:
        l4 = (be16(CTA_PROTO_ICMP_ID, t.sport), u8(CTA_PROTO_ICMP_TYPE, t.dport >> 8),
              u8(CTA_PROTO_ICMP_CODE, t.dport & 0xFF))
    elif t.proto == IPPROTO_ICMPV6:
        l4 = (be16(CTA_PROTO_ICMPV6_ID, t.sport), u8(CTA_PROTO_ICMPV6_TYPE, t.dport >> 8),
              u8(CTA_PROTO_ICMPV6_CODE, t.dport & 0xFF))
    else:
        l4 = (be16(CTA_PROTO_SRC_PORT, t.sport), be16(CTA_PROTO_DST_PORT, t.dport))
    return nest(CTA_TUPLE_PROTO, u8(CTA_PROTO_NUM, t.proto), *l4)


def encode_tcp_protoinfo(state: int, wscale: tuple[int, int] = (7, 7),
                         flags: tuple[int, int] = (_TCP_FLAGS_KEPT, _TCP_FLAGS_KEPT)) -> bytes:
    return nest(CTA_PROTOINFO, nest(
        CTA_PROTOINFO_TCP,
        u8(CTA_PROTOINFO_TCP_STATE, state),
        u8(CTA_PROTOINFO_TCP_WSCALE_ORIGINAL, wscale[0]),
        u8(CTA_PROTOINFO_TCP_WSCALE_REPLY, wscale[1]),
        # struct nf_ct_tcp_flags {u8 flags; u8 mask;}: mask says which bits to set
        nla(CTA_PROTOINFO_TCP_FLAGS_ORIGINAL, bytes((flags[0], 0xFF))),
        nla(CTA_PROTOINFO_TCP_FLAGS_REPLY, bytes((flags[1], 0xFF))),
    ))


def encode_tcp_liberal() -> bytes:
    """CTA_PROTOINFO that sets BE_LIBERAL in both directions of a TCP entry and leaves every
    other flag, the state and the windows as they are (the mask holds that bit alone)."""
    both = bytes((IP_CT_TCP_FLAG_BE_LIBERAL, IP_CT_TCP_FLAG_BE_LIBERAL))
    return nest(CTA_PROTOINFO, nest(CTA_PROTOINFO_TCP, nla(CTA_PROTOINFO_TCP_FLAGS_ORIGINAL, both),
                                    nla(CTA_PROTOINFO_TCP_FLAGS_REPLY, both)))


def encode_sctp_protoinfo(state: int, vtag_orig: int, vtag_reply: int) -> bytes:
    return nest(CTA_PROTOINFO, nest(
        CTA_PROTOINFO_SCTP,
        u8(CTA_PROTOINFO_SCTP_STATE, state),
        be32(CTA_PROTOINFO_SCTP_VTAG_ORIGINAL, vtag_orig),
        be32(CTA_PROTOINFO_SCTP_VTAG_REPLY, vtag_reply),
    ))


def encode_entry(orig: Tuple, reply: Tuple | None = None, *, status: int = IPS_SEEN_REPLY | IPS_ASSURED | IPS_CONFIRMED,
                 timeout: int = 600, mark: int | None = None, zone: int | None = None,
                 tcp_state: int | None = TCP_CONNTRACK_ESTABLISHED,
                 sctp: tuple[int, int, int] | None = None) -> CtEntry:
    """Attribute bytes in the kernel's order: tuples, zone, status, timeout, mark, protoinfo."""
    if reply is None:  # no NAT: the reply tuple is the inverse of the original
        reply = Tuple(orig.proto, orig.dst, orig.src, orig.dport, orig.sport)
        if orig.proto in (IPPROTO_ICMP, IPPROTO_ICMPV6):
            reply = Tuple(orig.proto, orig.dst, orig.src, orig.sport, icmp_reply_type(orig.proto, orig.dport))
    parts = [encode_tuple(CTA_TUPLE_ORIG, orig), encode_tuple(CTA_TUPLE_REPLY, reply)]
    if zone:
        parts.append(be16(CTA_ZONE, zone))
    parts.append(be32(CTA_STATUS, status))
    parts.append(be32(CTA_TIMEOUT, timeout))
    if mark is not None:
        parts.append(be32(CTA_MARK, mark))
    if orig.proto == IPPROTO_TCP and tcp_state is not None:
        parts.append(encode_tcp_protoinfo(tcp_state))
    elif orig.proto == IPPROTO_SCTP and sctp is not None:
        parts.append(encode_sctp_protoinfo(*sctp))
    return orig.family, b"".join(parts)


# the kernel's invmap (nf_conntrack_proto_icmp.c / _icmpv6.c): request <-> reply
_ICMP_INVERSE = {8: 0, 0: 8, 13: 14, 14: 13, 15: 16, 16: 15, 17: 18, 18: 17}
_ICMPV6_INVERSE = {128: 129, 129: 128, 139: 140, 140: 139}


def icmp_reply_type(proto: int, type_code: int) -> int:
    """type << 8 | code of the reply direction of an ICMP/ICMPv6 tuple."""
    typ, code = type_code >> 8, type_code & 0xFF
    table = _ICMP_INVERSE if proto == IPPROTO_ICMP else _ICMPV6_INVERSE
    return (table.get(typ, typ) << 8) | code


SYNTH_NAT_STATUS = IPS_SEEN_REPLY | IPS_ASSURED | IPS_CONFIRMED | IPS_SRC_NAT | IPS_SRC_NAT_DONE | IPS_DST_NAT_DONE


def synthetic_entries(n: int, *, start: int = 0, nat_ip: str = "203.0.113.1", dport: int = 80,
                      timeout: int = 600, mark: int | None = None, zone: int | None = None,
                      family: int = socket.AF_INET) -> list[CtEntry]:
    """n ESTABLISHED TCP entries with distinct tuples, SNATed to `nat_ip`.

    IPv4: client 198.18.0.0/16 -> server 198.19.0.0/16 (both in 198.18.0.0/15).
    Entry i: client host i % 65536, client port 1024 + i // 65536, NAT port
    1024 + i % 60000 on server 198.19.0.0 + 1 + i // 60000, so both the original
    and the reply tuples are unique (a reply-tuple clash is refused by the kernel).
    IPv6 uses 2001:db8:18::/112 -> 2001:db8:19::/112, NAT address 2001:db8:203::1.
    `start` offsets the sequence so two calls give disjoint sets.
    Built from precomputed byte pieces (no per-attribute objects): 200k in ~1 s.
    """
    if family == socket.AF_INET6:
        client0, server0 = "2001:db8:18::", "2001:db8:19::"
        nat_ip = nat_ip if ":" in nat_ip else "2001:db8:203::1"
    else:
        client0, server0 = "198.18.0.0", "198.19.0.0"
    c0 = int(ipaddress.ip_address(client0))
    s0 = int(ipaddress.ip_address(server0)) + 1
    nat = ipaddress.ip_address(nat_ip).packed
    L = len(nat)
    ip_src_t, ip_dst_t = (CTA_IP_V6_SRC, CTA_IP_V6_DST) if L == 16 else (CTA_IP_V4_SRC, CTA_IP_V4_DST)
    tuple_hdr = {a: NLA_HDR.pack(44 + 2 * L, a | NLA_F_NESTED) for a in (CTA_TUPLE_ORIG, CTA_TUPLE_REPLY)}
    ip_nest = NLA_HDR.pack(4 + 2 * (4 + L), CTA_TUPLE_IP | NLA_F_NESTED)
    src_h, dst_h = NLA_HDR.pack(4 + L, ip_src_t), NLA_HDR.pack(4 + L, ip_dst_t)
    proto_part = nest(CTA_TUPLE_PROTO, u8(CTA_PROTO_NUM, IPPROTO_TCP))  # length patched below
    proto_hdr = NLA_HDR.pack(len(proto_part) + 16, CTA_TUPLE_PROTO | NLA_F_NESTED) + proto_part[4:]
    sp_h, dp_h = NLA_HDR.pack(6, CTA_PROTO_SRC_PORT), NLA_HDR.pack(6, CTA_PROTO_DST_PORT)
    pad = b"\0\0"
    dport_b = BE16.pack(dport)
    tail = [b""]
    if zone:
        tail.append(be16(CTA_ZONE, zone))
    tail.append(be32(CTA_STATUS, SYNTH_NAT_STATUS))
    tail.append(be32(CTA_TIMEOUT, timeout))
    if mark is not None:
        tail.append(be32(CTA_MARK, mark))
    tail.append(encode_tcp_protoinfo(TCP_CONNTRACK_ESTABLISHED))
    tail_b = b"".join(tail)
    o_hdr, r_hdr = tuple_hdr[CTA_TUPLE_ORIG], tuple_hdr[CTA_TUPLE_REPLY]
    out = []
    for i in range(start, start + n):
        client = (c0 + (i & 0xFFFF)).to_bytes(L, "big")
        server = (s0 + i // 60000).to_bytes(L, "big")
        cport = BE16.pack(1024 + (i >> 16) % 64512)
        nport = BE16.pack(1024 + i % 60000)
        out.append((family, b"".join((
            o_hdr, ip_nest, src_h, client, dst_h, server, proto_hdr, sp_h, cport, pad, dp_h, dport_b, pad,
            r_hdr, ip_nest, src_h, server, dst_h, nat, proto_hdr, sp_h, dport_b, pad, dp_h, nport, pad,
            tail_b))))
    return out
