"""Which conntrack entries are replicated (conntrack-tools' filter.c, in one small class).

Decided on the raw key (the original tuple) only: the HA link's own subnet (the sync
channel and heartbeats), loopback, the configured address ranges and protocols are
ignored. Addresses are compared as integers against precomputed (network, mask)
pairs: no ipaddress object per event.
"""

from __future__ import annotations

import ipaddress
import struct

import numpy as np
from typing import Iterable

from .ctconst import (
    CTA_IP_V4_DST, CTA_IP_V4_SRC, CTA_IP_V6_DST, CTA_IP_V6_SRC, CTA_PROTO_NUM, CTA_TUPLE_IP,
    CTA_TUPLE_PROTO, NLA_F_NESTED, NLA_HDR,
)
from .ctmsg import MalformedMessage, tuple_info

# The kernel lays a key out the same way every time: CTA_TUPLE_IP{src, dst} then
# CTA_TUPLE_PROTO{num, ...}. Per address length, the header bytes to check, so the Master
# reads (proto, src, dst) with slices instead of an attribute walk; anything else walks.
_IP_SHAPES = {
    (NLA_HDR.pack(4 + 2 * (4 + L), CTA_TUPLE_IP | NLA_F_NESTED)
     + NLA_HDR.pack(4 + L, CTA_IP_V4_SRC if L == 4 else CTA_IP_V6_SRC)):
        (L, NLA_HDR.pack(4 + L, CTA_IP_V4_DST if L == 4 else CTA_IP_V6_DST))
    for L in (4, 16)
}
_PROTO_TYPE = NLA_HDR.pack(0, CTA_TUPLE_PROTO | NLA_F_NESTED)[2:]  # type half of the header
_NUM_HDR = NLA_HDR.pack(5, CTA_PROTO_NUM)
# IPv4: the IP nest and src header, the dst header, the proto number header (after the
# proto nest's header, whose length varies with the protocol)
_V4_HEAD, _V4_DST_HDR = next((head, dst) for head, (L, dst) in _IP_SHAPES.items() if L == 4)
_V4_PROTO_NUM = _PROTO_TYPE + _NUM_HDR  # key[26:32]: the proto nest's type, the number's header
_V4_HEAD_ARR, _V4_DST_ARR, _V4_PROTO_NUM_ARR = (np.frombuffer(b, np.uint8) for b in (_V4_HEAD, _V4_DST_HDR,
                                                                                     _V4_PROTO_NUM))
MIN_BLOCK = 16  # fewer keys than this: accepts() one by one is as quick


PROTOCOLS = {
    "icmp": 1, "igmp": 2, "tcp": 6, "udp": 17, "dccp": 33, "gre": 47, "esp": 50, "ah": 51,
    "icmpv6": 58, "ipv6-icmp": 58, "sctp": 132, "udplite": 136,
}
LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


def protocol_number(name: str | int) -> int:
    if isinstance(name, int):
        return name
    if name.isdigit():
        return int(name)
    try:
        return PROTOCOLS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown protocol {name!r}") from None


class EntryFilter:
    """`accepts(key)` is True when an entry must be replicated."""

    def __init__(self, ignore_networks: Iterable = (), ignore_protocols: Iterable = ()):
        nets = [ipaddress.ip_network(n, strict=False) for n in (*LOOPBACK, *ignore_networks)]
        # by address length (4 or 16 bytes): [(network int, mask int)]
        self._nets: dict[int, list[tuple[int, int]]] = {4: [], 16: []}
        for n in nets:
            size = 4 if n.version == 4 else 16
            self._nets[size].append((int(n.network_address), int(n.netmask)))
        self._protocols = frozenset(protocol_number(p) for p in ignore_protocols)
        self.ignored = 0
        self.malformed = 0

    @classmethod
    def from_config(cls, cfg) -> "EntryFilter":
        """The node config's filter: its HA link subnet plus sync.ignore_*."""
        nets = list(cfg.sync.ignore_addresses)
        group = cfg.group
        if group is not None:
            nets.append(ipaddress.ip_network(f"{group.peer_address}/{group.peer_mask}", strict=False))
        return cls(nets, cfg.sync.ignore_protocols)

    def accepts(self, key: bytes) -> bool:
        if (key[4:12] == _V4_HEAD and key[16:20] == _V4_DST_HDR and key[26:32] == _V4_PROTO_NUM
                and len(key) > 32):
            # an IPv4 key in the kernel's layout (most of them): no call, no tuple
            if key[32] in self._protocols:
                self.ignored += 1
                return False
            src = int.from_bytes(key[12:16], "big")
            dst = int.from_bytes(key[20:24], "big")
            for net, mask in self._nets[4]:
                if src & mask == net or dst & mask == net:
                    self.ignored += 1
                    return False
            return True
        fields = fast_key_fields(key)
        if fields is None:
            try:
                proto, src, dst, _sport, _dport = tuple_info(key)
            except (MalformedMessage, ValueError, IndexError, struct.error):  # unreadable: not ours to send
                self.malformed += 1
                return False
        else:
            proto, src, dst = fields
        if proto in self._protocols or self._in_ignored(src) or self._in_ignored(dst):
            self.ignored += 1
            return False
        return True

    def _in_ignored(self, addr: bytes) -> bool:
        nets = self._nets.get(len(addr))
        if not nets:
            return False
        value = int.from_bytes(addr, "big")
        for net, mask in nets:
            if value & mask == net:
                return True
        return False

    def select(self, events: Iterable) -> list:
        accepts = self.accepts
        return [ev for ev in events if accepts(ev.key)]

    def select_changes(self, changes: list[tuple]) -> list[tuple]:
        """`select` for ctmsg.parse_changes tuples (the key is their third item)."""
        if len(changes) >= MIN_BLOCK:
            ignored = self._ignored_v4_block([c[2] for c in changes])
            if ignored is not None:
                return [c for c, out in zip(changes, ignored) if not out]
        accepts = self.accepts
        return [c for c in changes if accepts(c[2])]

    def _ignored_v4_block(self, keys: list[bytes]) -> list[bool] | None:
        """accepts() negated for many IPv4 keys of one length in the kernel's layout (a dump's
        datagram, a burst of events), as one byte matrix; None if they are not all such keys."""
        lengths = set(map(len, keys))
        if len(lengths) != 1 or (width := lengths.pop()) <= 32:
            return None
        m = np.frombuffer(b"".join(keys), np.uint8).reshape(len(keys), width)
        if not ((m[:, 4:12] == _V4_HEAD_ARR).all() and (m[:, 16:20] == _V4_DST_ARR).all()
                and (m[:, 26:32] == _V4_PROTO_NUM_ARR).all()):
            return None
        src = m[:, 12:16].copy().view(">u4").ravel()
        dst = m[:, 20:24].copy().view(">u4").ravel()
        out = np.isin(m[:, 32], list(self._protocols)) if self._protocols else np.zeros(len(keys), bool)
        for net, mask in self._nets[4]:
            out |= ((src & mask) == net) | ((dst & mask) == net)
        self.ignored += int(out.sum())
        return out.tolist()


def fast_key_fields(key: bytes) -> tuple[int, bytes, bytes] | None:
    """(proto, src, dst) of a key in the kernel's layout, else None (the caller walks it)."""
    shape = _IP_SHAPES.get(key[4:12])
    if shape is None:
        return None
    L, dst_hdr = shape
    if (not 25 + 2 * L <= NLA_HDR.unpack_from(key)[0] <= len(key) or key[12 + L:16 + L] != dst_hdr
            or key[18 + 2 * L:20 + 2 * L] != _PROTO_TYPE or key[20 + 2 * L:24 + 2 * L] != _NUM_HDR):
        return None
    return key[24 + 2 * L], key[12:12 + L], key[16 + L:16 + 2 * L]
