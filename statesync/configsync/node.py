"""Config sync on one node: the watcher, the manifest, the apply and the hooks around
the decisions of `core`, speaking the frames of `frames` through a `send` callable.

The sync service (statesync.service) owns the loop and the channel; it calls
`on_frame` for config frames, `turn` every loop turn, `set_role` / `on_session` /
`on_disconnect` as the pair changes, and merges `status()` and `problems()` into its own.

Master: watched changes -> new generation -> a delta against the signature of the
version sent before (a rename: against the old name's) -> CFG_FILES; the Backup ACKs
each version; an ACK missing for ACK_TIMEOUT_S (a frame dropped around a reconnect)
resends the manifest, which converges whatever is missing.
Backup: on connect and on `resync --config` it asks for the manifest, compares it
with its own (`core.compare`), fetches what the Master wins (CFG_WANT carries its
signature, so the Master answers with a delta), pushes back what it wins itself
(changes made while the Master was away) and applies atomically (`apply`). Changes
it sees on disk that it did not apply are reported as local changes; one made while the
Master was connected is never pushed to it: the Master's version replaces it at
`resync --config` or at the Master's next change of the file.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from statesync.wire import Frame

from . import apply as applymod
from . import core, diff, frames
from .hooks import HookRunner
from .manifest import DELETED, Entry, Manifest, Name, read_version, stat_key
from .pathguard import PathGuard, PathRejected
from .stagetimes import StageTimes
from .watcher import Watcher

log = logging.getLogger("hasync.sync.config")

ACK_TIMEOUT_S = 3.0
PART_BYTES = 512 << 10  # literal bytes per file item: one 10 MB file is ~20 frames
FRAME_BYTES = 256 << 10  # small files share a CFG_FILES frame up to this size
MAX_LISTED = 20
# The store is a restart cache (stat keys, generations): written at most once per this
# long rather than after every change. An fsync'd save per applied version or ACK put
# 2-3 journal commits per edit on the filesystem the Backup's apply fsyncs on, and held
# the loop meanwhile. A crash inside the window loses nothing that matters: the restart
# scan re-hashes the changed files, and a version both nodes hold compares as the same.
SAVE_DELAY_S = 0.5


@dataclass
class _Incoming:
    name: Name
    path: Path
    entry: Entry
    writer: applymod.Writer
    keep: Path | None
    next_part: int = 1


class ConfigSync:
    def __init__(self, cfg, send: Callable[[bytes], bool], *, clock: Callable[[], float] = time.monotonic,
                 watch: bool = True):
        self.guard = PathGuard.for_node(cfg)
        self.state_dir = Path(cfg.state_dir)
        self.send_raw = send
        self.clock = clock
        roots = [r.directory for r in self.guard.roots]
        self.manifest = Manifest(roots, self.state_dir / "configsync" / "manifest")
        self.hooks = HookRunner(dict(cfg.sync.reload_hooks))
        self.role = "backup"
        self.connected = False
        # counters and what status shows
        self.bytes_sent = self.frames_sent = self.send_failures = 0
        self.frames_received = self.versions_sent = self.versions_applied = 0
        self.rejected = 0
        self.last_rejection: str | None = None
        self.frames_ignored = 0
        self.retries = 0
        self.bad_deltas = 0
        self.tombstones_expired = 0
        self._expired: set[Name] = set()  # dropped tombstones: a late duplicate ACK is no stranger
        self.roots_mismatch: str | None = None  # replicated_paths differ from the peer's: sync refused
        self.conflicts: list[dict] = []
        self.local_changes: dict[Name, str] = {}
        # edited here while the Master was connected: never pushed to it (a change found
        # at a compare after time apart still wins by its generation)
        self.edited_as_backup: set[Name] = set()
        self.last_applied: dict | None = None
        self.peer_kept: dict[Name, str] = {}  # the peer kept its own version (its generation was newer)
        # in-flight work
        self.pending: dict[Name, tuple[int, float]] = {}  # Master: sent, not yet ACKed
        self.awaiting: dict[Name, float] = {}  # asked with CFG_WANT, not yet applied
        self.forced_names: set[Name] = set()
        self.incoming: dict[int, _Incoming] = {}
        self._dropped_xfers: set[int] = set()
        self._xfer = 0
        self._out: list[tuple] = []
        self._out_size = 0
        self._acks: list[tuple] = []
        self._dirty_store = False
        self._save_at: float | None = None  # when the dirty store is written (SAVE_DELAY_S)
        self.manifest_saves = 0
        self.stages = StageTimes()
        self.dir_syncs = applymod.DirSyncs()  # renames of this frame, made durable before its ACKs
        self.leftovers_removed = applymod.remove_leftovers(roots)
        self.manifest.load()
        self._scan_all(report_local=False)
        self.manifest.save()
        self.watcher = Watcher(self._watch_dirs(), self._name_of, clock) if watch else None

    def _watch_dirs(self) -> list[str]:
        return sorted({str(r.directory) for r in self.guard.roots})

    def _name_of(self, path: str) -> Name | None:
        return self.guard.name_of(path)

    def fileno(self) -> int | None:
        return self.watcher.fileno() if self.watcher else None

    # ---- the pair -----------------------------------------------------------------------

    def set_role(self, role: str) -> None:
        if role == self.role:
            return
        self.role = role
        self.pending.clear()
        self.awaiting.clear()
        self.forced_names.clear()
        self._abort_incoming()
        if role == "backup" and self.connected:
            self.request(forced=False)

    def on_session(self) -> None:
        """The channel (re)connected: the Backup asks for the Master's manifest."""
        self.connected = True
        if self.role == "backup":
            self.request(forced=False)

    def on_disconnect(self) -> None:
        self.connected = False
        self.pending.clear()
        self.awaiting.clear()
        self._abort_incoming()

    def request(self, forced: bool) -> None:
        self._send(frames.CFG_REQUEST, forced)

    def resync(self) -> dict[str, Any]:
        """`hasync resync --config`: the Master's versions win everywhere."""
        self.conflicts.clear()
        self.hooks.failures.clear()
        if self.role == "master":
            self._send_manifest(forced=True)
            return {"config": "sent the manifest to the peer (forced)"}
        self.request(forced=True)
        return {"config": "asked the master for its manifest (forced)"}

    # ---- the loop ----------------------------------------------------------------------

    def next_timer(self) -> float | None:
        timers = []
        if self.watcher is not None and (t := self.watcher.next_timer()) is not None:
            timers.append(t)
        if self.hooks.busy:
            timers.append(self.clock() + 0.05)
        if self.pending:
            timers.append(min(t for _g, t in self.pending.values()) + ACK_TIMEOUT_S)
        if self.awaiting:
            timers.append(min(self.awaiting.values()) + ACK_TIMEOUT_S)
        if self._save_at is not None:
            timers.append(self._save_at)
        return min(timers) if timers else None

    def turn(self, now: float) -> None:
        if self.watcher is not None:
            batch = self.watcher.take(now)
            if batch is not None:
                self.stages.add("debounce", self.watcher.last_batch_wait * 1000)
                with self.stages.measure("local_changes"):
                    self._on_local_changes(*batch)
                self.manifest.drop_read()
        self.hooks.poll(now)
        if self.connected:
            if self.pending and min(t for _g, t in self.pending.values()) + ACK_TIMEOUT_S <= now:
                self.retries += 1
                self._send_manifest(forced=False)
                for name, (gen, _t) in list(self.pending.items()):
                    self.pending[name] = (gen, now)
            if self.awaiting and min(self.awaiting.values()) + ACK_TIMEOUT_S <= now:
                self.retries += 1
                self.awaiting.clear()
                self.request(forced=False)
        with self.stages.measure("flush"):
            self._flush()
        if self._dirty_store and self._save_at is None:
            self._save_at = now + SAVE_DELAY_S
        if self._save_at is not None and self._save_at <= now:
            with self.stages.measure("manifest_save"):
                self._save()

    # ---- local changes -----------------------------------------------------------------

    def _scan_all(self, report_local: bool) -> list[Name]:
        changed = []
        seen = set()
        for root, rel, path in self.guard.walk():
            seen.add((root, rel))
            if self.manifest.rescan((root, rel), path, keep_signature=True) is not None:
                changed.append((root, rel))
        for name in [n for n, l in self.manifest.files.items() if n not in seen and not l.entry.deleted]:
            if self.manifest.rescan(name, self.guard.path_of(*name), keep_signature=True) is not None:
                changed.append(name)
        if report_local:
            for name in changed:
                self._local_change(name)
        return changed

    def _on_local_changes(self, dirty: set[Name], moves: list[tuple[Name, Name]], rescan: bool) -> None:
        files = self.manifest.files
        dirty = dirty | {dest for _src, dest in moves}
        old = {name: (files[name].entry, files[name].sig) if name in files else None
               for name in dirty | {src for src, _ in moves}}
        changed: dict[Name, Entry] = {}
        if rescan:
            changed.update((name, files[name].entry) for name in self._scan_all(report_local=False))
        t0 = time.perf_counter()
        for name in sorted(dirty):
            entry = self.manifest.rescan(name, self.guard.path_of(*name), keep_signature=True)
            if entry is not None:
                changed[name] = entry
        for name in [s for s, _ in moves if s not in changed]:
            entry = self.manifest.rescan(name, self.guard.path_of(*name), keep_signature=True)
            if entry is not None:
                changed[name] = entry
        self.stages.add("rescan", (time.perf_counter() - t0) * 1000)
        if not changed:
            return
        self._dirty_store = True
        if self.role != "master":
            for name in changed:
                self._local_change(name)
                if self.connected:
                    self.edited_as_backup.add(name)
            return
        renamed_from = {dest: src for src, dest in moves}
        # creations first (a rename's new name copies from the old one), deletions last
        for name in sorted(changed, key=lambda n: changed[n].deleted):
            base = None
            src = renamed_from.get(name)
            prev = old.get(src) if src is not None else old.get(name)
            if prev is not None and prev[1] is not None and not prev[0].deleted:
                base = (src if src is not None else name, prev[0].digest, prev[1])
            self._send_version(name, changed[name], base)

    def _forget_local_change(self, name: Name) -> None:
        """Both nodes hold the same version of `name` again."""
        self.local_changes.pop(name, None)
        self.edited_as_backup.discard(name)

    def _local_change(self, name: Name) -> None:
        path = str(self.guard.path_of(*name))
        self.local_changes[name] = path
        log.warning("local change on the Backup to %s (the Master's version will be restored on resync)", path)

    # ---- sending -----------------------------------------------------------------------

    def _send(self, ftype: int, payload: Any) -> bool:
        buf = frames.encode(ftype, payload)
        if self.send_raw(buf):
            self.bytes_sent += len(buf)
            self.frames_sent += 1
            return True
        self.send_failures += 1
        return False

    def _root_shapes(self) -> tuple[str, ...]:
        return tuple("/".join(r.pattern) for r in self.guard.roots)

    def _send_manifest(self, forced: bool) -> None:
        self._send(frames.CFG_MANIFEST, (forced, self.manifest.to_wire(), self._root_shapes()))

    def _send_version(self, name: Name, entry: Entry, base: tuple | None, forced: bool = False) -> None:
        """Queue `name`'s current version; base = (base name, base digest, Signature) or None."""
        self._xfer += 1
        xfer = self._xfer
        root, rel = name
        if entry.deleted:
            self._queue((xfer, 0, True, root, rel, entry.to_wire(), forced, None, ()), 0)
        else:
            if self.manifest.get(name).digest != entry.digest:
                return  # changed again under us: the watcher brings the newer version
            data = self.manifest.take_read(name, entry.digest)  # the bytes the rescan just hashed
            if data is None:
                got = read_version(self.guard.path_of(*name))
                if got is None or self.manifest.digest_of(got[0]) != entry.digest:
                    return
                data = got[0]
            if base is not None and base[2] is not None and base[2].hashes:
                with self.stages.measure("delta"):
                    ops = diff.delta(base[2], data, self.manifest.files[name].sig)
                base_wire = (base[0][0], base[0][1], base[1])
            else:
                ops, base_wire = diff.full(data), None
            part, items, size = 0, [], 0
            for op in ops:
                items.append(op)
                size += len(op) if isinstance(op, bytes) else 8
                if size >= PART_BYTES:
                    self._queue((xfer, part, False, root, rel, entry.to_wire(), forced, base_wire, tuple(items)), size)
                    part, items, size = part + 1, [], 0
            self._queue((xfer, part, True, root, rel, entry.to_wire(), forced, base_wire, tuple(items)), size)
        self.versions_sent += 1
        self.pending[name] = (entry.gen, self.clock())

    def _queue(self, item: tuple, size: int) -> None:
        self._out.append(item)
        self._out_size += size + 64
        if self._out_size >= FRAME_BYTES:
            self._flush()

    def _flush(self) -> None:
        if self._out:
            self._send(frames.CFG_FILES, tuple(self._out))
            self._out, self._out_size = [], 0
        if self._acks:
            self.dir_syncs.flush()
            self._send(frames.CFG_ACK, tuple(self._acks))
            self._acks = []

    # ---- receiving ---------------------------------------------------------------------

    def on_frame(self, frame: Frame, now: float) -> None:
        t0 = time.perf_counter()
        try:
            self._on_frame(frame, now)
        finally:
            self.manifest.drop_read()
            self.stages.add(f"frame_{frame.type}", (time.perf_counter() - t0) * 1000)

    def _on_frame(self, frame: Frame, now: float) -> None:
        self.frames_received += 1
        ftype, p = frame.type, frame.payload
        if ftype == frames.CFG_REQUEST:
            if self.role == "master":
                self._send_manifest(forced=p)
            else:
                self.frames_ignored += 1
        elif self.roots_mismatch is not None and ftype in (frames.CFG_WANT, frames.CFG_FILES, frames.CFG_ACK):
            self.frames_ignored += 1  # root indexes mean different paths here: nothing is written
        elif ftype == frames.CFG_MANIFEST:
            if self.role == "backup":
                self._on_manifest(*p, now)
            else:
                self.frames_ignored += 1  # two masters: neither takes the other's manifest
        elif ftype == frames.CFG_WANT:
            self._on_want(p)
        elif ftype == frames.CFG_FILES:
            self._on_files(p, now)
        elif ftype == frames.CFG_ACK:
            self._on_acks(p)
        with self.stages.measure("fsync_dir"):
            self.dir_syncs.flush()  # before the hooks read the files and before the ACKs say "applied"
        self.hooks.start_queued()
        self._flush()

    def _resolve(self, root: int, rel: bytes) -> Path | None:
        try:
            return self.guard.resolve(root, rel)
        except PathRejected as exc:
            self.rejected += 1
            self.last_rejection = str(exc)
            log.warning("config frame rejected: %s", exc)
            return None

    def _check_roots(self, shapes: tuple | None) -> bool:
        """Files travel as (root index, relative path): both nodes must list the same
        replicated_paths in the same order. A mismatch stops config sync with a problem."""
        ours = self._root_shapes()
        if shapes is None or tuple(shapes) == ours:
            self.roots_mismatch = None
            return True
        self.roots_mismatch = (f"config sync stopped: replicated_paths differ from the peer's (ours {list(ours)}, "
                               f"the peer's {list(shapes)}; list the same entries in the same order on both nodes)")
        log.error("%s", self.roots_mismatch)
        return False

    def _on_manifest(self, forced: bool, remote: dict[Name, Entry], shapes: tuple | None, now: float) -> None:
        if not self._check_roots(shapes):
            self.frames_ignored += 1
            return
        for name in list(remote):
            if self._resolve(*name) is None:
                del remote[name]
        for entry in remote.values():
            self.manifest.observe(entry.gen)
        self._scan_all(report_local=True)
        # our tombstones the source no longer lists: both sides agree the path is gone
        for name, l in list(self.manifest.files.items()):
            if l.entry.deleted and name not in remote and l.entry.common >= l.entry.gen:
                self._expire(name)
        local = self.manifest.live()
        plan = core.compare(local, remote, local_is_source=False, forced=forced)
        for name in plan.same:
            if name in local and name in remote:
                self._agree(name, max(local[name].gen, remote[name].gen))
        if forced:
            self.forced_names = set(plan.fetch)
        wants = []
        for name in plan.fetch:
            theirs = remote.get(name)
            if theirs is None or theirs.deleted:
                keep = name in plan.keep_local
                self._apply_delete(name, self.guard.path_of(*name), theirs or Entry(0, 0, DELETED), keep,
                                   conflict=name in plan.conflicts)
                continue
            wants.append(self._want_item(name))
            self.awaiting[name] = now
        if wants:
            self._send(frames.CFG_WANT, tuple(wants))
        for name in plan.push:
            if name in self.edited_as_backup and self.role == "backup":
                continue  # stays here, reported: the Master's config is the source
            if name in plan.conflicts:
                self._record_conflict(name, local[name], remote.get(name), winner="local")
            self._send_version(name, local[name], None)
        self._dirty_store = True
        log.info("config manifest compared: %d same, %d to fetch, %d to push, %d conflicts%s",
                 len(plan.same), len(plan.fetch), len(plan.push), len(plan.conflicts), " (forced)" if forced else "")

    def _agree(self, name: Name, gen: int) -> None:
        """Both nodes hold the same version: it is the common one, at the newer generation."""
        local = self.manifest.files.get(name)
        if local is None:
            return
        local.entry = Entry(gen, gen, *local.entry.to_wire()[2:])
        self.manifest.observe(gen)
        self._forget_local_change(name)

    def _holds(self, name: Name, st: os.stat_result, digest: bytes) -> bool:
        """The file read with stat `st` is the version of `digest` we recorded (unchanged
        since, by its stat signature): no need to hash it again."""
        local = self.manifest.files.get(name)
        return local is not None and local.entry.digest == digest and local.stat_key == stat_key(st)

    def _want_item(self, name: Name) -> tuple:
        local = self.manifest.files.get(name)
        if local is not None and not local.entry.deleted and local.sig is None:
            # made when asked, not at every apply: a received version rarely needs it
            got = read_version(self.guard.path_of(*name))
            if got is not None and self.manifest.digest_of(got[0]) == local.entry.digest:
                local.sig = diff.signature(got[0])
        if local is None or local.entry.deleted or local.sig is None:
            return (name[0], name[1], b"", ())
        return (name[0], name[1], local.entry.digest, local.sig.to_wire())

    def _on_want(self, wants: tuple) -> None:
        for root, rel, base_digest, sig in wants:
            if self._resolve(root, rel) is None:
                continue
            name = (root, rel)
            self.manifest.rescan(name, self.guard.path_of(*name), keep_signature=True)
            entry = self.manifest.get(name)
            base = (name, base_digest, diff.Signature.from_wire(sig)) if sig and base_digest else None
            self._send_version(name, entry, base)

    def _on_acks(self, acks: tuple) -> None:
        for root, rel, gen, result in acks:
            name = (root, rel)
            if name not in self.manifest.files and name not in self.pending:
                if name in self._expired:
                    continue
                self.rejected += 1
                self.last_rejection = f"ACK for an unknown path {rel!r}"
                continue
            pending = self.pending.get(name)
            if pending is not None and pending[0] <= gen:
                del self.pending[name]
            if result in ("applied", "same"):
                self.manifest.set_common(name, gen)
                self.peer_kept.pop(name, None)
                mine = self.manifest.get(name)
                if mine.gen == gen:
                    self._forget_local_change(name)  # our version is now the peer's too
                    if mine.deleted and name in self.manifest.files:
                        self._expire(name)  # the peer deleted it too: nothing left to compare
            else:
                self.peer_kept[name] = result
            self._dirty_store = True

    def _on_files(self, items: tuple, now: float) -> None:
        for xfer, part, last, root, rel, entry, forced, base, ops in items:
            if xfer in self._dropped_xfers:
                if last:
                    self._dropped_xfers.discard(xfer)
                continue
            if part == 0:
                self._begin(xfer, (root, rel), entry, forced or (root, rel) in self.forced_names, base)
                if xfer not in self.incoming:
                    if not last:
                        self._dropped_xfers.add(xfer)
                    continue
            inc = self.incoming.get(xfer)
            if inc is None or (part and part != inc.next_part):
                self._dropped_xfers.add(xfer) if not last else None
                if inc is not None:
                    self._fail(xfer, "parts out of order")
                continue
            inc.next_part = part + 1
            try:
                with self.stages.measure("write"):
                    inc.writer.write(ops)
                if last:
                    self._commit(xfer)
            except (diff.BadDelta, applymod.DigestMismatch) as exc:
                self._fail(xfer, str(exc))
                if not last:
                    self._dropped_xfers.add(xfer)
            except OSError as exc:
                self._fail(xfer, f"write failed: {exc}")
                if not last:
                    self._dropped_xfers.add(xfer)

    def _begin(self, xfer: int, name: Name, incoming: Entry, forced: bool, base: tuple | None) -> None:
        path = self._resolve(*name)
        if path is None:
            return
        self.manifest.observe(incoming.gen)
        if self.manifest.rescan(name, path, keep_signature=False) is not None and self.role == "backup":
            self._local_change(name)
        local = self.manifest.get(name)
        d = core.decide(local, incoming, incoming_is_source=self.role == "backup", forced=forced)
        self.forced_names.discard(name)
        if d.same:
            self._agree(name, max(local.gen, incoming.gen))
            self.awaiting.pop(name, None)
            self._acks.append((*name, incoming.gen, "same"))
            return
        if not d.take:
            if d.conflict:
                self._record_conflict(name, local, incoming, winner="local")
            self.awaiting.pop(name, None)
            self._acks.append((*name, incoming.gen, f"kept the local generation {local.gen}"))
            return
        keep = applymod.aside_path(self.state_dir, name[0], name[1], local) if d.keep_local else None
        if d.conflict:
            self._record_conflict(name, local, incoming, winner="peer", kept=keep)
        if incoming.deleted:
            self._apply_delete(name, path, incoming, keep is not None, conflict=False)
            return
        base_bytes = b""
        if base is not None:
            bpath = self._resolve(base[0], base[1])
            got = read_version(bpath) if bpath is not None else None
            if got is None or not self._holds(base[:2], got[1], base[2]) and self.manifest.digest_of(got[0]) != base[2]:
                self.bad_deltas += 1
                self._send(frames.CFG_WANT, (self._want_item(name),))
                self.awaiting[name] = self.clock()
                return
            base_bytes = got[0]
        try:
            writer = applymod.Writer(path, base_bytes)
        except OSError as exc:
            self._acks.append((*name, incoming.gen, f"error: {exc}"[:200]))
            return
        self.incoming[xfer] = _Incoming(name, path, incoming, writer, keep)

    def _commit(self, xfer: int) -> None:
        inc = self.incoming.pop(xfer)
        with self.stages.measure("fsync_file"):
            inc.writer.prepare(inc.entry)
        with self.stages.measure("rename"):
            inc.writer.install(inc.keep)
        self.dir_syncs.add(inc.path.parent)
        e = inc.entry
        self.manifest.put(inc.name, Entry(e.gen, e.gen, e.digest, e.mode, e.uid, e.gid, e.size))
        self.manifest.files[inc.name].stat_key = stat_key(inc.writer.final_stat)
        self._applied(inc.name, inc.path, e)

    def _apply_delete(self, name: Name, path: Path, incoming: Entry, keep: bool, conflict: bool) -> None:
        local = self.manifest.get(name)
        aside = applymod.aside_path(self.state_dir, name[0], name[1], local) if keep else None
        applymod.delete(path, aside, self.dir_syncs)
        gen = max(incoming.gen, local.gen)
        self.manifest.put(name, Entry(gen, gen, DELETED))
        self._applied(name, path, self.manifest.get(name))

    def _applied(self, name: Name, path: Path, entry: Entry) -> None:
        self.versions_applied += 1
        self.awaiting.pop(name, None)
        self._forget_local_change(name)
        self.last_applied = {"path": str(path), "generation": entry.gen, "at": time.time(),
                             "deleted": entry.deleted}
        self._acks.append((*name, entry.gen, "applied"))
        self.hooks.applied(str(path))
        self._dirty_store = True

    def _fail(self, xfer: int, why: str) -> None:
        inc = self.incoming.pop(xfer, None)
        if inc is None:
            return
        inc.writer.abort()
        log.warning("config apply of %s failed (%s): asking for the whole file", inc.path, why)
        self.bad_deltas += 1
        self.manifest.files.get(inc.name) and setattr(self.manifest.files[inc.name], "sig", None)
        self._send(frames.CFG_WANT, ((*inc.name, b"", ()),))
        self.awaiting[inc.name] = self.clock()

    def _expire(self, name: Name) -> None:
        """Drop a tombstone both nodes hold. Safe: an absent name and a tombstone compare as
        the same, and the Lamport clock (kept in the store) never goes back, so a later
        version of the path still outranks the deletion."""
        del self.manifest.files[name]
        self.tombstones_expired += 1
        if len(self._expired) > 10000:
            self._expired.clear()
        self._expired.add(name)
        self._dirty_store = True

    def _abort_incoming(self) -> None:
        for inc in self.incoming.values():
            inc.writer.abort()
        self.incoming.clear()
        self._dropped_xfers.clear()

    def _record_conflict(self, name: Name, local: Entry, incoming: Entry | None, winner: str,
                         kept: Path | None = None) -> None:
        self.conflicts.append({
            "path": str(self.guard.path_of(*name)), "winner": winner,
            "local_generation": local.gen, "peer_generation": incoming.gen if incoming else None,
            "kept": str(kept) if kept else None, "at": time.time()})
        del self.conflicts[:-MAX_LISTED]
        log.warning("config conflict on %s: the %s version wins%s", self.guard.path_of(*name), winner,
                    f", the other is kept at {kept}" if kept else "")

    # ---- what status shows -------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        behind = len(self.pending) if self.role == "master" else len(self.awaiting) + len(self.incoming)
        return {
            "in_sync": self.connected and behind == 0 and not self.local_changes and not self.peer_kept
            and self.roots_mismatch is None,
            "behind": behind,
            "generation": self.manifest.clock,
            "files": sum(1 for l in self.manifest.files.values() if not l.entry.deleted),
            "conflicts": list(self.conflicts),
            "last_applied": self.last_applied,
            "hook_failures": list(self.hooks.failures.values()),
            "hook_runs": self.hooks.runs,
            "local_changes": sorted(self.local_changes.values())[:MAX_LISTED],
            "bytes_sent": self.bytes_sent,
            "frames_sent": self.frames_sent,
            "frames_received": self.frames_received,
            "send_failures": self.send_failures,
            "versions_sent": self.versions_sent,
            "versions_applied": self.versions_applied,
            "rejected": self.rejected,
            "last_rejection": self.last_rejection,
            "bad_deltas": self.bad_deltas,
            "retries": self.retries,
            "tombstones_expired": self.tombstones_expired,
            "manifest_saves": self.manifest_saves,
            "roots_mismatch": self.roots_mismatch,
            "roots": [str(r.directory) for r in self.guard.roots],
            "stage_ms": self.stages.summary(),
        }

    def problems(self) -> list[str]:
        out = [f"config conflict on {c['path']}: the {c['winner']} version won"
               + (f", the other is kept at {c['kept']}" if c["kept"] else "") for c in self.conflicts[-5:]]
        if self.roots_mismatch:
            out.append(self.roots_mismatch)
        out += [f"config reload hook `{f['command']}` failed: {f['error']}" for f in self.hooks.failures.values()]
        if self.role == "backup":
            out += [f"local change on the Backup to {p}" for p in sorted(self.local_changes.values())[:5]]
        return out

    def close(self) -> None:
        self._abort_incoming()
        self.hooks.close()
        if self.watcher is not None:
            self.watcher.close()
        if self._dirty_store:
            self._save()

    def _save(self) -> None:
        self.manifest.save()
        self.manifest_saves += 1
        self._dirty_store = False
        self._save_at = None
