"""Create/update requests for many captured entries at once: one numpy copy per layout.

ctcreate.prepare rewrites one entry with ~20 slice operations (~7 us per entry on this
machine: the Backup's largest cost in a burst or a resync). But a burst is thousands of
entries of one layout, and every rewrite prepare makes is a *byte permutation* of that
layout: the un-NATed reply tuple is the original tuple with its addresses and ports
swapped, CTA_NAT_SRC/DST are headers around bytes of the reply tuple, the TCP flag masks
are copies of the flags, the request header is constant but for its sequence number. So
entries of one layout and one NAT class are stacked into a (k, L) byte matrix and each
output run is one strided numpy copy; the only per-entry Python left is grouping.

An entry takes this path only when every attribute header it has matches the layout the
group's first entry taught us (top level, both tuples, the TCP protoinfo), it has
CTA_STATUS without IPS_EXPECTED, no CTA_TUPLE_MASTER, and port-protocol tuples in the
kernel's layout. Everything else (ICMP, related entries, odd layouts, malformed bytes)
goes through ctcreate.prepare, which stays the reference: tests/unit/test_ctbatch.py checks
that both give the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from .ctbuild import IP_CT_TCP_FLAG_BE_LIBERAL
from .ctconst import (
    CT_NEW, CTA_NAT_DST, CTA_NAT_SRC, CTA_PROTOINFO, CTA_STATUS, CTA_TIMEOUT, CTA_TUPLE_MASTER, CTA_TUPLE_ORIG,
    CTA_TUPLE_REPLY, IPS_CONFIRMED, IPS_EXPECTED, KEPT_ATTRS, NFGEN_HDR, NFGEN_HDR_LEN, NLA_HDR,
    NLA_TYPE_MASK,
)
from .ctcreate import (
    _KERNEL_TCP_HEADERS, _LAYOUTS, _NAT_RANGE_HDRS, _PORT_MAX_HDR, _PORT_TUPLE_SHAPE, _REPLY_HDRS, _STATUS_HDR,
    CREATE_EXCL_FLAGS, CREATE_FLAGS, UPDATE_FLAGS,
)
from .ctmsg import MalformedMessage

MIN_GROUP = 32  # below this the per-group set-up costs more than prepare() per entry

# a piece of an output row: ("in", start, stop) bytes of the entry, or ("const", bytes)
Piece = tuple


@dataclass(frozen=True, slots=True)
class Layout:
    """Where things sit in entries of one attribute layout (learnt from one entry)."""

    length: int
    check: tuple[tuple[int, bytes], ...]  # (offset, header bytes) every entry must show
    common: tuple[Piece, ...]  # orig, kept attributes, protoinfo (flag masks set), in order
    orig: int  # offset of CTA_TUPLE_ORIG
    reply: int  # offset of CTA_TUPLE_REPLY
    status: int  # offset of CTA_STATUS's value
    addr_len: int  # 4 or 16
    timeout: int = -1  # offset of CTA_TIMEOUT's value, -1 if the layout has none


def learn(attrs: bytes) -> Layout | None:
    """The layout of `attrs` if entries like it can be rewritten as a matrix, else None."""
    unpack = NLA_HDR.unpack_from
    end = len(attrs)
    if end % 4:
        return None  # not the kernel's (aligned) layout
    off = 0
    check: list[tuple[int, bytes]] = []
    common: list[Piece] = []
    orig = reply = status = None
    timeout = -1
    while off + 4 <= end:
        alen, atype = unpack(attrs, off)
        if alen < 4 or off + alen > end:
            return None
        nxt = min(off + ((alen + 3) & ~3), end)
        check.append((off, attrs[off:off + 4]))
        t = atype & NLA_TYPE_MASK
        if t == CTA_TUPLE_ORIG:
            orig = off
            common.append(("in", off, nxt))
        elif t == CTA_TUPLE_REPLY:
            reply = off
        elif t == CTA_STATUS and alen == 8:
            status = off + 4
        elif t == CTA_TUPLE_MASTER:
            return None  # related entry: create and update differ in more than NAT
        elif t == CTA_PROTOINFO:
            piece = _protoinfo_pieces(attrs, off, nxt, check)
            if piece is None:
                return None
            common.extend(piece)
        elif t in KEPT_ATTRS:
            if t == CTA_TIMEOUT and alen == 8:
                timeout = off + 4
            common.append(("in", off, nxt))
        off = nxt
    if off != end or orig is None or reply is None or status is None:
        return None
    olen = unpack(attrs, orig)[0]
    lay = _LAYOUTS.get(olen)
    if lay is None or unpack(attrs, reply)[0] != olen:
        return None
    L = (olen - 44) // 2
    for base in (orig, reply):
        t = attrs[base:base + olen]
        if not lay.matches(t):
            return None
        # the five headers ctcreate's layout checks, and the IP and proto nests
        check.extend((base + o, h) for (o, h) in _PORT_TUPLE_SHAPE[L])
        check.extend((base + o, t[o:o + 4]) for o in (4, 16 + 2 * L))
    return Layout(end, tuple(check), tuple(common), orig, reply, status, L, timeout)


def _protoinfo_pieces(attrs: bytes, start: int, stop: int, check: list) -> list[Piece] | None:
    """CTA_PROTOINFO with the TCP flag masks set to the flags (see ctcreate._tcp_flags_masked),
    for the kernel's 48-byte TCP layout only."""
    if stop - start != 48:
        return None
    p = attrs[start:stop]
    headers = (p[4:8], p[8:12], p[16:20], p[24:28], p[32:36], p[40:44])
    if headers != _KERNEL_TCP_HEADERS:
        return None
    check.extend((start + o, h) for o, h in zip((4, 8, 16, 24, 32, 40), headers))
    s = start
    # flags orig at +36 (mask +37), flags reply at +44 (mask +45): each a copy of the flags
    # with BE_LIBERAL ORed in (ctcreate._tcp_flags_masked says why)
    return [("in", s, s + 36), ("flags", s + 36), ("flags", s + 36), ("in", s + 38, s + 44),
            ("flags", s + 44), ("flags", s + 44), ("in", s + 46, s + 48)]


# -- the forms, as pieces ---------------------------------------------------------------------

def _tuple_fields(base: int, L: int) -> dict[str, Piece]:
    return {"src": ("in", base + 12, base + 12 + L), "dst": ("in", base + 16 + L, base + 16 + 2 * L),
            "sport": ("in", base + 32 + 2 * L, base + 34 + 2 * L),
            "dport": ("in", base + 40 + 2 * L, base + 42 + 2 * L)}


def _inverse_of_orig(lay: Layout) -> list[Piece]:
    b, L = lay.orig, lay.addr_len
    o = _tuple_fields(b, L)
    return [("const", _REPLY_HDRS[L]), ("in", b + 4, b + 12), o["dst"], ("in", b + 12 + L, b + 16 + L), o["src"],
            ("in", b + 16 + 2 * L, b + 32 + 2 * L), o["dport"], ("in", b + 34 + 2 * L, b + 40 + 2 * L), o["sport"],
            ("in", b + 42 + 2 * L, b + 44 + 2 * L)]


def _nat_range(atype: int, addr: Piece, port: Piece, L: int) -> list[Piece]:
    h0, h1, h2 = _NAT_RANGE_HDRS[atype, L, True]
    return [("const", h0), addr, ("const", h1), addr, ("const", h2), port, ("const", _PORT_MAX_HDR), port,
            ("const", b"\0\0")]


STATUS = ("status",)  # placeholder: CTA_STATUS header + the entry's status | IPS_CONFIRMED


def form(lay: Layout, snat: bool, dnat: bool, update: bool) -> list[Piece]:
    """The request body prepare() builds, as pieces: plain (no NAT: create-or-update), the
    NAT create form (un-NATed reply + CTA_NAT_*), or the NAT update form."""
    reply = ("in", lay.reply, lay.reply + 44 + 2 * lay.addr_len)
    pieces = list(lay.common)
    if not (snat or dnat):
        return pieces + [STATUS, reply]
    if update:
        return pieces + [reply, STATUS]
    pieces += [STATUS] + _inverse_of_orig(lay)
    r = _tuple_fields(lay.reply, lay.addr_len)
    if dnat:
        pieces += _nat_range(CTA_NAT_DST, r["src"], r["sport"], lay.addr_len)
    if snat:
        pieces += _nat_range(CTA_NAT_SRC, r["dst"], r["dport"], lay.addr_len)
    return pieces


# -- compiled: runs of column copies --------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Program:
    """Copies that turn a (k, L) matrix of entries into a (k, width) matrix of requests."""

    width: int  # request length (header included)
    header: bytes  # the request header, sequence number 0
    runs: tuple[tuple[int, int, int], ...]  # (output column, input column, length): from the entry
    consts: tuple[tuple[int, bytes], ...]  # (output column, bytes): the same in every row
    status_byte: int  # output column of the status' lowest byte (IPS_CONFIRMED is ORed in)
    timeout_at: int = -1  # output column of CTA_TIMEOUT's value (raised to a hold), -1: none
    liberal_at: tuple[int, ...] = ()  # output columns of TCP flags and masks: BE_LIBERAL ORed in


def compile_form(pieces: list[Piece], lay: Layout, family: int, flags: int) -> Program:
    runs: list[list[int]] = []
    consts: list[tuple[int, bytes]] = []
    pos = NFGEN_HDR_LEN
    status_byte = timeout_at = -1
    liberal_at: list[int] = []
    for piece in pieces:
        if piece[0] == "flags":
            liberal_at.append(pos)
            piece = ("in", piece[1], piece[1] + 1)
        if piece is STATUS:
            consts.append((pos, _STATUS_HDR))
            piece = ("in", lay.status, lay.status + 4)
            status_byte = pos + 7
            pos += 4
        if piece[0] == "const":
            consts.append((pos, piece[1]))
            pos += len(piece[1])
            continue
        _, a, b = piece
        if a <= lay.timeout < b:
            timeout_at = pos + lay.timeout - a
        if runs and runs[-1][0] + runs[-1][2] == pos and runs[-1][1] + runs[-1][2] == a:
            runs[-1][2] += b - a  # adjacent in both: one longer copy
        else:
            runs.append([pos, a, b - a])
        pos += b - a
    header = NFGEN_HDR.pack(pos, CT_NEW, flags, 0, 0, family, 0, 0)
    return Program(pos, header, tuple(map(tuple, runs)), tuple(consts), status_byte, timeout_at,
                   tuple(liberal_at))


def run_program(prog: Program, rows: np.ndarray, seq0: int, hold: int = 0) -> bytes:
    """Requests for `rows` (k, L) with sequence numbers seq0, seq0 + 1, ...; `hold`: each
    CTA_TIMEOUT raised to at least that many seconds (as ctcreate.prepare does)."""
    k = rows.shape[0]
    out = np.empty((k, prog.width), np.uint8)
    out[:, :NFGEN_HDR_LEN] = np.frombuffer(prog.header, np.uint8)
    for dst, src, n in prog.runs:
        out[:, dst:dst + n] = rows[:, src:src + n]
    for dst, data in prog.consts:
        out[:, dst:dst + len(data)] = np.frombuffer(data, np.uint8)
    out[:, prog.status_byte] |= IPS_CONFIRMED & 0xFF
    if prog.liberal_at:
        out[:, list(prog.liberal_at)] |= IP_CT_TCP_FLAG_BE_LIBERAL
    if hold and prog.timeout_at >= 0:
        timeout = out[:, prog.timeout_at:prog.timeout_at + 4].view(">u4")
        np.maximum(timeout, np.array(hold, ">u4"), out=timeout)
    seqs = (np.arange(k, dtype=np.uint64) + seq0) & 0xFFFFFFFF
    out[:, 8:12] = seqs.astype(np.uint32).view(np.uint8).reshape(k, 4)  # nlmsg_seq, host order
    return out.tobytes()


# -- a group: entries of one family and length ----------------------------------------------

_PROGRAMS: dict[tuple, tuple[Layout, dict]] = {}
_MAX_PROGRAMS = 64


def _programs_for(family: int, sample: bytes) -> tuple[Layout, dict] | None:
    lay = learn(sample)
    if lay is None:
        return None
    cache_key = (family, lay.length, lay.check)
    hit = _PROGRAMS.get(cache_key)
    if hit is not None:
        return hit
    progs = {}
    for snat in (False, True):
        for dnat in (False, True):
            nat = snat or dnat
            progs[snat, dnat, True] = compile_form(form(lay, snat, dnat, False), lay, family,
                                                   CREATE_EXCL_FLAGS if nat else CREATE_FLAGS)
            progs[snat, dnat, False] = compile_form(form(lay, snat, dnat, nat), lay, family,
                                                    UPDATE_FLAGS if nat else CREATE_FLAGS)
    if len(_PROGRAMS) >= _MAX_PROGRAMS:
        _PROGRAMS.clear()
    _PROGRAMS[cache_key] = (lay, progs)
    return lay, progs


def _matching(rows: np.ndarray, lay: Layout) -> np.ndarray:
    """Rows whose headers are all the layout's and whose status lacks IPS_EXPECTED."""
    ok = (rows[:, lay.status + 3] & (IPS_EXPECTED & 0xFF)) == 0
    # attributes are 4-aligned: every header is one 32-bit word of the row
    cols = np.array([off // 4 for off, _ in lay.check])
    want = np.frombuffer(b"".join(h for _, h in lay.check), np.uint32)
    ok &= (rows.view(np.uint32)[:, cols] == want).all(axis=1)
    return ok


def _nat_classes(rows: np.ndarray, lay: Layout) -> tuple[np.ndarray, np.ndarray]:
    """(snat, dnat) per row, as ctcreate._nat_for_create decides them."""
    L = lay.addr_len
    o, r = _tuple_fields(lay.orig, L), _tuple_fields(lay.reply, L)

    def differ(a: Piece, b: Piece) -> np.ndarray:
        return (rows[:, a[1]:a[2]] != rows[:, b[1]:b[2]]).any(axis=1)

    snat = differ(r["dst"], o["src"]) | differ(r["dport"], o["sport"])
    dnat = differ(r["src"], o["dst"]) | differ(r["sport"], o["dport"])
    return snat, dnat


def groups(entries: list[tuple[int, bytes]], small: list[int]) -> Iterator[tuple[int, np.ndarray]]:
    """(family, indices) of every family-and-length group of at least MIN_GROUP entries;
    the indices of the others are appended to `small`."""
    n = len(entries)
    if n < MIN_GROUP:
        small.extend(range(n))
        return
    fams = np.fromiter([e[0] for e in entries], np.int64, n)
    key = np.fromiter([len(e[1]) for e in entries], np.int64, n) * 256 + fams
    if key.min() == key.max():  # a burst: one layout
        yield int(fams[0]), np.arange(n)
        return
    values, inverse = np.unique(key, return_inverse=True)
    for v, value in enumerate(values):
        members = np.flatnonzero(inverse == v)
        if len(members) < MIN_GROUP:
            small.extend(members.tolist())
        else:
            yield int(value & 0xFF), members


def concat(parts: list, dtype) -> np.ndarray:
    """Lists and arrays joined into one array (FramedApply.index / has_other)."""
    return np.concatenate([np.asarray(p, dtype) for p in parts]) if parts else np.zeros(0, dtype)


@dataclass(slots=True)
class GroupOutput:
    blocks: list[tuple[bytes, int, int]]  # (requests, row width, how many)
    order: np.ndarray  # per request: index into the group's entries
    has_other: np.ndarray  # per request: a NATed entry (the other form may be needed)
    rest: np.ndarray  # indices of entries left to ctcreate.prepare


def frame_group(family: int, attrs_list: list[bytes], seq0: int, likely_new: bool, hold: int = 0) -> GroupOutput:
    """Requests for entries of one family and one length; sequence numbers from seq0 on, in
    the order of `order`. Entries the matrix cannot take are returned in `rest`."""
    n = len(attrs_list)
    found = _programs_for(family, attrs_list[0])
    if found is None:
        return GroupOutput([], np.zeros(0, np.int64), np.zeros(0, bool), np.arange(n))
    lay, progs = found
    rows = np.frombuffer(b"".join(attrs_list), np.uint8).reshape(n, lay.length)
    ok = _matching(rows, lay)
    snat, dnat = _nat_classes(rows, lay)
    nat_class = snat * 2 + dnat  # 0 none, 1 DNAT, 2 SNAT, 3 both
    blocks = []
    order = []
    seq = seq0
    for c in range(4):
        idx = np.flatnonzero(ok & (nat_class == c))
        if not len(idx):
            continue
        prog = progs[c >= 2, c & 1 == 1, likely_new]
        block = rows if len(idx) == n else rows[idx]
        blocks.append((run_program(prog, block, seq, hold), prog.width, len(idx)))
        order.append(idx)
        seq = (seq + len(idx)) & 0xFFFFFFFF
    order_arr = concat(order, np.int64)
    return GroupOutput(blocks, order_arr, nat_class[order_arr] != 0, np.flatnonzero(~ok))


__all__ = ["MIN_GROUP", "Layout", "learn", "form", "compile_form", "run_program", "frame_group", "groups",
           "concat", "GroupOutput", "MalformedMessage"]
