"""Conntrack expectations (NFNL_SUBSYS_CTNETLINK_EXP): the same raw-bytes approach as entries.

An expectation is kept as the kernel's attribute bytes; its identity is the raw
CTA_EXPECT_TUPLE (+ CTA_EXPECT_ZONE) attribute bytes. Creating it on another
kernel needs its master entry there first, with the same helper attached
(ctnetlink finds the helper through the master; EOPNOTSUPP otherwise, or
ENOENT when the master is missing). CTA_EXPECT_ID is the sender's and is not sent.
"""

from __future__ import annotations

from .ctbuild import be32, encode_tuple, nla, Tuple
from .ctconst import (
    EXP_NEW, NFGEN_HDR, NFGEN_HDR_LEN, NLA_HDR, NLA_TYPE_MASK, NLM_F_CREATE, NLM_F_REQUEST,
)
from .ctmsg import MalformedMessage, iter_attrs

CTA_EXPECT_MASTER = 1
CTA_EXPECT_TUPLE = 2
CTA_EXPECT_MASK = 3
CTA_EXPECT_TIMEOUT = 4
CTA_EXPECT_ID = 5
CTA_EXPECT_HELP_NAME = 6
CTA_EXPECT_ZONE = 7
CTA_EXPECT_FLAGS = 8
CTA_EXPECT_CLASS = 9
CTA_EXPECT_NAT = 10
CTA_EXPECT_FN = 11

# everything the create path takes; CTA_EXPECT_ID is the sending kernel's own handle
EXP_KEPT_ATTRS = frozenset({
    CTA_EXPECT_MASTER, CTA_EXPECT_TUPLE, CTA_EXPECT_MASK, CTA_EXPECT_TIMEOUT, CTA_EXPECT_HELP_NAME,
    CTA_EXPECT_ZONE, CTA_EXPECT_FLAGS, CTA_EXPECT_CLASS, CTA_EXPECT_NAT, CTA_EXPECT_FN,
})


def expectation_key(attrs: bytes) -> bytes:
    """Raw CTA_EXPECT_TUPLE attribute (+ CTA_EXPECT_ZONE): the expectation's identity."""
    tup = zone = b""
    for t, _, _, a0, a1 in iter_attrs(attrs):
        if t == CTA_EXPECT_TUPLE and not tup:
            tup = attrs[a0:a1]
        elif t == CTA_EXPECT_ZONE:
            zone = attrs[a0:a1]
    if not tup:
        raise MalformedMessage("expectation without CTA_EXPECT_TUPLE")
    return tup + zone


def expectation_create_attrs(attrs: bytes) -> bytes:
    unpack = NLA_HDR.unpack_from
    parts = []
    off, end = 0, len(attrs)
    while off + 4 <= end:
        alen, atype = unpack(attrs, off)
        if alen < 4 or off + alen > end:
            raise MalformedMessage(f"attribute length {alen} at {off} overruns {end}")
        nxt = off + ((alen + 3) & ~3)
        if atype & NLA_TYPE_MASK in EXP_KEPT_ATTRS:
            parts.append(attrs[off:nxt])
        off = nxt
    return b"".join(parts)


def to_expectation_create_message(family: int, attrs: bytes, seq: int) -> bytes:
    """Create-or-refresh (NLM_F_CREATE without NLM_F_EXCL: an existing one gets the new timeout)."""
    body = expectation_create_attrs(attrs)
    return NFGEN_HDR.pack(NFGEN_HDR_LEN + len(body), EXP_NEW, NLM_F_REQUEST | NLM_F_CREATE, seq, 0,
                          family, 0, 0) + body


def encode_expectation(master: Tuple, expected: Tuple, mask: Tuple, timeout: int,
                       helper: str | None = None) -> tuple[int, bytes]:
    """Attribute bytes of an expectation, for tests and injection.

    `mask` is a tuple of masks: addresses as text masks, ports as 16-bit masks
    (the kernel matches only its source parts; the destination is exact).
    """
    parts = [encode_tuple(CTA_EXPECT_TUPLE, expected), encode_tuple(CTA_EXPECT_MASK, mask),
             encode_tuple(CTA_EXPECT_MASTER, master), be32(CTA_EXPECT_TIMEOUT, timeout)]
    if helper:
        parts.append(nla(CTA_EXPECT_HELP_NAME, helper.encode() + b"\0"))
    return master.family, b"".join(parts)
