"""TCP session holder for the lab: do N long-lived TCP sessions survive a failover?

    python -m hasync.lab.sessions server --port 7001
    python -m hasync.lab.sessions client --target 203.0.113.10 --port 7001 --count 200 \
        --interval-ms 100 --duration 10 --out FILE.json [--ready-file PATH]

Through the lab firewalls (nf_conntrack_tcp_loose=0) a TCP session whose conntrack entry did not
reach the Backup cannot be picked up mid-stream: its packets are invalid there and dropped, so the
session stalls; a stateful peer that lost it answers with a reset. Each session therefore keeps one
small message in flight: every interval, if the previous echo came back, it sends the next one.
The longest wait for an echo is the session's stall. One thread, one selector.

Each session ends up in exactly one class, checked in this order:
  failed   the connection was never established;
  reset    ECONNRESET/EPIPE (including a reset after the peer's FIN: we keep sending after
           EOF, so a peer whose socket is gone answers with RST and that is counted here);
  closed   the peer sent FIN and no reset followed before the end, or another socket error
           (e.g. EHOSTUNREACH) ended the session;
  stalled  the longest wait for an echo exceeded the stall threshold (default 1000 ms);
  ok       everything else.
"""

from __future__ import annotations

import argparse
import errno
import heapq
import json
import os
import selectors
import socket
import struct
import threading
import time
from dataclasses import asdict, dataclass, field

from hasync.lab.probe import (
    WallClock,
    address_family,
    install_stop_signals,
    write_output,
    write_ready_file,
)

# magic, session index, sequence: 16 bytes; the echo must come back unchanged
MESSAGE = struct.Struct("!4sIQ")
MESSAGE_MAGIC = b"HSXS"
STALL_THRESHOLD_MS = 1000.0
CONNECT_TIMEOUT_S = 5.0
MAX_SERVER_BACKLOG_BYTES = 1 << 20  # per connection: stop reading a peer that does not read its echoes
RESET_ERRNOS = {errno.ECONNRESET, errno.EPIPE}


# --------------------------------------------------------------------------- report


@dataclass
class SessionResult:
    index: int
    local_port: int | None
    outcome: str  # failed | reset | closed | stalled | ok
    ok_exchanges: int
    max_stall_ms: float
    error: str | None = None  # errno name for failed/reset sessions
    ended_at_ms: float | None = None  # since the exchange phase started (reset/closed sessions)


@dataclass
class SessionsReport:
    target: str
    port: int
    count: int
    interval_ms: float
    duration_s: float  # length of the exchange phase
    stall_threshold_ms: float
    established: int
    sessions_ok: int
    sessions_reset: int
    sessions_closed: int
    sessions_stalled: int
    sessions_failed: int
    max_stall_ms: float
    exchanges_ok: int
    bad_replies: int  # echoes that were not ours or out of order: dropped and counted
    started_wall: float
    sessions: list[SessionResult] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict) -> "SessionsReport":
        fields = dict(data)
        fields["sessions"] = [SessionResult(**s) for s in data.get("sessions", [])]
        return cls(**fields)

    @classmethod
    def from_json(cls, text: str) -> "SessionsReport":
        return cls.from_dict(json.loads(text))


# --------------------------------------------------------------------------- one client session


class _Session:
    def __init__(self, index: int, sock: socket.socket):
        self.index = index
        self.sock = sock
        self.local_port: int | None = None
        self.established = False
        self.error: str | None = None  # set once the session is dead
        self.reset = False
        self.peer_closed = False
        self.ended_ns: int | None = None
        self.seq = 0
        self.in_flight_since: int | None = None  # send time of the message awaiting its echo
        self.unsent = b""  # tail of a message the socket did not take at once
        self.inbox = bytearray()
        self.ok_exchanges = 0
        self.max_wait_ns = 0

    @property
    def alive(self) -> bool:
        return self.established and self.error is None

    def die(self, exc: OSError | None, now_ns: int, reason: str | None = None) -> None:
        self.error = reason or errno.errorcode.get(exc.errno, str(exc))
        self.reset = exc is not None and exc.errno in RESET_ERRNOS
        self.ended_ns = now_ns

    def wait_so_far(self, now_ns: int) -> int:
        return now_ns - self.in_flight_since if self.in_flight_since is not None else 0

    def result(self, stall_threshold_ns: int, phase_start_ns: int, end_ns: int) -> SessionResult:
        # a message still unanswered at the end is a stall that has not finished yet
        max_wait = max(self.max_wait_ns, self.wait_so_far(self.ended_ns or end_ns))
        if not self.established:
            outcome = "failed"
        elif self.reset:
            outcome = "reset"
        elif self.peer_closed or self.error is not None:
            outcome = "closed"
        elif max_wait > stall_threshold_ns:
            outcome = "stalled"
        else:
            outcome = "ok"
        ended = (self.ended_ns - phase_start_ns) / 1e6 if self.ended_ns and self.established else None
        return SessionResult(
            self.index, self.local_port, outcome, self.ok_exchanges, max_wait / 1e6, self.error, ended
        )


class _SessionClient:
    def __init__(self, target: str, port: int, count: int):
        self.destination = (target, port)
        self.family = address_family(target)
        self.selector = selectors.DefaultSelector()
        self.sessions = [self._open(i) for i in range(count)]
        self.bad_replies = 0

    def _open(self, index: int) -> _Session:
        sock = socket.socket(self.family, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # one small message, no batching
        session = _Session(index, sock)
        code = sock.connect_ex(self.destination)
        if code not in (0, errno.EINPROGRESS):
            session.error = errno.errorcode.get(code, str(code))
            sock.close()
            return session
        self.selector.register(sock, selectors.EVENT_WRITE, session)
        return session

    def connect_all(self, timeout_s: float, stop_event: threading.Event) -> None:
        """Wait until every connect() finished, failed, or the timeout passed."""
        deadline = time.monotonic() + timeout_s
        pending = sum(1 for s in self.sessions if s.error is None)
        while pending and not stop_event.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            for key, _ in self.selector.select(min(remaining, 0.2)):
                session: _Session = key.data
                code = session.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                pending -= 1
                if code:
                    session.error = errno.errorcode.get(code, str(code))
                    self._forget(session)
                    continue
                session.established = True
                session.local_port = session.sock.getsockname()[1]
                self.selector.modify(session.sock, selectors.EVENT_READ, session)
        for session in self.sessions:
            if not session.established and session.error is None:
                session.error = "ETIMEDOUT"
                self._forget(session)

    def _forget(self, session: _Session) -> None:
        try:
            self.selector.unregister(session.sock)
        except (KeyError, ValueError):
            pass
        session.sock.close()

    def tick(self, session: _Session, now_ns: int) -> None:
        """The session's interval came round: send the next message unless one is still in flight."""
        if not session.alive:
            return
        try:
            if session.unsent:
                session.unsent = session.unsent[session.sock.send(session.unsent) :]
                return
            if session.peer_closed:
                # the echo will never come; this send only makes a vanished peer answer with RST
                session.sock.send(MESSAGE.pack(MESSAGE_MAGIC, session.index, session.seq))
                return
            if session.in_flight_since is not None:
                return
            message = MESSAGE.pack(MESSAGE_MAGIC, session.index, session.seq)
            session.in_flight_since = now_ns
            session.unsent = message[session.sock.send(message) :]
        except BlockingIOError:
            return
        except OSError as exc:
            session.die(exc, now_ns)
            self._forget(session)

    def receive(self, session: _Session, now_ns: int) -> None:
        try:
            data = session.sock.recv(4096)
        except BlockingIOError:
            return
        except OSError as exc:
            session.die(exc, now_ns)
            self._forget(session)
            return
        if not data:
            # FIN: keep the socket for sending, so a peer that is really gone answers with RST
            session.peer_closed = True
            session.ended_ns = now_ns
            self.selector.unregister(session.sock)
            return
        session.inbox += data
        while len(session.inbox) >= MESSAGE.size:
            magic, index, seq = MESSAGE.unpack_from(session.inbox)
            del session.inbox[: MESSAGE.size]
            expected = session.in_flight_since is not None and seq == session.seq
            if magic != MESSAGE_MAGIC or index != session.index or not expected:
                self.bad_replies += 1
                continue
            session.max_wait_ns = max(session.max_wait_ns, now_ns - session.in_flight_since)
            session.in_flight_since = None
            session.ok_exchanges += 1
            session.seq += 1

    def close(self) -> None:
        for session in self.sessions:
            if session.sock.fileno() != -1:
                session.sock.close()
        self.selector.close()


def run_sessions(
    target: str,
    port: int,
    count: int,
    interval_ms: float,
    duration_s: float | None,
    stop_event: threading.Event | None = None,
    *,
    stall_threshold_ms: float = STALL_THRESHOLD_MS,
    connect_timeout_s: float = CONNECT_TIMEOUT_S,
    ready_file: str | None = None,
) -> SessionsReport:
    """Open `count` sessions, exchange on each every interval until duration_s or stop_event."""
    if interval_ms <= 0 or count <= 0:
        raise ValueError("interval_ms and count must be > 0")
    stop_event = stop_event or threading.Event()
    interval_ns = int(interval_ms * 1e6)
    clock = WallClock()
    client = _SessionClient(target, port, count)
    try:
        client.connect_all(connect_timeout_s, stop_event)
        established = sum(s.established for s in client.sessions)
        if ready_file and established == count:
            write_ready_file(ready_file, {"pid": os.getpid(), "sessions": established})
        t0 = time.monotonic_ns()
        end_ns = t0 + int(duration_s * 1e9) if duration_s is not None else None
        # spread the sessions over one interval so 200 messages do not leave in one burst
        schedule = [(t0 + s.index * interval_ns // count, s.index) for s in client.sessions if s.alive]
        heapq.heapify(schedule)
        now = t0
        while not stop_event.is_set() and (end_ns is None or now < end_ns):
            while schedule and schedule[0][0] <= now:
                due, index = heapq.heappop(schedule)
                session = client.sessions[index]
                client.tick(session, now)
                if session.alive:
                    # absolute schedule; a late loop skips slots instead of catching up in a burst
                    behind = (now - due) // interval_ns + 1
                    heapq.heappush(schedule, (due + behind * interval_ns, index))
            wait_ns = (schedule[0][0] - now) if schedule else 200_000_000
            if end_ns is not None:
                wait_ns = min(wait_ns, end_ns - now)
            for key, _ in client.selector.select(max(0, min(wait_ns, 200_000_000)) / 1e9):
                client.receive(key.data, time.monotonic_ns())
            now = time.monotonic_ns()
        end = time.monotonic_ns()
    finally:
        client.close()
    threshold_ns = int(stall_threshold_ms * 1e6)
    results = [s.result(threshold_ns, t0, end) for s in client.sessions]
    outcomes = [r.outcome for r in results]
    return SessionsReport(
        target=target,
        port=port,
        count=count,
        interval_ms=interval_ms,
        duration_s=(end - t0) / 1e9,
        stall_threshold_ms=stall_threshold_ms,
        established=established,
        sessions_ok=outcomes.count("ok"),
        sessions_reset=outcomes.count("reset"),
        sessions_closed=outcomes.count("closed"),
        sessions_stalled=outcomes.count("stalled"),
        sessions_failed=outcomes.count("failed"),
        max_stall_ms=max((r.max_stall_ms for r in results if r.outcome != "failed"), default=0.0),
        exchanges_ok=sum(r.ok_exchanges for r in results),
        bad_replies=client.bad_replies,
        started_wall=clock.epoch_s(t0),
        sessions=results,
    )


# --------------------------------------------------------------------------- echo server


class _EchoConnection:
    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.outbox = bytearray()


def run_session_server(
    bind: str,
    port: int,
    stop_event: threading.Event | None = None,
    ready_file: str | None = None,
) -> int:
    """Accept any number of TCP connections and echo what they send; returns connections accepted."""
    stop_event = stop_event or threading.Event()
    selector = selectors.DefaultSelector()
    listener = socket.socket(address_family(bind), socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((bind, port))
    listener.listen(4096)
    listener.setblocking(False)
    selector.register(listener, selectors.EVENT_READ, None)
    if ready_file:
        write_ready_file(ready_file, {"pid": os.getpid(), "port": listener.getsockname()[1]})
    accepted = 0

    def drop(conn: _EchoConnection) -> None:
        selector.unregister(conn.sock)
        conn.sock.close()

    def flush(conn: _EchoConnection) -> None:
        try:
            sent = conn.sock.send(conn.outbox)
            del conn.outbox[:sent]
        except BlockingIOError:
            pass
        # read only while the peer reads its echoes; write interest only while something waits
        events = selectors.EVENT_WRITE if conn.outbox else 0
        if len(conn.outbox) < MAX_SERVER_BACKLOG_BYTES:
            events |= selectors.EVENT_READ
        selector.modify(conn.sock, events, conn)

    try:
        while not stop_event.is_set():
            for key, mask in selector.select(0.2):
                if key.data is None:
                    while True:
                        try:
                            sock, _ = listener.accept()
                        except (BlockingIOError, ConnectionAbortedError):
                            break
                        sock.setblocking(False)
                        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                        selector.register(sock, selectors.EVENT_READ, _EchoConnection(sock))
                        accepted += 1
                    continue
                conn: _EchoConnection = key.data
                try:
                    if mask & selectors.EVENT_READ:
                        data = conn.sock.recv(65536)
                        if not data:
                            drop(conn)
                            continue
                        conn.outbox += data
                    flush(conn)
                except OSError:
                    drop(conn)  # reset by the client or the path: nothing to echo to any more
    finally:
        for key in list(selector.get_map().values()):
            key.fileobj.close()
        selector.close()
    return accepted


# --------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hasync.lab.sessions", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    server = sub.add_parser("server", help="TCP echo server for many sessions")
    server.add_argument("--bind", default="0.0.0.0")
    server.add_argument("--port", type=int, default=7001)
    server.add_argument("--ready-file", help="written once listening")

    client = sub.add_parser("client", help="hold N TCP sessions and exchange on each")
    client.add_argument("--target", required=True)
    client.add_argument("--port", type=int, default=7001)
    client.add_argument("--count", type=int, default=200)
    client.add_argument("--interval-ms", type=float, default=100.0)
    client.add_argument("--duration", type=float, default=None, help="seconds (default: until SIGTERM)")
    client.add_argument("--stall-ms", type=float, default=STALL_THRESHOLD_MS)
    client.add_argument("--connect-timeout", type=float, default=CONNECT_TIMEOUT_S)
    client.add_argument("--out", help="JSON report path (default: stdout)")
    client.add_argument("--ready-file", help="written once every session is established")
    args = parser.parse_args(argv)

    stop_event = threading.Event()
    install_stop_signals(stop_event)
    if args.command == "server":
        run_session_server(args.bind, args.port, stop_event, args.ready_file)
        return 0
    report = run_sessions(
        args.target,
        args.port,
        args.count,
        args.interval_ms,
        args.duration,
        stop_event,
        stall_threshold_ms=args.stall_ms,
        connect_timeout_s=args.connect_timeout,
        ready_file=args.ready_file,
    )
    write_output(report.to_json(), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
