"""Link state of the watched interfaces, from rtnetlink link events (no polling).

Why a plain netlink socket rather than pyroute2's IPRoute().bind(): in pyroute2 0.9
the sync IPRoute is a wrapper around an asyncio core whose transport reads every
pending datagram into an internal queue, while get() hands back one datagram's worth.
Messages left in that queue no longer make the fd readable, so a selector loop could
sleep on a link change that has already arrived. Here the failover loop's selector
watches the kernel socket itself and read() drains it to EAGAIN; pyroute2's RTNL
marshal still does the parsing (slow, but link events are rare).

The initial state comes from an RTM_GETLINK dump sent on the same socket after it
joined RTMGRP_LINK, so dump replies and events arrive in kernel order: no event
between "subscribe" and "dump" is lost or applied out of order. An event queue
overrun (ENOBUFS) is healed the same way: a new dump.
"""

from __future__ import annotations

import errno
import socket
import struct
from typing import Iterable

from pyroute2.netlink import NLM_F_DUMP, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR
from pyroute2.netlink.rtnl import RTM_DELLINK, RTM_GETLINK, RTM_NEWLINK, RTMGRP_LINK
from pyroute2.netlink.rtnl.marshal import MarshalRtnl

IFF_UP = 0x1
IFF_LOWER_UP = 0x10000  # carrier (and not dormant), as the driver reports it
_USABLE_OPERSTATES = ("UP", "UNKNOWN")  # UNKNOWN: drivers that never report operstate

# nlmsghdr + an empty ifinfomsg (family AF_UNSPEC: every link)
_GETLINK_DUMP = struct.Struct("=IHHII BxHiII")
_RECV_BUFFER = 1 << 16
_SOCKET_RCVBUF = 1 << 20
_DUMP_TIMEOUT_S = 2.0


def is_up(flags: int, operstate: str | None) -> bool:
    """Up means administratively up, carrier present, and operstate UP/UNKNOWN."""
    return (
        bool(flags & IFF_UP)
        and bool(flags & IFF_LOWER_UP)
        and (operstate is None or operstate in _USABLE_OPERSTATES)
    )


class LinkMonitor:
    """Up/down of a fixed set of interfaces, reported on change only."""

    def __init__(self, ifnames: Iterable[str]):
        self._watched = frozenset(ifnames)
        self._state: dict[str, bool] = {}  # watched name -> up
        self._name_by_index: dict[int, str] = {}  # for renames and deletions
        self._marshal = MarshalRtnl()
        self._dump_seq = 0
        self._dump_pending = False
        self._dump_again = False
        self._names_in_dump: set[str] = set()
        self.overruns = 0  # ENOBUFS seen (events lost, healed by a dump)
        self.bad_messages = 0  # undecodable datagrams, dropped
        self._sock = socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE
        )
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SOCKET_RCVBUF)
        self._sock.bind((0, RTMGRP_LINK))

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        self._sock.close()

    def initial(self) -> dict[str, bool]:
        """Dump the links (blocking, once at start-up); every watched name gets a state.

        A watched interface that does not exist is down.
        """
        self._request_dump()
        self._sock.settimeout(_DUMP_TIMEOUT_S)
        try:
            while self._dump_pending:
                try:
                    self._apply(self._sock.recv(_RECV_BUFFER))
                except OSError as err:
                    if err.errno != errno.ENOBUFS:
                        raise
                    self._events_lost()
        finally:
            self._sock.setblocking(False)
        for name in self._watched:
            self._state.setdefault(name, False)
        return dict(self._state)

    def read(self) -> list[tuple[str, bool]]:
        """Drain pending events; return (ifname, is_up) for watched links that changed."""
        changes: list[tuple[str, bool]] = []
        while True:
            try:
                data = self._sock.recv(_RECV_BUFFER, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return changes
            except OSError as err:
                if err.errno != errno.ENOBUFS:
                    raise
                self._events_lost()
                continue
            changes.extend(self._apply(data))

    def _events_lost(self) -> None:
        # the kernel dropped events: the only safe picture is a fresh dump; a socket
        # runs one dump at a time (a second request fails with EBUSY), so a dump
        # already under way is followed by another one
        self.overruns += 1
        if self._dump_pending:
            self._dump_again = True
        else:
            self._request_dump()

    def _request_dump(self) -> None:
        self._dump_seq += 1
        self._dump_pending = True
        self._names_in_dump = set()
        self._sock.send(
            _GETLINK_DUMP.pack(
                _GETLINK_DUMP.size, RTM_GETLINK, NLM_F_REQUEST | NLM_F_DUMP, self._dump_seq, 0,
                socket.AF_UNSPEC, 0, 0, 0, 0,
            )
        )

    def _apply(self, data: bytes) -> list[tuple[str, bool]]:
        try:
            messages = list(self._marshal.parse(data))
        except Exception:  # noqa: BLE001 - a malformed datagram must never stop the loop
            self.bad_messages += 1
            return []
        changes = []
        for msg in messages:
            try:
                changes.extend(self._message(msg))
            except (KeyError, TypeError, ValueError):
                self.bad_messages += 1
        return changes

    def _message(self, msg) -> list[tuple[str, bool]]:
        header = msg["header"]
        kind = header["type"]
        ours = self._dump_pending and header["sequence_number"] == self._dump_seq
        if kind in (NLMSG_DONE, NLMSG_ERROR):
            if not ours:
                return []
            self._dump_pending = False
            changes = self._absent_from_dump()
            if self._dump_again:
                self._dump_again = False
                self._request_dump()
            return changes
        if kind == RTM_NEWLINK:
            name = msg.get("ifname")
            if ours:
                self._names_in_dump.add(name)
            return self._link_seen(msg["index"], name, is_up(msg["flags"], msg.get("IFLA_OPERSTATE")))
        if kind == RTM_DELLINK:
            return self._link_seen(msg["index"], None, False)
        return []

    def _absent_from_dump(self) -> list[tuple[str, bool]]:
        # a link deleted while events were being dropped only shows by its absence
        changes = []
        for index, name in list(self._name_by_index.items()):
            if name not in self._names_in_dump:
                changes.extend(self._link_seen(index, None, False))
        return changes

    def _link_seen(self, index: int, name: str | None, up: bool) -> list[tuple[str, bool]]:
        changes = []
        previous_name = self._name_by_index.get(index)
        if previous_name is not None and previous_name != name:
            # deleted, or renamed away from a watched name: that name has no link now
            del self._name_by_index[index]
            changes.extend(self._set(previous_name, False))
        if name is not None:
            self._name_by_index[index] = name
            changes.extend(self._set(name, up))
        return changes

    def _set(self, name: str, up: bool) -> list[tuple[str, bool]]:
        if name not in self._watched or self._state.get(name) == up:
            return []
        known = name in self._state
        self._state[name] = up
        # before initial() has run, a state is the baseline, not a change
        return [(name, up)] if known else []


def carrier(ifname: str) -> bool:
    """The carrier bit as the driver holds it now, read from sysfs.

    The kernel reports a carrier loss through linkwatch, which may hold the netlink
    event back for up to a second (measured here: 0.2-1.02 s on veth), while the bit
    itself flips at once. The failover loop reads it only when the peer's heartbeats
    fall silent on that interface, to learn of a pulled cable in milliseconds.
    A down or missing interface reads as no carrier.
    """
    try:
        with open(f"/sys/class/net/{ifname}/carrier", "rb") as f:
            return f.read(1) == b"1"
    except OSError:  # EINVAL while administratively down; ENOENT once gone
        return False
