"""Atomic apply on the receiving node: temporary file in the same directory, fsync,
digest check, rename, directory fsync (one per directory per received frame, after
all its renames: each file still changes by one rename). A crash at any point leaves the old file or
the new one, never a mix: the temporary file is invisible to readers of the target
and removed at the next start (`remove_leftovers`).

A version that loses a conflict is kept aside before it is replaced, as
state_dir/conflicts/<root>/<path>.<generation>.<digest> (a hard link when the state
dir shares the filesystem, else a copy).

HASYNC_CONFIGSYNC_TEST_APPLY_DELAY="<glob>:<seconds>" makes the apply of matching
file names sleep between the fsync and the rename: the lab tests kill the service
there to prove the rename is the only moment the target changes.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import shutil
import time
from pathlib import Path
from typing import Iterable

from .diff import Op, patch
from .manifest import Entry
from .pathguard import TEMP_PREFIX

_DELAY_ENV = "HASYNC_CONFIGSYNC_TEST_APPLY_DELAY"


def _test_delay(name: str) -> float:
    spec = os.environ.get(_DELAY_ENV, "")
    glob, _, seconds = spec.rpartition(":")
    if glob and fnmatch.fnmatchcase(name, glob):
        try:
            return float(seconds)
        except ValueError:
            return 0.0
    return 0.0


WRITEV_PIECES = min(os.sysconf("SC_IOV_MAX"), 1024)
WRITEV_BYTES = 8 << 20


class DigestMismatch(ValueError):
    pass


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Writer:
    """One incoming version being assembled next to its target."""

    def __init__(self, target: Path, base: bytes | None):
        self.target = target
        self.base = base or b""
        target.parent.mkdir(parents=True, exist_ok=True)
        self.temp = target.parent / f"{TEMP_PREFIX}{target.name}.{os.urandom(4).hex()}"
        self._fd = os.open(self.temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        self._hash = hashlib.sha256()
        self.size = 0
        self.final_stat: os.stat_result | None = None

    def write(self, ops: Iterable[Op]) -> None:
        # gathered into few writev calls: each write() to a new file may wait for the
        # filesystem journal (its mtime update starts a handle) while another process's
        # fsync commits it; a delta's many small pieces made that wait many times likelier
        batch, size = [], 0
        for piece in patch(self.base, ops):  # BadDelta for a copy outside the base
            self._hash.update(piece)
            self.size += len(piece)
            batch.append(piece)
            size += len(piece)
            if len(batch) >= WRITEV_PIECES or size >= WRITEV_BYTES:
                self._write_all(batch)
                batch, size = [], 0
        if batch:
            self._write_all(batch)

    def _write_all(self, pieces: list) -> None:
        views = [memoryview(p) for p in pieces]
        while views:
            done = os.writev(self._fd, views)
            while views and done >= len(views[0]):
                done -= len(views[0])
                views.pop(0)
            if views and done:
                views[0] = views[0][done:]

    def commit(self, entry: Entry, keep_aside: Path | None = None) -> None:
        """Check the digest, set mode and owner, make it durable, rename it into place."""
        self.prepare(entry)
        self.install(keep_aside)
        fsync_dir(self.target.parent)

    def prepare(self, entry: Entry) -> None:
        """Check the digest, set mode and owner and make the content durable; the target
        is untouched until `install`."""
        try:
            if self._hash.digest() != entry.digest:
                raise DigestMismatch(f"{self.target}: digest mismatch after apply")
            os.fchmod(self._fd, entry.mode)
            try:
                os.fchown(self._fd, entry.uid, entry.gid)
            except PermissionError:
                pass  # not root: the owner stays ours
            os.fsync(self._fd)
            # what we wrote, from our own fd: a stat of the path after the rename could
            # already be someone else's edit, which would then go unnoticed
            self.final_stat = os.fstat(self._fd)
        except BaseException:
            self.abort()
            raise
        finally:
            self._close()

    def install(self, keep_aside: Path | None = None) -> None:
        """Rename the prepared version into place: the one moment the target changes. Its
        directory still needs an fsync for the rename to survive a crash (a burst syncs
        each directory once, after all its renames: `DirSyncs`)."""
        try:
            delay = _test_delay(self.target.name)
            if delay:
                time.sleep(delay)
            if keep_aside is not None:
                keep(self.target, keep_aside)
            os.replace(self.temp, self.target)
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        self._close()
        try:
            os.unlink(self.temp)
        except FileNotFoundError:
            pass

    def _close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class DirSyncs:
    """Directories whose renames or unlinks are not durable yet: one fsync each per batch."""

    def __init__(self):
        self.dirs: set[Path] = set()

    def add(self, directory: Path) -> None:
        self.dirs.add(directory)

    def flush(self) -> None:
        dirs, self.dirs = self.dirs, set()
        for d in sorted(dirs):
            try:
                fsync_dir(d)
            except FileNotFoundError:
                pass  # removed meanwhile: nothing left to make durable there


def delete(target: Path, keep_aside: Path | None = None, dir_syncs: DirSyncs | None = None) -> None:
    if keep_aside is not None:
        keep(target, keep_aside)
    try:
        os.unlink(target)
    except FileNotFoundError:
        return
    if dir_syncs is not None:
        dir_syncs.add(target.parent)
    else:
        fsync_dir(target.parent)


def aside_path(state_dir: Path, root: int, rel: bytes, entry: Entry) -> Path:
    return Path(state_dir, "conflicts", str(root), f"{os.fsdecode(rel)}.{entry.gen}.{entry.digest.hex()[:16]}")


def keep(target: Path, aside: Path) -> None:
    if not target.exists():
        return
    aside.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(target, aside)
    except FileExistsError:
        pass
    except OSError:
        shutil.copy2(target, aside)


def remove_leftovers(directories: Iterable[Path]) -> int:
    """Temporary files of an apply that was killed (ours by name only)."""
    n = 0
    for d in directories:
        if not d.is_dir():
            continue
        for dirpath, _dirs, files in os.walk(d):
            for name in files:
                if name.startswith(TEMP_PREFIX):
                    try:
                        os.unlink(os.path.join(dirpath, name))
                        n += 1
                    except FileNotFoundError:
                        pass
    return n
