"""State sync end to end: sessions through the Master's SNAT survive its crash.

The lab's ruleset is stateful with tcp_loose=0, so a session whose conntrack entry
did not reach the Backup breaks after failover: the control test with sync off
proves the main test can fail.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import sys
import time
import tomllib
from contextlib import contextmanager
from pathlib import Path

import pytest
import tomli_w

from hasync.lab import commands, faults, netem, nsctl
from hasync.lab.process import run, start_process, stop_process
from hasync.lab.topology import teardown

pytestmark = pytest.mark.lab

SERVER = "203.0.113.10"
STEADY = {"fw1": "MASTER", "fw2": "BACKUP"}
SESSIONS = 200
# These tests watch the kernel tables with `conntrack -L`, and one dump of a nearly empty
# table walks the whole shared hash (262144 buckets) in one recv(), stalling a CPU for
# 10-13.5 ms (a SCHED_FIFO 5 ms loop here, another namespace dumping every 50 ms: max 13.45 ms
# late). A Master stalled that long misses 3 adverts, and with the lab's 15 ms dead time its
# peer takes over for a moment (12 false failovers in 84 polls, none with 5 missed adverts).
# The sessions must survive a crash, not the observer, nor a CI host that leaves a daemon
# unscheduled for 40 ms (seen once: a false takeover undid a switchover): 20 ms x 5, a dead
# time of 100 ms. test_failover shows the millisecond failover; here, with this dead time, a
# crash still costs a session well under the 1 s stall the sessions check for.
HEARTBEAT = {"heartbeat_interval_ms": 20, "dead_count": 5}


def _lab(sync: bool):
    if os.geteuid() != 0:
        pytest.skip("lab tests need root")
    tag = f"s{secrets.token_hex(2)}"
    lab = commands.up(f"t-sync-{tag}", tag=tag, owner_pid=os.getpid(), sync_enabled=sync,
                      **HEARTBEAT)
    ready = Path(lab.workdir) / "sessions.ready"
    lab.pids["sessions-server"] = start_process(
        lab, "server", [sys.executable, "-m", "hasync.lab.sessions", "server", "--port", "7001",
                        "--ready-file", str(ready)], "sessions-server")
    lab.save()
    commands._wait_file(ready, 10)
    return lab


@pytest.fixture(scope="module")
def synced():
    lab = _lab(sync=True)
    try:
        wait_sync_connected(lab)
        # settled: the node that started first may have been Master on its own for a moment,
        # and sessions set up through it would meet its handover in the first test
        commands.wait_until(lab, lambda s: s == STEADY, 20)
        wait_backup_synced(lab, "fw2")
        yield lab
    finally:
        teardown(lab)


@pytest.fixture(autouse=True)
def _heal_the_shared_lab(request):
    """A test that fails half-way must not leave the shared lab crashed (or a daemon stopped)
    for the tests after it: undo what it left. A test that passed left nothing."""
    yield
    if "synced" not in request.fixturenames:
        return
    lab = request.getfixturevalue("synced")
    netem.clear(lab, "fw2", "lan2")  # a sync channel cut
    for node in list(lab.faults):
        faults.restore(lab, node)
    for fw in ("fw1", "fw2"):
        if fw not in lab.pids:
            lab.pids[fw] = commands.start_hasync(lab, fw)
            lab.save()
    if commands.states(lab) == {"fw1": "BACKUP", "fw2": "MASTER"}:
        # a test that failed after a switchover: fw1 yielded and will not preempt by itself
        time.sleep(0.5)  # unless a preemption is on its way
        if commands.states(lab) == {"fw1": "BACKUP", "fw2": "MASTER"}:
            commands.switchover(lab, "fw1")  # taken back (asked again while fw1 resyncs)


def wait_sync_connected(lab, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = [(nsctl.try_status(lab, fw) or {}).get("sync") or {} for fw in ("fw1", "fw2")]
        if all(s.get("connected") for s in last):
            return
        time.sleep(0.1)
    raise AssertionError(f"sync not connected: {last}")


def conntrack_count(lab, fw: str, *args: str) -> int:
    out = run(lab, fw, ["conntrack", "-L", *args], check=False).stdout
    return sum(1 for line in out.splitlines() if line.strip())


def wait_count(lab, fw: str, expected: int, *args: str, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    n = -1
    while time.monotonic() < deadline:
        n = conntrack_count(lab, fw, *args)
        if n == expected:
            return n
        time.sleep(0.1)
    return n


def sessions_through_crash(lab, count: int = SESSIONS, then=None, before_crash=None) -> dict:
    """`count` TCP sessions via fw1's SNAT, fw1 crashes, 3 s of traffic via fw2 (then `then(lab)`)."""
    out = Path(lab.workdir) / f"sessions-{secrets.token_hex(3)}.json"
    ready = out.with_suffix(".ready")
    pid = start_process(lab, "client", [
        sys.executable, "-m", "hasync.lab.sessions", "client", "--target", SERVER, "--port", "7001",
        "--count", str(count), "--interval-ms", "100", "--out", str(out), "--ready-file", str(ready)],
        "sessions-client")
    lab.pids["sessions-client"] = pid
    lab.save()
    try:
        commands._wait_file(ready, 20)
        # every session's entry must be on the Backup before the crash
        assert wait_count(lab, "fw2", count, "-p", "tcp", "--dport", "7001") == count
        time.sleep(0.5)
        table = run(lab, "fw2", ["conntrack", "-L", "-p", "tcp", "--dport", "7001"]).stdout
        print("fw2 before the crash:", {st: table.count(f" {st} ") for st in
                                         ("ESTABLISHED", "SYN_SENT", "SYN_RECV", "CLOSE")})
        if before_crash is not None:
            before_crash(lab)
        faults.fail(lab, "fw1", "crash")
        commands.wait_until(lab, lambda s: s["fw2"] == "MASTER", 10)
        time.sleep(3.0)
        print("fw2 after the crash:", run(lab, "fw2", ["nft", "list", "counters"]).stdout.split())
        if then is not None:
            then(lab)
    finally:
        stop_process(pid, timeout=10)
        lab.pids.pop("sessions-client", None)
        lab.save()
    commands._wait_file(out, 10)
    return json.loads(out.read_text())


IDLE_UDP = ("-p", "udp", "--sport", "41500", "--dport", "13")  # other tests count port 9


def conntrack_timeout(lab, fw: str, *args: str) -> int | None:
    """The remaining timeout of the one entry `conntrack -L args` lists ("udp 17 29 src=...")."""
    out = run(lab, fw, ["conntrack", "-L", *args], check=False).stdout.split()
    return int(out[2]) if out else None


def one_idle_udp_flow(lab) -> None:
    """One packet, then silence: on the Backup the copy is held (sync.hold_timeout)."""
    run(lab, "client", [sys.executable, "-c", "import socket; s = socket.socket(2, 2); "
                        f"s.bind(('0.0.0.0', 41500)); s.sendto(b'x', ('{SERVER}', 13))"])
    assert wait_count(lab, "fw2", 1, *IDLE_UDP) == 1
    assert conntrack_timeout(lab, "fw2", *IDLE_UDP) > 3600


def idle_flow_released(lab) -> int | None:
    """After the takeover the new Master gives held entries their kernel timeouts back."""
    deadline = time.monotonic() + 8
    left = conntrack_timeout(lab, "fw2", *IDLE_UDP)
    while (left is None or left > 30) and time.monotonic() < deadline:
        time.sleep(0.2)
        left = conntrack_timeout(lab, "fw2", *IDLE_UDP)
    return left


def test_sessions_survive_master_crash(synced):
    lab = synced
    released = []
    report = sessions_through_crash(lab, before_crash=one_idle_udp_flow,
                                    then=lambda lab: released.append(idle_flow_released(lab)))
    # the idle UDP flow is on its kernel timeout again (udp_timeout: 30 s), not held for days
    assert released and released[0] is not None and released[0] <= 30, released
    deadline = time.monotonic() + 3  # the daemon's copy of its sync status is up to 0.5 s old
    while (((nsctl.try_status(lab, "fw2") or {}).get("sync") or {}).get("holds_released", 0) < 1
           and time.monotonic() < deadline):
        time.sleep(0.1)
    assert ((nsctl.try_status(lab, "fw2") or {}).get("sync") or {}).get("holds_released", 0) >= 1
    run(lab, "fw2", ["conntrack", "-D", *IDLE_UDP], check=False)
    assert report["established"] == SESSIONS
    assert report["sessions_reset"] == 0
    assert report["sessions_stalled"] == 0, report["max_stall_ms"]
    assert report["sessions_ok"] == SESSIONS
    # the Backup's kernel carried the NAT: replies still go to the WAN floating IP
    out = run(lab, "fw2", ["conntrack", "-L", "-p", "tcp", "--dport", "7001"]).stdout
    assert out.count("dst=203.0.113.1 ") >= SESSIONS
    faults.restore(lab, "fw1")
    commands.wait_until(lab, lambda s: s == STEADY, 20)


def test_without_sync_sessions_break():
    """The control: the same crash with sync off loses the sessions (the ruleset is stateful)."""
    lab = _lab(sync=False)
    try:
        out = Path(lab.workdir) / "nosync.json"
        ready = out.with_suffix(".ready")
        pid = start_process(lab, "client", [
            sys.executable, "-m", "hasync.lab.sessions", "client", "--target", SERVER, "--port", "7001",
            "--count", "20", "--interval-ms", "100", "--out", str(out), "--ready-file", str(ready)],
            "sessions-client")
        commands._wait_file(ready, 20)
        time.sleep(0.5)
        faults.fail(lab, "fw1", "crash")
        commands.wait_until(lab, lambda s: s["fw2"] == "MASTER", 10)
        time.sleep(2.0)
        stop_process(pid, timeout=10)
        commands._wait_file(out, 10)
        report = json.loads(out.read_text())
        assert report["established"] == 20
        assert report["sessions_ok"] == 0
    finally:
        teardown(lab)


def test_udp_flows_and_deletions_replicate(synced):
    lab = synced
    commands.wait_until(lab, lambda s: s == STEADY, 20)
    wait_sync_connected(lab)
    code = ("import socket\n"
            "for port in range(40000, 40050):\n"
            "    s = socket.socket(2, 2); s.bind(('0.0.0.0', port)); s.sendto(b'x', ('203.0.113.10', 9))\n")
    run(lab, "client", [sys.executable, "-c", code])
    assert wait_count(lab, "fw2", 50, "-p", "udp", "--dport", "9") == 50
    run(lab, "fw1", ["conntrack", "-D", "-p", "udp", "--dport", "9"])
    assert wait_count(lab, "fw2", 0, "-p", "udp", "--dport", "9") == 0


def test_sync_makes_every_entry_report_its_events(synced):
    """Both nodes' sync services set nf_conntrack_events=1 (statesync.ctsysctl): the Backup's
    copies must report their updates and destroys once it is Master, listener or not."""
    for fw in ("fw1", "fw2"):
        assert run(synced, fw, ["sysctl", "-n", "net.netfilter.nf_conntrack_events"]).stdout.strip() == "1"
        sync = (nsctl.try_status(synced, fw) or {}).get("sync") or {}
        assert not any("nf_conntrack_events" in p for p in sync.get("problems", [])), sync.get("problems")


def test_the_backup_holds_a_flow_the_master_keeps_alive(synced):
    """A flow's packets restart the Master's timer without an event: the Backup's copy must not
    die by the timeout of the flow's last event (sync.hold_timeout), and goes when the Master's does."""
    lab = synced
    commands.wait_until(lab, lambda s: s == STEADY, 20)
    wait_sync_connected(lab)
    sysctl = "net.netfilter.nf_conntrack_udp_timeout"
    before = {fw: run(lab, fw, ["sysctl", "-n", sysctl]).stdout.strip() for fw in ("fw1", "fw2")}
    flow = ("-p", "udp", "--sport", "41000", "--dport", "9")
    code = ("import socket, time\n"
            "s = socket.socket(2, 2); s.bind(('0.0.0.0', 41000))\n"
            f"while True:\n    s.sendto(b'x', ('{SERVER}', 9)); time.sleep(0.3)\n")
    pid = None
    try:
        for fw in ("fw1", "fw2"):
            run(lab, fw, ["sysctl", "-qw", f"{sysctl}=3"])
        pid = start_process(lab, "client", [sys.executable, "-c", code], "udp-keepalive")
        assert wait_count(lab, "fw2", 1, *flow) == 1
        time.sleep(7.0)  # over twice the timeout: the Master's entry lives on packets alone
        assert conntrack_count(lab, "fw1", *flow) == 1, "the flow is not alive on the Master"
        out = run(lab, "fw2", ["conntrack", "-L", *flow], check=False).stdout.split()
        assert out, "the Backup's copy of a live flow died by its last event's timeout"
        assert int(out[2]) > 3600, out  # held, not counting down from 3 s
    finally:
        if pid is not None:
            stop_process(pid)
            lab.pids.pop("udp-keepalive", None)
            lab.save()
        for fw, value in before.items():
            run(lab, fw, ["sysctl", "-qw", f"{sysctl}={value}"], check=False)
    run(lab, "fw1", ["conntrack", "-D", *flow], check=False)
    assert wait_count(lab, "fw2", 0, *flow) == 0  # the Master's destroy removes the held copy


def test_resync_after_backup_restart(synced):
    lab = synced
    commands.wait_until(lab, lambda s: s == STEADY, 20)
    # entries made while the Backup's daemon is down reach it when it comes back
    pid = lab.pids.pop("fw2")
    lab.save()
    stop_process(pid)
    run(lab, "fw2", ["conntrack", "-F"], check=False)
    for i in range(30):
        run(lab, "fw1", ["conntrack", "-I", "-p", "tcp", "-s", "198.18.0.1", "-d", "198.19.0.1",
                         "--sport", str(20000 + i), "--dport", "443", "--state", "ESTABLISHED",
                         "-t", "600", "-u", "SEEN_REPLY,ASSURED"])
    lab.pids["fw2"] = commands.start_hasync(lab, "fw2")
    lab.save()
    commands.wait_until(lab, lambda s: s == STEADY, 20)
    assert wait_count(lab, "fw2", 30, "-p", "tcp", "--dport", "443", timeout=15) == 30
    # the sync child's start-up dump (a CPU stall) was over before the node joined the pair
    log = (lab.node_dir("fw2") / "hasync.log").read_text().splitlines()
    held = max(i for i, line in enumerate(log) if "statesync" in line and "held until the first resync" in line)
    started = max(i for i, line in enumerate(log) if "hasync fw2 started" in line)
    assert held < started, log[-20:]
    # and an operator resync converges too
    run(lab, "fw2", ["conntrack", "-D", "-p", "tcp", "--dport", "443"])
    dumps, table = sync_field(lab, "fw1", "dumps"), sync_field(lab, "fw1", "table")
    assert table["seeded"], table  # by the dump of the resync fw2's restart asked for
    reply = nsctl.ask(lab, "fw1", "resync")
    assert reply.get("ok"), reply
    assert wait_count(lab, "fw2", 30, "-p", "tcp", "--dport", "443", timeout=15) == 30
    # served from the Master's table (statesync.table), without a dump: a dump stalls a CPU
    commands.wait_until(lab, lambda _: sync_field(lab, "fw1", "table")["snapshots"] > table["snapshots"], 10)
    assert sync_field(lab, "fw1", "dumps") == dumps


def _failback_and_switchovers(lab) -> None:
    faults.restore(lab, "fw1")
    commands.wait_until(lab, lambda s: s == STEADY, 20)  # preempts once its table is resynced
    wait_backup_synced(lab, "fw2")  # the failback's own resync is done and counted
    # fw2 connected afresh to the restarted fw1 (its old connection led to a killed process)
    channel = ((nsctl.try_status(lab, "fw2") or {}).get("sync") or {}).get("channel") or {}
    assert channel.get("reconnects", 0) >= 1, channel
    for fw, expected in (("fw1", {"fw1": "BACKUP", "fw2": "MASTER"}), ("fw2", STEADY)):
        before = sync_dumps(lab)
        assert nsctl.ask(lab, fw, "switchover")["ok"]
        commands.wait_until(lab, lambda s: s == expected, 10)
        wait_backup_synced(lab, next(n for n, state in expected.items() if state == "BACKUP"))
        # a dump stalls a CPU (~15 ms): a switchover costs none, the new Master adopts its
        # copy of the table (statesync.table) for the old Master's resync and the hold release
        after = sync_dumps(lab)
        assert after == before, (before, after, role_log(lab))


def wait_backup_synced(lab, fw: str, timeout: float = 20.0) -> None:
    """Until the Backup `fw` says it holds the whole table: its resync is over."""
    deadline = time.monotonic() + timeout
    def synced(sync: dict) -> bool:
        return sync.get("role") == "backup" and sync.get("synced")
    while not synced((nsctl.try_status(lab, fw) or {}).get("sync") or {}):
        assert time.monotonic() < deadline, (f"{fw} not synced after {timeout} s", role_log(lab))
        time.sleep(0.1)


def role_log(lab) -> dict:
    """Each node's log lines about role changes and resyncs: shown when a test fails."""
    return {fw: [line for line in (lab.node_dir(fw) / "hasync.log").read_text().splitlines()
                 if "->" in line or "resync" in line or "seated" in line or "role" in line]
            for fw in ("fw1", "fw2")}


def sync_field(lab, fw: str, name: str):
    sync = (nsctl.try_status(lab, fw) or {}).get("sync") or {}
    assert name in sync, (fw, sync)
    return sync[name]


def sync_dumps(lab) -> dict:
    """Conntrack dumps each node's sync service did so far."""
    return {fw: sync_field(lab, fw, "dumps") for fw in ("fw1", "fw2")}


def test_sessions_survive_failback_and_switchovers(synced):
    """A node that was Master and became Backup must not keep stale TCP windows: the
    sessions go crash -> failback -> switchover -> switchover without a reset or stall."""
    lab = synced
    commands.wait_until(lab, lambda s: s == STEADY, 20)
    wait_sync_connected(lab)
    run(lab, "fw1", ["conntrack", "-D", "-p", "tcp", "--dport", "7001"], check=False)  # earlier tests'
    assert wait_count(lab, "fw2", 0, "-p", "tcp", "--dport", "7001") == 0
    drops_before = {fw: invalid_drops(lab, fw) for fw in ("fw1", "fw2")}  # the counters are the lab's
    report = sessions_through_crash(lab, count=50, then=_failback_and_switchovers)
    for fw, lines in role_log(lab).items():  # shown on failure: the role changes and resyncs
        print(fw, *lines, sep="\n  ")
    print({k: v for k, v in report.items() if k != "sessions"}, report["sessions"][:2])
    assert report["established"] == 50
    assert report["sessions_reset"] == 0
    assert report["sessions_stalled"] == 0, report["max_stall_ms"]
    # Stale windows drop every packet of a session until it times out (7 drops and a dead
    # session in the restart case below). A stray 1-2 drops with every session fine was seen
    # in a few runs of ~60 over two machines (once one 52-byte packet: a pure ACK, which TCP
    # covers with the next), cause not found (no capture yet): up to 2 are tolerated and shown.
    drops = {fw: invalid_drops(lab, fw) - drops_before[fw] for fw in ("fw1", "fw2")}
    print("invalid drops", drops)
    assert sum(drops.values()) <= 2, drops


def assert_all_carried_on(lab, report: dict, drops: dict) -> None:
    """Every session of `report` carried on through the crash of fw1 (no reset, no stall,
    at most 2 invalid drops); then fw1 is restored and the lab steady again."""
    assert report["established"] == SESSIONS
    assert report["sessions_reset"] == 0
    assert report["sessions_stalled"] == 0, (report["max_stall_ms"], drops, role_log(lab))
    assert report["sessions_ok"] == SESSIONS
    assert sum(drops.values()) <= 2, drops
    faults.restore(lab, "fw1")
    commands.wait_until(lab, lambda s: s == STEADY, 20)


def test_sessions_survive_a_crash_right_after_a_switchover(synced):
    """Sessions set up through fw2 as Master; the operator switches back to fw1, and fw1 dies
    0.3 s later. fw2's entries are its own, with the windows of its Master days, stale by
    then. Without making them liberal at the switchover every packet was dropped as invalid
    and all 200 sessions died (3 of 3 runs). The sync channel is cut from just before the
    switchover: fw2's resync from fw1 (whose records are liberal too) must not be what
    saves them, as it would in most runs, for it is asked at once."""
    lab = synced
    commands.wait_until(lab, lambda s: s == STEADY, 20)
    wait_backup_synced(lab, "fw2")
    switchover_to_peer(lab, "fw1", {"fw1": "BACKUP", "fw2": "MASTER"})
    wait_backup_synced(lab, "fw1")
    run(lab, "fw2", ["conntrack", "-D", "-p", "tcp", "--dport", "7001"], check=False)  # earlier tests'
    assert wait_count(lab, "fw1", 0, "-p", "tcp", "--dport", "7001") == 0
    drops_before = {fw: invalid_drops(lab, fw) for fw in ("fw1", "fw2")}

    def back_to_fw1_then_crash(lab):
        netem.lossy(lab, "fw2", "lan2", 100)  # the sync channel's segments only
        switchover_to_peer(lab, "fw2", STEADY)
        time.sleep(0.3)

    try:
        report = sessions_through_crash(lab, count=SESSIONS, before_crash=back_to_fw1_then_crash)
        cut = netem.dropped(lab, "fw2", "lan2")
    finally:
        netem.clear(lab, "fw2", "lan2")
    drops = {fw: invalid_drops(lab, fw) - drops_before[fw] for fw in ("fw1", "fw2")}
    print({k: v for k, v in report.items() if k != "sessions"}, "invalid drops", drops, "sync segments cut", cut)
    assert cut > 0, "the sync channel was not cut: fw2 may have been saved by a resync"
    assert_all_carried_on(lab, report, drops)


BULK_SINK = ("import socket\n"
             "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
             "s.bind(('0.0.0.0', 7100)); s.listen(); c, _ = s.accept()\n"
             "while c.recv(1 << 20): pass\n")
BULK_SENDER = ("import socket, sys, time\n"
               f"c = socket.create_connection(('{SERVER}', 7100), timeout=5)\n"
               "buf, sent, t0 = b'x' * 65536, 0, time.monotonic()\n"
               "while time.monotonic() - t0 < float(sys.argv[1]):\n"
               "    try:\n"
               "        c.sendall(buf)\n"
               "    except OSError as e:\n"
               "        print('ERROR', repr(e), flush=True); break\n"
               "    sent += len(buf); time.sleep(0.005)\n"
               "else:\n"
               "    print('SENT', sent, flush=True)\n")


def invalid_drops(lab, fw: str) -> int:
    out = run(lab, fw, ["nft", "list", "counter", "inet", "hasync_lab", "invalid_dropped"]).stdout.split()
    return int(out[out.index("packets") + 1])


def test_a_restarted_master_daemon_takes_a_bulk_session_back(synced):
    """The daemon on the Master restarts (an upgrade, say) while its kernel keeps the table:
    the peer takes over, ~10 MB/s of one TCP session flow through it, the restarted node
    preempts back. Its entries carry the TCP windows of its Master days, far behind the
    session now. Before the restart made them liberal (and before the Backup wrote its TCP
    entries BE_LIBERAL, which covers this too once the first resync is in) the kernel dropped
    the session's packets as out of window: 7 invalid drops, the sender timed out."""
    lab = synced
    commands.wait_until(lab, lambda s: s == STEADY, 20)
    wait_sync_connected(lab)
    before = invalid_drops(lab, "fw1")

    def restart_fw1(lab):
        commands.stop_daemon(lab, "fw1")  # SIGTERM: fw1 resigns, fw2 takes over
        commands.wait_until(lab, lambda s: s["fw2"] == "MASTER", 10)
        time.sleep(3.0)  # tens of MB through fw2: fw1's windows fall far behind
        lab.pids["fw1"] = commands.start_hasync(lab, "fw1")
        lab.save()
        commands.wait_until(lab, lambda s: s == STEADY, 30)  # preempts once resynced

    result = bulk_session(lab, 16, restart_fw1)
    assert result[0] == "SENT" and int(result[1]) > 50 << 20, result
    assert invalid_drops(lab, "fw1") == before
    log = (lab.node_dir("fw1") / "hasync.log").read_text()
    assert "(TCP ones made liberal)" in log


def switchover_to_peer(lab, fw: str, expected: dict, timeout: float = 20.0) -> None:
    """Ask `fw` to hand over; it refuses until the peer's table is in sync, so ask again."""
    deadline = time.monotonic() + timeout
    while not (reply := nsctl.ask(lab, fw, "switchover")).get("ok"):
        assert time.monotonic() < deadline, reply
        time.sleep(0.2)
    commands.wait_until(lab, lambda s: s == expected, 10)


def test_a_copy_ahead_of_its_kernel_is_not_adopted_at_takeover(synced):
    """The Backup's kernel is flushed behind its sync service's back (`conntrack -F`): its
    copy of the table still lists the entries. At the takeover it must not serve that copy
    (the next Backup would hold ghosts for hours); its first resync dumps instead."""
    lab = synced
    commands.wait_until(lab, lambda s: s == STEADY, 20)
    wait_backup_synced(lab, "fw2")
    for i in range(60):
        run(lab, "fw1", ["conntrack", "-I", "-p", "tcp", "-s", "198.18.0.2", "-d", "198.19.0.2",
                         "--sport", str(21000 + i), "--dport", "8443", "--state", "ESTABLISHED",
                         "-t", "600", "-u", "SEEN_REPLY,ASSURED"])
    assert wait_count(lab, "fw2", 60, "-p", "tcp", "--dport", "8443") == 60
    run(lab, "fw2", ["conntrack", "-F"], check=False)
    dumps = sync_field(lab, "fw2", "dumps")
    switchover_to_peer(lab, "fw1", {"fw1": "BACKUP", "fw2": "MASTER"})
    try:
        wait_backup_synced(lab, "fw1")
        log = (lab.node_dir("fw2") / "hasync.log").read_text()
        assert "the copy is not adopted" in log, role_log(lab)
        assert sync_field(lab, "fw2", "dumps") == dumps + 1, role_log(lab)
        # and the dump is the truth: fw1 no longer holds what fw2's kernel lost
        assert wait_count(lab, "fw1", 0, "-p", "tcp", "--dport", "8443", timeout=15) == 0
    finally:
        switchover_to_peer(lab, "fw2", STEADY)
        run(lab, "fw1", ["conntrack", "-D", "-p", "tcp", "--dport", "8443"], check=False)


@contextmanager
def sync_setting(lab, fw: str, key: str, value):
    """`fw`'s [sync] `key` set to `value` (a reload restarts its sync child, which resyncs);
    put back afterwards."""
    path = Path(lab.configs[fw])
    original = path.read_bytes()
    data = tomllib.loads(original.decode())
    data["sync"][key] = value
    path.write_bytes(tomli_w.dumps(data).encode())
    try:
        reload_sync(lab, fw)
        yield
    finally:
        path.write_bytes(original)
        reload_sync(lab, fw)


def reload_sync(lab, fw: str) -> None:
    """Reload `fw` after a [sync] change: until its new sync child answers and is synced."""
    pid = sync_field(lab, fw, "pid")
    assert nsctl.ask(lab, fw, "reload")["ok"]
    commands.wait_until(lab, lambda _: ((nsctl.try_status(lab, fw) or {}).get("sync") or {})
                        .get("pid", pid) != pid, 10)
    wait_backup_synced(lab, fw)


def test_without_the_backup_copy_a_takeover_dumps_and_still_carries_the_entries(synced):
    """sync.backup_copy = false: the Backup keeps no copy of the Master's table (its memory),
    so the takeover dumps its kernel instead, the held entries still get their timeouts back,
    and the next Backup gets every entry."""
    lab = synced
    commands.wait_until(lab, lambda s: s == STEADY, 20)
    wait_backup_synced(lab, "fw2")
    with sync_setting(lab, "fw2", "backup_copy", False):
        table = sync_field(lab, "fw2", "table")
        assert table["backup_copy"] is False, table
        for i in range(40):
            run(lab, "fw1", ["conntrack", "-I", "-p", "tcp", "-s", "198.18.0.3", "-d", "198.19.0.3",
                             "--sport", str(22000 + i), "--dport", "8444", "--state", "ESTABLISHED",
                             "-t", "600", "-u", "SEEN_REPLY,ASSURED"])
        one_idle_udp_flow(lab)
        assert wait_count(lab, "fw2", 40, "-p", "tcp", "--dport", "8444") == 40
        assert sync_field(lab, "fw2", "table")["entries"] == 0  # replicated, and no copy kept
        dumps = sync_field(lab, "fw2", "dumps")
        switchover_to_peer(lab, "fw1", {"fw1": "BACKUP", "fw2": "MASTER"})
        try:
            wait_backup_synced(lab, "fw1")
            assert sync_field(lab, "fw2", "dumps") == dumps + 1, role_log(lab)
            assert wait_count(lab, "fw1", 40, "-p", "tcp", "--dport", "8444") == 40
            left = idle_flow_released(lab)  # released from the dump, not from a copy
            assert left is not None and left <= 30, left
        finally:
            switchover_to_peer(lab, "fw2", STEADY)
            for flow in (("-p", "tcp", "--dport", "8444"), IDLE_UDP):
                run(lab, "fw1", ["conntrack", "-D", *flow], check=False)
    wait_backup_synced(lab, "fw2")
    assert sync_field(lab, "fw2", "table")["backup_copy"] is True


def bulk_session(lab, seconds: float, during) -> list[str]:
    """One TCP session sending ~10 MB/s client -> server for `seconds`, `during(lab)` meanwhile;
    the sender's report: ["SENT", bytes] or ["ERROR", ...]."""
    sink = start_process(lab, "server", [sys.executable, "-c", BULK_SINK], "bulk-sink")
    time.sleep(0.3)
    sender = start_process(lab, "client", [sys.executable, "-c", BULK_SENDER, str(seconds)], "bulk-sender")
    report = lab.node_dir("client") / "bulk-sender.log"
    report.write_text("")
    try:
        time.sleep(2.0)
        during(lab)
        deadline = time.monotonic() + seconds + 30
        while not report.read_text().strip():
            assert time.monotonic() < deadline, "the bulk sender never finished"
            time.sleep(0.2)
        time.sleep(1.0)  # the sink reads to the end and closes by itself (a kill would reset)
    finally:
        stop_process(sender)
        stop_process(sink)
    return report.read_text().split()


def test_a_bulk_session_survives_two_switchovers(synced):
    """~10 MB/s through two switchovers: the packets in flight at each meet an entry whose
    TCP windows this kernel never saw filled (the Backup's copy), or stale ones (made liberal), some
    of them reordered. The Backup writes its TCP entries BE_LIBERAL, as the kernel does for a
    connection it picks up mid-stream. Without it, in a tmp experiment of the same steps, 2 of
    10 runs lost the session (once after 5 invalid drops, once with none counted: not
    understood); with it, 17 of 17 runs and this test's runs kept it."""
    lab = synced
    commands.wait_until(lab, lambda s: s == STEADY, 20)
    wait_sync_connected(lab)
    before = {fw: invalid_drops(lab, fw) for fw in ("fw1", "fw2")}

    def switchovers(lab):
        switchover_to_peer(lab, "fw1", {"fw1": "BACKUP", "fw2": "MASTER"})
        time.sleep(3.0)
        switchover_to_peer(lab, "fw2", STEADY)

    result = bulk_session(lab, 16, switchovers)
    drops = {fw: invalid_drops(lab, fw) - before[fw] for fw in ("fw1", "fw2")}
    assert result[0] == "SENT" and int(result[1]) > 50 << 20, (result, "invalid drops", drops)


def test_sessions_survive_a_crash_after_a_hand_back(synced):
    """(Last in the module: the 200 sessions it closes leave traffic behind.) Sessions set up
    through fw1; a switchover to fw2, which takes them over from its copy of
    the table, and back to fw1, which dies 0.3 s later, the sync channel cut as above. fw2 does
    not mark the entries liberal again at the hand-back (it wrote them BE_LIBERAL as Backup and
    its kernel did not change them as Master: StateTable.kernel_made_keys), so this shows that
    skipping them is safe: with stale windows and no liberal flag every session would die."""
    lab = synced
    commands.wait_until(lab, lambda s: s == STEADY, 20)
    wait_backup_synced(lab, "fw2")
    run(lab, "fw1", ["conntrack", "-D", "-p", "tcp", "--dport", "7001"], check=False)  # earlier tests'
    assert wait_count(lab, "fw2", 0, "-p", "tcp", "--dport", "7001") == 0
    drops_before = {fw: invalid_drops(lab, fw) for fw in ("fw1", "fw2")}
    log = lab.node_dir("fw2") / "hasync.log"
    log_start = log.stat().st_size

    def over_and_back_then_crash(lab):
        switchover_to_peer(lab, "fw1", {"fw1": "BACKUP", "fw2": "MASTER"})
        wait_backup_synced(lab, "fw1")
        time.sleep(1.0)  # a second of the sessions through fw2: its windows move on
        netem.lossy(lab, "fw2", "lan2", 100)  # the sync channel's segments only
        switchover_to_peer(lab, "fw2", STEADY)
        time.sleep(0.3)

    drops = {}

    def count_drops(lab):  # 3 s after the crash, before the client stops: not its sessions' close
        drops.update({fw: invalid_drops(lab, fw) - drops_before[fw] for fw in ("fw1", "fw2")})

    try:
        report = sessions_through_crash(lab, count=SESSIONS, then=count_drops,
                                        before_crash=over_and_back_then_crash)
        cut = netem.dropped(lab, "fw2", "lan2")
    finally:
        netem.clear(lab, "fw2", "lan2")
    with open(log) as f:
        f.seek(log_start)
        marked = [int(line.split(" TCP entries of ours made liberal")[0].rsplit(" ", 1)[1])
                  for line in f if " TCP entries of ours made liberal" in line]
    print({k: v for k, v in report.items() if k != "sessions"}, "invalid drops", drops,
          "sync segments cut", cut, "fw2 marked liberal", marked)
    assert cut > 0, "the sync channel was not cut: fw2 may have been saved by a resync"
    assert len(marked) == 1 and marked[0] < SESSIONS, marked  # the sessions' entries were skipped
    assert_all_carried_on(lab, report, drops)
