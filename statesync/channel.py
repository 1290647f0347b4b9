"""The sync channel: two ZeroMQ sockets on the HA link, CURVE on both, HELLO on top.

Each node binds a PULL socket on its own HA link address (CURVE server: a ZAP
handler admits only the pinned peer key) and connects a PUSH socket to the peer's
(CURVE client: `curve_serverkey` pins the peer's key, so only the real peer can
complete the handshake). Each direction is thus authenticated both ways and
encrypted; frames from the peer arrive on our PULL, ours leave by our PUSH.

Above CURVE, both sides send HELLO (software version, hostname, role, boot id)
until the peer answers HELLO_OK; a peer with another release or our own hostname
is answered REFUSE(reason), which both sides show in status. The channel is
*established* when our PUSH is connected, the peer accepted our HELLO and we
accepted the peer's; each time it becomes established, `take_new_session()`
returns True once (the Backup then asks for a resync).

Liveness: ZMTP heartbeats (PING/PONG) drop a dead TCP connection, which the
socket monitor reports; IMMEDIATE=1 means nothing queues towards a peer that is
not there (the protocol's resend window and resync cover that time).
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass

import zmq
import zmq.auth.thread
from zmq.utils.monitor import recv_monitor_message

from . import wire
from .wire import Frame, Hello, WireError

log = logging.getLogger("hasync.sync.channel")

ZAP_DOMAIN = "hasync-sync"
RECV_BURST = 16  # frames read per call (~16k records): the loop stays responsive to control and events


def check_hello(local: Hello, remote: Hello) -> str | None:
    """Why the peer may not pair with us (the seed's prerequisites), or None."""
    if remote.software_version != local.software_version:
        return (f"software version mismatch: peer {remote.hostname!r} runs {remote.software_version},"
                f" this node runs {local.software_version} (both nodes need the same release)")
    if remote.hostname == local.hostname:
        return f"both nodes are named {local.hostname!r}: the two nodes need different hostnames"
    if remote.boot_id == local.boot_id:
        return "the peer is this node itself (same boot id): check peer_address"
    return None


LIVE_S = 3.0  # see Channel.live


@dataclass
class ChannelCounters:
    frames_in: int = 0
    frames_out: int = 0
    frames_dropped_malformed: int = 0
    frames_before_hello: int = 0  # valid frames from a peer not (yet) accepted
    send_dropped: int = 0  # no connected peer (or its queue full): the protocol recovers
    refusals: int = 0  # ZAP: a CURVE client with a key that is not the pinned one
    handshake_failures: int = 0  # CURVE/ZMTP handshakes that failed (either direction)
    hellos_refused: int = 0  # HELLOs we answered with REFUSE
    refused_by_peer: int = 0  # REFUSEs we received
    sessions: int = 0
    reconnects: int = 0  # fresh connections to a peer that restarted (see Channel._reconnect)


def _endpoint(address: str, port: int) -> str:
    ip = ipaddress.ip_address(address)
    return f"tcp://[{ip}]:{port}" if ip.version == 6 else f"tcp://{ip}:{port}"


class _PinnedKey:
    """ZAP credentials provider: only the pinned peer key passes; refusals are counted."""

    def __init__(self, channel: "Channel", pinned: bytes):
        self.channel = channel
        self.pinned = pinned

    def callback(self, domain: str, key: bytes) -> bool:  # runs in the authenticator thread
        if key == self.pinned:
            return True
        ch = self.channel
        ch.counters.refusals += 1
        ch.last_refusal = (f"refused a CURVE client with key {key.decode(errors='replace')}:"
                           " not the pinned sync.peer_public_key")
        ch.refused_reason = ch.last_refusal
        return False


class Channel:
    def __init__(
        self,
        *,
        local_address: str,
        peer_address: str,
        port: int,
        public_key: bytes,
        secret_key: bytes,
        peer_public_key: bytes,
        hello: Hello,
        context: zmq.Context | None = None,
        heartbeat_ms: int = 1000,
        heartbeat_timeout_ms: int = 15000,  # a lossy link backs TCP off for seconds: not dead
        hello_retry: float = 0.5,
        sndhwm: int = 1000,
    ):
        self.ctx = context or zmq.Context()
        self._own_ctx = context is None
        self.hello = hello
        self.hello_retry = hello_retry
        self.peer_desc = f"{peer_address}:{port}"
        self.counters = ChannelCounters()
        self.last_frame_at = float("-inf")
        self.refused_reason: str | None = None  # why the pair is not established, if refused
        self.last_refusal: str | None = None
        self.peer: Hello | None = None  # the accepted peer HELLO
        self._tx_up = False
        self._hello_ok = False
        self._established = False
        self._new_session = False
        self._next_hello = float("-inf")
        self._owe_hello_ok = False

        self.auth = zmq.auth.thread.ThreadAuthenticator(self.ctx)
        self.auth.start()
        self.auth.configure_curve_callback(ZAP_DOMAIN, _PinnedKey(self, peer_public_key))
        try:
            ipv6 = ipaddress.ip_address(local_address).version == 6
            self.rx = self.ctx.socket(zmq.PULL)
            self.rx.ipv6 = ipv6
            self.rx.linger = 0
            self.rx.maxmsgsize = wire.MAX_FRAME_BYTES  # bigger: libzmq drops the connection
            self.rx.curve_server = True
            self.rx.curve_publickey = public_key
            self.rx.curve_secretkey = secret_key
            self.rx.zap_domain = ZAP_DOMAIN.encode()
            self.rx.heartbeat_ivl = heartbeat_ms
            self.rx.heartbeat_timeout = heartbeat_timeout_ms
            self.rx_monitor = self.rx.get_monitor_socket(
                zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
            self.rx.bind(_endpoint(local_address, port))

            self.tx = self.ctx.socket(zmq.PUSH)
            self.tx.ipv6 = ipv6
            self.tx.linger = 0
            self.tx.immediate = 1
            self.tx.sndhwm = sndhwm
            self.tx.curve_serverkey = peer_public_key
            self.tx.curve_publickey = public_key
            self.tx.curve_secretkey = secret_key
            self.tx.heartbeat_ivl = heartbeat_ms
            self.tx.heartbeat_timeout = heartbeat_timeout_ms
            self.tx.reconnect_ivl = 100
            self.tx.reconnect_ivl_max = 1000
            self.tx_monitor = self.tx.get_monitor_socket(
                zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
                | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
            # "src;dst": leave from the HA link address, never from another interface
            src = f"[{local_address}]" if ipv6 else local_address
            self._tx_endpoint = _endpoint(peer_address, port).replace("tcp://", f"tcp://{src}:0;")
            self.tx.connect(self._tx_endpoint)
        except BaseException:
            self.close()
            raise

    # ---- poll integration

    def sockets(self) -> list[zmq.Socket]:
        """Register these for POLLIN in the caller's zmq.Poller, then call `receive`."""
        return [self.rx, self.rx_monitor, self.tx_monitor]

    @property
    def connected(self) -> bool:
        return self._established

    def live(self, now: float) -> bool:
        """Connected and heard from lately. The peer answers at least every keepalive
        (1 s), so silence for LIVE_S means it is gone, long before the transport's own
        liveness timeout, which is kept long so a lossy link is not torn down."""
        return self._established and now - self.last_frame_at < LIVE_S

    def take_new_session(self) -> bool:
        """True once after each time the channel became established."""
        new, self._new_session = self._new_session, False
        return new

    def set_role(self, role: str) -> None:
        self.hello = Hello(self.hello.software_version, self.hello.hostname, role, self.hello.boot_id)

    # ---- I/O

    def send(self, buf: bytes) -> bool:
        try:
            self.tx.send(buf, zmq.NOBLOCK, copy=len(buf) < 65536)
        except zmq.Again:
            self.counters.send_dropped += 1
            return False
        self.counters.frames_out += 1
        return True

    def send_all(self, bufs) -> int:
        sent = 0
        for buf in bufs:
            if not self.send(buf):
                break  # the rest would fail too; the protocol resends what it must
            sent += 1
        return sent

    def receive(self, now: float) -> list[Frame]:
        """Handle monitor events and handshake frames; return the peer's other frames."""
        self._drain_monitors()
        out: list[Frame] = []
        for _ in range(RECV_BURST):
            try:
                buf = self.rx.recv(zmq.NOBLOCK, copy=True)
            except zmq.Again:
                break
            self.counters.frames_in += 1
            self.last_frame_at = now
            try:
                frame = wire.decode(buf)
            except WireError as exc:
                self.counters.frames_dropped_malformed += 1
                log.debug("dropped a malformed frame: %s", exc)
                continue
            if frame.type in (wire.HELLO, wire.HELLO_OK, wire.REFUSE):
                self._on_handshake(frame)
            elif self.peer is None:
                self.counters.frames_before_hello += 1
            else:
                out.append(frame)
        self.tick(now)
        return out

    def tick(self, now: float) -> None:
        """Repeat our HELLO until the peer answers it; send a HELLO_OK we still owe."""
        if self._owe_hello_ok and self._tx_up and self.peer is not None:
            self._owe_hello_ok = not self.send(wire.encode(Frame(wire.HELLO_OK)))
        if not self._hello_ok and now >= self._next_hello:
            self._next_hello = now + self.hello_retry
            if self._tx_up and not self.send(wire.encode(Frame(wire.HELLO, 0, self.hello))):
                self._next_hello = now + 0.02  # the pipe attaches just after the handshake event

    def next_timer(self) -> float | None:
        return None if self._hello_ok else self._next_hello

    # ---- internals

    def _on_handshake(self, frame: Frame) -> None:
        if frame.type == wire.HELLO:
            remote: Hello = frame.payload
            reason = check_hello(self.hello, remote)
            if reason:
                self.counters.hellos_refused += 1
                self.refused_reason = self.last_refusal = f"refused the peer: {reason}"
                self.peer = None
                self.send(wire.encode(Frame(wire.REFUSE, 0, reason[: wire.MAX_TEXT])))
                self._update_established()
                return
            if self.peer is not None and self.peer.boot_id != remote.boot_id:
                self._established = False  # the peer restarted under us: a new session
                self._reconnect()
            self.peer = remote
            # no connection to the peer yet (just reconnecting): answer once there is one
            self._owe_hello_ok = not self.send(wire.encode(Frame(wire.HELLO_OK)))
        elif frame.type == wire.HELLO_OK:
            self._hello_ok = True
        else:  # REFUSE
            self.counters.refused_by_peer += 1
            self.refused_reason = self.last_refusal = f"the peer refused us: {frame.payload}"
            self._hello_ok = False
        self._update_established()

    def _reconnect(self) -> None:
        """Connect afresh to a restarted peer. Our connection led to its old process, which
        may have died without a word (a crash sends no FIN): our HELLO_OK would go down it
        and be lost until TCP or ZMTP notice, seconds later. libzmq handles the old session's
        end before the new handshake (one I/O thread), so the events come in that order."""
        try:
            self.tx.disconnect(self._tx_endpoint)
        except zmq.ZMQError as exc:  # not connected (any more): connecting is all we need
            log.debug("disconnect before reconnecting: %s", exc)
        self.tx.connect(self._tx_endpoint)
        self.counters.reconnects += 1
        self._tx_up = False
        self._hello_ok = False

    def _update_established(self) -> None:
        now_up = self._tx_up and self._hello_ok and self.peer is not None
        if now_up and not self._established:
            self.counters.sessions += 1
            self._new_session = True
            self.refused_reason = None
            log.info("sync channel established with %s (%s)", self.peer.hostname, self.peer_desc)
        elif not now_up and self._established:
            log.warning("sync channel to %s lost", self.peer_desc)
        self._established = now_up

    def _drain_monitors(self) -> None:
        for mon, outgoing in ((self.tx_monitor, True), (self.rx_monitor, False)):
            while True:
                try:
                    ev = recv_monitor_message(mon, zmq.NOBLOCK)
                except zmq.Again:
                    break
                self._on_monitor(ev["event"], ev["value"], outgoing)

    def _on_monitor(self, event: int, value: int, outgoing: bool) -> None:
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self._tx_up = True
            self._next_hello = float("-inf")
        elif event == zmq.EVENT_DISCONNECTED:
            # only our outgoing connection dropped: the peer's HELLO came in on the other
            # one, which may well still be up, and the peer will not send it again. Keep
            # knowing the peer (a restarted peer shows by its new boot id) and re-HELLO.
            self._tx_up = False
            self._hello_ok = False
        else:
            self.counters.handshake_failures += 1
            if outgoing:
                if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                    why = f"the peer's ZAP refused our key (status {value})"
                else:
                    why = (f"CURVE handshake failed (error {value:#x}): is the peer's key the pinned"
                           " sync.peer_public_key?")
                self.refused_reason = self.last_refusal = f"connecting to {self.peer_desc}: {why}"
            elif event != zmq.EVENT_HANDSHAKE_FAILED_AUTH:  # ZAP refusals are reported by _PinnedKey
                self.last_refusal = f"an incoming connection failed the CURVE handshake (error {value:#x})"
        self._update_established()

    def close(self) -> None:
        for name in ("tx", "rx"):
            sock = getattr(self, name, None)
            if sock is not None:
                try:
                    sock.disable_monitor()
                except zmq.ZMQError:
                    pass
                sock.close(linger=0)
        for name in ("tx_monitor", "rx_monitor"):
            mon = getattr(self, name, None)
            if mon is not None:
                mon.close(linger=0)
        self.auth.stop()
        if self._own_ctx:
            self.ctx.term()
