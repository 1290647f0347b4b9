"""The heartbeat paths: one UDP socket per interface the adverts travel on.

Path 0 is the dedicated HA link (unicast to the peer's HA link address); paths 1..n
are the monitored interfaces (directed broadcast on the floating IP's subnet), so
the pair still sees each other when the HA link alone is cut. Each socket is bound
to its device, which tells the receiver which path an advert came in on: the path
id inside the signed advert must match it.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from dataclasses import dataclass

from hasync.config import Group

SO_BINDTODEVICE = getattr(socket, "SO_BINDTODEVICE", 25)
# a send on a path whose link is down fails with one of these: count it, carry on
_LINK_ERRORS = {errno.ENETUNREACH, errno.ENETDOWN, errno.ENODEV, errno.EHOSTUNREACH,
                errno.EADDRNOTAVAIL, errno.ENOBUFS, errno.EAGAIN, errno.EPERM, errno.EINVAL}


@dataclass
class Path:
    index: int
    ifname: str
    destination: str
    sock: socket.socket
    sent: int = 0
    send_errors: int = 0


def _open(ifname: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    sock.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, ifname.encode())
    # heartbeats go first on a busy link (DSCP CS6, like VRRP and routing protocols)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, 0xC0)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PRIORITY, 6)
    sock.bind(("0.0.0.0", port))
    sock.setblocking(False)
    return sock


class HeartbeatPaths:
    def __init__(self, group: Group, port: int):
        self.port = port
        targets = [(group.ha_link, str(group.peer_address))]
        for mon in group.monitors:
            if isinstance(mon.floating_ip, ipaddress.IPv4Interface):
                targets.append((mon.interface, str(mon.floating_ip.network.broadcast_address)))
        self.paths = [Path(i, name, dst, _open(name, port)) for i, (name, dst) in enumerate(targets)]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p.ifname for p in self.paths)

    def send(self, path: Path, data: bytes) -> None:
        try:
            path.sock.sendto(data, (path.destination, self.port))
            path.sent += 1
        except OSError as exc:
            if exc.errno not in _LINK_ERRORS:
                raise
            path.send_errors += 1

    def close(self) -> None:
        for p in self.paths:
            p.sock.close()
