"""UDP probes for the lab: an echo server and a prober that measures the client-visible outage.

    python -m hasync.lab.probe echo --bind 0.0.0.0 --port 7000
    python -m hasync.lab.probe udp --target 203.0.113.10 --port 7000 --interval-ms 5 --duration 10 \
        [--out FILE.json] [--ready-file PATH] [--new-flow-every-ms 0]

The prober sends one sequence-numbered, timestamped datagram per interval on an absolute schedule
(slot k is due at t0 + k * interval, so waiting never accumulates drift; a slot missed because the
process was descheduled is skipped and counted, never sent as a burst). Between slots it waits in
select() for echoes up to the next deadline rather than spinning: the machine is shared and a busy
loop would itself delay the firewalls under test.

Why one socket by default (`--new-flow-every-ms 0`): one socket keeps one 5-tuple, i.e. one
conntrack flow with one SNAT mapping on the firewall, as a real client's session would. After a
failover *without* state sync the new Master has no entry for that flow: echoes coming back from the
WAN side are new inbound packets to it and are dropped, and the same 5-tuple works again only once
its state was replicated (state sync) or the flow is re-created on the new Master (for UDP by the
client's next datagram, possibly with another SNAT port; for TCP with tcp_loose=0 never, see
sessions.py). `--new-flow-every-ms N` opens a fresh socket (new source port, new flow) every N ms,
so stale per-flow state can matter for at most N ms and the bare path failover is measured. The
previous socket stays open until the next rotation so its echoes in flight still count.

The accounting (`EchoTimeline`) is pure: it takes times as arguments, so it is tested without sockets.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import selectors
import signal
import socket
import struct
import sys
import threading
import time
from array import array
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

# magic, per-run token, sequence, send time (monotonic ns of the prober): 24 bytes
PROBE = struct.Struct("!4s4sQQ")
PROBE_MAGIC = b"HSXP"
OUTAGE_FACTOR = 3  # a silence longer than 3 intervals is an outage, shorter is jitter
DRAIN_NS = 200_000_000  # after the last send, wait this long for echoes still in flight
MAX_DATAGRAM = 2048


# --------------------------------------------------------------------------- shared helpers


def address_family(address: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in address else socket.AF_INET


def write_ready_file(path: str | os.PathLike, payload: dict) -> None:
    """Atomic write (tmp + rename), so a caller polling for the file never reads it half-written."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload) + "\n")
    os.replace(tmp, path)


def write_output(text: str, out: str | None) -> None:
    if out is None:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
        return
    path = Path(out)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text + "\n")
    os.replace(tmp, path)


def install_stop_signals(stop_event: threading.Event) -> None:
    """SIGTERM/SIGINT end the run cleanly: the loops poll the event at least every interval."""

    def handler(signum, frame):
        stop_event.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def percentile(sorted_values: list[int], q: float) -> int | None:
    """Nearest-rank percentile of an ascending list (no interpolation: a real sample)."""
    if not sorted_values:
        return None
    rank = max(1, -(-len(sorted_values) * q // 100))  # ceil(n * q / 100)
    return sorted_values[int(rank) - 1]


class WallClock:
    """Maps monotonic ns to wall-clock time with one anchor, so all times in a report agree."""

    def __init__(self) -> None:
        self.mono0 = time.monotonic_ns()
        self.wall0 = time.time_ns()

    def epoch_s(self, mono_ns: int) -> float:
        return (self.wall0 + (mono_ns - self.mono0)) / 1e9

    def iso(self, mono_ns: int) -> str:
        return datetime.fromtimestamp(self.epoch_s(mono_ns), timezone.utc).isoformat(timespec="milliseconds")


# --------------------------------------------------------------------------- pure accounting


@dataclass
class Outage:
    """A silence between two received echoes (or from the last echo to the end, if never recovered)."""

    start_mono_ns: int  # arrival of the last echo before the silence
    end_mono_ns: int  # arrival of the first echo after it (or the last send, if not recovered)
    gap_ms: float
    recovered: bool
    lost: int = 0  # probes sent inside the silence that never came back
    start_wall: float = 0.0
    end_wall: float = 0.0
    start_iso: str = ""
    end_iso: str = ""


class EchoTimeline:
    """Sans-I/O bookkeeping of sends and echoes; every method takes the time it happened at."""

    def __init__(self, interval_ns: int):
        self.interval_ns = interval_ns
        self.outage_threshold_ns = OUTAGE_FACTOR * interval_ns
        self.send_times = array("q")  # index = sequence number
        self.received = bytearray()  # 1 once the echo of that sequence arrived
        self.received_count = 0
        self.duplicates = 0
        self.rtts_ns: list[int] = []
        self.first_echo_ns: int | None = None
        self.last_echo_ns: int | None = None
        self.max_gap_ns = 0
        self.outages: list[Outage] = []

    @property
    def sent(self) -> int:
        return len(self.send_times)

    def on_send(self, now_ns: int) -> int:
        """Record a probe about to be sent at now_ns; returns its sequence number."""
        self.send_times.append(now_ns)
        self.received.append(0)
        return len(self.send_times) - 1

    def on_echo(self, seq: int, sent_ns: int, now_ns: int) -> bool:
        """An echo arrived. False (ignored) for sequences never sent or with a forged send time."""
        if seq >= len(self.send_times) or self.send_times[seq] != sent_ns:
            return False
        if self.received[seq]:
            self.duplicates += 1
            return True
        self.received[seq] = 1
        self.received_count += 1
        self.rtts_ns.append(now_ns - sent_ns)
        if self.last_echo_ns is None:
            self.first_echo_ns = now_ns
        else:
            gap = now_ns - self.last_echo_ns
            self.max_gap_ns = max(self.max_gap_ns, gap)
            if gap > self.outage_threshold_ns:
                self.outages.append(Outage(self.last_echo_ns, now_ns, gap / 1e6, recovered=True))
        self.last_echo_ns = now_ns
        return True

    def finish(self) -> None:
        """Close the books after the last send: a silence still running is an unrecovered outage."""
        if not self.send_times:
            return
        last_send = self.send_times[-1]
        # silence measured from the last echo, or from the first send when nothing ever came back
        since = self.last_echo_ns if self.last_echo_ns is not None else self.send_times[0]
        silence = last_send - since
        if silence > self.outage_threshold_ns:
            self.outages.append(Outage(since, last_send, silence / 1e6, recovered=False))
            self.max_gap_ns = max(self.max_gap_ns, silence)
        for outage in self.outages:
            outage.lost = self._lost_between(outage.start_mono_ns, outage.end_mono_ns)

    def _lost_between(self, start_ns: int, end_ns: int) -> int:
        return sum(
            1
            for seq, sent_ns in enumerate(self.send_times)
            if start_ns <= sent_ns <= end_ns and not self.received[seq]
        )


# --------------------------------------------------------------------------- report


@dataclass
class ProbeReport:
    target: str
    port: int
    interval_ms: float
    duration_s: float  # how long probes were actually sent
    sent: int
    received: int
    lost: int
    duplicates: int
    bad_replies: int  # datagrams that were not an echo of ours: dropped and counted
    skipped_slots: int  # send slots missed because the process ran late (not sent, not lost)
    flows: int  # sockets (conntrack flows) used
    max_gap_ms: float  # longest time between consecutive received echoes (incl. an unrecovered tail)
    recovered: bool  # False if echoes had stopped when the run ended
    first_echo_ms: float | None  # from the first send to the first echo
    rtt_p50_ms: float | None
    rtt_p99_ms: float | None
    started_wall: float
    outages: list[Outage] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict) -> "ProbeReport":
        fields = dict(data)
        fields["outages"] = [Outage(**o) for o in data.get("outages", [])]
        return cls(**fields)

    @classmethod
    def from_json(cls, text: str) -> "ProbeReport":
        return cls.from_dict(json.loads(text))


def build_report(
    timeline: EchoTimeline,
    clock: WallClock,
    target: str,
    port: int,
    interval_ms: float,
    bad_replies: int,
    skipped_slots: int,
    flows: int,
) -> ProbeReport:
    timeline.finish()
    for outage in timeline.outages:
        outage.start_wall = clock.epoch_s(outage.start_mono_ns)
        outage.end_wall = clock.epoch_s(outage.end_mono_ns)
        outage.start_iso = clock.iso(outage.start_mono_ns)
        outage.end_iso = clock.iso(outage.end_mono_ns)
    rtts = sorted(timeline.rtts_ns)
    p50, p99 = percentile(rtts, 50), percentile(rtts, 99)
    sends = timeline.send_times
    first_echo = (
        (timeline.first_echo_ns - sends[0]) / 1e6 if timeline.first_echo_ns is not None else None
    )
    return ProbeReport(
        target=target,
        port=port,
        interval_ms=interval_ms,
        duration_s=((sends[-1] - sends[0]) / 1e9) if sends else 0.0,
        sent=timeline.sent,
        received=timeline.received_count,
        lost=timeline.sent - timeline.received_count,
        duplicates=timeline.duplicates,
        bad_replies=bad_replies,
        skipped_slots=skipped_slots,
        flows=flows,
        max_gap_ms=timeline.max_gap_ns / 1e6,
        recovered=not any(not o.recovered for o in timeline.outages),
        first_echo_ms=first_echo,
        rtt_p50_ms=p50 / 1e6 if p50 is not None else None,
        rtt_p99_ms=p99 / 1e6 if p99 is not None else None,
        started_wall=clock.epoch_s(sends[0]) if sends else clock.epoch_s(clock.mono0),
        outages=timeline.outages,
    )


# --------------------------------------------------------------------------- prober (I/O)


class _Prober:
    """The socket side of run_prober: sends on schedule, drains echoes into the timeline."""

    def __init__(self, target: str, port: int, interval_ns: int, ready_file: str | None):
        self.destination = (target, port)
        self.family = address_family(target)
        self.token = secrets.token_bytes(4)
        self.timeline = EchoTimeline(interval_ns)
        self.selector = selectors.DefaultSelector()
        self.current: socket.socket | None = None
        self.previous: socket.socket | None = None
        self.flows = 0
        self.bad_replies = 0
        self.ready_file = ready_file
        self.buffer = bytearray(MAX_DATAGRAM)

    def open_flow(self) -> None:
        """A new socket is a new source port, hence a new conntrack flow."""
        if self.previous is not None:
            self.selector.unregister(self.previous)
            self.previous.close()
        self.previous = self.current
        sock = socket.socket(self.family, socket.SOCK_DGRAM)
        sock.setblocking(False)
        # connect() pins the peer: the kernel drops datagrams from anyone else for us
        sock.connect(self.destination)
        self.selector.register(sock, selectors.EVENT_READ)
        self.current = sock
        self.flows += 1

    def send(self, now_ns: int) -> None:
        seq = self.timeline.on_send(now_ns)
        try:
            self.current.send(PROBE.pack(PROBE_MAGIC, self.token, seq, now_ns))
        except (BlockingIOError, ConnectionRefusedError, OSError):
            # ICMP errors (port unreachable, no route) surface here; the probe simply counts as lost
            pass

    def wait_for_echoes(self, until_ns: int) -> None:
        """Receive echoes until the deadline; returns at once if it has already passed."""
        while True:
            timeout = (until_ns - time.monotonic_ns()) / 1e9
            if timeout <= 0:
                self._drain_ready(0)  # still take what is queued, but never block
                return
            self._drain_ready(timeout)

    def _drain_ready(self, timeout: float) -> None:
        for key, _ in self.selector.select(timeout):
            self._drain(key.fileobj)

    def _drain(self, sock: socket.socket) -> None:
        while True:
            try:
                size = sock.recv_into(self.buffer)
            except BlockingIOError:
                return
            except OSError:
                # a queued ICMP error (ECONNREFUSED etc.) is reported once; keep reading
                continue
            now_ns = time.monotonic_ns()
            if size != PROBE.size:
                self.bad_replies += 1
                continue
            magic, token, seq, sent_ns = PROBE.unpack_from(self.buffer)
            if magic != PROBE_MAGIC or token != self.token:
                self.bad_replies += 1
                continue
            first = self.timeline.received_count == 0
            if not self.timeline.on_echo(seq, sent_ns, now_ns):
                self.bad_replies += 1
                continue
            if first and self.ready_file:
                write_ready_file(self.ready_file, {"pid": os.getpid(), "first_echo_seq": seq})

    def close(self) -> None:
        for sock in (self.previous, self.current):
            if sock is not None:
                sock.close()
        self.selector.close()


def run_prober(
    target: str,
    port: int,
    interval_ms: float,
    duration_s: float | None,
    stop_event: threading.Event | None = None,
    *,
    new_flow_every_ms: float = 0,
    ready_file: str | None = None,
) -> ProbeReport:
    """Probe target:port until duration_s has passed (None: forever) or stop_event is set."""
    if interval_ms <= 0:
        raise ValueError("interval_ms must be > 0")
    interval_ns = int(interval_ms * 1e6)
    rotate_ns = int(new_flow_every_ms * 1e6)
    stop_event = stop_event or threading.Event()
    clock = WallClock()
    prober = _Prober(target, port, interval_ns, ready_file)
    skipped = 0
    try:
        prober.open_flow()
        t0 = time.monotonic_ns()
        end_ns = t0 + int(duration_s * 1e9) if duration_s is not None else None
        next_rotation = t0 + rotate_ns
        slot = 0
        while not stop_event.is_set():
            now = time.monotonic_ns()
            if end_ns is not None and now >= end_ns:
                break
            if rotate_ns and now >= next_rotation:
                prober.open_flow()
                next_rotation += rotate_ns
            prober.send(now)
            # next slot on the absolute schedule; slots already past are skipped, not burst
            due_slot = (now - t0) // interval_ns + 1
            skipped += max(0, due_slot - slot - 1)
            slot = due_slot
            prober.wait_for_echoes(t0 + slot * interval_ns)
        prober.wait_for_echoes(time.monotonic_ns() + DRAIN_NS)
    finally:
        prober.close()
    return build_report(
        prober.timeline, clock, target, port, interval_ms, prober.bad_replies, skipped, prober.flows
    )


# --------------------------------------------------------------------------- echo server


def run_echo_server(
    bind: str,
    port: int,
    stop_event: threading.Event | None = None,
    ready_file: str | None = None,
) -> int:
    """Echo every datagram back to its sender until stop_event is set; returns the count echoed."""
    stop_event = stop_event or threading.Event()
    sock = socket.socket(address_family(bind), socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((bind, port))
    sock.settimeout(0.2)  # wake up to notice stop_event
    if ready_file:
        write_ready_file(ready_file, {"pid": os.getpid(), "port": sock.getsockname()[1]})
    buffer = bytearray(65535)
    echoed = 0
    try:
        while not stop_event.is_set():
            try:
                size, peer = sock.recvfrom_into(buffer)
                sock.sendto(memoryview(buffer)[:size], peer)
                echoed += 1
            except TimeoutError:
                continue
            except OSError:
                continue  # e.g. a transient ENOBUFS or an unreachable peer: the prober counts the loss
    finally:
        sock.close()
    return echoed


# --------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hasync.lab.probe", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    echo = sub.add_parser("echo", help="UDP echo server")
    echo.add_argument("--bind", default="0.0.0.0")
    echo.add_argument("--port", type=int, default=7000)
    echo.add_argument("--ready-file", help="written once the socket is bound")

    udp = sub.add_parser("udp", help="UDP prober")
    udp.add_argument("--target", required=True)
    udp.add_argument("--port", type=int, default=7000)
    udp.add_argument("--interval-ms", type=float, default=5.0)
    udp.add_argument("--duration", type=float, default=None, help="seconds (default: until SIGTERM)")
    udp.add_argument("--out", help="JSON report path (default: stdout)")
    udp.add_argument("--ready-file", help="written once the first echo came back")
    udp.add_argument(
        "--new-flow-every-ms",
        type=float,
        default=0,
        help="open a new socket (new conntrack flow) every N ms; 0 keeps one flow (tests state sync)",
    )
    args = parser.parse_args(argv)

    stop_event = threading.Event()
    install_stop_signals(stop_event)
    if args.command == "echo":
        run_echo_server(args.bind, args.port, stop_event, args.ready_file)
        return 0
    report = run_prober(
        args.target,
        args.port,
        args.interval_ms,
        args.duration,
        stop_event,
        new_flow_every_ms=args.new_flow_every_ms,
        ready_file=args.ready_file,
    )
    write_output(report.to_json(), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
