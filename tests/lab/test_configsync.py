"""Config sync end to end: a lab pair with sync on; files written in fw1's replicated
directory appear in fw2's (create, edit, rename, delete), a one-line edit of a 10 MB file
moves a small delta, a killed apply leaves old-or-new, hooks run or are reported, local
changes on the Backup are reported, and names outside the set are rejected."""

from __future__ import annotations

import hashlib
import os
import secrets
import signal
import sys
import time
from pathlib import Path

import pytest

from hasync import control
from hasync.lab import commands, nsctl
from hasync.lab.process import run
from hasync.lab.state import workdir_path
from hasync.lab.topology import teardown

pytestmark = pytest.mark.lab


def wait_for(predicate, what, timeout=20.0):
    # a correctness deadline only (the machine is shared): never a timing target
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}: {last}")


def sync_status(lab, fw):
    """The sync child's own status (the daemon shows a copy refreshed every 0.5 s)."""
    try:
        return nsctl.in_netns(lab.ns(fw), control.request, "@hasync-sync", "status", timeout=5.0)
    except OSError:
        return {}


def cfg_status(lab, fw):
    return sync_status(lab, fw).get("config") or {}


# A role flap turns the Backup's edit into a Master's change (pushed, not reported); one
# failure of the report test in a full suite fits it. These tests are about files, not about
# how fast a failure is seen (test_failover): a 100 ms dead time rides out a CI stall.
HEARTBEAT = {"heartbeat_interval_ms": 20, "dead_count": 5}


@pytest.fixture(scope="module")
def lab():
    if os.geteuid() != 0:
        pytest.skip("lab tests need root")
    tag = f"cfs{secrets.token_hex(2)}"
    name = f"t-cfs-{tag}"
    d2 = workdir_path(name) / "fw2" / "etc"
    hook_log = workdir_path(name) / "hook.log"
    hooks = {f"{d2}/hook-ok*": f"sh -c 'echo $HASYNC_CONFIG_PATHS >> {hook_log}'", f"{d2}/hook-bad*": "false"}
    os.environ["HASYNC_CONFIGSYNC_TEST_APPLY_DELAY"] = "slow-*:1.5"
    try:
        lab = commands.up(name, tag=tag, owner_pid=os.getpid(), sync_enabled=True,
                          fw2={"sync": {"reload_hooks": hooks}}, **HEARTBEAT)
    finally:
        os.environ.pop("HASYNC_CONFIGSYNC_TEST_APPLY_DELAY", None)
    lab.hook_log = hook_log
    try:
        wait_for(lambda: cfg_status(lab, "fw1").get("in_sync") and cfg_status(lab, "fw2").get("in_sync"),
                 "config sync to connect")
        yield lab
    finally:
        teardown(lab)


def dirs(lab):
    return Path(lab.replicated_dirs["fw1"]), Path(lab.replicated_dirs["fw2"])


def same_on_backup(lab, name, content=None):
    m, b = dirs(lab)
    want = (m / name).read_bytes() if content is None else content
    return lambda: (b / name).exists() and (b / name).read_bytes() == want


def test_create_edit_rename_delete(lab):
    m, b = dirs(lab)
    (m / "a.conf").write_bytes(b"table inet filter {}\n")
    os.chmod(m / "a.conf", 0o600)
    wait_for(same_on_backup(lab, "a.conf"), "create")
    assert (b / "a.conf").stat().st_mode & 0o777 == 0o600
    (m / "a.conf").write_bytes(b"\x00\x01binary\xff" * 100)
    wait_for(same_on_backup(lab, "a.conf"), "edit")
    os.rename(m / "a.conf", m / "b.conf")
    wait_for(lambda: not (b / "a.conf").exists() and same_on_backup(lab, "b.conf")(), "rename")
    (m / "b.conf").unlink()
    wait_for(lambda: not (b / "b.conf").exists(), "delete")
    # the daemon shows a copy of the sync status refreshed every 0.5 s: wait for it
    wait_for(lambda: cfg_status(lab, "fw1")["behind"] == 0
             and cfg_status(lab, "fw1")["generation"] == cfg_status(lab, "fw2")["generation"], "same generation")
    s2 = cfg_status(lab, "fw2")
    assert s2["last_applied"] and s2["last_applied"]["deleted"], s2


def test_one_line_edit_of_10mb_moves_a_small_delta(lab):
    m, b = dirs(lab)
    lines = [f"add element inet filter allow {{ 198.18.{i // 250 % 250}.{i % 250} . {i % 65535} }}\n"
             for i in range(200_000)]
    text = "".join(lines)
    assert len(text) > 10_000_000
    (m / "big.nft").write_text(text)
    wait_for(same_on_backup(lab, "big.nft"), "the 10 MB file", timeout=60)
    wait_for(lambda: cfg_status(lab, "fw1")["behind"] == 0, "ack")
    before = cfg_status(lab, "fw1")["bytes_sent"]
    lines[100_000] = "add element inet filter allow { 203.0.113.7 . 443 }\n"
    (m / "big.nft").write_text("".join(lines))
    wait_for(same_on_backup(lab, "big.nft"), "the edit", timeout=60)
    sent = wait_for(lambda: (s := cfg_status(lab, "fw1"))["behind"] == 0 and s, "ack")["bytes_sent"] - before
    assert 0 < sent < 64 * 1024, sent


def test_killed_apply_leaves_old_or_new(lab):
    m, b = dirs(lab)
    old, new = os.urandom(3 << 20), os.urandom(3 << 20)
    (m / "slow-blob.bin").write_bytes(old)
    wait_for(same_on_backup(lab, "slow-blob.bin"), "the old version", timeout=30)
    allowed = {hashlib.sha256(old).digest(), hashlib.sha256(new).digest()}
    pid = cfg_pid = (nsctl.try_status(lab, "fw2") or {})["sync"]["pid"]
    (m / "slow-blob.bin").write_bytes(new)
    # the apply sleeps 1.5 s between fsync and rename: kill it there, by PID
    wait_for(lambda: any(p.name.startswith(".hasync-tmp-slow-blob") for p in b.iterdir()), "the apply to start")
    os.kill(pid, signal.SIGKILL)
    seen = set()
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline:
        seen.add(hashlib.sha256((b / "slow-blob.bin").read_bytes()).digest())
        st = nsctl.try_status(lab, "fw2") or {}
        if (st.get("sync") or {}).get("pid", cfg_pid) != cfg_pid and (b / "slow-blob.bin").read_bytes() == new:
            break
        time.sleep(0.05)
    assert seen <= allowed and hashlib.sha256(old).digest() in seen
    assert (b / "slow-blob.bin").read_bytes() == new  # the restarted service converged
    assert not [p for p in b.iterdir() if p.name.startswith(".hasync-tmp-")]


def test_reload_hooks_run_and_a_failing_one_is_reported(lab):
    m, b = dirs(lab)
    (m / "hook-ok.conf").write_bytes(b"ok\n")
    (m / "hook-bad.conf").write_bytes(b"bad\n")
    wait_for(lambda: lab.hook_log.exists() and str(b / "hook-ok.conf") in lab.hook_log.read_text(), "the hook")
    s = wait_for(lambda: (s := cfg_status(lab, "fw2"))["hook_failures"] and s, "the hook failure")
    assert s["hook_failures"][0]["command"] == "false" and s["hook_failures"][0]["rc"] == 1
    assert any("reload hook" in p for p in sync_status(lab, "fw2")["problems"])


def test_local_change_on_the_backup_is_reported(lab):
    m, b = dirs(lab)
    (m / "local.conf").write_bytes(b"master\n")
    wait_for(same_on_backup(lab, "local.conf"), "create")
    (b / "local.conf").write_bytes(b"edited on the backup\n")
    wait_for(lambda: any("local change on the Backup" in p and "local.conf" in p
                         for p in (nsctl.try_status(lab, "fw2") or {})["sync"]["problems"]),
             "the report")
    nsctl.ask(lab, "fw2", "resync", config=True)
    wait_for(same_on_backup(lab, "local.conf", b"master\n"), "resync --config to restore it")


def test_names_outside_the_set_are_rejected_and_counted(lab):
    m, b = dirs(lab)
    before = cfg_status(lab, "fw2")["rejected"]
    keys = Path(lab.node_dir("fw1")) / "keys"
    fw2_pub = (Path(lab.node_dir("fw2")) / "keys" / "curve.key").read_text()
    script = f"""
import time, zmq, zmq.auth
from statesync.configsync import frames
pub, sec = zmq.auth.load_certificate("{keys}/curve.key_secret")
server, _ = zmq.auth.load_certificate("{Path(lab.node_dir('fw2'))}/keys/curve.key")
ctx = zmq.Context()
s = ctx.socket(zmq.PUSH); s.linger = 2000
s.curve_publickey, s.curve_secretkey, s.curve_serverkey = pub, sec, server
s.connect("tcp://198.51.100.2:7610")
time.sleep(0.5)
entry = (10**9, 0, b"\\0" * 32, 0o644, 0, 0, 1)
for root, rel in ((0, b"../escape"), (0, b"/etc/passwd"), (0, b"sub/../../x"), (7, b"x")):
    s.send(frames.encode(frames.CFG_FILES, ((1, 0, True, root, rel, entry, False, None, (b"x",)),)))
time.sleep(0.5)
ctx.destroy(linger=1000)
"""
    assert fw2_pub
    # the peer's own key and address: from fw1's namespace, as fw1 would send them
    run(lab, "fw1", [sys.executable, "-c", script])
    s = wait_for(lambda: (s := cfg_status(lab, "fw2"))["rejected"] >= before + 4 and s, "4 rejections")
    assert s["last_rejection"]
    assert not (b.parent / "escape").exists()
