"""What the failover machine asks its I/O shell to do. Small frozen values, no behaviour."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SendAdvert:
    """Send one advert now on every path, with these extra flags."""

    flags: int = 0


@dataclass(frozen=True, slots=True)
class AddFloatingIPs:
    pass


@dataclass(frozen=True, slots=True)
class RemoveFloatingIPs:
    pass


@dataclass(frozen=True, slots=True)
class Announce:
    """Gratuitous ARP / unsolicited NA for every floating IP."""


@dataclass(frozen=True, slots=True)
class Transition:
    """The node's state changed: log it, tell the sync service, run the notify hooks."""

    old: str
    new: str
    cause: str


Action = SendAdvert | AddFloatingIPs | RemoveFloatingIPs | Announce | Transition
