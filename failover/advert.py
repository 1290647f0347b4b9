"""The heartbeat (advert) wire format: a small authenticated datagram.

Every advert is signed with HMAC-SHA256 (truncated to 16 bytes) under one of the
pair's shared keys, named by a key id so keys can be rotated with no downtime:
a node accepts every key it has and signs with the one it is told to.

Replay protection: the sender's counter starts at the wall clock in nanoseconds
and grows by one per advert, so it keeps growing across restarts without any
stored state; the receiver keeps the highest counter seen per path and drops
anything not above it. The path id is inside the signed bytes, so an advert
captured on the HA link cannot be replayed onto a LAN.

    0      4  5  6  7  8     10 11 12         20      24         32      40
    +------+--+--+--+--+-----+--+--+----------+-------+----------+-------+
    |magic |v |ty|fl|gr|keyid|st|pr| counter  |intv us| sync pos |digest |
    +------+--+--+--+--+-----+--+--+----------+-------+----------+-------+
    | path | len hostname | len version | HMAC-SHA256[:16]               |
"""

from __future__ import annotations

import hmac
import struct
import time
from dataclasses import dataclass
from typing import Mapping

MAGIC = b"HASY"
WIRE_VERSION = 1
KIND_ADVERT = 1
MAC_LEN = 16
MAX_ADVERT = 512

# flags
FLAG_RESIGN = 0x01  # sender is leaving MASTER now: take over without waiting for the dead timer
FLAG_SHUTDOWN = 0x02  # sender's daemon is stopping
FLAG_TAKEOVER_REQ = 0x04  # sender (a Backup) asks the Master to hand over (switchover, preemption)
FLAG_YIELD = 0x08  # sender will not lead by itself (it handed over)
FLAG_STATE_READY = 0x10  # sender's conntrack table holds the Master's: a hand-over to it keeps sessions

# states on the wire
STATES = ("INIT", "BACKUP", "MASTER", "FAULT", "DISABLED")
STATE_CODE = {name: code for code, name in enumerate(STATES)}

_HEAD = struct.Struct("!4sBBBBHBBQIQ8sB")


class AdvertError(ValueError):
    """Why an advert was dropped; `reason` is a short counter name."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Advert:
    group: int
    state: str
    priority: int
    hostname: str
    version: str
    counter: int
    path: int  # index of the path it was sent on (0 = HA link, 1.. = monitored interfaces)
    interval_us: int = 0
    flags: int = 0
    sync_position: int = 0
    config_digest: bytes = b"\0" * 8
    key_id: int = 0

    def has(self, flag: int) -> bool:
        return bool(self.flags & flag)


def encode(advert: Advert, key_id: int, key: bytes) -> bytes:
    host = advert.hostname.encode()
    ver = advert.version.encode()
    body = (
        _HEAD.pack(
            MAGIC, WIRE_VERSION, KIND_ADVERT, advert.flags, advert.group, key_id,
            STATE_CODE[advert.state], advert.priority, advert.counter, advert.interval_us,
            advert.sync_position, advert.config_digest, advert.path,
        )
        + bytes((len(host),)) + host + bytes((len(ver),)) + ver
    )
    return body + hmac.digest(key, body, "sha256")[:MAC_LEN]


def decode(data: bytes, keys: Mapping[int, bytes]) -> Advert:
    """Parse and authenticate; raises AdvertError naming why it was dropped."""
    if len(data) > MAX_ADVERT:
        raise AdvertError("oversized")
    if len(data) < _HEAD.size + 2 + MAC_LEN:
        raise AdvertError("malformed")
    (magic, version, kind, flags, group, key_id, state, priority, counter, interval_us,
     sync_position, digest, path) = _HEAD.unpack_from(data)
    if magic != MAGIC or kind != KIND_ADVERT:
        raise AdvertError("malformed")
    if version != WIRE_VERSION:
        raise AdvertError("version")
    key = keys.get(key_id)
    if key is None:
        raise AdvertError("unknown_key")
    body, mac = data[:-MAC_LEN], data[-MAC_LEN:]
    if not hmac.compare_digest(hmac.digest(key, body, "sha256")[:MAC_LEN], mac):
        raise AdvertError("forged")
    try:
        pos = _HEAD.size
        host_len = body[pos]
        hostname = body[pos + 1: pos + 1 + host_len].decode()
        pos += 1 + host_len
        ver_len = body[pos]
        soft = body[pos + 1: pos + 1 + ver_len].decode()
        if pos + 1 + ver_len != len(body) or state >= len(STATES):
            raise AdvertError("malformed")
    except (IndexError, UnicodeDecodeError):
        raise AdvertError("malformed") from None
    return Advert(
        group=group, state=STATES[state], priority=priority, hostname=hostname, version=soft,
        counter=counter, path=path, interval_us=interval_us, flags=flags,
        sync_position=sync_position, config_digest=digest, key_id=key_id,
    )


class Counter:
    """The sender's anti-replay counter: wall-clock ns at start, +1 per advert."""

    def __init__(self, start: int | None = None):
        self._value = time.time_ns() if start is None else start

    def next(self) -> int:
        self._value += 1
        return self._value


class ReplayWindow:
    """Highest counter seen per (sender, path); anything not above it is a replay."""

    def __init__(self) -> None:
        self._highest: dict[tuple[str, int], int] = {}

    def accept(self, advert: Advert) -> bool:
        slot = (advert.hostname, advert.path)
        if advert.counter <= self._highest.get(slot, -1):
            return False
        self._highest[slot] = advert.counter
        return True
