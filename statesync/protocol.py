"""The conntrack replication protocol, sans-I/O: no sockets, no clocks, no threads.

Modelled on conntrack-tools' FT-FW mode (sync-ftfw.c): stream frames carry a
sequence number; the receiver applies them strictly in order, acknowledges
periodically and asks for a resend (NACK) when it sees a gap; the sender keeps
unacknowledged frames in a resend window and sends a KEEPALIVE carrying its last
seq when idle or waiting, which makes the receiver ACK (or NACK a lost tail).

Differences, chosen on purpose:
- Changes are staged per entry (keyed by the raw original tuple) before framing,
  so a burst of updates of one connection costs one record, and the resend window
  applies back-pressure instead of dropping: when it is full, changes wait (and
  coalesce) in the pending map. Nothing is ever silently lost; a NACK the window
  cannot serve (the peer is ahead of us: we restarted) triggers a resync.
- Go-back-N: the receiver drops frames after a gap and NACKs [expected, seen];
  the sender resends its window from `expected`. On a TCP channel gaps only
  happen around reconnects, so a reorder buffer is not worth its code.
- Resync = RESYNC_BEGIN(id), DATA (snapshot and live records interleaved; live
  changes staged after the resync started win over snapshot records of the same
  key), RESYNC_END(id, snapshot_count). The receiver keeps the set of keys
  upserted since BEGIN; at END, entries it holds outside that set are purged.
  What it "holds" is tracked here too (`Receiver.held`: keys written by
  replication), so the purge needs no dump of the table: a dump of a nearly empty
  table walks the whole shared conntrack hash in one recv() and stalls a CPU for
  ~15 ms, long enough for the failover daemons to declare their peer lost. It
  also spares the Backup's own connections, which the Master never sends.

       stream seq:  1     2      3 ...      k          k+1 ...
      Sender ----> DATA  DATA  RESYNC_BEGIN  DATA(snap|live)...  RESYNC_END
      Receiver <-- ACK(n) | NACK(from, to) | RESYNC_REQ
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from itertools import repeat
from operator import itemgetter
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Protocol

from . import wire
from .wire import (
    DATA, FLAG_SNAPSHOT, KEEPALIVE, OP_DELETE, OP_UPSERT, RESYNC_BEGIN, RESYNC_END, Frame, WireError,
)

_KIND, _FAMILY, _KEY, _ATTRS = (itemgetter(i) for i in range(4))  # of a change tuple


class Change(Protocol):
    """What the kernel side hands us (ctnetlink's CtEvent fits)."""

    kind: int
    family: int
    key: bytes
    attrs: bytes


# -- Sender ---------------------------------------------------------------------------------


@dataclass
class SenderCounters:
    events_staged: int = 0
    events_coalesced: int = 0  # changes merged into an already pending record
    records_sent: int = 0
    snapshot_records_sent: int = 0
    snapshot_records_skipped: int = 0  # a live change of the same key won
    frames_sent: int = 0
    frames_resent: int = 0
    acks: int = 0
    acks_bogus: int = 0
    nacks: int = 0
    resyncs: int = 0
    window_full: int = 0  # times framing stopped for back-pressure


class Sender:
    """Master side: staged changes in, encoded frames out.

    `destroy_kind` is the event kind meaning "entry gone" (ctmsg.EV_DESTROY).
    """

    def __init__(
        self,
        *,
        destroy_kind: int,
        window_frames: int = 256,
        window_bytes: int = 32 << 20,
        max_batch_bytes: int = 256 << 10,
        keepalive_interval: float = 1.0,
        resend_timeout: float = 0.25,
        first_seq: int = 1,
    ):
        self.destroy_kind = destroy_kind
        self.window_frames = window_frames
        self.window_bytes = window_bytes
        self.max_batch_bytes = max_batch_bytes
        self.keepalive_interval = keepalive_interval
        self.resend_timeout = resend_timeout
        self.counters = SenderCounters()
        self.seq = first_seq - 1  # last stream seq assigned
        self.acked = first_seq - 1
        self.pending: dict[bytes, tuple[int, int, bytes]] = {}  # key -> (op, family, attrs)
        self.window: OrderedDict[int, tuple[bytes, float]] = OrderedDict()  # seq -> (frame, sent at), unacked
        self._window_used = 0
        self._resend: list[bytes] = []
        self._resend_from_sent: int | None = None  # NACK start we last served (dampens duplicate NACKs)
        self._last_tx = float("-inf")
        self._last_progress = float("-inf")  # last time the window moved (ack or send)
        self.resync_needed = False
        self.resync_id = 0
        self._snapshot: Iterator | None = None
        self._snapshot_count = 0
        self._touched: set[bytes] = set()  # keys staged live since the resync began
        self._control: list[bytes] = []  # RESYNC_BEGIN/END waiting for window room
        self._begin_seq: int | None = None  # seq the last snapshot's RESYNC_BEGIN went out with

    # ---- input

    def on_events(self, events: Iterable[Change]) -> None:
        self.on_changes([(ev.kind, ev.family, ev.key, ev.attrs) for ev in events])

    def on_changes(self, changes: list[tuple]) -> None:
        """on_events for plain tuples (kind, family, key, attrs, ...): the Master's hot path."""
        pending = self.pending
        destroy = self.destroy_kind
        before = len(pending)
        keys = list(map(_KEY, changes))
        if destroy not in map(_KIND, changes):  # a burst of new entries: no Python loop
            pending.update(zip(keys, zip(repeat(OP_UPSERT), map(_FAMILY, changes), map(_ATTRS, changes))))
        else:
            for kind, family, key, attrs, *_ in changes:
                pending[key] = (OP_DELETE, family, b"") if kind == destroy else (OP_UPSERT, family, attrs)
        # every change either added a key or replaced a pending one
        self.counters.events_coalesced += len(changes) - (len(pending) - before)
        if self._snapshot is not None:
            self._touched.update(keys)
        self.counters.events_staged += len(changes)

    def on_ack(self, seq: int, now: float) -> None:
        if seq > self.seq:
            self.counters.acks_bogus += 1
            return
        self.counters.acks += 1
        if seq <= self.acked:
            return
        self.acked = seq
        window = self.window
        while window:
            first = next(iter(window))
            if first > seq:
                break
            self._window_used -= len(window.pop(first)[0])
        self._last_progress = now

    def on_nack(self, first: int, last: int, now: float) -> None:
        """Resend [first, ...] from the window (go-back-N), or resync if we cannot."""
        self.counters.nacks += 1
        if first > self.seq:
            # the peer expects frames we never sent: we restarted under it
            self.resync_needed = True
            return
        first = max(first, self.acked + 1)
        if first > self.seq:
            return  # everything already acknowledged: a stale NACK
        if first not in self.window:
            oldest = next(iter(self.window), None)
            if oldest is None or first > oldest:
                self.resync_needed = True
                return
            first = oldest  # what lies below was superseded by the snapshot the window starts with
        if self._resend_from_sent == first and now - self._last_progress < self.resend_timeout:
            return  # the same NACK again before our resend could arrive
        self._resend_from_sent = first
        self._last_progress = now
        self._resend = [buf for seq, (buf, _) in self.window.items() if seq >= first]
        self.counters.frames_resent += len(self._resend)

    def start_resync(self, snapshot: Iterable, chunked: bool = False) -> None:
        """Stream `snapshot` ((family, key, attrs) ...) while live changes keep flowing.
        `chunked`: the snapshot yields lists of those (a dump's datagram each), which are
        framed a list at a time (the Master's resync: no Python step per entry here).

        Staged changes and unacked frames are dropped: the snapshot is read after this
        call, so it already holds everything they carried; the receiver jumps to
        RESYNC_BEGIN and treats older frames as replays.
        """
        self.counters.resyncs += 1
        self.resync_needed = False
        self.resync_id += 1
        self.pending.clear()
        self.window.clear()
        self._window_used = 0
        self._resend.clear()
        self._resend_from_sent = None
        self._control.clear()
        self._snapshot = iter(snapshot) if chunked else ([entry] for entry in snapshot)
        self._snapshot_count = 0
        self._touched = set()
        self._queue_control(Frame(RESYNC_BEGIN, 0, self.resync_id))

    @property
    def resyncing(self) -> bool:
        return self._snapshot is not None

    @property
    def has_work(self) -> bool:
        """New stream frames could be produced right now (more input or resends waiting)."""
        return bool(self._resend) or (
            bool(self.pending or self._snapshot is not None or self._control) and self._window_has_room())

    def oldest_unacked_age(self, now: float) -> float:
        """Seconds the oldest unacknowledged frame has waited: how far behind the peer is."""
        if not self.window:
            return 0.0
        return now - next(iter(self.window.values()))[1]

    def on_resync_request(self, now: float) -> bool:
        """The peer asks for a snapshot: True if a new one must be read (call start_resync).

        While the last snapshot's RESYNC_BEGIN is unacknowledged the request is a repeat from
        a peer that missed it: that snapshot is sent again from its RESYNC_BEGIN (go-back-N)
        instead of started over, so a repeat over a lossy link costs no new dump."""
        if self._control and self._control[0].type == RESYNC_BEGIN:
            return False  # not even sent yet: it waits for window room
        begin = self._begin_seq
        if begin is None or begin not in self.window:
            return True
        self._resend = [buf for seq, (buf, _) in self.window.items() if seq >= begin]
        self.counters.frames_resent += len(self._resend)
        self._resend_from_sent = begin
        self._last_progress = now
        return False

    @property
    def idle(self) -> bool:
        """Nothing pending, nothing unacknowledged, no resync running."""
        return not self.pending and not self.window and self._snapshot is None and not self._control

    # ---- output

    def get_timer(self) -> float:
        """When `next_frames` must be called even without new input (a KEEPALIVE)."""
        if self.window:
            return max(self._last_tx, self._last_progress) + self.resend_timeout
        return self._last_tx + self.keepalive_interval

    def next_frames(self, now: float, max_batch_bytes: int | None = None, max_frames: int | None = None) -> list[bytes]:
        """Frames to send now: resends, then new stream frames while the window has room
        (at most `max_frames` new ones, so a caller's loop stays responsive), else a
        KEEPALIVE when the timer is due."""
        limit = max_batch_bytes or self.max_batch_bytes
        out = self._resend
        self._resend = []
        budget = len(out) + max_frames if max_frames is not None else None
        while budget is None or len(out) < budget:
            self._flush_control(out, now)
            if self._control or not self._window_has_room():
                if self._control or self.pending or self._snapshot is not None:
                    self.counters.window_full += 1
                break
            batch, snapshot = self._take_batch(limit)
            if not batch:
                if self._control:
                    continue  # the snapshot ended on an empty batch: send RESYNC_END
                break
            self._send_stream(out, wire.data_frame(0, batch, FLAG_SNAPSHOT if snapshot else 0), now)
            if snapshot:
                self.counters.snapshot_records_sent += len(batch)
            self.counters.records_sent += len(batch)
        if not out and now >= self.get_timer():
            out.append(wire.encode(Frame(KEEPALIVE, self.seq)))
        if out:
            self._last_tx = now
        self.counters.frames_sent += len(out)
        return out

    # ---- internals

    def _window_has_room(self) -> bool:
        return len(self.window) < self.window_frames and self._window_used < self.window_bytes

    def _send_stream(self, out: list[bytes], frame: Frame, now: float) -> None:
        self.seq += 1
        buf = wire.encode(Frame(frame.type, self.seq, frame.payload, frame.flags))
        self.window[self.seq] = (buf, now)
        if frame.type == RESYNC_BEGIN:
            self._begin_seq = self.seq
        self._window_used += len(buf)
        if len(self.window) == 1:
            self._last_progress = now  # the retransmit clock starts with the oldest unacked frame
        out.append(buf)

    def _queue_control(self, frame: Frame) -> None:
        self._control.append(frame)

    def _flush_control(self, out: list[bytes], now: float) -> None:
        while self._control and self._window_has_room():
            self._send_stream(out, self._control.pop(0), now)

    def _take_batch(self, limit: int) -> tuple[list[wire.Record], bool]:
        """Live changes first (they are newer); snapshot records only when none wait."""
        batch: list[wire.Record] = []
        size = 0
        pending = self.pending
        if pending:
            # one iterator per batch, keys deleted after: `next(iter(pending))` per record
            # rescans the deleted slots at the dict's front (quadratic: 4 s for a 200k burst)
            overhead = wire.RECORD_OVERHEAD
            max_records = wire.MAX_RECORDS
            for key, (op, family, attrs) in pending.items():
                batch.append((op, family, key, attrs))
                size += len(key) + len(attrs) + overhead  # wire.record_size, inlined
                if size >= limit or len(batch) >= max_records:
                    break
            for rec in batch:
                del pending[rec[2]]
            return batch, False
        if self._snapshot is None:
            return batch, False
        touched = self._touched
        max_records = wire.MAX_RECORDS
        for chunk in self._snapshot:
            if touched:
                fresh = [e for e in chunk if e[1] not in touched]
                self.counters.snapshot_records_skipped += len(chunk) - len(fresh)
                chunk = fresh
            if len(batch) + len(chunk) > max_records:  # never the case for a dump's datagram
                self._snapshot = itertools.chain([chunk[max_records - len(batch):]], self._snapshot)
                chunk = chunk[:max_records - len(batch)]
            batch.extend([(OP_UPSERT, e[0], e[1], e[2]) for e in chunk])
            size += sum([len(e[1]) + len(e[2]) for e in chunk]) + wire.RECORD_OVERHEAD * len(chunk)
            if size >= limit or len(batch) >= max_records:
                break
        else:
            # snapshot exhausted: close the resync after its last records
            self._snapshot_count += len(batch)
            self._snapshot = None
            self._touched = set()
            self._queue_control(Frame(RESYNC_END, 0, (self.resync_id, self._snapshot_count)))
            return batch, True
        self._snapshot_count += len(batch)
        return batch, True


# -- Receiver -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Apply:
    """Write these records (op, family, key, attrs) into the table, in order.
    A frame never holds two records of one key, so upserts and deletes may be split."""

    records: tuple[wire.Record, ...]


@dataclass(frozen=True, slots=True)
class SendAck:
    seq: int

    def to_bytes(self) -> bytes:
        return wire.encode(Frame(wire.ACK, 0, self.seq))


@dataclass(frozen=True, slots=True)
class SendNack:
    first: int
    last: int

    def to_bytes(self) -> bytes:
        return wire.encode(Frame(wire.NACK, 0, (self.first, self.last)))


@dataclass(frozen=True, slots=True)
class RequestResync:
    def to_bytes(self) -> bytes:
        return wire.encode(Frame(wire.RESYNC_REQ))


@dataclass(frozen=True, slots=True)
class Purge:
    """The resync is complete: delete the `stale` entries (held locally, not in the
    snapshot). `keep` is what the resync wrote (a cache-mode Backup filters by it)."""

    resync_id: int
    keep: frozenset[bytes]
    stale: frozenset[bytes] = frozenset()


@dataclass
class ReceiverCounters:
    frames_in: int = 0
    frames_dropped_malformed: int = 0
    frames_unexpected: int = 0  # valid frame of a type the receiver does not take
    replayed: int = 0
    gaps: int = 0
    unsynced_dropped: int = 0  # stream frames before the first RESYNC_BEGIN
    resyncs: int = 0
    resync_count_mismatch: int = 0
    records_applied: int = 0
    acks_sent: int = 0
    nacks_sent: int = 0


@dataclass
class Receiver:
    """Backup side: frames in, actions out. Call `reset()` when the peer changes.

    `held` is the set of keys the local table holds from replication: applied upserts
    add, deletes remove, a purge removes its stale keys. It outlives `reset()` (the
    table does). The owner seeds it (a dump at start-up, before the node joins) and
    adds what it creates itself while Master, so a later purge finds those too.
    """

    ack_every: int = 8  # stream frames between ACKs (KEEPALIVE and RESYNC_END always ACK)
    nack_retry: float = 0.25  # seconds before the same NACK is sent again
    resync_retry: float = 1.0  # seconds before a RESYNC_REQ is repeated while unsynced...
    resync_retry_max: float = 4.0  # ...doubling up to this: an answer may be on its way
    counters: ReceiverCounters = field(default_factory=ReceiverCounters)
    expected: int | None = None  # next stream seq to apply; None until a RESYNC_BEGIN
    in_resync: int | None = None  # id of the resync being received
    last_resync_done: int | None = None
    held: set[bytes] = field(default_factory=set)
    _keep: set[bytes] = field(default_factory=set)
    _snapshot_seen: int = 0
    _unacked: int = 0
    _nacked: tuple[int, float] | None = None
    _resync_asked: float = float("-inf")
    _retry_after: float = 0.0  # current wait before repeating a RESYNC_REQ (0: resync_retry)

    def reset(self) -> None:
        self._forget_position()
        self._resync_asked = float("-inf")
        self._retry_after = 0.0

    def _forget_position(self) -> None:
        self.expected = None
        self.in_resync = None
        self._keep = set()
        self._unacked = 0
        self._nacked = None

    @property
    def synced(self) -> bool:
        return self.expected is not None and self.in_resync is None

    def on_bytes(self, buf: bytes, now: float) -> list:
        self.counters.frames_in += 1
        try:
            frame = wire.decode(buf)
        except WireError:
            self.counters.frames_dropped_malformed += 1
            return []
        return self._on_frame(frame, now)

    def on_frame(self, frame: Frame, now: float) -> list:
        self.counters.frames_in += 1
        return self._on_frame(frame, now)

    def ask_resync(self, now: float) -> list:
        """A resync request (start, connect, operator, a snapshot that did not add up). From
        now on the next RESYNC_BEGIN is taken whatever its seq: the Master may answer by
        sending its last snapshot again from its start (Sender.on_resync_request), below
        where this stream had got to."""
        self._forget_position()
        self._resync_asked = now
        return [RequestResync()]

    # ---- internals

    def _on_frame(self, frame: Frame, now: float) -> list:
        ftype = frame.type
        if ftype == KEEPALIVE:
            return self._on_keepalive(frame.seq, now)
        if ftype not in wire.STREAM_TYPES:
            self.counters.frames_unexpected += 1
            return []
        seq = frame.seq
        expected = self.expected
        if ftype == RESYNC_BEGIN and (expected is None or seq >= expected):
            # a snapshot supersedes everything before it, including frames lost in a gap
            return self._on_resync_begin(seq, frame.payload)
        if expected is None:
            self.counters.unsynced_dropped += 1
            if ftype == RESYNC_END or (ftype == DATA and frame.flags & FLAG_SNAPSHOT):
                return self._ask_for_lost_begin(now)
            return self._maybe_ask_resync(now)
        if seq < expected:
            self.counters.replayed += 1
            return [self._ack()]  # our ACK may have been lost
        if seq > expected:
            return self._gap(seq, now)
        self.expected = seq + 1
        self._nacked = None
        actions: list = []
        if ftype == DATA:
            actions.append(self._on_data(frame))
        else:  # RESYNC_END
            ended = self._on_resync_end(frame.payload, now)
            if self.expected is None:
                # it did not add up and we asked again: acknowledged first, so the Master
                # reads a new snapshot instead of sending this one again
                self.counters.acks_sent += 1
                return [SendAck(seq), *ended]
            actions.extend(ended)
        self._unacked += 1
        if self._unacked >= self.ack_every or ftype == RESYNC_END:
            actions.append(self._ack())
        return actions

    def _on_data(self, frame: Frame) -> Apply:
        records = frame.payload
        held = self.held
        upserted = [r[2] for r in records if r[0] == OP_UPSERT]
        if len(upserted) == len(records):  # a burst or a snapshot: no deletes, set-at-a-time
            held.update(upserted)
            if self.in_resync is not None:
                self._keep.update(upserted)
                if frame.flags & FLAG_SNAPSHOT:
                    self._snapshot_seen += len(records)
        elif self.in_resync is not None:
            keep = self._keep
            for op, _family, key, _attrs in records:
                if op == OP_UPSERT:
                    keep.add(key)
                    held.add(key)
                else:
                    keep.discard(key)
                    held.discard(key)
            if frame.flags & FLAG_SNAPSHOT:
                self._snapshot_seen += len(records)
        else:
            for op, _family, key, _attrs in records:
                if op == OP_UPSERT:
                    held.add(key)
                else:
                    held.discard(key)
        self.counters.records_applied += len(records)
        return Apply(records)

    def _on_resync_begin(self, seq: int, resync_id: int) -> list:
        self.counters.resyncs += 1
        self._retry_after = 0.0
        self.expected = seq + 1
        self.in_resync = resync_id
        self._keep = set()
        self._snapshot_seen = 0
        self._nacked = None
        self._unacked = 0
        return [self._ack()]

    def _on_resync_end(self, payload: tuple[int, int], now: float) -> list:
        resync_id, count = payload
        if self.in_resync != resync_id:
            self.counters.resync_count_mismatch += 1
            return []
        actions: list = []
        if count != self._snapshot_seen:
            # a sender bug or a forged stream: do not purge on a partial picture
            self.counters.resync_count_mismatch += 1
            return self.ask_resync(now)
        keep = frozenset(self._keep)
        stale = frozenset(self.held - keep)
        self.held -= stale
        actions.append(Purge(resync_id, keep, stale))
        self.in_resync = None
        self.last_resync_done = resync_id
        self._keep = set()
        return actions

    def _on_keepalive(self, last_seq: int, now: float) -> list:
        if self.expected is None:
            return self._maybe_ask_resync(now)
        if last_seq >= self.expected:
            return self._gap(last_seq, now)  # the tail was lost
        return [self._ack()]

    def _gap(self, last: int, now: float) -> list:
        """NACK [expected, last]: `last` is the highest seq known missing or dropped."""
        expected = self.expected
        if self._nacked is not None and self._nacked[0] == expected and now - self._nacked[1] < self.nack_retry:
            return []
        if self._nacked is None or self._nacked[0] != expected:
            self.counters.gaps += 1
        self._nacked = (expected, now)
        self.counters.nacks_sent += 1
        return [SendNack(expected, last)]

    def _ack(self) -> SendAck:
        self._unacked = 0
        self.counters.acks_sent += 1
        return SendAck(self.expected - 1)

    def _ask_for_lost_begin(self, now: float) -> list:
        """A snapshot is flowing and we missed its RESYNC_BEGIN: ask again as soon as a NACK
        would (the Master sends that snapshot again from its start, Sender.on_resync_request)."""
        if now - self._resync_asked < self.nack_retry:
            return []
        return self.ask_resync(now)

    def _maybe_ask_resync(self, now: float) -> list:
        """Repeat the request (it may have met a peer that was not Master yet, or been lost),
        backing off: over a slow link the snapshot asked for last time may still be on its
        way, and a repeat makes the Master send it again from its start (or read a new one
        once the last one's RESYNC_BEGIN was acknowledged: Sender.on_resync_request)."""
        if self._resync_asked != float("-inf"):  # a repeat
            wait = self._retry_after or self.resync_retry
            if now - self._resync_asked < wait:
                return []
            self._retry_after = min(wait * 2, self.resync_retry_max)
        return self.ask_resync(now)
