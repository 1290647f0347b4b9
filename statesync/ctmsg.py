"""ctnetlink message codec: the hot path decodes as little as it can.

An entry travels as the kernel's own attribute bytes (everything after the
nfgenmsg header). Its identity is the raw bytes of CTA_TUPLE_ORIG (plus CTA_ZONE
when the entry lives in a non-default zone), so the Master never builds an
object per attribute; the Backup rewrites the header and a few attributes
(ctcreate.py) before handing the bytes to its own kernel.

This module: framing, the attribute walk, batch parsing, keys, and decoding on
demand (tuple_info, status_of, ..., decode_entry for tests and debugging).
Pure code: no sockets here (see ctnetlink.py). Constants live in ctconst.py
and are re-exported here.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

from .ctconst import *  # noqa: F401,F403  (constants are part of this module's API)
from .ctconst import (
    BE16, BE32, BE64, NFGEN_HDR, NFGEN_HDR_LEN, NLA_HDR, NLMSGERR, NLMSGHDR, NLMSGHDR_LEN,
)


class MalformedMessage(ValueError):
    """Bytes that do not parse as netlink attributes: the caller drops and counts them."""


@dataclass(slots=True)
class CtEvent:
    """One conntrack message: raw bytes plus the few ints needed to route it."""

    kind: int  # EV_NEW / EV_UPDATE / EV_DESTROY
    family: int  # AF_INET / AF_INET6
    key: bytes  # CTA_TUPLE_ORIG attribute (+ CTA_ZONE attribute if non-default zone)
    attrs: bytes  # attribute bytes after nfgenmsg, as the kernel sent them
    # nlmsg_pid of an event: the netlink port whose request caused it (0 for packets),
    # so a node can tell its own injections (CtSocket.portid) from real traffic
    portid: int = 0


def align4(n: int) -> int:
    return (n + 3) & ~3


# --- attribute walking ------------------------------------------------------------

def iter_attrs(buf: bytes, start: int = 0, end: int | None = None):
    """Yield (type, payload_start, payload_end, attr_start, attr_end_aligned)."""
    if end is None:
        end = len(buf)
    off = start
    unpack = NLA_HDR.unpack_from
    while off + 4 <= end:
        alen, atype = unpack(buf, off)
        if alen < 4 or off + alen > end:
            raise MalformedMessage(f"attribute length {alen} at {off} overruns {end}")
        nxt = off + align4(alen)
        yield atype & NLA_TYPE_MASK, off + 4, off + alen, off, min(nxt, end)
        off = nxt


def find_attr(buf: bytes, atype: int, start: int = 0, end: int | None = None) -> tuple[int, int] | None:
    """(payload_start, payload_end) of the first attribute of type `atype`, or None."""
    for t, ps, pe, _, _ in iter_attrs(buf, start, end):
        if t == atype:
            return ps, pe
    return None


def key_of(attrs: bytes, start: int = 0, end: int | None = None) -> bytes:
    """Identity of an entry: raw CTA_TUPLE_ORIG (+ CTA_ZONE) attribute bytes.

    The kernel writes CTA_TUPLE_ORIG, CTA_TUPLE_REPLY, then CTA_ZONE (only for a
    non-default zone) first in both events and dumps, so the walk stops after the
    third attribute.  The result is itself a valid attribute stream, ready to be
    the body of a delete request.
    """
    if end is None:
        end = len(attrs)
    unpack = NLA_HDR.unpack_from
    off = start
    orig = None
    for _ in range(3):
        if off + 4 > end:
            break
        alen, atype = unpack(attrs, off)
        if alen < 4 or off + alen > end:
            raise MalformedMessage(f"attribute length {alen} at {off} overruns {end}")
        nxt = off + ((alen + 3) & ~3)
        atype &= NLA_TYPE_MASK
        if atype == CTA_TUPLE_ORIG:
            orig = attrs[off:nxt]
        elif atype == CTA_ZONE:
            if orig is not None:
                return orig + attrs[off:nxt]
        off = nxt
    if orig is None:
        # not in kernel order (e.g. built by hand): fall back to a full walk
        zone = b""
        for t, _, _, a0, a1 in iter_attrs(attrs, start, end):
            if t == CTA_TUPLE_ORIG and orig is None:
                orig = attrs[a0:a1]
            elif t == CTA_ZONE:
                zone = attrs[a0:a1]
        if orig is None:
            raise MalformedMessage("no CTA_TUPLE_ORIG")
        return orig + zone
    return orig


# --- batch parsing (what recv() returned) ------------------------------------------

def parse_messages(buf, n: int | None = None, errors: list | None = None) -> list[CtEvent]:
    """Turn a recv() buffer of ctnetlink messages into CtEvents.

    NLMSG_ERROR messages are appended to `errors` as (seq, errno) if given;
    messages that do not parse are skipped (parse_messages_counted counts them).
    """
    return parse_messages_counted(buf, n, errors)[0]


def parse_messages_counted(buf, n: int | None = None, errors: list | None = None,
                           subsys: int = NFNL_SUBSYS_CTNETLINK):
    """(events, malformed messages dropped, NLMSG_DONE seen) for one recv() buffer.

    For subsys NFNL_SUBSYS_CTNETLINK_EXP (expectations) the events carry an
    empty key: ctexp.expectation_key computes theirs.
    """
    changes, bad, done = parse_changes(buf, n, errors, subsys)
    return [CtEvent(*c) for c in changes], bad, done


_KEY_HEADERS = struct.Struct("=HH")  # an attribute header: length, type


def parse_changes(buf, n: int | None = None, errors: list | None = None, subsys: int = NFNL_SUBSYS_CTNETLINK,
                  kind: int = 0) -> tuple[list[tuple[int, int, bytes, bytes, int]], int, bool]:
    """parse_messages_counted's hot twin: each message as a plain tuple
    (kind, family, key, attrs, portid), for the Master's event and dump loops (a tuple
    costs a tenth of a CtEvent). `kind` forces the kind (a dump's entries are all EV_NEW).

    The key is cut from the kernel's order (CTA_TUPLE_ORIG, CTA_TUPLE_REPLY, then CTA_ZONE
    only in a non-default zone) with fixed reads; any other order takes key_of's walk.
    """
    if n is None:
        n = len(buf)
    out: list[tuple[int, int, bytes, bytes, int]] = []
    append = out.append
    bad = 0
    done = False
    off = 0
    mv = bytes(buf[:n]) if not isinstance(buf, bytes) else buf
    header = NLMSGHDR.unpack_from
    attr = _KEY_HEADERS.unpack_from
    ct = subsys == NFNL_SUBSYS_CTNETLINK
    while off + NLMSGHDR_LEN <= n:
        mlen, mtype, mflags, seq, pid = header(mv, off)
        if mlen < NLMSGHDR_LEN or off + mlen > n:
            bad += 1
            break
        nxt = off + ((mlen + 3) & ~3)
        if (mtype >> 8) == subsys and mlen >= NFGEN_HDR_LEN:
            sub = mtype & 0xFF
            if sub == IPCTNL_MSG_CT_NEW:
                # the kernel marks a new entry with NLM_F_CREATE|NLM_F_EXCL, an update with neither
                k = kind or (EV_NEW if mflags & NLM_F_CREATE else EV_UPDATE)
            elif sub == IPCTNL_MSG_CT_DELETE:
                k = kind or EV_DESTROY
            else:
                off = nxt
                continue
            a0, end = off + NFGEN_HDR_LEN, off + mlen
            attrs = mv[a0:end]
            if not ct:
                append((k, mv[off + 16], b"", attrs, pid))
                off = nxt
                continue
            key = None
            if a0 + 12 <= end:
                l1, t1 = attr(mv, a0)
                a1 = a0 + ((l1 + 3) & ~3)
                if t1 & NLA_TYPE_MASK == CTA_TUPLE_ORIG and 4 <= l1 and a1 + 8 <= end:
                    l2, t2 = attr(mv, a1)
                    a2 = a1 + ((l2 + 3) & ~3)
                    if (l2 >= 4 and a2 + 4 <= end and t2 & NLA_TYPE_MASK != CTA_ZONE
                            and attr(mv, a2)[1] & NLA_TYPE_MASK != CTA_ZONE):
                        key = mv[a0:a1]
            try:
                if key is None:
                    key = key_of(attrs)
            except MalformedMessage:
                bad += 1
            else:
                append((k, mv[off + 16], key, attrs, pid))
        elif mtype == NLMSG_DONE:
            done = True
        elif mtype == NLMSG_ERROR:
            if errors is not None and mlen >= NLMSGHDR_LEN + 4:
                errors.append((seq, -NLMSGERR.unpack_from(mv, off + NLMSGHDR_LEN)[0]))
        off = nxt
    return out, bad, done


# --- request framing ------------------------------------------------------------------

def request(msg_type: int, flags: int, family: int, seq: int, body: bytes = b"") -> bytes:
    return NFGEN_HDR.pack(NFGEN_HDR_LEN + len(body), msg_type, flags, seq, 0, family, 0, 0) + body


def to_delete_message(family: int, key: bytes, seq: int, ack: bool = False) -> bytes:
    """A delete request for the entry whose key (orig tuple [+ zone] attributes) is `key`."""
    flags = NLM_F_REQUEST | (NLM_F_ACK if ack else 0)
    return NFGEN_HDR.pack(NFGEN_HDR_LEN + len(key), CT_DELETE, flags, seq, 0, family, 0, 0) + key


# --- decode on demand ---------------------------------------------------------------

def tuple_info(key: bytes) -> tuple[int, bytes, bytes, int, int]:
    """(proto, src, dst, sport, dport) of a key or any CTA_TUPLE_* attribute.

    For ICMP/ICMPv6, sport is the echo id and dport is (type << 8) | code.
    Addresses are 4 or 16 raw bytes.
    """
    alen, _ = NLA_HDR.unpack_from(key, 0)
    return _tuple_fields(key, 4, alen)


def _tuple_fields(buf: bytes, start: int, end: int) -> tuple[int, bytes, bytes, int, int]:
    src = dst = b""
    proto = sport = dport = 0
    icmp_type = icmp_code = None
    for t, ps, pe, _, _ in iter_attrs(buf, start, end):
        if t == CTA_TUPLE_IP:
            for it, ips, ipe, _, _ in iter_attrs(buf, ps, pe):
                if it in (CTA_IP_V4_SRC, CTA_IP_V6_SRC):
                    src = bytes(buf[ips:ipe])
                elif it in (CTA_IP_V4_DST, CTA_IP_V6_DST):
                    dst = bytes(buf[ips:ipe])
        elif t == CTA_TUPLE_PROTO:
            for pt, pps, ppe, _, _ in iter_attrs(buf, ps, pe):
                if pt == CTA_PROTO_NUM:
                    proto = buf[pps]
                elif pt == CTA_PROTO_SRC_PORT or pt == CTA_PROTO_ICMP_ID or pt == CTA_PROTO_ICMPV6_ID:
                    sport = BE16.unpack_from(buf, pps)[0]
                elif pt == CTA_PROTO_DST_PORT:
                    dport = BE16.unpack_from(buf, pps)[0]
                elif pt == CTA_PROTO_ICMP_TYPE or pt == CTA_PROTO_ICMPV6_TYPE:
                    icmp_type = buf[pps]
                elif pt == CTA_PROTO_ICMP_CODE or pt == CTA_PROTO_ICMPV6_CODE:
                    icmp_code = buf[pps]
    if icmp_type is not None or icmp_code is not None:
        dport = ((icmp_type or 0) << 8) | (icmp_code or 0)
    return proto, src, dst, sport, dport


def _u32(attrs: bytes, atype: int) -> int | None:
    span = find_attr(attrs, atype)
    return None if span is None else BE32.unpack_from(attrs, span[0])[0]


def status_of(attrs: bytes) -> int | None:
    return _u32(attrs, CTA_STATUS)


def mark_of(attrs: bytes) -> int | None:
    return _u32(attrs, CTA_MARK)


def timeout_of(attrs: bytes) -> int | None:
    return _u32(attrs, CTA_TIMEOUT)


def zone_of(attrs: bytes) -> int:
    span = find_attr(attrs, CTA_ZONE)
    return 0 if span is None else BE16.unpack_from(attrs, span[0])[0]


def tcp_state_of(attrs: bytes) -> int | None:
    span = find_attr(attrs, CTA_PROTOINFO)
    if span is None:
        return None
    tcp = find_attr(attrs, CTA_PROTOINFO_TCP, *span)
    if tcp is None:
        return None
    st = find_attr(attrs, CTA_PROTOINFO_TCP_STATE, *tcp)
    return None if st is None else attrs[st[0]]


def _tuple_dict(buf: bytes, ps: int, pe: int, family: int) -> dict:
    proto, src, dst, sport, dport = _tuple_fields(buf, ps, pe)
    d = {"proto": proto, "src": _ntop(family, src), "dst": _ntop(family, dst)}
    if proto in (IPPROTO_ICMP, IPPROTO_ICMPV6):
        d.update(id=sport, type=dport >> 8, code=dport & 0xFF)
    else:
        d.update(sport=sport, dport=dport)
    zone = find_attr(buf, CTA_TUPLE_ZONE, ps, pe)
    if zone is not None:
        d["zone"] = BE16.unpack_from(buf, zone[0])[0]
    return d


def _ntop(family: int, raw: bytes) -> str | None:
    if not raw:
        return None
    return socket.inet_ntop(socket.AF_INET6 if len(raw) == 16 else socket.AF_INET, raw)


def _protoinfo_dict(buf: bytes, ps: int, pe: int) -> dict:
    out: dict = {}
    for t, s, e, _, _ in iter_attrs(buf, ps, pe):
        if t == CTA_PROTOINFO_TCP:
            tcp: dict = {}
            for tt, ts, te, _, _ in iter_attrs(buf, s, e):
                if tt == CTA_PROTOINFO_TCP_STATE:
                    tcp["state"] = buf[ts]
                    tcp["state_name"] = TCP_STATE_NAMES[buf[ts]] if buf[ts] < len(TCP_STATE_NAMES) else str(buf[ts])
                elif tt == CTA_PROTOINFO_TCP_WSCALE_ORIGINAL:
                    tcp["wscale_orig"] = buf[ts]
                elif tt == CTA_PROTOINFO_TCP_WSCALE_REPLY:
                    tcp["wscale_reply"] = buf[ts]
                elif tt == CTA_PROTOINFO_TCP_FLAGS_ORIGINAL:
                    tcp["flags_orig"] = (buf[ts], buf[ts + 1])  # (flags, mask)
                elif tt == CTA_PROTOINFO_TCP_FLAGS_REPLY:
                    tcp["flags_reply"] = (buf[ts], buf[ts + 1])
            out["tcp"] = tcp
        elif t == CTA_PROTOINFO_SCTP:
            sctp: dict = {}
            for st, ss, se, _, _ in iter_attrs(buf, s, e):
                if st == CTA_PROTOINFO_SCTP_STATE:
                    sctp["state"] = buf[ss]
                elif st == CTA_PROTOINFO_SCTP_VTAG_ORIGINAL:
                    sctp["vtag_orig"] = BE32.unpack_from(buf, ss)[0]
                elif st == CTA_PROTOINFO_SCTP_VTAG_REPLY:
                    sctp["vtag_reply"] = BE32.unpack_from(buf, ss)[0]
            out["sctp"] = sctp
        elif t == CTA_PROTOINFO_DCCP:
            out["dccp"] = bytes(buf[s:e])
    return out


def decode_entry(family: int, attrs: bytes) -> dict:
    """Full decode for tests and debugging (slow path: one dict per entry)."""
    d: dict = {"family": family}
    for t, ps, pe, _, _ in iter_attrs(attrs):
        if t == CTA_TUPLE_ORIG:
            d["orig"] = _tuple_dict(attrs, ps, pe, family)
        elif t == CTA_TUPLE_REPLY:
            d["reply"] = _tuple_dict(attrs, ps, pe, family)
        elif t == CTA_TUPLE_MASTER:
            d["master"] = _tuple_dict(attrs, ps, pe, family)
        elif t == CTA_STATUS:
            d["status"] = BE32.unpack_from(attrs, ps)[0]
        elif t == CTA_TIMEOUT:
            d["timeout"] = BE32.unpack_from(attrs, ps)[0]
        elif t == CTA_MARK:
            d["mark"] = BE32.unpack_from(attrs, ps)[0]
        elif t == CTA_ZONE:
            d["zone"] = BE16.unpack_from(attrs, ps)[0]
        elif t == CTA_ID:
            d["id"] = BE32.unpack_from(attrs, ps)[0]
        elif t == CTA_USE:
            d["use"] = BE32.unpack_from(attrs, ps)[0]
        elif t == CTA_PROTOINFO:
            d["protoinfo"] = _protoinfo_dict(attrs, ps, pe)
        elif t == CTA_HELP:
            name = find_attr(attrs, CTA_HELP_NAME, ps, pe)
            if name is not None:
                d["helper"] = bytes(attrs[name[0]:name[1]]).rstrip(b"\0").decode(errors="replace")
        elif t in (CTA_COUNTERS_ORIG, CTA_COUNTERS_REPLY):
            c = {}
            for ct, cs, _, _, _ in iter_attrs(attrs, ps, pe):
                if ct == CTA_COUNTERS_PACKETS:
                    c["packets"] = BE64.unpack_from(attrs, cs)[0]
                elif ct == CTA_COUNTERS_BYTES:
                    c["bytes"] = BE64.unpack_from(attrs, cs)[0]
            d["counters_orig" if t == CTA_COUNTERS_ORIG else "counters_reply"] = c
        elif t == CTA_LABELS:
            d["labels"] = bytes(attrs[ps:pe])
        elif t == CTA_SECCTX:
            d["secctx"] = True
        elif t == CTA_TIMESTAMP:
            d["timestamp"] = True
    return d
