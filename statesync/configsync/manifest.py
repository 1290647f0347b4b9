"""The manifest: per replicated path, its version (generation, digest, mode, owner).

Generations are a Lamport clock shared by the pair: a local change takes
`clock + 1`, and every generation seen from the peer pushes the clock up to it, so
"newer" means the same on both nodes. `common` is the newest generation of the path
that both nodes are known to have held (set when a version is applied from the peer
or acknowledged by it): `core.decide` uses it to tell one-sided changes from
conflicts. A deleted path stays as a tombstone (digest b"") so a deletion has a
generation too.

The manifest is persisted in state_dir/configsync/manifest (msgpack, written
atomically) with each file's stat signature, so a restart re-hashes only the files
that changed while the node was down.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable

import msgpack

from .diff import Signature, signature

DIGEST_BYTES = 32
DELETED = b""

Name = tuple[int, bytes]  # (root index, relative path)


def digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


@dataclass(frozen=True)
class Entry:
    gen: int
    common: int
    digest: bytes  # DELETED for a tombstone
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    size: int = 0

    @property
    def deleted(self) -> bool:
        return self.digest == DELETED

    def same_content(self, other: "Entry") -> bool:
        return (self.digest, self.mode, self.uid, self.gid) == (other.digest, other.mode, other.uid, other.gid) \
            or (self.deleted and other.deleted)

    def to_wire(self) -> tuple:
        return (self.gen, self.common, self.digest, self.mode, self.uid, self.gid, self.size)


ABSENT = Entry(0, 0, DELETED)


@dataclass
class Local:
    """What we remember of the file on disk: its entry, the stat that produced it and
    (on the sending side) the signature of its content for the next delta."""

    entry: Entry
    stat_key: tuple = ()
    sig: Signature | None = None


def stat_key(st: os.stat_result) -> tuple:
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def read_version(path: Path) -> tuple[bytes, os.stat_result] | None:
    """A regular file's content and stat (None if gone, a symlink or not a file)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except (FileNotFoundError, NotADirectoryError, OSError):
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read()
        return data, os.fstat(fd)
    finally:
        os.close(fd)


class Manifest:
    def __init__(self, roots: Iterable[Path], store: Path | None):
        self.roots = [str(r) for r in roots]
        self.store = store
        self.clock = 0
        self.files: dict[Name, Local] = {}
        # the content behind the last new entry `rescan` made: the sender uses it instead
        # of reading and hashing the file a second time
        self._read: tuple[Name, bytes, bytes] | None = None

    def get(self, name: Name) -> Entry:
        local = self.files.get(name)
        return local.entry if local else ABSENT

    def take_read(self, name: Name, digest_: bytes) -> bytes | None:
        """The bytes `rescan` read for `name`'s version `digest_` (once), or None."""
        got, self._read = self._read, None
        return got[2] if got is not None and got[:2] == (name, digest_) else None

    def drop_read(self) -> None:
        self._read = None  # not kept past the turn that made it: a file can be large

    @staticmethod
    def digest_of(data: bytes) -> bytes:
        return digest(data)

    def observe(self, gen: int) -> None:
        if gen > self.clock:
            self.clock = gen

    def next_gen(self) -> int:
        self.clock += 1
        return self.clock

    def put(self, name: Name, entry: Entry, key: tuple = (), sig: Signature | None = None) -> None:
        self.observe(entry.gen)
        self.files[name] = Local(entry, key, sig)

    def set_common(self, name: Name, gen: int) -> None:
        local = self.files.get(name)
        if local is not None and gen > local.entry.common:
            local.entry = replace(local.entry, common=gen)

    def live(self) -> dict[Name, Entry]:
        return {n: l.entry for n, l in self.files.items()}

    def to_wire(self) -> tuple:
        return tuple((root, rel, *local.entry.to_wire()) for (root, rel), local in sorted(self.files.items()))

    # ---- a local look at one path

    def rescan(self, name: Name, path: Path, *, keep_signature: bool) -> Entry | None:
        """Compare the file on disk with what we hold; record and return a new entry if it
        changed (a new generation), None if not."""
        old = self.files.get(name)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            st = None
        if st is None or not stat.S_ISREG(st.st_mode):
            if old is None or old.entry.deleted:
                return None
            entry = Entry(self.next_gen(), old.entry.common, DELETED)
            self.files[name] = Local(entry)
            return entry
        if old is not None and old.stat_key == stat_key(st) and (old.sig is not None or not keep_signature):
            return None
        got = read_version(path)
        if got is None:
            return None
        data, st = got
        d = digest(data)
        sig = signature(data) if keep_signature else None
        mode = stat.S_IMODE(st.st_mode)
        if old is not None and (old.entry.digest, old.entry.mode, old.entry.uid, old.entry.gid) == (
                d, mode, st.st_uid, st.st_gid):
            old.stat_key, old.sig = stat_key(st), sig
            return None
        entry = Entry(self.next_gen(), old.entry.common if old else 0, d, mode, st.st_uid, st.st_gid, len(data))
        self.files[name] = Local(entry, stat_key(st), sig)
        self._read = (name, d, data)
        return entry

    # ---- persistence

    def save(self) -> None:
        if self.store is None:
            return
        doc = {
            "clock": self.clock,
            "files": [(self.roots[root], rel, *l.entry.to_wire(), list(l.stat_key))
                      for (root, rel), l in self.files.items()],
        }
        self.store.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.store.parent, prefix=".manifest.")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(msgpack.packb(doc, use_bin_type=True))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.store)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def load(self) -> None:
        if self.store is None:
            return
        try:
            doc = msgpack.unpackb(self.store.read_bytes(), raw=False)
        except FileNotFoundError:
            return
        except Exception:  # a damaged store: rebuilt by the scan (all generations restart)
            return
        self.clock = int(doc.get("clock", 0))
        index = {r: i for i, r in enumerate(self.roots)}
        for root, rel, gen, common, dig, mode, uid, gid, size, key in doc.get("files", []):
            if root in index:
                self.files[(index[root], rel)] = Local(Entry(gen, common, dig, mode, uid, gid, size), tuple(key))
