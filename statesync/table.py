"""The Master's state table: each entry's current attributes, kept from ctnetlink events.

Two reasons to keep it (conntrackd keeps the same, its "internal cache"):
- A resync is served from here, not from a dump. A dump walks the whole conntrack
  hash in one recv() with preemption off (~10 ms of a CPU at the lab's hash size,
  more with a bigger one): that CPU forwards nothing meanwhile and the failover
  daemons' heartbeats run late. With the table, only the first resync of a Master
  term whose table is not known dumps (it also seeds the table).
- An UPDATE event carries only part of an entry: CTA_PROTOINFO comes only with a
  protocol-state change, CTA_LABELS only with a label change, and so on (a mark-only
  update has no TCP state). A Backup that creates an entry from such a record (cache
  mode's commit, a resync into a Backup that lacks it) would make a TCP entry without its state. So each
  update is completed with the attributes it lacks from the entry's last state, and
  the completed record is what is sent.

A Backup keeps the same table from the records it is sent (`on_records`): at takeover it
is the new Master's table (`adopt`), so the resyncs that follow a switchover need no dump
either. In cache mode it is the cache that the takeover commits. In kernel mode the copy
can be left out (config sync.backup_copy = false): its memory back, a dump at takeover.

Rows are kept as they come, (kind or op, family, key, attrs, ...): an event's change
tuple, a dump's, a replicated record. Keeping the caller's tuple costs no allocation per
entry on the burst path; a snapshot cuts (family, key, attrs) from them. Pure code.
"""

from __future__ import annotations

from itertools import islice
from operator import itemgetter
from typing import Iterable, Iterator

from .ctconst import (
    CTA_HELP, CTA_LABELS, CTA_PROTOINFO, CTA_SECCTX, CTA_SEQ_ADJ_ORIG, CTA_SEQ_ADJ_REPLY, CTA_SYNPROXY,
    CTA_TUPLE_MASTER, EV_DESTROY, EV_NEW,
)
from .ctmsg import MalformedMessage, iter_attrs
from .wire import OP_DELETE, OP_UPSERT

# top-level attributes an event may leave out while the entry still has them (the kernel
# puts them in only when their IPCT_* bit is in the event); the rest are always sent or,
# like CTA_MARK, left out only when zero
CARRIED = frozenset({CTA_PROTOINFO, CTA_HELP, CTA_TUPLE_MASTER, CTA_SEQ_ADJ_ORIG, CTA_SEQ_ADJ_REPLY,
                     CTA_SECCTX, CTA_LABELS, CTA_SYNPROXY})

RECORD_FIELDS = 4  # a replicated record (op, family, key, attrs); a kernel change has a portid too
SNAPSHOT_CHUNK = 128  # entries per snapshot chunk: about a dump datagram's worth

_NEW_ONLY = frozenset({EV_NEW})
_KIND = itemgetter(0)
_KEY = itemgetter(2)
_ENTRY = itemgetter(slice(1, 4))  # a row -> (family, key, attrs), as a snapshot streams it


def complete(old: bytes, new: bytes) -> bytes:
    """`new` plus the CARRIED attributes of `old` that `new` lacks (`new` itself if none)."""
    try:
        present = {t for t, *_ in iter_attrs(new)}
        extra = [old[s:e] for t, _, _, s, e in iter_attrs(old) if t in CARRIED and t not in present]
    except MalformedMessage:
        return new  # the receiver drops and counts what does not parse
    if not extra:
        return new
    pad = b"\0" * (-len(new) % 4)  # the kernel pads; an appended attribute must start aligned
    return b"".join([new, pad, *extra])


def _completed_row(row: tuple, old_attrs: bytes) -> tuple:
    """`row` with its attrs completed from `old_attrs` (`row` itself if nothing was missing)."""
    attrs = complete(old_attrs, row[3])
    return row if attrs is row[3] else (*row[:3], attrs, *row[4:])


class StateTable:
    """key -> (kind, family, key, attrs, ...) for every entry the Master replicates.

    `seeded` says the table holds the whole kernel table: until then a resync must dump
    (and seeds the table with `begin_seed`, `seed`, `end_seed`)."""

    def __init__(self) -> None:
        self.entries: dict[bytes, tuple] = {}  # key -> row
        self.seeded = False
        self.completed = 0  # updates completed from the entry's last state
        self._seeding: set[bytes] | None = None  # keys changed live while a seeding dump runs

    def __len__(self) -> int:
        return len(self.entries)

    def on_changes(self, changes: list[tuple]) -> list[tuple]:
        """Record (kind, family, key, attrs, ...) changes; return them with updates completed."""
        entries = self.entries
        if self._seeding is not None:
            self._seeding.update(map(_KEY, changes))
        if set(map(_KIND, changes)) <= _NEW_ONLY:
            # a burst of new entries (a NEW for a key we hold means we missed its destroy)
            entries.update(zip(map(_KEY, changes), changes))
            return changes
        out = []
        for change in changes:
            key = change[2]
            if change[0] == EV_DESTROY:
                entries.pop(key, None)
            else:
                old = entries.get(key)
                if old is not None and change[0] != EV_NEW:
                    whole = _completed_row(change, old[3])
                    if whole is not change:
                        change = whole
                        self.completed += 1
                entries[key] = change
            out.append(change)
        return out

    def kernel_made_keys(self) -> list[bytes]:
        """Keys whose row came from this node's own kernel: an event's or a dump's change
        (kind, family, key, attrs, portid). A row still as it was replicated to us, a record
        (op, family, key, attrs) adopted at takeover, is an entry we wrote as Backup, TCP ones
        BE_LIBERAL, and untouched since: any change of its state or a re-creation by the
        kernel would have replaced it with an event's change."""
        return [key for key, row in self.entries.items() if len(row) != RECORD_FIELDS]

    def snapshot(self) -> Iterator[list[tuple]]:
        """The table as it is now, in chunks of entries (Sender.start_resync(chunked=True)).
        Copied at once: later changes reach the peer live (the Sender skips their keys)."""
        rows = iter(list(self.entries.values()))
        return iter(lambda: list(map(_ENTRY, islice(rows, SNAPSHOT_CHUNK))), [])

    # ---- a Backup's copy

    def on_records(self, records: list[tuple]) -> None:
        """Replicated (op, family, key, attrs) records, in order: upserts set, deletes remove."""
        entries = self.entries
        if OP_DELETE not in map(_KIND, records):
            entries.update(zip(map(_KEY, records), records))
            return
        for record in records:
            if record[0] == OP_UPSERT:
                entries[record[2]] = record
            else:
                entries.pop(record[2], None)

    def remove(self, keys: Iterable[bytes]) -> None:
        pop = self.entries.pop
        for key in keys:
            pop(key, None)

    def adopt(self) -> None:
        """The copy is whole (the Backup was synced at the takeover): it serves snapshots."""
        self.seeded = True
        self._seeding = None

    # ---- seeding from a dump

    def begin_seed(self) -> None:
        self.entries.clear()
        self.seeded = False
        self._seeding = set()

    def seed(self, changes: list[tuple]) -> list[tuple]:
        """Dumped (kind, family, key, attrs, ...) changes; a key changed live since begin_seed
        keeps its live state (the dump's may be older).

        A live update that came before the dump reached its key found no row to complete it
        from (begin_seed emptied the table), so it went out as the kernel sent it, perhaps
        without the TCP state. The dump's row completes it now: what the live update left
        out did not change in it. Returns those completed live rows, to be sent again (the
        peer may have created the entry from the partial one, and the snapshot skips keys
        that changed live)."""
        touched = self._seeding
        if touched is None:
            return []  # unseeded since (an overrun): this dump no longer counts
        repaired: list[tuple] = []
        if touched:
            entries = self.entries
            fresh = []
            for c in changes:
                if c[2] not in touched:
                    fresh.append(c)
                    continue
                live = entries.get(c[2])  # None: destroyed live, the dump's row is stale
                if live is not None and live[0] != EV_NEW:
                    whole = _completed_row(live, c[3])
                    if whole is not live:
                        entries[c[2]] = whole
                        repaired.append(whole)
            changes = fresh
            self.completed += len(repaired)
        self.entries.update(zip(map(_KEY, changes), changes))
        return repaired

    def end_seed(self) -> None:
        if self._seeding is not None:
            self._seeding = None
            self.seeded = True

    def unseed(self) -> None:
        """Events were lost (an overrun): the table is wrong until a dump seeds it again."""
        self.entries.clear()
        self.seeded = False
        self._seeding = None
