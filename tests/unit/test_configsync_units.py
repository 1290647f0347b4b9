"""The pure parts of config sync: deltas, the conflict rule, the path guard, frame checks."""

from __future__ import annotations

import os
import random

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from statesync import wire
from statesync.configsync import core, diff, frames
from statesync.configsync.manifest import ABSENT, DELETED, Entry
from statesync.configsync.pathguard import PathGuard, PathRejected

blobs = st.binary(max_size=40000) | st.lists(st.sampled_from([b"rule a\n", b"rule bb\n", b"\n", b"x" * 3000]),
                                              max_size=200).map(b"".join)


@settings(max_examples=150, deadline=None)
@given(old=blobs, new=blobs)
def test_delta_round_trip(old, new):
    ops = diff.delta(diff.signature(old), new)
    assert diff.apply(old, ops) == new
    assert all(len(op) <= diff.PIECE for op in ops if isinstance(op, bytes))


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**32), size=st.integers(20000, 60000), at=st.integers(0, 19999),
       insert=st.binary(max_size=100))
def test_an_insertion_costs_about_one_chunk(seed, size, at, insert):
    data = random.Random(seed).randbytes(size)
    new = data[:at] + insert + data[at:]
    ops = diff.delta(diff.signature(data), new)
    assert diff.apply(data, ops) == new
    assert diff.ops_bytes(ops) <= len(insert) + 3 * diff.MAX_CHUNK


def test_patch_refuses_a_copy_outside_the_base():
    with pytest.raises(diff.BadDelta):
        diff.apply(b"abc", [(2, 5)])


def E(gen, common, d=b"a", **kw):
    return Entry(gen, common, (d * 32)[:32] if d else DELETED, **kw)


def test_one_sided_change_wins_without_conflict():
    d = core.decide(E(5, 5), E(7, 5, b"b"), incoming_is_source=True)
    assert d.take and not d.conflict and not d.keep_local
    d = core.decide(E(7, 5, b"b"), E(5, 5), incoming_is_source=True)  # only we changed: ours is newer
    assert not d.take and not d.conflict


def test_both_changed_is_a_conflict_and_the_newer_wins():
    d = core.decide(E(6, 5, b"b"), E(8, 5, b"c"), incoming_is_source=False)
    assert d.take and d.conflict and d.keep_local
    d = core.decide(E(9, 5, b"b"), E(8, 5, b"c"), incoming_is_source=True)
    assert not d.take and d.conflict
    d = core.decide(E(8, 5, b"b"), E(8, 5, b"c"), incoming_is_source=True)  # a tie: the Master wins
    assert d.take and d.conflict


def test_common_is_the_newest_both_held():
    # the peer knows both held gen 7 even if our own ack was lost: not a conflict
    d = core.decide(E(7, 4, b"b"), E(9, 7, b"c"), incoming_is_source=True)
    assert d.take and not d.conflict


def test_forced_resync_takes_the_source_and_keeps_local_changes():
    d = core.decide(E(9, 5, b"b"), E(6, 5, b"c"), incoming_is_source=True, forced=True)
    assert d.take and d.keep_local
    assert core.decide(E(3, 3), E(3, 3), incoming_is_source=True, forced=True).same


def test_compare_plans_fetch_push_and_conflicts():
    n = lambda s: (0, s)  # noqa: E731
    local = {n(b"same"): E(3, 3), n(b"mine"): E(9, 4, b"m"), n(b"theirs"): E(4, 4), n(b"both"): E(6, 4, b"b")}
    remote = {n(b"same"): E(3, 3), n(b"mine"): E(4, 4), n(b"theirs"): E(8, 4, b"t"), n(b"both"): E(7, 4, b"c"),
              n(b"new"): E(2, 0, b"n")}
    plan = core.compare(local, remote, local_is_source=False)
    assert plan.same == (n(b"same"),)
    assert set(plan.fetch) == {n(b"theirs"), n(b"both"), n(b"new")}
    assert plan.push == (n(b"mine"),)
    assert plan.conflicts == (n(b"both"),) and plan.keep_local == (n(b"both"),)
    assert core.compare({n(b"x"): ABSENT}, {}, local_is_source=True).same


@pytest.fixture
def guard(tmp_path):
    etc = tmp_path / "etc"
    (etc / "sub").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    os.symlink(tmp_path / "outside", etc / "link")
    state = etc / "state"
    return PathGuard([f"{etc}/**", f"{tmp_path}/single.conf"], [etc / "hasync.toml", etc / "k.key"], [state]), etc


@pytest.mark.parametrize("rel", [b"../x", b"/etc/passwd", b"a/../../x", b"./a", b"a//b", b"", b"a\0b",
                                 b"link/evil", b"hasync.toml", b"k.key", b"state/manifest", b".hasync-tmp-a.1"])
def test_guard_rejects(guard, rel):
    g, _ = guard
    with pytest.raises(PathRejected):
        g.resolve(0, rel)


def test_guard_accepts_members_and_maps_names(guard):
    g, etc = guard
    assert g.resolve(0, b"sub/fw.nft") == etc / "sub" / "fw.nft"
    assert g.name_of(etc / "sub" / "fw.nft") == (0, b"sub/fw.nft")
    assert g.name_of(etc / "hasync.toml") is None  # node-local even though the glob matches
    assert g.resolve(1, b"single.conf").name == "single.conf"
    with pytest.raises(PathRejected):
        g.resolve(1, b"other.conf")
    with pytest.raises(PathRejected):
        g.resolve(2, b"x")


def pack(ftype, payload):
    return msgpack.packb([1, ftype, 0, 0, payload], use_bin_type=True)


@pytest.mark.parametrize("ftype, payload", [
    (frames.CFG_REQUEST, 1),
    (frames.CFG_MANIFEST, [False, [[0, b"a", 1, 1, b"short", 0o644, 0, 0, 1]]]),
    (frames.CFG_WANT, [[0, b"a", b"", [[b"x", 5]]]]),
    (frames.CFG_FILES, [[1, 0, True, 0, b"a", [1, 0, b"", 0o644, 0, 0, 0], False, None, [[-1, 2]]]]),
    (frames.CFG_FILES, [[1, 0, True, 0, "a", [1, 0, b"", 0o644, 0, 0, 0], False, None, []]]),
    (frames.CFG_ACK, [[0, b"a", 1, 5]]),
])
def test_malformed_config_frames_are_refused(ftype, payload):
    with pytest.raises(wire.WireError):
        wire.decode(pack(ftype, payload))


def test_a_file_frame_round_trips():
    entry = Entry(3, 2, b"d" * 32, 0o600, 0, 0, 3)
    item = (1, 0, True, 0, b"a.conf", entry.to_wire(), False, (0, b"old.conf", b"e" * 32), (b"abc", (0, 10)))
    got = wire.decode(frames.encode(frames.CFG_FILES, (item,))).payload[0]
    assert got[4] == b"a.conf" and got[5] == entry and got[7] == (0, b"old.conf", b"e" * 32)
    assert got[8] == (b"abc", (0, 10))


def _line_walk_chunks(data: bytes) -> list[int]:
    """The chunk rule stated plainly (every line end looked at): the reference the fast
    chunker, which jumps over line ends that cannot close a chunk, must agree with."""
    import zlib
    out, start, line_start, n = [], 0, 0, len(data)
    for i in range(n):
        if i + 1 - start >= diff.MAX_CHUNK and data.find(b"\n", line_start, start + diff.MAX_CHUNK) < 0:
            out.append(diff.MAX_CHUNK)
            start = line_start = start + diff.MAX_CHUNK
            continue
        if data[i] == 0x0A and i >= line_start:
            end = i + 1
            if end - start >= diff.MIN_CHUNK and not (zlib.crc32(data[line_start:end]) & 0x3):
                out.append(end - start)
                start = end
            line_start = end
    if start < n:
        out.append(n - start)
    return out


@settings(max_examples=150, deadline=None)
@given(data=blobs)
def test_fast_chunker_cuts_where_the_line_walk_cuts(data):
    assert diff.chunk_lengths(data) == _line_walk_chunks(data)


@settings(max_examples=50, deadline=None)
@given(old=blobs, new=blobs)
def test_delta_from_a_known_signature_is_the_same_delta(old, new):
    base = diff.signature(old)
    assert diff.delta(base, new, diff.signature(new)) == diff.delta(base, new)


def test_manifest_with_root_shapes_is_checked_and_an_old_one_still_accepted():
    entry = [0, b"a", 1, 1, b"d" * 32, 0o644, 0, 0, 1]
    forced, files, shapes = wire.decode(frames.encode(frames.CFG_MANIFEST, (False, (entry,), ("*", "**")))).payload
    assert shapes == ("*", "**") and (0, b"a") in files
    assert wire.decode(frames.encode(frames.CFG_MANIFEST, (False, (entry,)))).payload[2] is None
    with pytest.raises(wire.WireError):
        wire.decode(frames.encode(frames.CFG_MANIFEST, (False, (entry,), (3,))))
