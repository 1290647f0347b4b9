"""The failover core end to end: both daemons as processes in the lab, the real kernel.

One lab is shared by the whole module (building it costs seconds); every test
starts from, and returns to, the steady state fw1 Master / fw2 Backup.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from failover import advert as wire
from hasync.lab import commands, faults, nsctl
from hasync.lab.inspect import holder_of_floating_ips
from hasync.lab.process import run, start_process, stop_process
from hasync.lab.topology import teardown

pytestmark = pytest.mark.lab

SERVER = "203.0.113.10"
STEADY = {"fw1": "MASTER", "fw2": "BACKUP"}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("lab tests need root")
    hook_dir = tmp_path_factory.mktemp("hooks")
    hook = hook_dir / "notify.sh"
    hook.write_text(textwrap.dedent("""\
        #!/bin/sh
        echo "$HASYNC_OLD_STATE $HASYNC_STATE $HASYNC_GROUP $HASYNC_CAUSE" >> "$0.$HASYNC_NODE.log"
        """))
    hook.chmod(hook.stat().st_mode | stat.S_IEXEC)
    tag = f"f{secrets.token_hex(2)}"
    lab = commands.up(f"t-failover-{tag}", tag=tag, owner_pid=os.getpid(),
                      fw1={"node": {"notify": [f"env HASYNC_NODE=fw1 {hook}"]}},
                      fw2={"node": {"notify": [f"env HASYNC_NODE=fw2 {hook}"]}})
    ready = Path(lab.workdir) / "sessions.ready"
    server = start_process(lab, "server", [sys.executable, "-m", "hasync.lab.sessions", "server",
                                           "--port", "7001", "--ready-file", str(ready)],
                           "sessions-server")
    lab.pids["sessions-server"] = server
    lab.save()
    commands._wait_file(ready, 10)
    lab.hook = hook  # type: ignore[attr-defined]
    try:
        yield lab
    finally:
        teardown(lab)


@pytest.fixture
def steady(pair):
    """Start in the steady state; put it back afterwards whatever the test did."""
    _restore_all(pair)
    yield pair
    _restore_all(pair)


def _restore_all(lab) -> None:
    for fw in ("fw1", "fw2"):
        if lab.faults.get(fw):
            faults.restore(lab, fw)
        if not lab.pids.get(fw):
            lab.pids[fw] = commands.start_hasync(lab, fw)
            lab.save()
    for fw in ("fw1", "fw2"):
        s = nsctl.try_status(lab, fw)
        if s and not s.get("enabled"):
            nsctl.ask(lab, fw, "enable")
    if commands.states(lab) == {"fw1": "BACKUP", "fw2": "MASTER"}:
        # a test that failed after a switchover: fw1 yielded and will not preempt by itself
        time.sleep(0.5)  # unless a preemption is on its way
        if commands.states(lab) == {"fw1": "BACKUP", "fw2": "MASTER"}:
            nsctl.ask(lab, "fw1", "switchover")
    wait_states(lab, STEADY, 20)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # links may still be gaining carrier after a build
        if all((nsctl.try_status(lab, fw) or {}).get("icon") == "green" for fw in ("fw1", "fw2")):
            return
        time.sleep(0.05)
    raise AssertionError(f"not green: {[status(lab, fw)['reasons'] for fw in ('fw1', 'fw2')]}")


def wait_states(lab, expected: dict, timeout: float = 10.0) -> dict:
    return commands.wait_until(lab, lambda s: all(s[k] == v for k, v in expected.items()), timeout)


def status(lab, fw: str) -> dict:
    s = nsctl.ask(lab, fw, "status")
    assert s["ok"], s
    return s


def tcp_roundtrip(lab) -> bool:
    """A fresh TCP connection from the client to the server through the firewall pair."""
    code = (f"import socket; s=socket.create_connection(('{SERVER}',7001),timeout=3);"
            "s.sendall(b'ping'); assert s.recv(16)==b'ping'")
    done = run(lab, "client", [sys.executable, "-c", code], check=False)
    if done.returncode != 0:
        print(done.stderr)
    return done.returncode == 0


def conntrack_has_snat(lab, fw: str) -> bool:
    out = run(lab, fw, ["conntrack", "-L", "-p", "tcp", "--dport", "7001"], check=False).stdout
    return "dst=203.0.113.1 " in out


# ---- tests ---------------------------------------------------------------------------


def test_initial_election_and_status(steady):
    lab = steady
    assert holder_of_floating_ips(lab) == {"192.0.2.1/24": ["fw1"], "203.0.113.1/24": ["fw1"]}
    s1, s2 = status(lab, "fw1"), status(lab, "fw2")
    assert (s1["icon"], s1["role"]) == ("green", "Master")
    assert (s2["icon"], s2["role"]) == ("green", "Backup")
    assert s1["reasons"] == [] and s2["reasons"] == []
    assert s2["peer"]["hostname"] == "fw1" and set(s2["peer"]["paths_alive"]) == {"lan1", "lan2", "wan1"}
    assert tcp_roundtrip(lab)
    assert conntrack_has_snat(lab, "fw1")
    # the operator's way in: the CLI inside the node's namespace
    out = subprocess.run(["ip", "netns", "exec", lab.ns("fw1"), sys.executable, "-m", "hasync",
                          "status", "--json"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert '"role": "Master"' in out.stdout


def test_master_crash_backup_takes_over(steady):
    lab = steady
    faults.fail(lab, "fw1", "crash")
    wait_states(lab, {"fw2": "MASTER"})
    assert holder_of_floating_ips(lab) == {"192.0.2.1/24": ["fw2"], "203.0.113.1/24": ["fw2"]}
    assert tcp_roundtrip(lab)
    assert conntrack_has_snat(lab, "fw2")
    s2 = status(lab, "fw2")
    assert s2["icon"] == "red" and s2["role"] == "Master"
    assert any("peer lost" in r for r in s2["reasons"])
    assert s2["last_transition"]["cause"] == "peer lost"
    # the restored node comes back, and the preferred Master preempts
    faults.restore(lab, "fw1")
    wait_states(lab, STEADY, 15)
    assert holder_of_floating_ips(lab) == {"192.0.2.1/24": ["fw1"], "203.0.113.1/24": ["fw1"]}


@pytest.mark.parametrize("link", ["wan1", "lan1"])
def test_monitored_link_down_demotes_master_and_back(steady, link):
    lab = steady
    faults.fail(lab, "fw1", link)
    wait_states(lab, {"fw1": "FAULT", "fw2": "MASTER"})
    s1 = status(lab, "fw1")
    assert s1["icon"] == "red" and s1["role"] == "Backup"
    assert any(link in r for r in s1["reasons"])
    assert status(lab, "fw2")["last_transition"]["cause"] == "peer fw1 is FAULT"
    faults.restore(lab, "fw1")
    wait_states(lab, STEADY)


def test_ha_link_cut_alone_keeps_exactly_one_master(steady):
    lab = steady
    faults.fail(lab, "fw1", "halink")
    time.sleep(1.0)  # 65 dead intervals
    assert commands.states(lab) == STEADY, commands.heartbeat_report(lab)
    assert holder_of_floating_ips(lab) == {"192.0.2.1/24": ["fw1"], "203.0.113.1/24": ["fw1"]}
    # exactly one node answers for the LAN floating IP: the client's ARP sees fw1's MAC
    run(lab, "client", ["ip", "neigh", "flush", "dev", "eth0"])
    run(lab, "client", [sys.executable, "-c", "import socket,time; s=socket.socket(2,2); "
                        "s.sendto(b'x',('192.0.2.1',9)); time.sleep(0.2)"])
    neigh = run(lab, "client", ["ip", "neigh", "show", "192.0.2.1"]).stdout
    fw1_mac = run(lab, "fw1", ["cat", "/sys/class/net/lan1/address"]).stdout.strip()
    assert fw1_mac in neigh
    reasons = status(lab, "fw2")["reasons"]
    assert any("HA link lan2 is down" in r for r in reasons)
    assert any("no heartbeats from the peer on lan2" in r for r in reasons)
    faults.restore(lab, "fw1")


def _advert_sender(kind: str) -> str:
    """Code run in the client namespace: send forged adverts, or replay a captured one."""
    return textwrap.dedent(f"""
        import socket, sys, time
        sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})
        from failover import advert as wire
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if {kind!r} == "replay":
            s.bind(("0.0.0.0", 7609))
            s.settimeout(2)
            while True:   # a real advert of the Master's, broadcast on the LAN
                data, _ = s.recvfrom(2048)
                if b"\x03fw1" in data:
                    break
            payloads = [data]
        else:
            adv = wire.Advert(group=1, state="MASTER", priority=255, hostname="fw1", version="0.1.0",
                              counter=time.time_ns() * 2, path=2, flags=0)
            payloads = [wire.encode(adv, 1, b"not the pair's key......1234567")]
        for _ in range(200):
            for p in payloads:
                s.sendto(p, ("192.0.2.255", 7609))
                s.sendto(p, ("192.0.2.3", 7609))
            time.sleep(0.001)
    """)


@pytest.mark.parametrize("kind,counter", [("forge", "forged"), ("replay", "replayed")])
def test_forged_or_replayed_advert_from_the_lan_changes_nothing(steady, kind, counter):
    lab = steady
    before = status(lab, "fw2")["heartbeats"]["dropped"].get(counter, 0)
    history = status(lab, "fw2")["last_transition"]
    run(lab, "client", [sys.executable, "-c", _advert_sender(kind)])
    s2 = status(lab, "fw2")
    assert s2["heartbeats"]["dropped"].get(counter, 0) >= before + 200
    assert s2["last_transition"] == history, commands.heartbeat_report(lab)
    assert commands.states(lab) == STEADY, commands.heartbeat_report(lab)


def test_preemption_off_then_on(steady):
    lab = steady
    reply = nsctl.ask(lab, "fw1", "group_edit", fields={"preempt": "off"})
    assert reply["ok"], reply
    try:
        faults.fail(lab, "fw1", "wan1")
        wait_states(lab, {"fw1": "FAULT", "fw2": "MASTER"})
        faults.restore(lab, "fw1")
        wait_states(lab, {"fw1": "BACKUP", "fw2": "MASTER"})
        time.sleep(0.5)
        # no preemption
        assert commands.states(lab) == {"fw1": "BACKUP", "fw2": "MASTER"}, commands.heartbeat_report(lab)
    finally:
        reply = nsctl.ask(lab, "fw1", "group_edit", fields={"preempt": "on"})
    assert reply["ok"], reply
    wait_states(lab, STEADY)  # preemption back on: the higher priority takes its role back


def test_switchover_both_ways_without_flapping(steady):
    lab = steady
    reply = nsctl.ask(lab, "fw1", "switchover")
    assert reply["ok"], reply
    wait_states(lab, {"fw1": "BACKUP", "fw2": "MASTER"})
    time.sleep(0.5)
    # fw1 yielded: no preemption
    assert commands.states(lab) == {"fw1": "BACKUP", "fw2": "MASTER"}, commands.heartbeat_report(lab)
    assert holder_of_floating_ips(lab) == {"192.0.2.1/24": ["fw2"], "203.0.113.1/24": ["fw2"]}
    assert tcp_roundtrip(lab)
    reply = nsctl.ask(lab, "fw1", "switchover")  # asked from the Backup side this time
    assert reply["ok"], reply
    wait_states(lab, STEADY)


def test_a_switchover_stands_when_the_new_master_stalls_for_a_moment(steady):
    """The new Master stops running for longer than the dead time (SIGSTOP; seen in CI as a
    40 ms gap right after a switchover): the old one takes over, and once both are heard
    as Master the operator's switchover stands, not the priorities."""
    lab = steady
    assert nsctl.ask(lab, "fw1", "switchover")["ok"]
    wait_states(lab, {"fw1": "BACKUP", "fw2": "MASTER"})
    pid = lab.pids["fw2"]
    os.kill(pid, signal.SIGSTOP)  # the daemon alone: its hook runner threads stop with it
    try:
        deadline = time.monotonic() + 5
        while (nsctl.try_status(lab, "fw1") or {}).get("state") != "MASTER":
            assert time.monotonic() < deadline, "fw1 never noticed the silence"
            time.sleep(0.01)
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_states(lab, {"fw1": "BACKUP", "fw2": "MASTER"})
    time.sleep(0.5)
    assert commands.states(lab) == {"fw1": "BACKUP", "fw2": "MASTER"}, commands.heartbeat_report(lab)
    assert holder_of_floating_ips(lab) == {"192.0.2.1/24": ["fw2"], "203.0.113.1/24": ["fw2"]}
    # the stalled node says why in its log, and a failed lab wait or test shows those lines
    report = commands.heartbeat_report(lab)
    assert "the heartbeat loop woke late" in report and "no heartbeat sent for" in report, report
    assert "BACKUP -> MASTER (peer lost)" in report and "last heard from the peer" in report, report
    assert nsctl.ask(lab, "fw1", "switchover")["ok"]  # asked from the Backup: back to steady
    wait_states(lab, STEADY)


def test_switchover_refused_when_peer_cannot_take_over(steady):
    lab = steady
    faults.fail(lab, "fw2", "wan1")
    wait_states(lab, {"fw2": "FAULT"})
    reply = nsctl.ask(lab, "fw1", "switchover")
    assert not reply["ok"] and "peer" in reply["error"]
    assert commands.states(lab)["fw1"] == "MASTER"


def test_disable_releases_floating_ips_and_enable_returns(steady):
    lab = steady
    assert nsctl.ask(lab, "fw1", "disable")["ok"]
    wait_states(lab, {"fw1": "DISABLED", "fw2": "MASTER"})
    s1 = status(lab, "fw1")
    assert (s1["icon"], s1["role"]) == ("grey", "")
    assert holder_of_floating_ips(lab) == {"192.0.2.1/24": ["fw2"], "203.0.113.1/24": ["fw2"]}
    assert any("DISABLED" in r for r in status(lab, "fw2")["reasons"])
    assert 'status = "disable"' in Path(lab.configs["fw1"]).read_text()  # persisted
    assert nsctl.ask(lab, "fw1", "enable")["ok"]
    wait_states(lab, STEADY)


def test_graceful_stop_hands_over_and_releases(steady):
    lab = steady
    pid = lab.pids.pop("fw1")
    lab.save()
    os.kill(pid, signal.SIGTERM)
    wait_states(lab, {"fw2": "MASTER"})
    assert not stop_process(pid, timeout=5)  # it exited by itself: no SIGKILL needed
    assert "resigned" in status(lab, "fw2")["last_transition"]["cause"]
    assert holder_of_floating_ips(lab) == {"192.0.2.1/24": ["fw2"], "203.0.113.1/24": ["fw2"]}
    assert any("stopped" in r for r in status(lab, "fw2")["reasons"])


def _cli(lab, fw: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", lab.ns(fw), sys.executable, "-m", "hasync", *args],
                          capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("args,field,words", [
    (["--monitor", "lan2=198.51.100.5/30"], "monitor", "HA link"),
    (["--monitor", "wan1=198.18.0.1/24"], "floating_ip", "subnet"),
    (["--peer-address", "198.51.100.9"], "peer_address", "outside"),
    (["--monitor", "wan1=203.0.113.1/24", "--monitor", "wan1=203.0.113.5/24"], "interface", "duplicate"),
    (["--monitor", "wan1=203.0.113.1/24", "--monitor", "lan1=203.0.113.1/24"], "floating_ip", ""),
    (["--dead-count", "1"], "dead_count", ""),
])
def test_group_edit_validation_names_the_field_and_changes_nothing(steady, args, field, words):
    lab = steady
    before = Path(lab.configs["fw2"]).read_bytes()
    out = _cli(lab, "fw2", "group", "edit", *args)
    assert out.returncode == 1
    assert field in out.stderr and words in out.stderr, out.stderr
    assert Path(lab.configs["fw2"]).read_bytes() == before
    assert commands.states(lab) == STEADY, commands.heartbeat_report(lab)


def test_group_delete_and_add_through_the_cli(steady):
    lab = steady
    out = _cli(lab, "fw2", "group", "add", "--state", "backup", "--ha-link", "lan2",
               "--peer-address", "198.51.100.1", "--peer-mask", "30",
               "--monitor", "wan1=203.0.113.1/24", "--monitor", "lan1=192.0.2.1/24")
    assert out.returncode == 1 and "one HA group per node" in out.stderr
    out = _cli(lab, "fw2", "group", "delete")
    assert out.returncode == 0, out.stderr
    s2 = status(lab, "fw2")
    assert (s2["icon"], s2["role"], s2["state"]) == ("green", "", "NO GROUP")
    out = _cli(lab, "fw2", "group", "add", "--state", "backup", "--ha-link", "lan2",
               "--peer-address", "198.51.100.1", "--peer-mask", "255.255.255.252",
               "--monitor", "wan1=203.0.113.1/24", "--monitor", "lan1=192.0.2.1/24")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "HA Group Added Successfully"
    wait_states(lab, STEADY)
    # it joined as Backup straight away: never Master, not even for a moment
    assert status(lab, "fw2")["last_transition"]["old"] == "INIT", status(lab, "fw2")["last_transition"]
    shown = _cli(lab, "fw2", "group", "show")
    assert "monitoring interface wan1: floating IP 203.0.113.1/24" in shown.stdout


def test_notify_hooks_ran_in_order(pair):
    lab = pair
    _restore_all(lab)
    log = Path(f"{lab.hook}.fw2.log")
    time.sleep(0.5)  # let hooks of earlier transitions finish
    skip = len(log.read_text().splitlines()) if log.exists() else 0
    assert nsctl.ask(lab, "fw1", "switchover")["ok"]
    wait_states(lab, {"fw1": "BACKUP", "fw2": "MASTER"})
    assert nsctl.ask(lab, "fw2", "switchover")["ok"]
    wait_states(lab, STEADY)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        lines = log.read_text().splitlines()[skip:] if log.exists() else []
        if len(lines) >= 2 and lines[-1].startswith("MASTER BACKUP"):
            break
        time.sleep(0.05)
    states = [line.split()[:2] for line in lines]
    # every line continues where the previous one ended: no hook ran out of order
    for prev, nxt in zip(states, states[1:]):
        assert prev[1] == nxt[0], lines
    assert states == [["BACKUP", "MASTER"], ["MASTER", "BACKUP"]]
    assert lines[-1].split()[2] == "1"  # HASYNC_GROUP


def test_reload_applies_live_without_flapping(steady):
    import tomllib

    import tomli_w

    lab = steady
    path = Path(lab.configs["fw1"])
    original = path.read_bytes()
    before = status(lab, "fw1")["last_transition"]
    try:
        data = tomllib.loads(original.decode())
        data["group"][0]["priority"] = 180
        data["group"][0]["heartbeat_interval_ms"] = 8
        path.write_bytes(tomli_w.dumps(data).encode())
        os.kill(lab.pids["fw1"], signal.SIGHUP)  # what systemd's ExecReload does
        deadline = time.monotonic() + 5
        while status(lab, "fw1")["priority"] != 180 and time.monotonic() < deadline:
            time.sleep(0.05)
        s1 = status(lab, "fw1")
        assert s1["priority"] == 180
        # no flap: still the same Master
        assert s1["last_transition"] == before, commands.heartbeat_report(lab)
        assert holder_of_floating_ips(lab) == {"192.0.2.1/24": ["fw1"], "203.0.113.1/24": ["fw1"]}
        assert status(lab, "fw2")["peer"]["priority"] == 180
        # an invalid file is refused with the reason, and the running config stays
        data["group"][0]["dead_count"] = 0
        path.write_bytes(tomli_w.dumps(data).encode())
        reply = nsctl.ask(lab, "fw1", "reload")
        assert not reply["ok"] and "dead_count" in reply["error"], reply
        assert status(lab, "fw1")["priority"] == 180
    finally:
        path.write_bytes(original)
        assert nsctl.ask(lab, "fw1", "reload")["ok"]
    assert status(lab, "fw1")["priority"] == 150
    assert status(lab, "fw1")["last_transition"] == before, commands.heartbeat_report(lab)
