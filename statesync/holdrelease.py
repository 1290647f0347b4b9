"""Giving held entries their kernel timeouts back after a takeover.

A Backup writes every replicated entry with CTA_TIMEOUT raised to sync.hold_timeout
(5 days by default): the Master refreshes its timers on packets without an event, so
the copies must not die by the timeout of the last event. Once the node is Master
its own packets refresh the timers, and the hold only keeps flows that ended while
the old Master died (a TIME_WAIT, an idle UDP flow) for days. So, once after a
takeover, every entry whose remaining timeout exceeds its protocol and state's
default (the kernel's sysctls in this namespace) is cut to that default: exactly
what the kernel gives an entry on its last packet, so a live flow loses nothing.

Protocols and states without a sysctl are left alone (GRE, DCCP, TCP's SYN_SENT2).
An entry under a custom timeout policy (nft `ct timeout`) longer than the sysctl is
cut to the sysctl too; its next packet restores the policy's timeout, so only an
idle flow of such a policy expires sooner.
"""

from __future__ import annotations

import os
import struct
from typing import Iterable

from .ctconst import (
    BE32, CTA_PROTOINFO, CTA_PROTOINFO_SCTP, CTA_PROTOINFO_SCTP_STATE,
    CTA_PROTOINFO_TCP, CTA_PROTOINFO_TCP_STATE, CTA_STATUS, CTA_TIMEOUT, IPPROTO_ICMP, IPPROTO_ICMPV6,
    IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP, IPS_SEEN_REPLY, NLA_HDR, NLA_TYPE_MASK,
)
from .ctcreate import kernel_tcp_state
from .ctmsg import MalformedMessage, find_attr, tuple_info
from .filter import fast_key_fields

SYSCTL_DIR = "/proc/sys/net/netfilter"

# conntrack state number (include/uapi/linux/netfilter/nf_conntrack_{tcp,sctp}.h) -> sysctl
_TCP_STATES = {1: "syn_sent", 2: "syn_recv", 3: "established", 4: "fin_wait", 5: "close_wait",
               6: "last_ack", 7: "time_wait", 8: "close"}
_SCTP_STATES = {1: "closed", 2: "cookie_wait", 3: "cookie_echoed", 4: "established",
                5: "shutdown_sent", 6: "shutdown_recd", 7: "shutdown_ack_sent", 8: "heartbeat_sent"}
# (protocol, state) -> sysctl name; UDP's "state" is 1 once a reply was seen (the stream timeout)
SYSCTLS = {
    **{(IPPROTO_TCP, n): f"nf_conntrack_tcp_timeout_{s}" for n, s in _TCP_STATES.items()},
    **{(IPPROTO_SCTP, n): f"nf_conntrack_sctp_timeout_{s}" for n, s in _SCTP_STATES.items()},
    (IPPROTO_UDP, 0): "nf_conntrack_udp_timeout",
    (IPPROTO_UDP, 1): "nf_conntrack_udp_timeout_stream",
    (IPPROTO_ICMP, 0): "nf_conntrack_icmp_timeout",
    (IPPROTO_ICMPV6, 0): "nf_conntrack_icmpv6_timeout",
}

Ceilings = dict[tuple[int, int], int]


def read_ceilings(sysctl_dir: str = SYSCTL_DIR) -> Ceilings:
    """The kernel's default timeout per (protocol, state), as this namespace sets them."""
    out: Ceilings = {}
    for which, name in SYSCTLS.items():
        try:
            with open(os.path.join(sysctl_dir, name)) as f:
                out[which] = int(f.read())
        except (OSError, ValueError):
            continue  # that protocol's module is not loaded: leave its entries alone
    return out


def _proto_of(key: bytes) -> int:
    fields = fast_key_fields(key)  # the kernel's key layout, read by fixed offsets
    return fields[0] if fields is not None else tuple_info(key)[0]


def _state_of(proto: int, attrs: bytes, protoinfo: tuple[int, int] | None, status: int | None) -> int | None:
    """The entry's state as SYSCTLS keys it: TCP/SCTP from CTA_PROTOINFO, UDP from its status."""
    if proto == IPPROTO_TCP or proto == IPPROTO_SCTP:
        if protoinfo is None:
            return None
        if proto == IPPROTO_TCP:
            fast = kernel_tcp_state(attrs[protoinfo[0] - 4:protoinfo[1]])
            if fast is not None:
                return fast
        nest, state_attr = ((CTA_PROTOINFO_TCP, CTA_PROTOINFO_TCP_STATE) if proto == IPPROTO_TCP
                            else (CTA_PROTOINFO_SCTP, CTA_PROTOINFO_SCTP_STATE))
        inner = find_attr(attrs, nest, *protoinfo)
        at = None if inner is None else find_attr(attrs, state_attr, *inner)
        return None if at is None or at[1] <= at[0] else attrs[at[0]]
    if proto == IPPROTO_UDP:
        return 1 if status is not None and status & IPS_SEEN_REPLY else 0
    return 0


def ceiling_of(key: bytes, attrs: bytes, ceilings: Ceilings, held: int | None = None) -> tuple[int, int] | None:
    """(remaining timeout, the kernel's default for the entry's protocol and state), or None
    if the entry has no timeout or its protocol/state has no known default. `held`: the
    timeout the entry was written with, when `attrs` are the record it was written from
    (a state table's) rather than the kernel's dump."""
    timeout = status = None
    protoinfo = None
    off, end = 0, len(attrs)
    while off + 4 <= end:  # one walk over the top-level attributes
        alen, atype = NLA_HDR.unpack_from(attrs, off)
        if alen < 4 or off + alen > end:
            return None
        t = atype & NLA_TYPE_MASK
        if t == CTA_TIMEOUT and alen == 8:
            timeout = BE32.unpack_from(attrs, off + 4)[0]
        elif t == CTA_STATUS and alen == 8:
            status = BE32.unpack_from(attrs, off + 4)[0]
        elif t == CTA_PROTOINFO:
            protoinfo = (off + 4, off + alen)
        off += (alen + 3) & ~3
    if held is not None:
        timeout = held
    if timeout is None:
        return None
    try:
        proto = _proto_of(key)
        state = _state_of(proto, attrs, protoinfo, status)
    except (struct.error, MalformedMessage):
        return None  # not what the kernel would give: leave the entry alone
    ceiling = ceilings.get((proto, state))
    return None if ceiling is None else (timeout, ceiling)


def releases(entries: Iterable[tuple], ceilings: Ceilings, held: int | None = None) -> list[tuple[bytes, int]]:
    """(key, new timeout) for each (family, key, attrs, ...) whose timeout exceeds its default
    (`held`: see ceiling_of)."""
    out = []
    for entry in entries:
        key = entry[1]
        found = ceiling_of(key, entry[2], ceilings, held)
        if found is not None and found[0] > found[1]:
            out.append((key, found[1]))
    return out
