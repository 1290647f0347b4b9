"""Two sync services in two namespaces joined by a veth (the HA link): entries inserted in A's
kernel appear in B's kernel, deletes follow; wrong keys, other hostnames and garbage frames are
refused, dropped and counted while the services keep running."""

import json
import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tomli_w

from statesync import keys
from statesync.ctnetlink import entered_netns

pytestmark = pytest.mark.lab

ROOT = Path(__file__).resolve().parents[2]
PORT = 7610
A_ADDR, B_ADDR = "198.51.100.1", "198.51.100.2"


def sh(*argv, ns=None, check=True):
    if ns:
        argv = ("ip", "netns", "exec", ns, *argv)
    return subprocess.run(argv, check=check, capture_output=True, text=True)


def ask(ns, cmd, **args):
    """One control request to the service in `ns` (abstract sockets are per namespace)."""
    with entered_netns(ns):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with sock:
        sock.settimeout(10)
        sock.connect(b"\0hasync-sync")
        sock.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return json.loads(data)


def wait_for(predicate, what, timeout=20.0):
    # a correctness deadline only (the machine is shared): never a timing target
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def write_config(path, *, hostname, peer, secret_file, peer_public, auth_key, mode="kernel"):
    cfg = {
        "node": {"hostname": hostname, "control_socket": "@hasync", "state_dir": str(path.parent / "state")},
        "global": {"status": "enable"},
        "security": {"auth_key_id": 1, "auth_keys": {"1": str(auth_key)}},
        "sync": {"enabled": True, "port": PORT, "mode": mode, "curve_secret_key_file": str(secret_file),
                 "peer_public_key": peer_public},
        "group": [{"id": 1, "state": "master" if hostname == "fw1" else "backup", "ha_link": "lan2",
                   "peer_address": peer, "peer_mask": 30,
                   "monitor": [{"interface": "lan1", "floating_ip": "192.0.2.1/24"}]}],
    }
    path.write_text(tomli_w.dumps(cfg))
    return path


def ct_entries(ns):
    return [line for line in sh("conntrack", "-L", ns=ns, check=False).stdout.splitlines() if "dport=" in line]


def insert(ns, i, reply_dst=None):
    argv = ["conntrack", "-I", "-p", "tcp", "-s", "192.0.2.10", "-d", "203.0.113.10", "--sport", str(20000 + i),
            "--dport", "80", "--state", "ESTABLISHED", "-u", "SEEN_REPLY,ASSURED", "-t", "600"]
    if reply_dst:
        argv += ["-r", "203.0.113.10", "-q", reply_dst, "--reply-port-src", "80", "--reply-port-dst", str(20000 + i)]
    sh(*argv, ns=ns)


class Pair:
    def __init__(self, tmp):
        tag = secrets.token_hex(3)
        self.a, self.b = f"hsx-syn-a-{tag}", f"hsx-syn-b-{tag}"
        self.tmp = tmp
        self.pids = {}

    def build(self):
        for ns in (self.a, self.b):
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", self.a, "link", "add", "lan2", "type", "veth", "peer", "name", "lan2", "netns", self.b)
        for ns, addr in ((self.a, A_ADDR), (self.b, B_ADDR)):
            sh("ip", "-n", ns, "addr", "add", f"{addr}/30", "dev", "lan2")
            sh("ip", "-n", ns, "link", "set", "lan2", "up")
        auth = self.tmp / "auth-1.key"
        auth.write_text(secrets.token_hex(32))
        auth.chmod(0o600)
        self.keys = {name: keys.generate(self.tmp / "keys", name) for name in ("a", "b", "x")}
        pub = {name: keys.load_public(p).decode() for name, (p, _) in self.keys.items()}
        self.cfg_a = write_config(self.tmp / "a.toml", hostname="fw1", peer=B_ADDR, secret_file=self.keys["a"][1],
                                  peer_public=pub["b"], auth_key=auth)
        self.cfg_b = write_config(self.tmp / "b.toml", hostname="fw2", peer=A_ADDR, secret_file=self.keys["b"][1],
                                  peer_public=pub["a"], auth_key=auth)
        self.cfg_b_cache = write_config(self.tmp / "bc.toml", hostname="fw2", peer=A_ADDR, secret_file=self.keys["b"][1],
                                        peer_public=pub["a"], auth_key=auth, mode="cache")
        self.cfg_b_wrong_key = write_config(self.tmp / "bx.toml", hostname="fw2", peer=A_ADDR,
                                            secret_file=self.keys["x"][1], peer_public=pub["a"], auth_key=auth)
        self.cfg_b_same_name = write_config(self.tmp / "bn.toml", hostname="fw1", peer=A_ADDR,
                                            secret_file=self.keys["b"][1], peer_public=pub["a"], auth_key=auth)

    def start(self, node, cfg, role):
        ns = self.a if node == "a" else self.b
        log = open(self.tmp / f"{node}-{len(self.pids)}.log", "w")
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-m", "statesync.service", "--config", str(cfg),
             "--role", role], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)})
        self.pids[node] = proc
        wait_for(lambda: self._answers(ns, proc), f"service {node} to answer")
        return proc

    def _answers(self, ns, proc):
        assert proc.poll() is None, f"service exited: {proc.returncode}"
        try:
            return ask(ns, "status")
        except OSError:
            return None

    def stop(self, node):
        proc = self.pids.pop(node, None)
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc

    def teardown(self):
        for node in list(self.pids):
            self.stop(node)
        for ns in (self.a, self.b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    p = Pair(tmp_path_factory.mktemp("sync"))
    try:
        p.build()
        p.start("a", p.cfg_a, "master")
        p.start("b", p.cfg_b, "backup")
        yield p
    finally:
        p.teardown()


def test_entries_replicate_into_the_backup_kernel(pair):
    wait_for(lambda: ask(pair.a, "status")["connected"] and ask(pair.b, "status")["connected"], "connection")
    for i in range(20):
        insert(pair.a, i)
    insert(pair.a, 99, reply_dst="203.0.113.1")  # a NATed entry: the reply tuple must survive
    wait_for(lambda: len(ct_entries(pair.b)) == 21, "21 entries in B")
    nat = [line for line in ct_entries(pair.b) if "sport=20099" in line]
    assert len(nat) == 1 and "dst=203.0.113.1" in nat[0] and "ESTABLISHED" in nat[0] and "ASSURED" in nat[0]

    sh("conntrack", "-D", "-p", "tcp", "--sport", "20003", ns=pair.a)
    wait_for(lambda: not any("sport=20003 " in line for line in ct_entries(pair.b)), "delete to replicate")
    assert len(ct_entries(pair.b)) == 20

    a, b = ask(pair.a, "status"), ask(pair.b, "status")
    assert a["role"] == "master" and b["role"] == "backup" and b["peer"] == "fw1"
    assert a["entries_sent"] >= 22 and b["entries_applied"] >= 22
    assert b["entries_sent"] == 0  # loop prevention: the Backup never sends what it injected
    assert not b["errors"], b["errors"]


def test_garbage_frames_are_dropped_and_counted(pair):
    before = ask(pair.a, "status")["channel"]
    a_public = keys.load_public(pair.keys["a"][0]).decode()
    script = f"""
import time, zmq
from statesync import keys
ctx = zmq.Context()
anon = ctx.socket(zmq.PUSH); anon.linger = 0                     # no CURVE at all: fails the handshake
anon.connect("tcp://{A_ADDR}:{PORT}")
keyed = ctx.socket(zmq.PUSH); keyed.linger = 1000                 # the peer's own key
pub, sec = keys.load_secret("{pair.keys['b'][1]}")
keyed.curve_publickey, keyed.curve_secretkey, keyed.curve_serverkey = pub, sec, b"{a_public}"
keyed.connect("tcp://{A_ADDR}:{PORT}")
time.sleep(0.5)
for junk in (b"\\xc1", b"\\x95\\x01\\x04\\x00\\x01\\x91\\x94\\x09\\x02\\xc4\\x01k\\xc4\\x01a", b"\\x00" * 100):
    keyed.send(junk)
time.sleep(0.5)
ctx.destroy(linger=0)
"""
    sh(sys.executable, "-c", script, ns=pair.b)
    after = wait_for(lambda: (s := ask(pair.a, "status")["channel"])["frames_dropped_malformed"]
                     >= before["frames_dropped_malformed"] + 3 and s, "malformed frames to be counted")
    assert after["handshake_failures"] > before["handshake_failures"]  # the keyless client
    assert pair.pids["a"].poll() is None
    # and the pair still works afterwards
    insert(pair.a, 200)
    wait_for(lambda: any("sport=20200 " in line for line in ct_entries(pair.b)), "replication after garbage")


def test_peer_with_another_key_is_refused(pair):
    pair.stop("b")
    pair.start("b", pair.cfg_b_wrong_key, "backup")
    s = wait_for(lambda: (s := ask(pair.a, "status"))["channel"]["refusals"] > 0 and not s["connected"] and s,
                 "A to refuse the unknown key")
    assert "pinned" in s["refused_reason"] or "CURVE" in s["refused_reason"]
    sb = wait_for(lambda: (s := ask(pair.b, "status"))["refused_reason"] and s, "B to see the refusal")
    assert not sb["connected"] and ("ZAP" in sb["refused_reason"] or "CURVE" in sb["refused_reason"])


def test_peer_with_the_same_hostname_is_refused(pair):
    pair.stop("b")
    pair.start("b", pair.cfg_b_same_name, "backup")
    s = wait_for(lambda: (s := ask(pair.b, "status"))["refused_reason"] and "hostname" in s["refused_reason"] and s,
                 "the hostname refusal")
    assert not s["connected"]
    assert "hostname" in (ask(pair.a, "status")["refused_reason"] or "")
    # with the right config again, the pair reconnects and resyncs from scratch
    pair.stop("b")
    sh("conntrack", "-F", ns=pair.b, check=False)
    pair.start("b", pair.cfg_b, "backup")
    wait_for(lambda: len(ct_entries(pair.b)) == len(ct_entries(pair.a)) > 0, "a full resync")
    assert ask(pair.b, "status")["last_resync"]["entries"] >= 20


def test_cache_mode_commits_on_takeover_then_the_direction_flips(pair):
    pair.stop("b")
    sh("conntrack", "-F", ns=pair.b)
    pair.start("b", pair.cfg_b_cache, "backup")
    if not any("sport=20000 " in line for line in ct_entries(pair.a)):
        insert(pair.a, 0)  # run alone: the entry an earlier test left, deleted at the end
    n = len(ct_entries(pair.a))
    wait_for(lambda: ask(pair.b, "status")["cached"] == n, f"{n} entries in B's cache")
    assert ct_entries(pair.b) == []  # cache mode: nothing in the kernel before the takeover
    reply = ask(pair.b, "role", role="master")
    assert reply["ok"] and reply["committed"] == n
    assert len(ct_entries(pair.b)) == n  # the reply comes after the commit, not before
    # what the takeover waited for, shown (the status copy may be a moment old)
    commit = wait_for(lambda: ask(pair.b, "status")["last_commit"], "the commit in B's status")
    assert commit["entries"] == n and commit["ms"] >= commit["frame_ms"] >= 0, commit
    assert ask(pair.a, "role", role="backup")["ok"]
    insert(pair.b, 300)  # the new Master's changes now flow to the old one
    wait_for(lambda: any("sport=20300 " in line for line in ct_entries(pair.a)), "B -> A replication")
    sh("conntrack", "-D", "-p", "tcp", "--sport", "20000", ns=pair.b)
    wait_for(lambda: not any("sport=20000 " in line for line in ct_entries(pair.a)), "B -> A delete")
    a = ask(pair.a, "status")
    assert a["role"] == "backup" and a["connected"] and a["last_resync"] is not None
