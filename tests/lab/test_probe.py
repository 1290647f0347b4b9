"""Probes: the pure accounting (no network), then the real tools between two namespaces.

The outage is made with an nftables input chain with policy drop in the server's namespace:
this kernel has no sch_netem, and a blackhole is what `netem loss 100%` would give us.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hasync.lab.probe import PROBE, PROBE_MAGIC, EchoTimeline, ProbeReport, _Prober, build_report, WallClock
from hasync.lab.sessions import SessionsReport

REPO = Path(__file__).resolve().parents[2]
MS = 1_000_000


# --------------------------------------------------------------------------- pure: EchoTimeline


def replay(interval_ms: int, count: int, dropped: set[int], rtt_ms: int = 1) -> EchoTimeline:
    """Sends every interval, every echo not dropped arrives rtt later."""
    timeline = EchoTimeline(interval_ms * MS)
    for seq in range(count):
        assert timeline.on_send(seq * interval_ms * MS) == seq
    for seq in range(count):
        if seq not in dropped:
            sent = seq * interval_ms * MS
            assert timeline.on_echo(seq, sent, sent + rtt_ms * MS)
    return timeline


def test_hole_in_the_middle_is_one_outage_with_exact_gap():
    timeline = replay(5, 200, dropped=set(range(50, 110)))
    timeline.finish()
    # last echo before: seq 49, first after: seq 110 -> 61 intervals apart
    assert timeline.max_gap_ns == 61 * 5 * MS
    assert len(timeline.outages) == 1
    outage = timeline.outages[0]
    assert outage.recovered and outage.gap_ms == 305.0 and outage.lost == 60
    assert timeline.received_count == 140


def test_silence_at_the_end_is_an_unrecovered_outage():
    timeline = replay(5, 100, dropped=set(range(60, 100)))
    timeline.finish()
    (outage,) = timeline.outages
    assert not outage.recovered
    assert outage.lost == 40
    # from the last echo (seq 59 + 1 ms rtt) to the last send (seq 99)
    assert timeline.max_gap_ns == (99 * 5 - 59 * 5 - 1) * MS


def test_no_echo_at_all_is_one_unrecovered_outage_over_the_whole_run():
    timeline = replay(5, 50, dropped=set(range(50)))
    timeline.finish()
    (outage,) = timeline.outages
    assert not outage.recovered and outage.lost == 50 and outage.gap_ms == 49 * 5


def test_forged_and_duplicate_echoes():
    timeline = replay(5, 10, dropped=set())
    assert not timeline.on_echo(10, 0, 100 * MS)  # never sent
    assert not timeline.on_echo(3, 3 * 5 * MS + 1, 100 * MS)  # wrong send time
    assert timeline.on_echo(3, 3 * 5 * MS, 100 * MS)  # a duplicate is ours, but counted apart
    assert timeline.duplicates == 1 and timeline.received_count == 10


@settings(max_examples=200, deadline=None)
@given(
    count=st.integers(min_value=1, max_value=300),
    interval_ms=st.integers(min_value=1, max_value=20),
    data=st.data(),
)
def test_gaps_and_losses_match_a_direct_computation(count, interval_ms, data):
    dropped = data.draw(st.sets(st.integers(min_value=0, max_value=count - 1)))
    timeline = replay(interval_ms, count, dropped)
    timeline.finish()
    arrivals = [seq * interval_ms * MS + MS for seq in range(count) if seq not in dropped]
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    threshold = 3 * interval_ms * MS
    recovered = [o for o in timeline.outages if o.recovered]
    assert [o.gap_ms * MS for o in recovered] == [g for g in gaps if g > threshold]
    assert timeline.received_count == count - len(dropped)
    assert sum(o.lost for o in timeline.outages) <= len(dropped)
    assert timeline.max_gap_ns >= max(gaps, default=0)


def test_report_round_trips_through_json():
    timeline = replay(5, 100, dropped=set(range(20, 80)))
    report = build_report(timeline, WallClock(), "192.0.2.20", 7000, 5, 0, 0, 1)
    again = ProbeReport.from_json(report.to_json())
    assert again == report
    assert again.lost == 60 and again.outages[0].gap_ms == 305.0
    assert again.rtt_p50_ms == 1.0


def test_prober_drops_and_counts_garbage_datagrams():
    """Bad input from the network: wrong size, wrong magic, other run's token, unknown seq."""
    prober = _Prober("192.0.2.20", 7000, 5 * MS, ready_file=None)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        ours.setblocking(False)
        prober.current = ours
        sent_at = time.monotonic_ns()
        seq = prober.timeline.on_send(sent_at)
        theirs.send(b"x")
        theirs.send(b"\xff" * PROBE.size)
        theirs.send(PROBE.pack(PROBE_MAGIC, b"nope", seq, sent_at))
        theirs.send(PROBE.pack(PROBE_MAGIC, prober.token, seq + 7, sent_at))
        theirs.send(PROBE.pack(PROBE_MAGIC, prober.token, seq, sent_at))  # the real echo
        prober._drain(ours)
        assert prober.bad_replies == 4
        assert prober.timeline.received_count == 1
    finally:
        ours.close()
        theirs.close()


# --------------------------------------------------------------------------- lab: two namespaces


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, text=True)


@pytest.fixture
def netns_pair():
    """Namespaces a (192.0.2.10) and b (192.0.2.20) joined by one veth; removed even on failure."""
    suffix = secrets.token_hex(3)
    a, b = f"hsx-prb-{suffix}-a", f"hsx-prb-{suffix}-b"
    try:
        sh("ip", "netns", "add", a)
        sh("ip", "netns", "add", b)
        # created directly inside the namespaces: no interface ever appears in the root namespace
        sh("ip", "-n", a, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", b)
        for ns, addr in ((a, "192.0.2.10/24"), (b, "192.0.2.20/24")):
            sh("ip", "-n", ns, "addr", "add", addr, "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        yield a, b
    finally:
        for ns in (a, b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


class Processes:
    """Processes started in namespaces, stopped by PID at the end whatever happens."""

    def __init__(self):
        self.procs: list[subprocess.Popen] = []

    def start(self, ns: str, module: str, *args: str) -> subprocess.Popen:
        env = dict(os.environ, PYTHONPATH=str(REPO))
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-m", module, *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.procs.append(proc)
        return proc

    def stop_all(self):
        for proc in self.procs:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.fixture
def processes():
    started = Processes()
    try:
        yield started
    finally:
        started.stop_all()


def wait_for_file(path: Path, proc: subprocess.Popen, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"process exited early: {proc.communicate()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} not written within {timeout} s")
        time.sleep(0.02)


def finish(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err.decode()


CUT = "add table inet hsx_prb_cut; add chain inet hsx_prb_cut input { type filter hook input priority 0; policy drop; }"


@pytest.mark.lab
def test_udp_prober_reports_a_300ms_blackhole(netns_pair, processes, tmp_path):
    a, b = netns_pair
    server_ready, ready, out = tmp_path / "echo.ready", tmp_path / "probe.ready", tmp_path / "probe.json"
    echo = processes.start(b, "hasync.lab.probe", "echo", "--bind", "0.0.0.0", "--port", "7000",
                           "--ready-file", str(server_ready))
    wait_for_file(server_ready, echo)
    prober = processes.start(a, "hasync.lab.probe", "udp", "--target", "192.0.2.20", "--port", "7000",
                             "--interval-ms", "5", "--duration", "2", "--out", str(out),
                             "--ready-file", str(ready))
    wait_for_file(ready, prober)
    time.sleep(0.5)
    cut_requested = time.time()
    sh("ip", "netns", "exec", b, "nft", CUT)
    cut_done = time.time()
    time.sleep(0.3)
    heal_requested = time.time()
    sh("ip", "netns", "exec", b, "nft", "delete table inet hsx_prb_cut")
    finish(prober)

    report = ProbeReport.from_json(out.read_text())
    assert report.max_gap_ms >= 250
    assert report.recovered
    big = [o for o in report.outages if o.gap_ms >= 250]
    assert len(big) == 1, report.outages
    outage = big[0]
    # the outage is the one we made: it began before the cut took effect and ended after the heal
    assert outage.start_wall <= cut_done
    assert outage.end_wall >= heal_requested
    assert outage.start_wall >= cut_requested - 1.0
    assert outage.lost >= 40  # >= 300 ms at 5 ms, minus slack for a late scheduler
    assert report.lost >= outage.lost
    assert report.received > 100 and report.sent == report.received + report.lost
    assert report.bad_replies == 0 and report.flows == 1
    assert report.rtt_p50_ms is not None and report.rtt_p50_ms <= report.rtt_p99_ms
    json.loads(out.read_text())  # valid JSON on disk

    # SIGTERM ends the echo server cleanly
    os.kill(echo.pid, signal.SIGTERM)
    finish(echo, timeout=5)


@pytest.mark.lab
def test_udp_prober_rotates_flows_and_stops_on_sigterm(netns_pair, processes, tmp_path):
    a, b = netns_pair
    server_ready, ready, out = tmp_path / "echo.ready", tmp_path / "probe.ready", tmp_path / "probe.json"
    echo = processes.start(b, "hasync.lab.probe", "echo", "--port", "7000", "--ready-file", str(server_ready))
    wait_for_file(server_ready, echo)
    prober = processes.start(a, "hasync.lab.probe", "udp", "--target", "192.0.2.20", "--port", "7000",
                             "--interval-ms", "5", "--new-flow-every-ms", "200", "--out", str(out),
                             "--ready-file", str(ready))
    wait_for_file(ready, prober)
    time.sleep(0.8)
    os.kill(prober.pid, signal.SIGTERM)  # no --duration: only the signal ends it
    finish(prober)
    report = ProbeReport.from_json(out.read_text())
    assert report.flows >= 3
    assert report.received > 50 and report.recovered


def start_session_server(processes, ns, tmp_path):
    ready = tmp_path / "server.ready"
    server = processes.start(ns, "hasync.lab.sessions", "server", "--port", "7001", "--ready-file", str(ready))
    wait_for_file(ready, server)
    return server


@pytest.mark.lab
def test_twenty_tcp_sessions_all_ok(netns_pair, processes, tmp_path):
    a, b = netns_pair
    start_session_server(processes, b, tmp_path)
    out, ready = tmp_path / "sessions.json", tmp_path / "client.ready"
    client = processes.start(a, "hasync.lab.sessions", "client", "--target", "192.0.2.20", "--port", "7001",
                             "--count", "20", "--interval-ms", "100", "--duration", "2", "--out", str(out),
                             "--ready-file", str(ready))
    finish(client)
    assert json.loads(ready.read_text())["sessions"] == 20
    report = SessionsReport.from_json(out.read_text())
    assert report.established == 20
    assert report.sessions_ok == 20, report
    assert report.sessions_reset == report.sessions_stalled == report.sessions_failed == 0
    assert report.bad_replies == 0
    assert all(s.ok_exchanges >= 5 for s in report.sessions)
    assert len({s.local_port for s in report.sessions}) == 20


@pytest.mark.lab
def test_killing_the_server_resets_every_session(netns_pair, processes, tmp_path):
    a, b = netns_pair
    server = start_session_server(processes, b, tmp_path)
    out, ready = tmp_path / "sessions.json", tmp_path / "client.ready"
    client = processes.start(a, "hasync.lab.sessions", "client", "--target", "192.0.2.20", "--port", "7001",
                             "--count", "20", "--interval-ms", "100", "--duration", "2.5", "--out", str(out),
                             "--ready-file", str(ready))
    wait_for_file(ready, client)
    time.sleep(0.6)
    os.kill(server.pid, signal.SIGKILL)
    server.wait()
    finish(client)
    report = SessionsReport.from_json(out.read_text())
    assert report.established == 20
    assert report.sessions_reset == 20, [(s.outcome, s.error) for s in report.sessions]
    assert report.sessions_ok == 0
    for session in report.sessions:
        assert session.error in ("ECONNRESET", "EPIPE")
        assert session.ok_exchanges >= 1  # it worked before the kill
        assert session.ended_at_ms is not None and session.ended_at_ms >= 300


@pytest.mark.lab
def test_blackholed_sessions_are_reported_stalled_not_reset(netns_pair, processes, tmp_path):
    """What a failover without state sync looks like to TCP through tcp_loose=0: silence, no reset."""
    a, b = netns_pair
    start_session_server(processes, b, tmp_path)
    out, ready = tmp_path / "sessions.json", tmp_path / "client.ready"
    client = processes.start(a, "hasync.lab.sessions", "client", "--target", "192.0.2.20", "--port", "7001",
                             "--count", "20", "--interval-ms", "100", "--duration", "3.5", "--out", str(out),
                             "--ready-file", str(ready))
    wait_for_file(ready, client)
    time.sleep(0.5)
    sh("ip", "netns", "exec", b, "nft", CUT)
    time.sleep(1.5)
    sh("ip", "netns", "exec", b, "nft", "delete table inet hsx_prb_cut")
    finish(client)
    report = SessionsReport.from_json(out.read_text())
    assert report.sessions_stalled == 20, [(s.outcome, s.max_stall_ms) for s in report.sessions]
    assert report.sessions_reset == report.sessions_ok == 0
    assert report.max_stall_ms >= 1000
    assert all(s.max_stall_ms >= 1000 and s.ok_exchanges >= 1 for s in report.sessions)
