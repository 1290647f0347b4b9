"""A buffer of many ctnetlink messages parsed as arrays: the Master's dump path.

ctmsg.parse_changes walks message by message (~3 us each on this machine). A dump's
datagram holds dozens of entries and a resync reads a million, so here only the walk
over the message lengths and the cutting of each entry's key and attribute bytes stay
per message; the headers, the kind and the key's three attribute headers are read as
numpy arrays. The result is the same list parse_changes gives; a buffer the arrays
cannot vouch for (a message in another order, a zone, one cut short) goes through
parse_changes whole, which stays the reference (tests/unit/test_ctblock.py).
"""

from __future__ import annotations

import numpy as np

from .ctconst import (
    CTA_TUPLE_ORIG, CTA_ZONE, EV_DESTROY, EV_NEW, EV_UPDATE, IPCTNL_MSG_CT_DELETE, IPCTNL_MSG_CT_NEW,
    NFGEN_HDR_LEN, NFNL_SUBSYS_CTNETLINK, NLA_TYPE_MASK, NLM_F_CREATE, NLMSG_DONE, NLMSG_ERROR,
    NLMSGERR, NLMSGHDR_LEN,
)
from .ctmsg import parse_changes

MIN_MESSAGES = 8  # fewer than this: parse_changes is as quick


def parse_block(buf: bytes, errors: list | None = None, kind: int = 0) -> tuple[list[tuple], int, bool]:
    """parse_changes(buf, errors=errors, kind=kind), for a buffer of many messages."""
    n = len(buf)
    if n % 4:
        return parse_changes(buf, errors=errors, kind=kind)
    words = memoryview(buf).cast("I")
    offsets = []
    off = 0
    while off + NLMSGHDR_LEN <= n:  # the one walk: message lengths only
        length = words[off >> 2]
        if length < NLMSGHDR_LEN or off + length > n:
            return parse_changes(buf, errors=errors, kind=kind)
        offsets.append(off)
        off += (length + 3) & ~3
    if len(offsets) < MIN_MESSAGES or off != n:
        return parse_changes(buf, errors=errors, kind=kind)
    parsed = parse_at(buf, offsets, errors, kind)
    return parsed if parsed is not None else parse_changes(buf, errors=errors, kind=kind)


def parse_slots(buf: bytes, offsets: list[int], lengths: list[int], errors: list | None = None,
                kind: int = 0) -> tuple[list[tuple], int, bool]:
    """parse_changes of each datagram buf[offsets[i]:offsets[i] + lengths[i]] (mmsg's slots),
    concatenated: as arrays when every datagram is one message (events are)."""
    if len(offsets) >= MIN_MESSAGES and len(buf) % 4 == 0:
        o = np.array(offsets, np.int64)
        if (np.frombuffer(buf, np.uint32)[o >> 2] == np.array(lengths, np.uint32)).all():
            parsed = parse_at(buf, offsets, errors, kind)
            if parsed is not None:
                return parsed
    out: list[tuple] = []
    bad = 0
    done = False
    for at, length in zip(offsets, lengths):
        changes, b, d = parse_changes(buf[at:at + length], errors=errors, kind=kind)
        out += changes
        bad += b
        done = done or d
    return out, bad, done


def parse_at(buf: bytes, offsets: list[int], errors: list | None = None,
             kind: int = 0) -> tuple[list[tuple], int, bool] | None:
    """The messages starting at `offsets` (each within buf, 4-aligned), as parse_changes would
    give them; None (and nothing added to `errors`) if the arrays cannot vouch for them all."""
    words = memoryview(buf).cast("I")
    u16 = np.frombuffer(buf, np.uint16)
    u32 = np.frombuffer(buf, np.uint32)
    o = np.array(offsets, np.int64)
    length = u32[o >> 2].astype(np.int64)
    mtype = u16[(o + 4) >> 1]
    ct = ((mtype >> 8) == NFNL_SUBSYS_CTNETLINK) & (length >= NFGEN_HDR_LEN)
    sub = mtype & 0xFF
    entry = ct & ((sub == IPCTNL_MSG_CT_NEW) | (sub == IPCTNL_MSG_CT_DELETE))
    if not entry.any():
        return [], 0, _control_messages(buf, offsets, mtype, length, ~ct, words, errors)
    o, end = o[entry], o[entry] + length[entry]
    # the key: CTA_TUPLE_ORIG first, then two attributes neither of which is CTA_ZONE
    a0 = o + NFGEN_HDR_LEN
    fits = a0 + 12 <= end
    a0s = np.where(fits, a0, 0)
    l1 = u16[a0s >> 1].astype(np.int64)
    a1 = a0 + ((l1 + 3) & ~3)
    fits &= (l1 >= 4) & (a1 + 8 <= end) & ((u16[(a0s + 2) >> 1] & NLA_TYPE_MASK) == CTA_TUPLE_ORIG)
    a1s = np.where(fits, a1, 0)
    l2 = u16[a1s >> 1].astype(np.int64)
    a2 = a1 + ((l2 + 3) & ~3)
    fits &= (l2 >= 4) & (a2 + 4 <= end) & ((u16[(a1s + 2) >> 1] & NLA_TYPE_MASK) != CTA_ZONE)
    a2s = np.where(fits, a2, 0)
    fits &= (u16[(a2s + 2) >> 1] & NLA_TYPE_MASK) != CTA_ZONE
    if not fits.all():
        return None
    done = _control_messages(buf, offsets, mtype, length, ~ct, words, errors)
    if kind:
        kinds = [kind] * len(o)
    else:
        sub_e = sub[entry]
        created = (u16[(o + 6) >> 1] & NLM_F_CREATE) != 0
        kinds = np.where(sub_e == IPCTNL_MSG_CT_DELETE, EV_DESTROY,
                         np.where(created, EV_NEW, EV_UPDATE)).tolist()
    families = np.frombuffer(buf, np.uint8)[o + 16].tolist()
    pids = u32[(o + 12) >> 2].tolist()
    starts, key_ends, ends = a0.tolist(), a1.tolist(), end.tolist()
    keys = [buf[a:b] for a, b in zip(starts, key_ends)]
    attrs = [buf[a:b] for a, b in zip(starts, ends)]
    return list(zip(kinds, families, keys, attrs, pids)), 0, done


def _control_messages(buf, offsets, mtype, length, which, words, errors) -> bool:
    """DONE and ERROR among the messages (a few per buffer at most); True if DONE was seen."""
    done = False
    for i in np.flatnonzero(which).tolist():
        t = int(mtype[i])
        if t == NLMSG_DONE:
            done = True
        elif t == NLMSG_ERROR and errors is not None and length[i] >= NLMSGHDR_LEN + 4:
            at = offsets[i]
            errors.append((words[(at + 8) >> 2], -NLMSGERR.unpack_from(buf, at + NLMSGHDR_LEN)[0]))
    return done


__all__ = ["parse_block", "parse_slots", "parse_at", "MIN_MESSAGES", "EV_NEW"]
