"""sd_notify against a fake NOTIFY_SOCKET, the watchdog rate limit, and the daemon's systemd bridge."""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import given, strategies as st

from hasync import sdnotify
from hasync.daemon import SystemdBridge
from hasync.metrics import TransitionCounter
from hasync.sdnotify import Notifier, watchdog_interval


class FakeSystemd:
    """A unix datagram socket standing in for systemd's notify socket."""

    def __init__(self, address: str | bytes):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(2.0)

    def messages(self) -> list[dict[str, str]]:
        """Every datagram waiting, each as its KEY=VALUE fields."""
        out = []
        self.sock.setblocking(False)
        try:
            while True:
                data = self.sock.recv(4096)
                out.append(dict(line.split("=", 1) for line in data.decode().split("\n")))
        except BlockingIOError:
            pass
        finally:
            self.sock.settimeout(2.0)
        return out

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(params=["abstract", "path"])
def systemd(request, tmp_path: Path):
    if request.param == "abstract":
        name = f"@hsx-ops-notify-{uuid.uuid4().hex[:12]}"
        fake = FakeSystemd(b"\0" + name[1:].encode())
    else:
        name = str(tmp_path / "notify.sock")
        fake = FakeSystemd(name)
    try:
        yield name, fake
    finally:
        fake.close()


def test_ready_status_stopping_reach_the_socket(systemd):
    name, fake = systemd
    env = {"NOTIFY_SOCKET": name}
    n = Notifier.from_environ(env)
    try:
        assert n.enabled
        assert n.ready("MASTER (elected)")
        assert n.status("BACKUP\n(peer fw2 is Master)")  # a newline must not split the field
        assert n.reloading()
        assert n.stopping("bye")
        got = fake.messages()
    finally:
        n.close()
    assert got == [
        {"READY": "1", "STATUS": "MASTER (elected)"},
        {"STATUS": "BACKUP (peer fw2 is Master)"},
        {"RELOADING": "1"},
        {"STOPPING": "1", "STATUS": "bye"},
    ]
    assert n.sent == 4 and n.errors == 0


def test_from_environ_unsets_the_variables_for_children(systemd):
    name, _fake = systemd
    env = {"NOTIFY_SOCKET": name, "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid()), "PATH": "/bin"}
    n = Notifier.from_environ(env)
    assert env == {"PATH": "/bin"}
    assert n.interval == 1.0
    kept = {"NOTIFY_SOCKET": name}
    Notifier.from_environ(kept, unset=False)
    assert kept == {"NOTIFY_SOCKET": name}


def test_watchdog_pings_at_most_once_per_half_period(systemd):
    name, fake = systemd
    n = Notifier(sdnotify.socket_address(name), interval=1.0)
    try:
        sent = [n.watchdog_ping(t) for t in (100.0, 100.2, 100.99, 101.0, 101.5, 102.01, 102.02)]
        got = fake.messages()
    finally:
        n.close()
    assert sent == [True, False, False, True, False, True, False]
    assert got == [{"WATCHDOG": "1"}] * 3


def test_nothing_is_sent_outside_systemd():
    n = Notifier.from_environ({})
    assert not n.enabled
    assert n.interval is None
    assert n.ready("x") is False
    assert n.watchdog_ping(0.0) is False and n.watchdog_ping(1e9) is False
    assert n.sent == 0 and n._sock is None  # no socket was even created


def test_watchdog_without_notify_socket_stays_off():
    n = Notifier.from_environ({"WATCHDOG_USEC": "1000000"})
    assert n.watchdog_ping(10.0) is False


def test_a_vanished_systemd_is_counted_not_raised(tmp_path: Path):
    n = Notifier(str(tmp_path / "gone.sock"), interval=0.5)
    try:
        assert n.ready() is False
        assert n.watchdog_ping(1.0) is False
        assert n.errors == 2
    finally:
        n.close()


@pytest.mark.parametrize("env, expected", [
    ({}, None),
    ({"WATCHDOG_USEC": "3000000"}, 1.5),
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "-5"}, None),
    ({"WATCHDOG_USEC": "abc"}, None),
    ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}, None),  # meant for another process
    ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "x"}, None),
])
def test_watchdog_interval(env, expected):
    assert watchdog_interval(env, pid=4242) == expected


def test_watchdog_interval_for_our_pid():
    assert watchdog_interval({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": "4242"}, pid=4242) == 0.25


@given(st.text())
def test_socket_address_never_raises(value):
    address = sdnotify.socket_address(value)
    assert address is None or address == value or address == b"\0" + value[1:].encode()


# ---- the daemon's bridge: READY once the node left INIT, transitions counted -----------------

class RecordingNotifier:
    def __init__(self):
        self.calls: list[tuple[str, str]] = []

    def ready(self, status: str = "") -> bool:
        self.calls.append(("ready", status))
        return True

    def status(self, text: str) -> bool:
        self.calls.append(("status", text))
        return True


def T(old, new, cause):
    return SimpleNamespace(old=old, new=new, cause=cause)


def test_bridge_sends_ready_on_leaving_init_and_counts_every_transition():
    notifier, counter, forwarded = RecordingNotifier(), TransitionCounter(), []
    bridge = SystemdBridge(notifier, counter, forwarded.append)
    bridge.on_transition(T("DISABLED", "INIT", "enabled by operator"))
    assert notifier.calls == []  # still joining
    bridge.on_transition(T("INIT", "BACKUP", "peer fw2 is Master"))
    bridge.on_transition(T("BACKUP", "MASTER", "peer fw2 resigned"))
    bridge.on_transition(T("MASTER", "BACKUP", "peer fw2 is Master"))
    assert notifier.calls == [("ready", "BACKUP (peer fw2 is Master)"),
                              ("status", "MASTER (peer fw2 resigned)"),
                              ("status", "BACKUP (peer fw2 is Master)")]
    assert counter.as_dict() == {"INIT": {"enabled by operator": 1},
                                 "BACKUP": {"peer fw2 is Master": 2},
                                 "MASTER": {"peer fw2 resigned": 1}}
    assert [t.new for t in forwarded] == ["INIT", "BACKUP", "MASTER", "BACKUP"]  # sync still told


def test_bridge_ready_without_a_pair_to_join():
    notifier = RecordingNotifier()
    bridge = SystemdBridge(notifier, TransitionCounter())
    bridge.state_settled("NO GROUP")
    bridge.state_settled("DISABLED", "disabled by operator")
    assert notifier.calls == [("ready", "NO GROUP"), ("status", "DISABLED (disabled by operator)")]


# ---- the daemon under a fake systemd, in a namespace of its own --------------------------------

@pytest.mark.lab
def test_daemon_reports_ready_and_stopping(tmp_path: Path):
    import json
    import signal
    import subprocess
    import sys
    import time
    import urllib.request

    from hasync import config

    if os.geteuid() != 0:
        pytest.skip("needs root for a network namespace")
    ns = f"hsx-ops-{uuid.uuid4().hex[:8]}"
    config.write_key_file(tmp_path / "auth-1.key", config.generate_auth_key())
    doc = {"node": {"hostname": "fw1", "control_socket": f"@{ns}", "state_dir": str(tmp_path),
                    "log_format": "json", "metrics_port": 9609},
           "global": {"status": "enable"},
           "security": {"auth_key_id": 1, "auth_keys": {"1": "auth-1.key"}}, "sync": {"enabled": False}}
    cfg_path = tmp_path / "hasync.toml"
    config.save(config.parse(doc, path=cfg_path), cfg_path)
    fake = FakeSystemd(str(tmp_path / "notify.sock"))
    proc = None
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
        proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "hasync", "--config",
                                 str(cfg_path), "run"], env=env, stderr=subprocess.PIPE, text=True)
        first = fake.sock.recv(4096).decode()  # blocks up to 2 s
        assert dict(line.split("=", 1) for line in first.split("\n")) == {"READY": "1", "STATUS": "NO GROUP"}
        scrape = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c",
                                 "import urllib.request;print(urllib.request.urlopen("
                                 "'http://127.0.0.1:9609/metrics', timeout=5).read().decode())"],
                                capture_output=True, text=True, timeout=30)
        assert scrape.returncode == 0 and "process_resident_memory_bytes" in scrape.stdout, scrape.stderr
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err
        fake.sock.settimeout(2.0)
        assert fake.sock.recv(4096).decode() == "STOPPING=1"
        records = [json.loads(line) for line in err.splitlines() if line.strip()]
        assert any(r["msg"].startswith("hasync fw1 started") and r["host"] == "fw1" for r in records)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        subprocess.run(["ip", "netns", "delete", ns], check=False)
        fake.close()
