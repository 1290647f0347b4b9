"""The state sync process: kernel <-> protocol <-> channel, one loop, one thread.

    python -m statesync.service --config FILE [--role master|backup]

Master: ctnetlink events -> EntryFilter -> Sender -> Channel. An event overrun
(ENOBUFS) or a NACK the window cannot serve restarts a resync from a fresh dump.
Backup: Channel -> Receiver -> the kernel (mode "kernel": CtSocket.apply/delete at
once) or a dict (mode "cache": committed into the kernel when we become Master).

Dumps are rare on purpose: one conntrack dump of a (nearly) empty table walks the
whole hash, shared by all namespaces, in one recv() and stalls a CPU for ~15 ms on a
non-preemptible kernel, which the failover daemons' 5 ms heartbeats notice. So the
Backup purges from the keys it knows it holds (Receiver.held, seeded by one dump at
start-up), and the Master serves resyncs from its table (statesync.table). A Backup keeps a copy of that
table and adopts it at takeover when it was in sync, so a switchover costs no dump; a
term without a whole copy dumps for its first resync (seeding the table), and so does a
resync after an overrun. `dumps` in status counts them.

Loop prevention: the direction follows the role. Only the Master reads events and
only the Backup writes entries, so nothing a node injected is ever sent back; no
origin mark is needed (conntrack-tools needs one because its nodes may both send).
The failover daemon starts this process (statesync.supervisor) and drives roles
over the control socket (statesync.control). Until told otherwise it is a Backup.

Config sync (statesync.configsync) shares the loop and the channel: its frames
(types 32..63) go to ConfigSync, its watcher's pipe is polled with the rest, and
its status is the `config` section of ours. Bulk conntrack work and file applies
take turns in one thread; neither touches the failover process's heartbeats.
"""

from __future__ import annotations

import argparse
import logging
import os
import queue
import signal
import sys
import threading
import time
import uuid
from collections import Counter
from operator import itemgetter
from typing import Any, Iterable, Iterator

import zmq

import hasync
from hasync import config as cfgmod

from hasync.control import ControlServer

from . import control, ctsysctl, holdrelease, keys, memory, protocol, wire
from .channel import Channel
from .configsync import frames as config_frames
from .configsync.node import ConfigSync
from .ctnetlink import EV_DESTROY, CtSocket, FramedApply, Overrun, is_tcp_key
from .filter import EntryFilter
from .table import StateTable

log = logging.getLogger("hasync.sync")

CONFIG_TYPES = frozenset(config_frames.TYPES)
MAX_FRAMES_PER_TURN = 16  # Sender frames per loop turn: events and the channel stay responsive
MAX_WAIT_S = 0.2
SWITCH_INTERVAL_S = 0.0005
# a resync is served from the table (statesync.table) only this long after the dump that
# seeded it: an entry made before any listener existed has no event extension and dies
# without a DESTROY, so only a dump drops it from the table; the age bounds how long
# such ghosts can be replicated
TABLE_FRESH_S = 600.0
RELEASE_AFTER_S = 5.0  # a new Master releases its holds this long after the takeover (holdrelease):
# from its copy of the table, or, without a whole copy, from the first snapshot's dump if that
# comes sooner


class KernelWriter:
    """The Backup's kernel writes, in a thread of their own and strictly in order.

    The kernel's work for a batch (inside send(), which releases the GIL) then overlaps the
    decoding of the next frames in the loop's thread: on 2 cores the Backup keeps up with a
    faster Master. The queue is short (2 jobs: enough to overlap), so a Backup that cannot
    keep up pushes back on its loop (and through the protocol's window on the Master)
    instead of growing.
    """

    def __init__(self, maxsize: int = 2):
        self._jobs: queue.Queue = queue.Queue(maxsize)
        self._thread = threading.Thread(target=self._run, name="sync-kernel-writer", daemon=True)
        self._thread.start()

    def submit(self, fn, *args) -> None:
        self._jobs.put((fn, args))

    def wait_idle(self) -> None:
        """Return once every job submitted so far is done (before anything else uses the table)."""
        self._jobs.join()

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                if job is None:
                    return
                fn, args = job
                try:
                    fn(*args)
                except Exception:  # a broken batch must not end the Backup's writes
                    log.exception("kernel write failed")
            finally:
                self._jobs.task_done()

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=10)


def ha_link_address(ifname: str, peer_network) -> str:
    """Our address on the HA link: the one of `ifname` inside the peer's subnet."""
    import ipaddress

    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=ifname)
        if not idx:
            raise SystemExit(f"statesync: HA link interface {ifname} does not exist")
        for msg in ipr.get_addr(index=idx[0]):
            addr = ipaddress.ip_address(msg.get_attr("IFA_ADDRESS"))
            if addr in peer_network:
                return str(addr)
    raise SystemExit(f"statesync: {ifname} has no address in the HA link subnet {peer_network}")


class SyncService:
    def __init__(self, cfg: cfgmod.NodeConfig, *, role: str = "backup", local_address: str | None = None):
        group = cfg.group
        if group is None:
            raise SystemExit("statesync: the config has no HA group")
        if cfg.sync.curve_secret_key_file is None or not cfg.sync.peer_public_key:
            raise SystemExit("statesync: sync.curve_secret_key_file and sync.peer_public_key are required")
        self.cfg = cfg
        self.mode = cfg.sync.mode
        self.role = "backup"
        self.filter = EntryFilter.from_config(cfg)
        public, secret = keys.load_secret(cfg.sync.curve_secret_key_file)
        local = local_address or ha_link_address(group.ha_link, group.peer_network)
        self.channel = Channel(
            local_address=local,
            peer_address=str(group.peer_address),
            port=cfg.sync.port,
            public_key=public,
            secret_key=secret,
            peer_public_key=keys.check_z85(cfg.sync.peer_public_key, "sync.peer_public_key"),
            hello=wire.Hello(hasync.__version__, cfg.hostname, "backup", uuid.uuid4().hex),
        )
        self.ct = CtSocket()  # apply / delete / purge dumps: used by the writer thread, or after wait_idle()
        self.writer = KernelWriter()
        self.events: CtSocket | None = None
        self.sender: protocol.Sender | None = None
        self.receiver = protocol.Receiver()
        # each entry's state: the Master's, for snapshots without a dump; a Backup's copy of
        # it, which a takeover adopts (and in mode "cache" commits into the kernel)
        self.table = StateTable()
        # without the copy (sync.backup_copy = false) a takeover dumps instead of adopting it
        self.keeps_copy = self.mode == "cache" or cfg.sync.backup_copy
        self._seeded_at = float("-inf")
        self.poller = zmq.Poller()
        for sock in self.channel.sockets():
            self.poller.register(sock, zmq.POLLIN)
        self.config = ConfigSync(cfg, self.channel.send)
        if self.config.fileno() is not None:
            self.poller.register(self.config.fileno(), zmq.POLLIN)
        self.control = ControlServer(control.socket_name(cfg.control_socket), self._handle_control)
        self.poller.register(self.control.fileno(), zmq.POLLIN)
        self._control_dispatch = control.dispatcher(self)
        self._was_connected = False
        self._conns: dict[int, Any] = {}
        # what status reports
        self.entries_sent = 0
        self.entries_applied = 0
        self.overruns = 0
        self.errors: Counter = Counter()  # errno name / reason -> count
        self.frames_ignored_role = 0
        self.dumps = 0  # conntrack table dumps done (each stalls a CPU: see the module doc)
        self.table_snapshots = 0  # resyncs served from the table, without a dump
        self.holds_released = 0  # held entries given their kernel timeout back (holdrelease)
        self._release_at: float | None = None  # when a new Master releases its holds
        self._release_entries: list[tuple] | None = None  # the table's entries at that takeover
        self.last_resync: dict[str, Any] | None = None
        self.last_commit: dict[str, Any] | None = None  # cache mode: the last takeover's commit
        self._resync_started: float | None = None
        self._snap_base = 0
        self._unsynced_since: float | None = time.monotonic()
        self._sent_before = 0  # records counted from Senders of earlier master terms
        self._applied_ok = 0
        self.running = True
        self.events_problem = ctsysctl.ensure_events()  # before we write or read any entry
        if self.events_problem:
            log.warning("%s", self.events_problem)
        if self.mode == "kernel":
            self._seed_held()
        self.set_role(role)

    def _seed_held(self) -> None:
        """Entries left from before a (re)start must be purged by the first resync like any
        other stale one: hold them from one dump now, before the node joins its peer."""
        accepts = self.filter.accepts
        self.dumps += 1
        self.receiver.held.update(c[2] for c in self.ct.dump_changes() if accepts(c[2]))
        if self.receiver.held:
            # they may be from a time this node was Master (a restart of the daemon on the
            # Master, say): their TCP windows may be stale, so they are liberal from now on
            # (in the writer thread, ~4 us a TCP entry here: the node answers its daemon meanwhile)
            self.writer.submit(self._make_liberal, list(self.receiver.held))
        log.info("start: %d entries in the table from before, held until the first resync%s",
                 len(self.receiver.held), " (TCP ones made liberal)" if self.receiver.held else "")

    # ---- control commands (statesync.control) -----------------------------------------

    def set_role(self, role: str) -> dict[str, Any]:
        if role == self.role and (role == "backup" or self.sender is not None):
            return {"role": role}
        now = time.monotonic()
        committed = 0
        self.writer.wait_idle()  # what the old Master sent is in our table before anything else
        if role == "master":
            whole = self.receiver.synced and self.keeps_copy  # a complete copy of the old Master's table
            if whole and self.mode == "kernel":
                whole = self._kernel_holds_copy()
            if self.mode == "cache" and self.table:
                committed = self._commit_cache()
            # events after the commit: our own commit is not news for the peer
            self.events = CtSocket.events()
            self.poller.register(self.events.fileno(), zmq.POLLIN)
            self.sender = protocol.Sender(destroy_kind=EV_DESTROY)
            if whole:  # the resyncs that follow (the old Master's, a restart) need no dump
                self.table.adopt()
                self._seeded_at = now
            else:
                self.table.unseed()  # the first snapshot dumps
            self.receiver.reset()
            self._unsynced_since = None
            if self.mode == "kernel" and self.cfg.sync.hold_timeout:
                # not at the takeover itself: the dump stalls a CPU (the first snapshot may do it)
                self._release_at = now + RELEASE_AFTER_S
                # the entries as we wrote them, each with the hold (unless an event replaces it)
                self._release_entries = list(self.table.entries.values()) if whole else None
        else:
            was_master = self.role == "master"
            # our own entries (the table unseeds below): their windows go stale from now on;
            # those we wrote as Backup and the kernel has not changed since are liberal already
            own = (self.table.kernel_made_keys() if was_master and self.mode == "kernel" and self.table.seeded
                   else None)
            self._stop_master()
            self._release_at = self._release_entries = None
            self.receiver.reset()
            self._unsynced_since = now
            if was_master:
                # our sequence windows go stale from now on, as the traffic moves on through
                # the peer, and with tcp_loose=0 a takeover would drop every packet of those
                # sessions as invalid (seen in the lab): liberal at once, in place, no gap
                if self.mode == "kernel":
                    self.writer.submit(self._make_liberal, own)
                # the peer is not Master yet and would ignore a request: its first frame as
                # Master makes it (Receiver.reset)
            elif self.channel.connected:
                self._send_actions(self.receiver.ask_resync(now))
        self.role = role
        self.channel.set_role(role)
        self.config.set_role(role)
        log.info("role: %s%s", role, f" (committed {committed} cached entries in "
                                     f"{self.last_commit['ms']} ms)" if committed else "")
        return {"role": role, "committed": committed}

    def _kernel_holds_copy(self) -> bool:
        """Is our kernel at least as big as our copy of the table? Entries flushed here
        (`conntrack -F`) or refused by this kernel stay in the copy, and a copy adopted with
        them would serve ghosts to the next Backup, which would hold them for days (hold_timeout). More
        entries in the kernel than in the copy is normal (our own local flows)."""
        count = ctsysctl.table_count()
        if count is not None and count >= len(self.table):
            return True
        log.warning("takeover: the kernel holds %s entries, fewer than the %d in our copy of the "
                    "table: the copy is not adopted, the first resync dumps", count, len(self.table))
        return False

    def _handle_control(self, req: dict[str, Any]) -> dict[str, Any]:
        # `hasync resync --config-only` arrives as resync with config=True: config sync's
        if req.get("cmd") == "resync" and req.get("config"):
            return {"ok": True, **self.config.resync()}
        return self._control_dispatch(req)

    def resync(self) -> dict[str, Any]:
        now = time.monotonic()
        if self.role == "master":
            self._start_resync(now, "operator request")
            return {"resync": "sending a full snapshot to the peer"}
        self._unsynced_since = now
        self._send_actions(self.receiver.ask_resync(now))
        return {"resync": "asked the master for a full snapshot"}

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        ch = self.channel
        sent = self._sent_before + (self.sender.counters.records_sent if self.sender else 0)
        if self.role == "master":
            lag = self.sender.oldest_unacked_age(now) if self.sender else 0.0
        else:
            lag = 0.0 if self._unsynced_since is None else now - self._unsynced_since
        problems = []
        if self.role == "backup" and ch.connected and not self.receiver.synced:
            problems.append("resync in progress")
        if self.overruns:
            problems.append(f"{self.overruns} event overruns (healed by resync)")
        if self.events_problem:
            problems.append(self.events_problem)
        problems.extend(self.config.problems())
        return {
            "pid": os.getpid(),
            "config": self.config.status(),
            "connected": ch.live(time.monotonic()),
            # a Backup holds the Master's whole table (a resync finished since it connected)
            "synced": ch.connected and (self.role == "master" or self.receiver.synced),
            "peer": ch.peer.hostname if ch.peer else None,
            "refused_reason": ch.refused_reason,
            "last_refusal": ch.last_refusal,
            "role": self.role,
            "mode": self.mode,
            "entries_sent": sent,
            "entries_applied": self.entries_applied,
            "cached": len(self.table) if self.mode == "cache" and self.role == "backup" else 0,
            "lag_ms": round(lag * 1000, 1),
            "last_resync": self.last_resync,
            "last_commit": self.last_commit,
            "errors": dict(self.errors),
            "overruns": self.overruns,
            "problems": problems,
            "channel": vars(ch.counters).copy(),
            "receiver": vars(self.receiver.counters).copy(),
            "sender": vars(self.sender.counters).copy() if self.sender else None,
            "filter": {"ignored": self.filter.ignored, "malformed": self.filter.malformed},
            "frames_ignored_role": self.frames_ignored_role,
            "dumps": self.dumps,
            "table": {"entries": len(self.table), "seeded": self.table.seeded, "backup_copy": self.keeps_copy,
                      "snapshots": self.table_snapshots, "completed": self.table.completed},
            "held": len(self.receiver.held),
            "holds_released": self.holds_released,
        }

    # ---- the loop ----------------------------------------------------------------------

    def run(self) -> None:
        while self.running:
            self.turn(self._wait_ms())

    def turn(self, wait_ms: int) -> None:
        ready = dict(self.poller.poll(wait_ms))
        now = time.monotonic()
        if self.events is not None:
            self._read_events(now)
        self._read_channel(now)
        self.config.turn(now)
        self._serve_control(ready)
        if self.sender is not None:
            if self.sender.resync_needed:
                self._start_resync(now, "the peer missed frames the window no longer holds")
            self.channel.send_all(self.sender.next_frames(now, max_frames=MAX_FRAMES_PER_TURN))
            if self.sender.resyncing is False and self._resync_started is not None:
                self._resync_done(now, self.sender.counters.snapshot_records_sent)
        if self._release_at is not None and now >= self._release_at:
            self._release_at = None
            if self._release_entries is not None:
                self._release_from_table()
            else:
                self.dumps += 1
                self.writer.submit(self._release_holds_from_dump)

    def _wait_ms(self) -> int:
        now = time.monotonic()
        deadline = now + MAX_WAIT_S
        if self.sender is not None:
            if self.sender.has_work:
                return 0
            deadline = min(deadline, self.sender.get_timer())
        for timer in (self.channel.next_timer(), self.config.next_timer(), self._release_at):
            if timer is not None:
                deadline = min(deadline, timer)
        if deadline <= now:  # also -inf: a timer that never ran is due
            return 0
        return int((deadline - now) * 1000) + 1

    def _read_events(self, now: float) -> None:
        try:
            changes = self.events.recv_changes(block=False)
        except Overrun:
            self.overruns += 1
            log.warning("conntrack event overrun: resync from a dump")
            self.table.unseed()
            self._drain_events()
            self._start_resync(now, "event overrun")
            return
        if changes and self.sender is not None:
            selected = self.table.on_changes(self.filter.select_changes(changes))
            self._hold_local(selected)
            self.sender.on_changes(selected)

    def _hold_local(self, changes: list[tuple]) -> None:
        """As Master our own table grows from traffic: hold those keys as if replicated, so
        that a purge after we are Backup again removes the ones the new Master lacks."""
        held = self.receiver.held
        if EV_DESTROY not in map(itemgetter(0), changes):
            held.update(map(itemgetter(2), changes))
            return
        for kind, _family, key, *_ in changes:
            if kind == EV_DESTROY:
                held.discard(key)
            else:
                held.add(key)

    def _drain_events(self) -> None:
        """Empty the event queue before the dump starts. After an overrun the kernel keeps
        dropping events, without a second ENOBUFS, until the queue is empty (netlink's
        CONGESTED bit): anything dropped before the dump starts is in the dump, anything
        after reaches us as an event."""
        while True:
            try:
                if not self.events.recv_changes(block=False):
                    return
            except Overrun:
                continue

    def _read_channel(self, now: float) -> None:
        frames = self.channel.receive(now)
        if self.channel.take_new_session():
            # a (re)connected peer: a Backup asks for everything, a Master waits for that request
            if self.role == "backup":
                self.receiver.reset()
                self._unsynced_since = now
                self._send_actions(self.receiver.ask_resync(now))
            self.config.on_session()
        elif self._was_connected and not self.channel.connected:
            self.config.on_disconnect()
        self._was_connected = self.channel.connected
        if not frames:
            return
        actions: list = []
        for frame in frames:
            ftype = frame.type
            if ftype in CONFIG_TYPES:
                self.config.on_frame(frame, now)
            elif ftype in (wire.ACK, wire.NACK, wire.RESYNC_REQ):
                if self.sender is None:
                    self.frames_ignored_role += 1
                elif ftype == wire.ACK:
                    self.sender.on_ack(frame.payload, now)
                elif ftype == wire.NACK:
                    self.sender.on_nack(*frame.payload, now)
                elif self.sender.on_resync_request(now):
                    self._start_resync(now, "the peer asked")
            elif self.role == "backup":
                actions.extend(self.receiver.on_frame(frame, now))
            elif ftype != wire.KEEPALIVE:
                self.frames_ignored_role += 1  # two masters: never apply the other's state
        if actions:
            self._backup_actions(actions, now)

    def _backup_actions(self, actions: list, now: float) -> None:
        batch: list[tuple] = []  # records of consecutive Apply actions
        for act in actions:
            if isinstance(act, protocol.Apply):
                batch += act.records
            elif isinstance(act, protocol.Purge):
                self._write(batch)
                batch = []
                self._purge(act)
                self._unsynced_since = None
                self.last_resync = {"at": time.time(), "id": act.resync_id, "entries": len(act.keep)}
            else:
                self.channel.send(act.to_bytes())
        self._write(batch)
        if self.receiver.synced:
            self._unsynced_since = None

    def _write(self, records: list[tuple]) -> None:
        """Write (op, family, key, attrs) records, in order per key. One frame never holds a
        key twice; when two frames of this turn do, only the key's last record is written
        (the kernel writes below go upserts first, then deletes)."""
        if not records:
            return
        if len({r[2] for r in records}) != len(records):
            records = list({r[2]: r for r in records}.values())
        if self.keeps_copy:
            self.table.on_records(records)
        if self.mode == "cache":
            self.entries_applied += len(records)
            return
        upserts = [(r[1], r[3]) for r in records if r[0] == wire.OP_UPSERT]
        deletes = [r[2] for r in records if r[0] == wire.OP_DELETE] if len(upserts) < len(records) else []
        # framed here (Python work), sent by the writer (kernel work): the two overlap
        # held: the Master restarts its entries' timers on packets without an event, so our
        # copies must not die by the timeout of the last event (config sync.hold_timeout)
        framed = self.ct.frame_apply(upserts, hold=self.cfg.sync.hold_timeout) if upserts else None
        self.writer.submit(self._write_kernel, framed, deletes)

    def _write_kernel(self, upserts: FramedApply | None, deletes: list) -> None:  # in the writer thread
        if upserts is not None:
            res = self.ct.send_framed(upserts)
            self.entries_applied += res.ok
            self._count_errors(res, ignore=())
        if deletes:
            res = self.ct.delete(deletes)
            self.entries_applied += res.ok
            self._count_errors(res, ignore=(2,))  # ENOENT: already gone (timed out here)

    def _purge(self, purge: protocol.Purge) -> None:
        self.table.remove(purge.stale)  # (the held keys not in the snapshot: a superset of ours)
        if self.mode == "cache":
            return
        # no dump: the receiver knows what we hold (after the writes queued before it)
        self.writer.submit(self._purge_kernel, len(purge.keep), list(purge.stale))

    def _purge_kernel(self, kept: int, stale: list[bytes]) -> None:  # in the writer thread
        if stale:
            res = self.ct.delete(stale)
            self._count_errors(res, ignore=(2,))  # ENOENT: timed out here meanwhile
        log.info("resync complete: %d entries, %d stale ones purged", kept, len(stale))

    def _make_liberal(self, keys: list[bytes] | None) -> None:  # in the writer thread
        """Our TCP entries BE_LIBERAL, in place (CtSocket.make_liberal); None: they are not
        known (no seeded table), so a dump says."""
        if keys is None:
            self.dumps += 1
            keys = [c[2] for c in self.ct.dump_changes()]
        tcp = [key for key in keys if is_tcp_key(key)]
        res = self.ct.make_liberal(tcp)
        self._count_errors(res, ignore=(2,))  # ENOENT: gone meanwhile
        log.info("%d TCP entries of ours made liberal (their windows are stale)", res.ok)

    def _release_holds_from_dump(self) -> None:  # in the writer thread
        accepts = self.filter.accepts
        self._release_holds_logged((c[1:] for c in self.ct.dump_changes() if accepts(c[2])))

    def _release_from_table(self) -> None:
        """The takeover's entries that no event changed since still carry the hold we wrote
        them with: no dump needed to know their timeouts."""
        now_entries = self.table.entries
        unchanged = [r[1:4] for r in self._release_entries if now_entries.get(r[2]) is r]
        self._release_entries = None
        self.writer.submit(self._release_holds_logged, unchanged, self.cfg.sync.hold_timeout)

    def _release_holds_logged(self, entries: Iterable[tuple], held: int | None = None) -> None:
        # in the writer thread
        released = self._release_holds(entries, holdrelease.read_ceilings(), held)
        log.info("takeover: %d held entries given their kernel timeout back", released)

    def _release_holds(self, entries, ceilings: holdrelease.Ceilings, held: int | None = None) -> int:
        """Cut (family, key, attrs, ...) entries held beyond their kernel default to it (in the
        writer thread)."""
        items = holdrelease.releases(entries, ceilings, held)
        if not items:
            return 0
        res = self.ct.set_timeouts(items)
        self.holds_released += res.ok
        self._count_errors(res, ignore=(2,))  # ENOENT: gone meanwhile
        return res.ok

    def _commit_cache(self) -> int:
        started = time.monotonic()
        framed = self.ct.frame_apply([(r[1], r[3]) for r in self.table.entries.values()])
        framed_at = time.monotonic()
        res = self.ct.send_framed(framed)
        self._count_errors(res, ignore=())
        done = time.monotonic()
        # the takeover waits for this (cache mode): the operator sees what it cost
        self.last_commit = {"at": time.time(), "entries": res.ok, "ms": round((done - started) * 1000, 1),
                            "frame_ms": round((framed_at - started) * 1000, 1)}
        return res.ok

    def _count_errors(self, res, ignore: tuple[int, ...]) -> None:
        import errno as errno_mod

        for err, n in res.errors.items():
            if err not in ignore:
                self.errors[errno_mod.errorcode.get(err, str(err))] += n

    def _snapshot(self, now: float) -> tuple[str, Iterator[list[tuple]]]:
        """Lists of (family, key, attrs, ...): from the table when it is seeded and fresh,
        else from a dump that seeds it (and which of the two)."""
        if self.table.seeded and now - self._seeded_at < TABLE_FRESH_S:
            self.table_snapshots += 1
            return "the table", self.table.snapshot()
        return "a dump", self._dump_snapshot(now)

    def _dump_snapshot(self, now: float) -> Iterator[list[tuple]]:
        """A dump on its own socket, read lazily as the window lets the snapshot flow: a list
        of (family, key, attrs, ...) per datagram the kernel answers with."""
        sock = CtSocket()
        self.dumps += 1
        table = self.table
        table.begin_seed()
        try:
            select = self.filter.select_changes
            held = self.receiver.held
            # a takeover's holds are released from the first snapshot's dump, not one more
            ceilings = holdrelease.read_ceilings() if self._release_at is not None else None
            self._release_at = self._release_entries = None
            for changes in sock.dump_batches():
                chosen = select(changes)
                held.update([c[2] for c in chosen])  # what we send, we hold (see _hold_local)
                entries = [c[1:] for c in chosen]
                repaired = table.seed(chosen)
                if repaired and self.sender is not None:
                    self.sender.on_changes(repaired)  # live updates sent partial, now whole
                if ceilings is not None:
                    self.writer.submit(self._release_holds, entries, ceilings)
                yield entries
            table.end_seed()
            self._seeded_at = now
        finally:
            sock.close()

    def _start_resync(self, now: float, why: str) -> None:
        if self.sender is None:
            return
        source, snapshot = self._snapshot(now)
        log.info("resync: snapshot to the peer (%s) from %s", why, source)
        self._resync_started = now
        self._snap_base = self.sender.counters.snapshot_records_sent
        self.sender.start_resync(snapshot, chunked=True)

    def _resync_done(self, now: float, snapshot_sent: int) -> None:
        self.last_resync = {"at": time.time(), "id": self.sender.resync_id,
                            "entries": snapshot_sent - self._snap_base,
                            "duration_ms": round((now - self._resync_started) * 1000, 1)}
        self._resync_started = None

    def _stop_master(self) -> None:
        if self.events is not None:
            self.poller.unregister(self.events.fileno())
            self.events.close()
            self.events = None
        if self.sender is not None:
            self._sent_before += self.sender.counters.records_sent
            self.sender = None
        self._resync_started = None
        self.table.unseed()  # a Backup keeps no table (its memory goes back)

    def _send_actions(self, actions: list) -> None:
        for act in actions:
            self.channel.send(act.to_bytes())

    def _serve_control(self, ready: dict) -> None:
        # zmq.Poller reports plain sockets by file descriptor
        if self.control.fileno() in ready:
            conn = self.control.accept()
            if conn is not None:
                self._conns[conn.fileno()] = conn
                self.poller.register(conn.fileno(), zmq.POLLIN)
        for fd in [fd for fd in self._conns if fd in ready]:
            conn = self._conns[fd]
            if self.control.readable(conn):  # answered (or gone): the server closed it
                self.poller.unregister(fd)
                del self._conns[fd]

    def close(self) -> None:
        self.writer.close()
        self._stop_master()
        for conn in self._conns.values():
            conn.close()
        self.control.close()
        self.config.close()
        self.channel.close()
        self.ct.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="statesync.service", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--role", choices=control.ROLES, default="backup", help="role at start (default backup)")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s statesync %(levelname)s %(message)s")
    cfg = cfgmod.load(args.config)
    service = SyncService(cfg, role=args.role)
    memory.tune_for_bulk()
    # the Backup's kernel writer gives the GIL up for each batch's sendmmsg and must get it
    # back from the loop thread: at the default 5 ms switch interval it sat idle 5 ms at a time
    # (before sendmmsg, after every ~1 ms send())
    sys.setswitchinterval(SWITCH_INTERVAL_S)

    def stop(*_):
        service.running = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        service.run()
    finally:
        service.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
