"""Config sync frames (wire types 32..63): payload checks, registered with statesync.wire.

    CFG_REQUEST   Backup -> Master   forced: bool                      "send me your manifest"
    CFG_MANIFEST  Master -> Backup   (forced, ((root, rel, *entry), ...), root_shapes)
    CFG_WANT      either way         ((root, rel, base_digest, signature), ...)  "send me these"
    CFG_FILES     either way         (item, ...) with item = (xfer, part, last, root, rel, entry,
                                      forced, base, ops); base = (root, rel, digest) or None
    CFG_ACK       either way         ((root, rel, gen, result), ...)

`entry` is manifest.Entry.to_wire(); ops are diff ops (bytes, or (offset, length)).
A file bigger than one frame travels as parts of one `xfer`, in order. The checks
here are about shape only; root_shapes (one text per replicated_paths entry: its
pattern below its directory) lets the Backup check that root index i means the same
entry on both nodes (older peers send no shapes: unchecked); whether a name is inside the replicated set is the
receiver's PathGuard's call (it knows the local roots).
"""

from __future__ import annotations

from typing import Any

from statesync import wire
from statesync.wire import WireError

from .diff import CHUNK_HASH_BYTES
from .manifest import DIGEST_BYTES, Entry

CFG_REQUEST = 32
CFG_MANIFEST = 33
CFG_WANT = 34
CFG_FILES = 35
CFG_ACK = 36
TYPES = (CFG_REQUEST, CFG_MANIFEST, CFG_WANT, CFG_FILES, CFG_ACK)

MAX_U64 = (1 << 64) - 1
MAX_MODE = 0o7777
MAX_ID = (1 << 32) - 1


def _uint(v: Any, what: str, limit: int = MAX_U64) -> int:
    if type(v) is not int or not 0 <= v <= limit:
        raise WireError(f"{what}: unsigned integer expected")
    return v


def _tuple(v: Any, what: str, n: int | None = None) -> tuple:
    if type(v) is not tuple or (n is not None and len(v) != n):
        raise WireError(f"{what}: array{'' if n is None else f' of {n}'} expected")
    return v


def _name(root: Any, rel: Any) -> tuple[int, bytes]:
    _uint(root, "root", 255)
    if type(rel) is not bytes or not rel:
        raise WireError("path: bytes expected")
    return root, rel


def _digest(v: Any, allow_empty: bool = True) -> bytes:
    if type(v) is not bytes or not (len(v) == DIGEST_BYTES or (allow_empty and not v)):
        raise WireError("digest: 32 bytes expected")
    return v


def entry_from_wire(v: Any) -> Entry:
    gen, common, dig, mode, uid, gid, size = _tuple(v, "entry", 7)
    return Entry(_uint(gen, "gen"), _uint(common, "common"), _digest(dig), _uint(mode, "mode", MAX_MODE),
                 _uint(uid, "uid", MAX_ID), _uint(gid, "gid", MAX_ID), _uint(size, "size"))


def _check_request(p: Any) -> bool:
    if type(p) is not bool:
        raise WireError("CFG_REQUEST: forced flag expected")
    return p


def _check_manifest(p: Any) -> tuple[bool, dict, tuple | None]:
    if type(p) is tuple and len(p) == 2:
        (forced, items), shapes = p, None
    else:
        forced, items, shapes = _tuple(p, "CFG_MANIFEST", 3)
        if any(type(s) is not str for s in _tuple(shapes, "root shapes")):
            raise WireError("CFG_MANIFEST: root shapes must be text")
    if type(forced) is not bool:
        raise WireError("CFG_MANIFEST: forced flag expected")
    out = {}
    for item in _tuple(items, "CFG_MANIFEST entries"):
        item = _tuple(item, "manifest entry", 9)
        out[_name(item[0], item[1])] = entry_from_wire(item[2:])
    return forced, out, shapes


def _check_want(p: Any) -> tuple:
    out = []
    for item in _tuple(p, "CFG_WANT"):
        root, rel, base, sig = _tuple(item, "want", 4)
        for pair in _tuple(sig, "signature"):
            h, n = _tuple(pair, "signature chunk", 2)
            if type(h) is not bytes or len(h) != CHUNK_HASH_BYTES:
                raise WireError("signature: chunk hash expected")
            _uint(n, "chunk length")
        out.append((*_name(root, rel), _digest(base), sig))
    return tuple(out)


def _check_ops(ops: Any) -> tuple:
    for op in _tuple(ops, "ops"):
        if type(op) is bytes:
            continue
        off, n = _tuple(op, "copy op", 2)
        _uint(off, "copy offset")
        _uint(n, "copy length")
    return ops


def _check_files(p: Any) -> tuple:
    out = []
    for item in _tuple(p, "CFG_FILES"):
        xfer, part, last, root, rel, entry, forced, base, ops = _tuple(item, "file item", 9)
        _uint(xfer, "xfer")
        _uint(part, "part")
        if type(last) is not bool or type(forced) is not bool:
            raise WireError("file item: flags expected")
        if base is not None:
            b_root, b_rel, b_digest = _tuple(base, "base", 3)
            base = (*_name(b_root, b_rel), _digest(b_digest, allow_empty=False))
        out.append((xfer, part, last, *_name(root, rel), entry_from_wire(entry), forced, base, _check_ops(ops)))
    return tuple(out)


def _check_ack(p: Any) -> tuple:
    out = []
    for item in _tuple(p, "CFG_ACK"):
        root, rel, gen, result = _tuple(item, "ack", 4)
        if type(result) is not str:
            raise WireError("ack: result text expected")
        out.append((*_name(root, rel), _uint(gen, "gen"), result))
    return tuple(out)


def register() -> None:
    """Add the config frame types to the wire codec (idempotent)."""
    for code, name, check in ((CFG_REQUEST, "CFG_REQUEST", _check_request),
                              (CFG_MANIFEST, "CFG_MANIFEST", _check_manifest),
                              (CFG_WANT, "CFG_WANT", _check_want),
                              (CFG_FILES, "CFG_FILES", _check_files),
                              (CFG_ACK, "CFG_ACK", _check_ack)):
        if wire.TYPE_NAMES.get(code) != name:
            wire.register_type(code, name, check)


def encode(ftype: int, payload: Any) -> bytes:
    return wire.encode(wire.Frame(ftype, 0, payload))


register()
