"""Announcing a floating IP's new owner: gratuitous ARP (IPv4), unsolicited NA (IPv6).

After a takeover the LAN's hosts and switches still map the floating IP to the old
Master's MAC. A gratuitous ARP (sender IP = target IP = the floating IP, broadcast)
makes Linux and most stacks overwrite an existing entry; both the request form
(RFC 5227's announcement) and the reply form (RFC 5944 section 4.6) are sent because
some stacks only honour one of them. For IPv6 an unsolicited Neighbour Advertisement
with the Override flag, to the all-nodes group ff02::1 (link-local, never routed),
does the same (RFC 4861 section 7.2.6).

Frames are packed by hand with precompiled structs. Sockets are opened once per
interface and reused; the interface's index and MAC are cached with them and
re-read after a send error (the interface may have been re-created). Sends never
block: AF_PACKET and raw sockets drop rather than wait when the queue is full.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct
from dataclasses import dataclass

IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface

ETH_P_ARP = 0x0806
ETH_P_IP = 0x0800
ARPHRD_ETHER = 1
ARPOP_REQUEST = 1
ARPOP_REPLY = 2
BROADCAST_MAC = b"\xff" * 6
ZERO_MAC = b"\x00" * 6

ICMPV6_NEIGHBOUR_ADVERTISEMENT = 136
NA_FLAG_ROUTER = 0x80000000
NA_FLAG_OVERRIDE = 0x20000000
ND_OPT_TARGET_LINKADDR = 2
ALL_NODES = "ff02::1"
ND_HOP_LIMIT = 255  # receivers drop ND messages whose hop limit is not 255
ICMP6_FILTER = 1  # <netinet/icmp6.h>; not exported by the socket module
_BLOCK_ALL_ICMP6 = b"\xff" * 32  # this socket only sends: keep its receive queue empty

# Ethernet header + ARP for IPv4 over Ethernet
_ARP_FRAME = struct.Struct("!6s6sH HHBBH6s4s6s4s")
# ICMPv6 NA: type, code, checksum (filled by the kernel), flags, target, TLLA option
_NEIGHBOUR_ADVERT = struct.Struct("!BBHI16sBB6s")
_IN6_PKTINFO = struct.Struct("16sI")

# errors after which the cached socket/index/MAC are suspect and are re-read once
_STALE_INTERFACE_ERRORS = (errno.ENXIO, errno.ENODEV, errno.EBADF, errno.EINVAL)


@dataclass
class _Interface:
    index: int
    mac: bytes
    router: bool  # IPv6 forwarding on: set the Router flag, as a firewall is one
    packet_socket: socket.socket
    icmp6_socket: socket.socket | None = None

    def close(self) -> None:
        self.packet_socket.close()
        if self.icmp6_socket is not None:
            self.icmp6_socket.close()


def arp_frames(mac: bytes, ip: ipaddress.IPv4Address) -> tuple[bytes, bytes]:
    """The gratuitous ARP request and reply announcing that `ip` is at `mac`."""
    address = ip.packed
    request = _ARP_FRAME.pack(
        BROADCAST_MAC, mac, ETH_P_ARP,
        ARPHRD_ETHER, ETH_P_IP, 6, 4, ARPOP_REQUEST, mac, address, ZERO_MAC, address,
    )
    reply = _ARP_FRAME.pack(
        BROADCAST_MAC, mac, ETH_P_ARP,
        ARPHRD_ETHER, ETH_P_IP, 6, 4, ARPOP_REPLY, mac, address, mac, address,
    )
    return request, reply


def neighbour_advert(mac: bytes, ip: ipaddress.IPv6Address, router: bool) -> bytes:
    """An unsolicited NA (Override set, Solicited clear) for `ip` at `mac`, checksum 0.

    The kernel fills the ICMPv6 checksum for raw ICMPv6 sockets (RFC 3542 section 3.1),
    as it knows the final source address.
    """
    flags = NA_FLAG_OVERRIDE | (NA_FLAG_ROUTER if router else 0)
    return _NEIGHBOUR_ADVERT.pack(
        ICMPV6_NEIGHBOUR_ADVERTISEMENT, 0, 0, flags, ip.packed, ND_OPT_TARGET_LINKADDR, 1, mac
    )


class Announcer:
    """Sends gratuitous ARPs and unsolicited NAs; one set of sockets per interface."""

    def __init__(self) -> None:
        self._interfaces: dict[str, _Interface] = {}
        self.sent = 0  # frames handed to the kernel
        self.send_errors = 0
        self.last_error: OSError | None = None

    def announce(self, ifname: str, ip: IPInterface) -> bool:
        """Announce `ip` on `ifname` once. False (and counted) if the kernel refused.

        Never raises for a send failure: a missing or down interface must not stop the
        failover loop, which retries on its next announcement.
        """
        try:
            try:
                self._send(self._interface(ifname), ip.ip)
            except OSError as err:
                if err.errno not in _STALE_INTERFACE_ERRORS:
                    raise
                self.forget(ifname)
                self._send(self._interface(ifname), ip.ip)
            return True
        except OSError as err:
            self.send_errors += 1
            self.last_error = err
            return False

    def forget(self, ifname: str) -> None:
        """Drop the cached sockets, index and MAC of `ifname` (re-read on next use)."""
        interface = self._interfaces.pop(ifname, None)
        if interface is not None:
            interface.close()

    def close(self) -> None:
        for ifname in list(self._interfaces):
            self.forget(ifname)

    def _send(self, interface: _Interface, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
        if ip.version == 4:
            for frame in arp_frames(interface.mac, ip):
                interface.packet_socket.send(frame)
                self.sent += 1
            return
        if interface.icmp6_socket is None:
            interface.icmp6_socket = _open_icmp6_socket(interface.index)
        interface.icmp6_socket.sendmsg(
            [neighbour_advert(interface.mac, ip, interface.router)],
            # source = the floating IP itself, so receivers tie the MAC to it
            [(socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, _IN6_PKTINFO.pack(ip.packed, interface.index))],
            0,
            (ALL_NODES, 0, 0, interface.index),
        )
        self.sent += 1

    def _interface(self, ifname: str) -> _Interface:
        interface = self._interfaces.get(ifname)
        if interface is None:
            interface = self._interfaces[ifname] = _open_interface(ifname)
        return interface


def _open_interface(ifname: str) -> _Interface:
    # protocol 0: this packet socket receives nothing, it only sends
    packet_socket = socket.socket(socket.AF_PACKET, socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC, 0)
    try:
        packet_socket.bind((ifname, 0))
        mac = packet_socket.getsockname()[4]
        if len(mac) != 6:
            raise OSError(errno.EINVAL, f"{ifname} has no Ethernet address")
        return _Interface(
            index=socket.if_nametoindex(ifname),
            mac=mac,
            router=_ipv6_forwarding(ifname),
            packet_socket=packet_socket,
        )
    except BaseException:
        packet_socket.close()
        raise


def _open_icmp6_socket(index: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6, socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC, socket.IPPROTO_ICMPV6)
    try:
        sock.setsockopt(socket.IPPROTO_ICMPV6, ICMP6_FILTER, _BLOCK_ALL_ICMP6)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, ND_HOP_LIMIT)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, index)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, 0)
        return sock
    except BaseException:
        sock.close()
        raise


def _ipv6_forwarding(ifname: str) -> bool:
    try:
        with open(f"/proc/sys/net/ipv6/conf/{ifname}/forwarding", "rb") as f:
            return f.read().strip() == b"1"
    except OSError:
        return False
