"""Which paths belong to the replicated set, and refusing everything else.

`sync.replicated_paths` lists files, directories and globs. Each entry becomes a
*root* (its leading directory without wildcards) and a pattern below it; a path
travels as (root index, relative path as bytes), so the two nodes may keep the set
under different directories (the lab's workdir/fw1/etc and workdir/fw2/etc) as long
as both list the same entries in the same order.

A name from the network is accepted only if it is relative, has no `.`/`..`/empty
component, matches its root's pattern, is not one of our temporary files, leads
through no symlink (a symlinked directory could point anywhere) and is not one of
the node-local files: the node's own config, key files, anything under state_dir.
Those are refused even when a glob matches them.
"""

from __future__ import annotations

import fnmatch
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

TEMP_PREFIX = ".hasync-tmp-"  # our apply's temporary files: never members
MAX_NAME = 4096
_WILD = set("*?[")


class PathRejected(ValueError):
    """A replicated-path name that must not be written: dropped and counted."""


@dataclass(frozen=True)
class Root:
    directory: Path
    pattern: tuple[str, ...]  # path segments below directory; "**" spans any number

    def matches(self, parts: tuple[str, ...]) -> bool:
        return _match(self.pattern, parts)


def _match(pattern: tuple[str, ...], parts: tuple[str, ...]) -> bool:
    if not pattern:
        return not parts
    head = pattern[0]
    if head == "**":
        return any(_match(pattern[1:], parts[i:]) for i in range(len(parts) + 1))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], head) and _match(pattern[1:], parts[1:])


def make_root(entry: str) -> Root:
    """'/etc/nftables.conf' -> (/etc, nftables.conf); '/etc/fw/' or an existing directory ->
    (/etc/fw, **); '/x/etc/*' -> (/x/etc, *)."""
    segments = [s for s in entry.split("/") if s]
    fixed: list[str] = []
    for seg in segments:
        if _WILD & set(seg):
            break
        fixed.append(seg)
    rest = tuple(segments[len(fixed):])
    if not rest:
        whole = Path("/", *fixed)
        if entry.endswith("/") or whole.is_dir():
            return Root(whole, ("**",))
        return Root(whole.parent, (whole.name,))
    return Root(Path("/", *fixed), rest)


class PathGuard:
    def __init__(self, replicated: Iterable[str], excluded_files: Iterable[os.PathLike | str] = (),
                 excluded_dirs: Iterable[os.PathLike | str] = ()):
        self.roots = tuple(make_root(e) for e in replicated)
        self.excluded_files = frozenset(os.path.realpath(p) for p in excluded_files)
        self.excluded_dirs = tuple(os.path.realpath(p) for p in excluded_dirs)

    @classmethod
    def for_node(cls, cfg) -> "PathGuard":
        """The guard for a NodeConfig: its own file, key files and state_dir are node-local."""
        files: list = []
        if cfg.path is not None:
            files.append(cfg.path)
        files.extend(cfg.auth_key_files.values())
        secret = cfg.sync.curve_secret_key_file
        if secret is not None:
            files.append(secret)
            files.append(Path(str(secret).removesuffix("_secret")))  # zmq.auth's public half
        return cls(cfg.sync.replicated_paths, files, [cfg.state_dir])

    # ---- names from the network

    def resolve(self, root: int, rel: bytes) -> Path:
        """The local path for a (root, relative name) from the peer, or PathRejected."""
        if type(root) is not int or not 0 <= root < len(self.roots):
            raise PathRejected(f"unknown root {root!r}")
        if type(rel) is not bytes or not 0 < len(rel) <= MAX_NAME or b"\0" in rel:
            raise PathRejected("bad name")
        if rel.startswith(b"/"):
            raise PathRejected(f"absolute path {rel!r}")
        parts = tuple(os.fsdecode(p) for p in rel.split(b"/"))
        if any(p in ("", ".", "..") for p in parts):
            raise PathRejected(f"'.', '..' or empty component in {rel!r}")
        r = self.roots[root]
        if not r.matches(parts) or parts[-1].startswith(TEMP_PREFIX):
            raise PathRejected(f"{rel!r} is outside the replicated set")
        path = r.directory.joinpath(*parts)
        self._check_no_symlink(r.directory, parts)
        if self.is_excluded(path):
            raise PathRejected(f"{path} is node-local (own config, keys or state_dir)")
        return path

    def _check_no_symlink(self, directory: Path, parts: tuple[str, ...]) -> None:
        # every directory on the way must be a real directory: a symlink could lead out
        cur = directory
        for part in parts[:-1]:
            cur = cur / part
            try:
                st = os.lstat(cur)
            except FileNotFoundError:
                return  # created by the apply, as a real directory
            if not stat.S_ISDIR(st.st_mode):
                raise PathRejected(f"{cur} is a symlink or not a directory")

    def is_excluded(self, path: Path) -> bool:
        real = os.path.realpath(path)
        if real in self.excluded_files or os.path.abspath(path) in self.excluded_files:
            return True
        return any(real == d or real.startswith(d.rstrip("/") + "/") for d in self.excluded_dirs)

    # ---- local paths

    def name_of(self, path: str | os.PathLike) -> tuple[int, bytes] | None:
        """(root, relative name) of a local path in the set, or None (also for node-local files)."""
        p = os.path.abspath(path)
        for i, r in enumerate(self.roots):
            d = str(r.directory)
            if not p.startswith(d.rstrip("/") + "/"):
                continue
            parts = tuple(p[len(d.rstrip("/")) + 1:].split("/"))
            if r.matches(parts) and not parts[-1].startswith(TEMP_PREFIX) and not self.is_excluded(Path(p)):
                return i, os.fsencode("/".join(parts))
        return None

    def path_of(self, root: int, rel: bytes) -> Path:
        """A name we produced ourselves (trusted) -> local path."""
        return self.roots[root].directory / os.fsdecode(rel)

    def walk(self) -> Iterator[tuple[int, bytes, Path]]:
        """Every regular file in the set (symlinks are not followed and not replicated)."""
        seen: set[tuple[int, bytes]] = set()
        for i, r in enumerate(self.roots):
            if not r.directory.is_dir():
                continue
            deep = "**" in r.pattern
            depth = len(r.pattern)
            for dirpath, dirnames, filenames in os.walk(r.directory):
                rel_dir = os.path.relpath(dirpath, r.directory)
                level = 0 if rel_dir == "." else rel_dir.count("/") + 1
                if not deep and level >= depth - 1:
                    dirnames[:] = []
                for name in filenames:
                    path = Path(dirpath, name)
                    if path.is_symlink() or not path.is_file():
                        continue
                    key = self.name_of(path)
                    if key is not None and key[0] == i and key not in seen:
                        seen.add(key)
                        yield key[0], key[1], path
