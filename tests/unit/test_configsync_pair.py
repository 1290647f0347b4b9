"""Two ConfigSync nodes joined in memory (frames encoded, decoded and delivered by
hand), each on its own directory: the whole protocol without sockets or a lab."""

from __future__ import annotations

import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from statesync import wire
from statesync.configsync import frames
from statesync.configsync.node import ConfigSync
from statesync.configsync.pathguard import make_root


def node_cfg(base: Path, name: str, hooks=None):
    etc = base / name / "etc"
    etc.mkdir(parents=True)
    return SimpleNamespace(
        path=base / name / "hasync.toml", auth_key_files={1: base / "auth-1.key"}, state_dir=base / name / "state",
        sync=SimpleNamespace(replicated_paths=(f"{etc}/*",), reload_hooks=hooks or {},
                             curve_secret_key_file=base / name / "keys" / "curve.key_secret")), etc


class Pair:
    def __init__(self, tmp: Path, hooks_b=None):
        self.queues = {"a": [], "b": []}
        self.cfg_a, self.etc_a = node_cfg(tmp, "a")
        self.cfg_b, self.etc_b = node_cfg(tmp, "b", hooks_b)
        self.a = ConfigSync(self.cfg_a, lambda buf: self.queues["b"].append(buf) or True, watch=False)
        self.b = ConfigSync(self.cfg_b, lambda buf: self.queues["a"].append(buf) or True, watch=False)
        self.a.set_role("master")
        for n in (self.a, self.b):
            n.connected = True

    def connect(self):
        self.a.on_session()
        self.b.on_session()
        self.pump()

    def pump(self, rounds=20):
        for _ in range(rounds):
            moved = False
            for who, node in (("a", self.a), ("b", self.b)):
                q, self.queues[who] = self.queues[who], []
                for buf in q:
                    node.on_frame(wire.decode(buf), time.monotonic())
                    moved = True
                node.turn(time.monotonic())
            if not moved:
                return

    def master_changed(self, *names: str, moves=()):
        self.a._on_local_changes({self.a.guard.name_of(self.etc_a / n) for n in names},
                                 [(self.a.guard.name_of(self.etc_a / s), self.a.guard.name_of(self.etc_a / d))
                                  for s, d in moves], False)
        self.a._flush()
        self.pump()

    def close(self):
        self.a.close()
        self.b.close()


@pytest.fixture
def pair(tmp_path):
    p = Pair(tmp_path)
    yield p
    p.close()


def test_create_edit_rename_delete_reach_the_backup(pair):
    pair.connect()
    (pair.etc_a / "one.conf").write_bytes(b"hello\n")
    os.chmod(pair.etc_a / "one.conf", 0o640)
    pair.master_changed("one.conf")
    assert (pair.etc_b / "one.conf").read_bytes() == b"hello\n"
    assert (pair.etc_b / "one.conf").stat().st_mode & 0o777 == 0o640
    (pair.etc_a / "one.conf").write_bytes(b"hello again\n")
    pair.master_changed("one.conf")
    assert (pair.etc_b / "one.conf").read_bytes() == b"hello again\n"
    os.rename(pair.etc_a / "one.conf", pair.etc_a / "two.conf")
    pair.master_changed(moves=[("one.conf", "two.conf")])
    assert not (pair.etc_b / "one.conf").exists()
    assert (pair.etc_b / "two.conf").read_bytes() == b"hello again\n"
    (pair.etc_a / "two.conf").unlink()
    pair.master_changed("two.conf")
    assert not (pair.etc_b / "two.conf").exists()
    sa, sb = pair.a.status(), pair.b.status()
    assert sa["in_sync"] and sb["in_sync"] and sa["behind"] == 0
    assert sb["generation"] == sa["generation"] and sb["last_applied"]["deleted"]


def test_connect_converges_files_made_while_apart(pair):
    (pair.etc_a / "m.conf").write_bytes(b"from the master")
    (pair.etc_b / "stale.conf").write_bytes(b"old")
    pair.a._scan_all(report_local=False)
    pair.connect()
    assert (pair.etc_b / "m.conf").read_bytes() == b"from the master"
    # made on the Backup while apart, never on the Master: its generation is newer, so it wins
    assert (pair.etc_a / "stale.conf").read_bytes() == b"old"
    assert pair.b.status()["in_sync"]


def test_a_one_line_edit_of_a_large_file_sends_a_small_delta(pair):
    lines = [f"add rule inet filter forward ip saddr 192.0.2.{i % 250} tcp dport {i} accept\n" for i in range(60000)]
    (pair.etc_a / "big.nft").write_text("".join(lines))
    pair.a._scan_all(report_local=False)
    pair.connect()
    assert (pair.etc_b / "big.nft").read_bytes() == (pair.etc_a / "big.nft").read_bytes()
    lines[30000] = "add rule inet filter forward drop\n"
    (pair.etc_a / "big.nft").write_text("".join(lines))
    before = pair.a.bytes_sent
    pair.master_changed("big.nft")
    assert (pair.etc_b / "big.nft").read_bytes() == (pair.etc_a / "big.nft").read_bytes()
    assert pair.a.bytes_sent - before < 16384


def test_conflict_newer_generation_wins_and_the_loser_is_kept(pair):
    pair.connect()
    (pair.etc_a / "x.conf").write_bytes(b"v1")
    pair.master_changed("x.conf")
    pair.a.on_disconnect()
    pair.b.on_disconnect()
    (pair.etc_a / "x.conf").write_bytes(b"master v2")
    pair.a._scan_all(report_local=False)
    (pair.etc_b / "x.conf").write_bytes(b"backup v2")
    pair.b._scan_all(report_local=False)
    (pair.etc_b / "x.conf").write_bytes(b"backup v3")  # two changes: a newer generation
    pair.b._scan_all(report_local=False)
    pair.a.connected = pair.b.connected = True
    pair.connect()
    assert (pair.etc_a / "x.conf").read_bytes() == b"backup v3"
    conflicts = pair.a.status()["conflicts"] + pair.b.status()["conflicts"]
    assert conflicts and any(c["kept"] for c in conflicts)
    kept = [Path(c["kept"]) for c in conflicts if c["kept"]]
    assert kept[0].read_bytes() == b"master v2"
    assert any("conflict" in p for p in pair.a.problems() + pair.b.problems())


def test_local_change_on_the_backup_is_reported_and_resync_restores(pair):
    pair.connect()
    (pair.etc_a / "y.conf").write_bytes(b"master")
    pair.master_changed("y.conf")
    (pair.etc_b / "y.conf").write_bytes(b"edited on the backup")
    pair.b._on_local_changes({pair.b.guard.name_of(pair.etc_b / "y.conf")}, [], False)
    assert any("local change on the Backup" in p for p in pair.b.problems())
    assert not pair.b.status()["in_sync"]
    # a reconnect compares manifests: the Backup's edit is newer, yet it is not the Master's to take
    pair.b.on_session()
    pair.pump()
    assert (pair.etc_a / "y.conf").read_bytes() == b"master"
    assert any("local change on the Backup" in p for p in pair.b.problems())
    pair.b.resync()
    pair.pump()
    assert (pair.etc_b / "y.conf").read_bytes() == b"master"
    assert pair.b.status()["in_sync"] and not pair.b.problems()


def test_names_outside_the_set_are_rejected_and_counted(pair, tmp_path):
    pair.connect()
    entry = (1, 0, b"\0" * 32, 0o644, 0, 0, 1)
    for root, rel in ((0, b"../escape"), (0, b"/etc/passwd"), (3, b"x"), (0, b"sub/deeper")):
        item = (99, 0, True, root, rel, entry, False, None, (b"x",))
        pair.b.on_frame(wire.decode(frames.encode(frames.CFG_FILES, (item,))), time.monotonic())
    assert pair.b.status()["rejected"] == 4
    assert not (tmp_path / "b" / "escape").exists()


def test_failing_reload_hook_is_reported(tmp_path):
    p = Pair(tmp_path, hooks_b={f"{tmp_path}/b/etc/bad*": "sh -c 'exit 3'",
                                f"{tmp_path}/b/etc/good*": f"sh -c 'echo $HASYNC_CONFIG_PATHS > {tmp_path}/ran'"})
    try:
        p.connect()
        (p.etc_a / "bad.conf").write_bytes(b"1")
        (p.etc_a / "good.conf").write_bytes(b"1")
        p.master_changed("bad.conf", "good.conf")
        deadline = time.monotonic() + 10
        while p.b.hooks.busy and time.monotonic() < deadline:
            p.b.turn(time.monotonic())
            time.sleep(0.01)
        fails = p.b.status()["hook_failures"]
        assert len(fails) == 1 and fails[0]["rc"] == 3
        assert (tmp_path / "ran").read_text().strip() == str(p.etc_b / "good.conf")
        assert any("reload hook" in x for x in p.b.problems())
    finally:
        p.close()


def test_a_burst_syncs_each_directory_once_per_frame(pair, monkeypatch):
    from statesync.configsync import apply as applymod
    pair.connect()
    synced = []
    monkeypatch.setattr(applymod, "fsync_dir", lambda d: synced.append(d))
    names = [f"burst-{i}.conf" for i in range(40)]
    for i, n in enumerate(names):
        (pair.etc_a / n).write_bytes(f"set x {i}\n".encode())
    pair.master_changed(*names)
    assert all((pair.etc_b / n).read_bytes() == (pair.etc_a / n).read_bytes() for n in names)
    assert synced == [pair.etc_b]  # one CFG_FILES frame: one directory fsync, after all its renames
    assert pair.a.status()["behind"] == 0


def test_tombstones_expire_once_both_sides_hold_the_deletion(pair):
    pair.connect()
    (pair.etc_a / "gone.conf").write_bytes(b"x\n")
    pair.master_changed("gone.conf")
    name = pair.a.guard.name_of(pair.etc_a / "gone.conf")
    (pair.etc_a / "gone.conf").unlink()
    pair.master_changed("gone.conf")
    assert not (pair.etc_b / "gone.conf").exists()
    assert name not in pair.a.manifest.files  # the Backup ACKed the deletion
    pair.b.request(forced=False)  # the next manifest no longer lists it: the Backup drops its own
    pair.pump()
    assert name not in pair.b.manifest.files
    assert pair.a.status()["tombstones_expired"] == 1 and pair.b.status()["tombstones_expired"] == 1
    assert pair.a.rejected == 0 and pair.b.status()["in_sync"]
    # a later version of the same path still wins over the forgotten deletion
    (pair.etc_a / "gone.conf").write_bytes(b"back\n")
    pair.master_changed("gone.conf")
    assert (pair.etc_b / "gone.conf").read_bytes() == b"back\n"


def test_replicated_paths_in_another_order_stop_config_sync_with_a_problem(tmp_path):
    p = Pair(tmp_path)
    try:
        # the Backup lists a second entry first: root 0 would mean another directory there
        extra = tmp_path / "b" / "other"
        extra.mkdir()
        p.b.guard.roots = (make_root(f"{extra}/"), *p.b.guard.roots)
        (p.etc_a / "m.conf").write_bytes(b"from the master")
        p.a._scan_all(report_local=False)
        p.connect()
        assert not (p.etc_b / "m.conf").exists() and not list(extra.iterdir())
        st = p.b.status()
        assert not st["in_sync"] and "replicated_paths differ" in st["roots_mismatch"]
        assert any("replicated_paths differ" in x for x in p.b.problems())
    finally:
        p.close()


def test_manifest_saves_are_coalesced_and_written_by_close(pair):
    from statesync.configsync import node as nodemod
    store = pair.b.manifest.store
    saves0 = pair.b.manifest_saves
    for i in range(5):
        (pair.etc_a / "x.conf").write_text(f"x {i}\n")
        pair.master_changed("x.conf")
    assert (pair.etc_b / "x.conf").read_text() == "x 4\n"
    assert pair.b.manifest_saves == saves0  # five applies within SAVE_DELAY_S: nothing written yet
    assert pair.b.next_timer() is not None
    pair.b.turn(time.monotonic() + nodemod.SAVE_DELAY_S + 0.01)
    assert pair.b.manifest_saves == saves0 + 1
    reloaded = nodemod.Manifest(pair.b.manifest.roots, store)
    reloaded.load()
    name = pair.b.guard.name_of(pair.etc_b / "x.conf")
    assert reloaded.get(name).digest == pair.b.manifest.get(name).digest
    (pair.etc_a / "x.conf").write_text("x 5\n")
    pair.master_changed("x.conf")
    pair.b.close()  # a dirty store is written on the way out
    reloaded = nodemod.Manifest(pair.b.manifest.roots, store)
    reloaded.load()
    assert reloaded.get(name).digest == pair.b.manifest.get(name).digest != b""


def test_the_sender_sends_the_bytes_the_rescan_hashed(pair, monkeypatch):
    from statesync.configsync import node as nodemod
    pair.connect()
    (pair.etc_a / "y.conf").write_text("first\n")
    reads = []
    real = nodemod.read_version
    monkeypatch.setattr(nodemod, "read_version", lambda p: reads.append(p) or real(p))
    pair.master_changed("y.conf")
    assert (pair.etc_b / "y.conf").read_text() == "first\n"
    assert reads == []  # no second read (and hash) of the file between rescan and send
