"""The lab topology against the real kernel: NAT path, statefulness, faults, teardown."""

from __future__ import annotations

import json
import os
import secrets
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

import hasync.lab as lab_api
from hasync.lab import firewall, state, topology

pytestmark = pytest.mark.lab

SERVER_PORT = 8080
CLIENT_PORT = 8081
WAIT_S = 10.0  # generous upper bound for readiness; never a timing target


def _tag() -> str:
    return f"x-lab-{secrets.token_hex(2)}"


def _existing_namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def _wait_for(predicate, what: str, timeout: float = WAIT_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def _listener(lab, node: str, address: str, port: int, ready: Path, accepted: Path) -> int:
    """A TCP listener in `node` that reports the peer address it sees, then waits for EOF."""
    script = f"""
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(({address!r}, {port}))
s.listen()
open({str(ready)!r}, "w").close()
while True:
    c, peer = s.accept()
    open({str(accepted)!r}, "a").write(peer[0] + "\\n")
    c.sendall(peer[0].encode() + b"\\n")
    c.recv(1)
    c.close()
"""
    pid = lab_api.start_process(lab, node, [sys.executable, "-c", script], f"listener-{port}")
    _wait_for(ready.exists, f"listener {address}:{port}")
    return pid


def _connect_script(target: str, port: int, timeout: float) -> str:
    # prints what the listener saw as our address, then holds the connection until stdin closes
    return f"""
import socket, sys
try:
    c = socket.create_connection(({target!r}, {port}), timeout={timeout})
except (TimeoutError, socket.timeout):
    print("timeout", flush=True); sys.exit(0)
except ConnectionRefusedError:
    print("refused", flush=True); sys.exit(0)
print("seen-as", c.makefile().readline().strip(), flush=True)
sys.stdin.read()
c.close()
"""


def _conntrack_entries(lab, node: str, port: int) -> list[dict]:
    out = lab_api.run(lab, node, ["conntrack", "-L", "-p", "tcp", "--dport", str(port)]).stdout
    entries = []
    for line in out.splitlines():
        fields = [f.split("=", 1) for f in line.split() if "=" in f]
        srcs = [v for k, v in fields if k == "src"]
        dsts = [v for k, v in fields if k == "dst"]
        if len(srcs) == 2:
            entries.append({"orig": (srcs[0], dsts[0]), "reply": (srcs[1], dsts[1]), "line": line})
    return entries


def _counter_packets(lab, node: str, counter: str) -> int:
    out = lab_api.run(lab, node, ["nft", "-j", "list", "counter", "inet", firewall.TABLE, counter]).stdout
    for item in json.loads(out)["nftables"]:
        if "counter" in item:
            return item["counter"]["packets"]
    raise AssertionError(f"counter {counter} not found")


def _add_floating_ips(lab, fw: str) -> None:
    lab_api.ip_batch([f"address add {lab.floating_ip(i)} dev {i}" for i in ("lan1", "wan1")], netns=lab.ns(fw))


# --------------------------------------------------------------------------- the NAT path


@pytest.fixture(scope="module")
def nat_lab(module_lab_factory, tmp_path_factory):
    lab = module_lab_factory(tag=_tag())
    _add_floating_ips(lab, "fw1")
    work = tmp_path_factory.mktemp("nat")
    lab.pids["server-listener"] = _listener(lab, "server", "203.0.113.10", SERVER_PORT,
                                            work / "server.ready", work / "server.accepted")
    lab.pids["client-listener"] = _listener(lab, "client", "192.0.2.10", CLIENT_PORT,
                                            work / "client.ready", work / "client.accepted")
    lab.save()  # teardown stops the listeners by PID even if a test fails
    return lab, work


def test_namespaces_addresses_and_sysctls(nat_lab):
    lab, _ = nat_lab
    assert set(lab.namespaces.values()) <= _existing_namespaces()
    fw1 = lab_api.addresses_on(lab, "fw1")
    assert "192.0.2.2/24" in fw1["lan1"] and "203.0.113.2/24" in fw1["wan1"]
    assert fw1["lan2"] == {"198.51.100.1/30"}
    assert lab_api.addresses_on(lab, "fw2")["lan2"] == {"198.51.100.2/30"}
    for fw in ("fw1", "fw2"):
        values = lab_api.run(lab, fw, ["sysctl", "-n", "net.ipv4.ip_forward", "net.netfilter.nf_conntrack_tcp_loose",
                                       "net.ipv4.conf.all.arp_ignore", "net.ipv4.conf.all.arp_announce"]).stdout.split()
        assert values == ["1", "0", "1", "2"]
        tables = lab_api.run(lab, fw, ["nft", "list", "tables"]).stdout.split("\n")
        assert [t for t in tables if t] == [f"table inet {firewall.TABLE}"]
    assert lab_api.load(lab.name).namespaces == lab.namespaces


def test_client_reaches_server_through_snat(nat_lab):
    lab, work = nat_lab
    client = subprocess.Popen(lab_api.exec_argv(lab, "client", [sys.executable, "-c",
                                                                _connect_script("203.0.113.10", SERVER_PORT, 5)]),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        reply = client.stdout.readline().split()
        assert reply == ["seen-as", "203.0.113.1"], reply  # the server sees the WAN floating IP
        entries = _conntrack_entries(lab, "fw1", SERVER_PORT)
        assert any(e["orig"] == ("192.0.2.10", "203.0.113.10") and e["reply"] == ("203.0.113.10", "203.0.113.1")
                   for e in entries), entries
        assert _conntrack_entries(lab, "fw2", SERVER_PORT) == []  # nothing went through the backup
    finally:
        client.stdin.close()
        client.wait(timeout=WAIT_S)


def test_connection_from_wan_side_is_dropped(nat_lab):
    lab, work = nat_lab
    # give the server a way back to the LAN, so only the firewall can stop it
    lab_api.run(lab, "server", ["ip", "route", "replace", "192.0.2.0/24", "via", "203.0.113.1"])
    dropped_before = _counter_packets(lab, "fw1", "policy_dropped")
    try:
        result = lab_api.run(lab, "server", [sys.executable, "-c", _connect_script("192.0.2.10", CLIENT_PORT, 1.0)],
                             input="")
    finally:
        lab_api.run(lab, "server", ["ip", "route", "del", "192.0.2.0/24"])
    assert result.stdout.split() == ["timeout"]
    assert _counter_packets(lab, "fw1", "policy_dropped") > dropped_before  # the SYN reached fw1 and died there
    assert not (work / "client.accepted").exists()


# --------------------------------------------------------------------------- faults


def test_link_faults_drop_carrier_and_restore(lab_factory):
    lab = lab_factory(tag=_tag())
    _wait_for(lambda: lab_api.link_state(lab, "fw1", "wan1")["carrier"], "fw1 wan1 carrier")
    for kind, node, ifname in (("wan1", "fw1", "wan1"), ("lan1", "fw1", "lan1"), ("halink", "fw1", "lan2")):
        lab_api.fail(lab, "fw1", kind)
        assert lab_api.load(lab.name).faults == {"fw1": [kind]}
        _wait_for(lambda: not lab_api.link_state(lab, node, ifname)["carrier"], f"{kind}: no carrier")
        assert lab_api.link_state(lab, "fw1", ifname)["admin_up"] == (kind != "halink")
        assert lab_api.restore(lab, "fw1") == []
        assert lab_api.load(lab.name).faults == {}
        _wait_for(lambda: lab_api.link_state(lab, node, ifname)["carrier"], f"{kind}: carrier back")
    lab_api.fail(lab, "fw1", "halink")
    _wait_for(lambda: not lab_api.link_state(lab, "fw2", "lan2")["carrier"], "peer's lan2 loses carrier")
    lab_api.restore(lab, "fw1")
    with pytest.raises(ValueError):
        lab_api.fail(lab, "client", "wan1")
    with pytest.raises(ValueError):
        lab_api.fail(lab, "fw1", "meteor")


def _ha_link_probe(lab) -> str:
    # a closed port on fw1's HA address: "refused" while fw1 is alive, "timeout" once silenced
    return lab_api.run(lab, "fw2", [sys.executable, "-c", _connect_script("198.51.100.1", 9, 0.5)],
                       input="").stdout.strip()


def test_crash_kills_daemon_silences_node_and_restore_reboots_it(lab_factory):
    lab = lab_factory(tag=_tag())
    _add_floating_ips(lab, "fw1")
    lab.pids["fw1"] = lab_api.start_process(lab, "fw1", ["sleep", "600"], "fake-daemon")
    lab.save()
    _wait_for(lambda: lab_api.link_state(lab, "fw2", "lan2")["carrier"], "HA link carrier")
    assert _ha_link_probe(lab) == "refused"
    daemon = lab.pids["fw1"]

    lab_api.fail(lab, "fw1", "crash")
    assert not lab_api.is_running(daemon)
    assert "fw1" not in lab_api.load(lab.name).pids
    assert not lab_api.link_state(lab, "fw1", "lan1")["admin_up"]
    assert not lab_api.link_state(lab, "fw1", "wan1")["admin_up"]
    assert lab_api.link_state(lab, "fw2", "lan2")["carrier"]  # survivor sees a silent peer, not a cut cable
    assert _ha_link_probe(lab) == "timeout"
    assert lab_api.holder_of_floating_ips(lab) == {"192.0.2.1/24": [], "203.0.113.1/24": []}

    assert lab_api.restore(lab, "fw1") == ["fw1"]  # no starter registered for daemon kind "none"
    lab_api.fail(lab, "fw1", "crash")
    started = []

    def start_daemon(lab_, node):
        started.append(node)
        return lab_api.start_process(lab_, node, ["sleep", "600"], "fake-daemon")

    assert lab_api.restore(lab, "fw1", start_daemon=start_daemon) == []
    assert started == ["fw1"]
    assert lab_api.is_running(lab_api.load(lab.name).pids["fw1"])
    fw1 = lab_api.addresses_on(lab, "fw1")
    assert fw1["lan1"] == {"192.0.2.2/24"} and fw1["wan1"] == {"203.0.113.2/24"}  # the reboot forgot the VIPs
    _wait_for(lambda: lab_api.link_state(lab, "fw1", "wan1")["carrier"], "fw1 wan1 back")
    assert _ha_link_probe(lab) == "refused"


# --------------------------------------------------------------------------- teardown


def test_teardown_runs_even_when_the_body_raises():
    name, tag = f"t-{_tag()}", _tag()
    with pytest.raises(RuntimeError, match="boom"):
        with topology.lab_session(name, tag) as lab:
            namespaces = set(lab.namespaces.values())
            assert namespaces <= _existing_namespaces()
            lab.pids["stray"] = lab_api.start_process(lab, "client", ["sleep", "600"], "stray")
            lab.save()
            stray = lab.pids["stray"]
            unrecorded = lab_api.start_process(lab, "server", ["sleep", "600"], "unrecorded")
            raise RuntimeError("boom")
    assert not namespaces & _existing_namespaces()
    assert not lab_api.is_running(stray) and not lab_api.is_running(unrecorded)
    assert name not in lab_api.list_labs()
    assert not Path(lab.workdir).exists()
    topology.teardown(name)  # idempotent: nothing left, nothing raised


def test_failed_build_tears_down_what_it_made(monkeypatch):
    name, tag = f"t-{_tag()}", _tag()
    monkeypatch.setattr(firewall, "ruleset", lambda *_: "this is not nftables\n")
    with pytest.raises(topology.LabBuildError, match="sysctls and rulesets"):
        topology.build(name, tag)
    assert not any(ns.startswith(f"hs{tag}-") for ns in _existing_namespaces())
    assert name not in lab_api.list_labs()
    assert not state.workdir_path(name).exists()


def test_build_refuses_an_existing_lab_and_reaps_orphans(lab_factory):
    lab = lab_factory(tag=_tag())
    with pytest.raises(topology.LabBuildError, match="already exists"):
        topology.build(lab.name, _tag())
    dead = subprocess.Popen(["true"])
    dead.wait()
    orphan = topology.build(f"t-{_tag()}", _tag(), owner_pid=dead.pid)
    reaped = topology.reap_orphans()
    assert orphan.name in reaped and lab.name not in reaped
    assert not set(orphan.namespaces.values()) & _existing_namespaces()
    assert set(lab.namespaces.values()) <= _existing_namespaces()


# --------------------------------------------------------------------------- daemon configs


def test_hasync_configs_load_and_match_the_live_system(lab_factory):
    from hasync import config

    lab = lab_factory(tag=_tag())
    paths = lab_api.write_hasync_configs(lab, heartbeat_interval_ms=10, sync_enabled=True,
                                         fw2={"group": {"priority": 120}})
    assert lab_api.load(lab.name).daemon == "hasync"
    loaded = {}
    for fw, path in paths.items():
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        loaded[fw] = config.load(path, system=config.read_system_view(lab.ns(fw)))
    fw1, fw2 = loaded["fw1"], loaded["fw2"]
    assert (fw1.group.state, fw1.group.priority, fw2.group.state, fw2.group.priority) == \
        ("master", 150, "backup", 120)
    assert str(fw1.group.peer_address) == "198.51.100.2" and str(fw2.group.peer_address) == "198.51.100.1"
    assert fw1.group.peer_mask == 30 and fw1.group.heartbeat_interval_ms == 10 and fw1.group.dead_count == 3
    assert {(m.interface, str(m.floating_ip)) for m in fw1.group.monitors} == \
        {("wan1", "203.0.113.1/24"), ("lan1", "192.0.2.1/24")}
    assert fw1.auth_keys == fw2.auth_keys and len(fw1.auth_keys[1]) == 32
    assert fw1.sync.enabled and fw1.sync.port == 7610 and fw1.control_socket == "@hasync"
    assert fw1.hostname != fw2.hostname
    assert fw1.sync.peer_public_key != fw2.sync.peer_public_key  # each pins the other's key
    assert fw1.sync.replicated_paths == (f"{lab.replicated_dirs['fw1']}/*",)
    with pytest.raises(TypeError, match="no_such_knob"):
        lab_api.write_hasync_configs(lab, no_such_knob=1)


def test_keepalived_pair_holds_and_moves_the_floating_ips(lab_factory):
    lab = lab_factory(tag=_tag())
    paths = lab_api.write_keepalived_configs(lab, advert_int_s=0.05)
    for fw, path in paths.items():
        lab_api.run(lab, fw, ["keepalived", "--config-test", "-f", path])  # raises with keepalived's complaint
    for fw in ("fw1", "fw2"):
        lab_api.start_keepalived(lab, fw)
    fw1_holds = {"192.0.2.1/24": ["fw1"], "203.0.113.1/24": ["fw1"]}
    fw2_holds = {"192.0.2.1/24": ["fw2"], "203.0.113.1/24": ["fw2"]}
    _wait_for(lambda: lab_api.holder_of_floating_ips(lab) == fw1_holds, "fw1 (MASTER) to hold the VIPs")
    lab_api.fail(lab, "fw1", "crash")
    _wait_for(lambda: lab_api.holder_of_floating_ips(lab) == fw2_holds, "fw2 to take the VIPs")
    assert lab_api.restore(lab, "fw1") == []  # keepalived registered its own starter
    _wait_for(lambda: lab_api.holder_of_floating_ips(lab) == fw1_holds, "fw1 to preempt back")
