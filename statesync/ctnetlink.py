"""The ctnetlink socket: events, dumps and batched create/delete against the kernel.

One AF_NETLINK/NETLINK_NETFILTER socket in the network namespace current at
creation time (a netlink socket stays bound to that namespace for life, so
`CtSocket.open_in(netns)` enters a namespace only for the socket() call).

Writes are batched: many requests packed into one buffer and one send() per
~256 KiB. Requests carry no NLM_F_ACK by default: netlink handles a send()
synchronously, so once send() returns every error message is already queued
and a non-blocking drain collects them; success is "sent minus errors".
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import struct
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Iterator

from . import ctbatch, ctmsg, mmsg
from .ctblock import parse_block, parse_slots
from .mmsg import DatagramReader, Truncated
from .ctbuild import CtEntry, encode_entry, encode_tcp_liberal, synthetic_entries  # noqa: F401  (re-exported)
from .ctconst import (  # noqa: F401  (EV_* re-exported)
    CT_DELETE, CT_EVENT_GROUPS, CT_GET, CT_NEW, EV_DESTROY, EV_NEW, EV_UPDATE, EXP_DELETE, EXP_GET,
    NETLINK_NETFILTER, NFNL_SUBSYS_CTNETLINK_EXP,
    NFGEN_HDR, NFGEN_HDR_LEN, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST,
)
from .ctexp import encode_expectation, expectation_key, to_expectation_create_message  # noqa: F401
from .ctcreate import (  # noqa: F401  (re-exported)
    CREATE_EXCL_FLAGS, CREATE_FLAGS, UPDATE_FLAGS, prepare, to_create_message, to_update_message,
)
from .ctmsg import (  # noqa: F401  (re-exported)
    CtEvent, MalformedMessage, decode_entry, key_of, parse_changes, parse_messages_counted, to_delete_message,
    tuple_info,
)
from .filter import fast_key_fields

__all__ = [
    "CtSocket", "Overrun", "ApplyResult", "FramedApply", "CtEvent", "CtEntry", "MalformedMessage", "entered_netns",
    "EV_NEW", "EV_UPDATE", "EV_DESTROY",
    "to_create_message", "to_update_message", "to_delete_message", "tuple_info", "key_of",
    "decode_entry", "encode_entry", "synthetic_entries", "encode_expectation", "expectation_key",
]

SOL_NETLINK = 270
NETLINK_NO_ENOBUFS = 5
NETLINK_CAP_ACK = 10
NETLINK_EXT_ACK = 11
SO_RCVBUFFORCE = 33
SO_SNDBUFFORCE = 32

RECV_SIZE = 1 << 20  # a dump's datagram holds many entries
EVENT_RECV_SIZE = 64 << 10  # an event is one message (< 1 KiB): no 1 MiB buffer per event
SEND_BATCH = 32 << 10
CLONE_NEWNET = 0x40000000


class Overrun(Exception):
    """ENOBUFS on the event socket: events were lost, the caller must resync from a dump."""


@dataclass(slots=True)
class ApplyResult:
    sent: int = 0
    errors: Counter = field(default_factory=Counter)  # errno -> count
    lost_replies: bool = False  # the reply queue overflowed: error counts are a lower bound
    retried: int = 0  # NATed/related entries sent a second time in their other form

    @property
    def failed(self) -> int:
        return sum(self.errors.values())

    @property
    def ok(self) -> int:
        return self.sent - self.failed

    def __iadd__(self, other: "ApplyResult") -> "ApplyResult":
        self.sent += other.sent
        self.errors.update(other.errors)
        self.lost_replies |= other.lost_replies
        return self


@dataclass(slots=True)
class FramedApply:
    """`CtSocket.frame_apply`'s output, for `send_framed`."""

    chunks: list[tuple[bytes, int]]  # (~SEND_BATCH bytes of requests, how many)
    seq0: int  # sequence number of the first request
    entries: list[tuple[int, bytes]]  # what was framed: (family, attrs)
    index: list  # per request (in seq order): the index of its entry in `entries`
    has_other: list  # per request: a NATed/related entry, whose other form a retry may need
    likely_new: bool  # first form was create (retry update on EEXIST), else the reverse
    malformed: int = 0  # entries that did not prepare (counted as EINVAL when sent)
    hold: int = 0  # CTA_TIMEOUT raised to at least this (ctcreate.prepare), retries included

    @property
    def count(self) -> int:
        return len(self.index)


class CtSocket:
    """One ctnetlink socket in the current network namespace."""

    def __init__(self, groups: int = 0, rcvbuf: int = 8 << 20, sndbuf: int = 4 << 20):
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:
            _set_buf(self.sock, socket.SO_RCVBUF, SO_RCVBUFFORCE, rcvbuf)
            # a batch must fit the send buffer (netlink_sendmsg: EMSGSIZE above sk_sndbuf - 32)
            _set_buf(self.sock, socket.SO_SNDBUF, SO_SNDBUFFORCE, max(sndbuf, 2 * SEND_BATCH))
            # errors echo only the header of the failed request, not the whole batch's bytes
            self.sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
            self.sock.bind((0, groups))
        except BaseException:
            self.sock.close()
            raise
        self.groups = groups
        self.portid = self.sock.getsockname()[0]
        self._seq = 1
        self._seq_lock = threading.Lock()
        self.malformed = 0  # messages from the kernel that did not parse (dropped)
        self._reader: DatagramReader | None = None  # made on the first recv_changes

    @classmethod
    def events(cls, rcvbuf: int = 64 << 20) -> "CtSocket":
        """Subscribed to new/update/destroy. NETLINK_NO_ENOBUFS stays off: overruns must surface.

        A queued event costs ~0.6 KiB of receive buffer (skb truesize): 32 MiB held ~50k and
        overran now and then in a 200k burst injected at ~100k/s (a dump and a resync then
        cost seconds); 64 MiB holds ~100k, which a running service has not overrun in the
        bench. Memory is only taken while events wait. (A stopped service still overruns:
        tests/lab/test_sync_stress.py freezes it through 200k.)"""
        return cls(groups=CT_EVENT_GROUPS, rcvbuf=rcvbuf)

    @classmethod
    def open_in(cls, netns: str, *args, events: bool = False, **kw) -> "CtSocket":
        """A socket in the named network namespace (/run/netns/NAME), this thread left where it was."""
        with entered_netns(netns):
            return cls.events(*args, **kw) if events else cls(*args, **kw)

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _next_seq(self, n: int = 1) -> int:
        """Reserve n sequence numbers (a Backup frames in one thread and sends in another)."""
        with self._seq_lock:
            seq = self._seq
            self._seq = (self._seq + n) & 0xFFFFFFFF or 1
        return seq

    # --- events ----------------------------------------------------------------------

    def recv_batch(self, block: bool = True, max_datagrams: int = 4096) -> list[CtEvent]:
        """Every event queued now, as CtEvents (see recv_changes)."""
        return [CtEvent(*c) for c in self.recv_changes(block, max_datagrams)]

    def recv_changes(self, block: bool = True, max_datagrams: int = 4096) -> list[tuple]:
        """Every event queued now (after waiting for the first one if `block`), as
        ctmsg.parse_changes tuples (kind, family, key, attrs, portid).

        Each event is its own netlink datagram, so this drains up to
        `max_datagrams` recv() calls without blocking.
        Raises Overrun on ENOBUFS (events already parsed in this call are lost
        too: the caller resyncs from a dump anyway).
        """
        if DatagramReader.available:
            return self._recv_slots(block, max_datagrams)
        recv = self.sock.recv
        out: list[tuple] = []
        flags = 0 if block else socket.MSG_DONTWAIT
        for _ in range(max_datagrams):
            try:
                buf = recv(EVENT_RECV_SIZE, flags)
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno == errno.ENOBUFS:
                    raise Overrun("conntrack event queue overran (ENOBUFS)") from e
                raise
            changes, bad, _ = parse_changes(buf)
            if bad:
                self.malformed += bad
            out += changes
            flags = socket.MSG_DONTWAIT
        return out

    def _recv_slots(self, block: bool, max_datagrams: int) -> list[tuple]:
        """recv_changes by recvmmsg: SLOTS events per system call, parsed as arrays."""
        if self._reader is None:
            self._reader = DatagramReader(self.fileno())
        out: list[tuple] = []
        got = 0
        while got < max_datagrams:
            try:
                buf, offsets, lengths = self._reader.read(block)
            except Truncated as e:  # an event cut short: the table is no longer mirrored
                raise Overrun(str(e)) from e
            except OSError as e:
                if e.errno == errno.ENOBUFS:
                    raise Overrun("conntrack event queue overran (ENOBUFS)") from e
                raise
            changes, bad, _ = parse_slots(buf, offsets, lengths)
            if bad:
                self.malformed += bad
            out += changes
            got += len(offsets)
            if len(offsets) < self._reader.slots:
                break
            block = False
        return out

    # --- dump ------------------------------------------------------------------------

    def dump(self, family: int = socket.AF_UNSPEC) -> Iterator[CtEvent]:
        """Every entry of the table (kind EV_NEW), streamed as the kernel answers."""
        for c in self.dump_changes(family):
            yield CtEvent(*c)

    def dump_changes(self, family: int = socket.AF_UNSPEC) -> Iterator[tuple]:
        """dump's entries as parse_changes tuples (kind EV_NEW, family, key, attrs, portid)."""
        for changes in self.dump_batches(family):
            yield from changes

    def dump_batches(self, family: int = socket.AF_UNSPEC) -> Iterator[list[tuple]]:
        """dump_changes, a list per datagram the kernel answers with."""
        seq = self._next_seq()
        self.sock.send(ctmsg.request(CT_GET, NLM_F_REQUEST | NLM_F_DUMP, family, seq))
        while True:
            buf = self.sock.recv(RECV_SIZE)
            errors: list = []
            changes, bad, done = parse_block(buf, errors=errors, kind=EV_NEW)
            self.malformed += bad
            if changes:
                yield changes
            for eseq, err in errors:
                if eseq == seq and err:
                    raise OSError(err, f"ctnetlink dump: {os.strerror(err)}")
                if eseq == seq:
                    done = True
            if done:
                return

    # --- expectations ------------------------------------------------------------------

    def dump_expectations(self, family: int = socket.AF_UNSPEC) -> Iterator[CtEvent]:
        """Every expectation (kind EV_NEW; key = CTA_EXPECT_TUPLE [+ zone] bytes)."""
        seq = self._next_seq()
        self.sock.send(ctmsg.request(EXP_GET, NLM_F_REQUEST | NLM_F_DUMP, family, seq))
        while True:
            buf = self.sock.recv(RECV_SIZE)
            errors: list = []
            raw, bad, done = ctmsg.parse_messages_counted(buf, errors=errors, subsys=NFNL_SUBSYS_CTNETLINK_EXP)
            self.malformed += bad
            for ev in raw:
                try:
                    yield CtEvent(EV_NEW, ev.family, expectation_key(ev.attrs), ev.attrs)
                except MalformedMessage:
                    self.malformed += 1
            for eseq, err in errors:
                if eseq == seq and err:
                    raise OSError(err, f"expectation dump: {os.strerror(err)}")
                done = done or eseq == seq
            if done:
                return

    def apply_expectations(self, entries: Iterable[tuple[int, bytes]]) -> ApplyResult:
        """Create-or-refresh expectations captured elsewhere (their masters must exist here)."""
        entries = entries if isinstance(entries, list) else list(entries)
        seq0 = self._next_seq(len(entries) + 1)

        def messages():
            seq = seq0
            for family, attrs in entries:
                yield to_expectation_create_message(family, attrs, seq)
                seq = (seq + 1) & 0xFFFFFFFF

        return self.send_batched(messages())

    def flush_expectations(self, family: int = socket.AF_UNSPEC) -> None:
        self._request_ack(EXP_DELETE, family)

    # --- batched writes ----------------------------------------------------------------

    def apply(self, entries: Iterable[tuple[int, bytes]], likely_new: bool = True) -> ApplyResult:
        """Create-or-update each (family, attrs) captured from another kernel.

        A plain entry is one request (NLM_F_CREATE without NLM_F_EXCL). A NATed or
        related entry has distinct create and update forms (see ctcreate): the
        first pass sends the create form (likely_new, e.g. NEW events and resyncs)
        or the update form (e.g. UPDATE events), and the entries answered EEXIST /
        ENOENT go again in the other form. Errors are counted after the retry.
        """
        return self.send_framed(self.frame_apply(entries, likely_new))

    def frame_apply(self, entries: Iterable[tuple[int, bytes]], likely_new: bool = True,
                    hold: int = 0) -> "FramedApply":
        """The Python half of `apply`: prepare and frame every request, no I/O (a caller may
        frame the next batch in one thread while another thread sends this one). `hold`:
        timeouts raised to at least that many seconds (see ctcreate.prepare).

        Entries of one family and length come in thousands (a burst, a resync): those are
        rewritten as a matrix (ctbatch); the rest, and what the matrix refuses, one by one."""
        entries = entries if isinstance(entries, list) else list(entries)
        seq = self._next_seq(len(entries) + 1)
        framed = FramedApply([], seq, entries, [], [], likely_new, hold=hold)
        one_by_one: list[int] = []
        for family, members in ctbatch.groups(entries, one_by_one):
            out = ctbatch.frame_group(family, [entries[i][1] for i in members], seq, likely_new, hold)
            for data, width, count in out.blocks:
                _cut(data, width, count, framed.chunks)
            framed.index.append(members[out.order])
            framed.has_other.append(out.has_other)
            seq = (seq + len(out.order)) & 0xFFFFFFFF
            one_by_one.extend(members[out.rest].tolist())
        if one_by_one:
            self._frame_one_by_one(one_by_one, seq, framed)
        framed.index = ctbatch.concat(framed.index, int)
        framed.has_other = ctbatch.concat(framed.has_other, bool)
        return framed

    def _frame_one_by_one(self, which: list[int], seq: int, framed: "FramedApply") -> None:
        """Frame entries[i] for i in `which` with ctcreate.prepare, sequence numbers from `seq`."""
        hdr = NFGEN_HDR.pack
        excl_flags = CREATE_EXCL_FLAGS if framed.likely_new else UPDATE_FLAGS
        entries = framed.entries
        index: list[int] = []
        has_other: list[bool] = []
        batch: list[bytes] = []  # header and body as separate pieces, one join per ~SEND_BATCH
        size = 0
        for i in which:
            family, attrs = entries[i]
            try:
                create, update = prepare(attrs, framed.hold)
            except MalformedMessage:
                framed.malformed += 1
                continue
            index.append(i)
            if update is None:
                body, flags = create, CREATE_FLAGS
                has_other.append(False)
            else:
                body, flags = (create if framed.likely_new else update), excl_flags
                has_other.append(True)
            batch.append(hdr(NFGEN_HDR_LEN + len(body), CT_NEW, flags, seq, 0, family, 0, 0))
            batch.append(body)
            seq = (seq + 1) & 0xFFFFFFFF
            size += NFGEN_HDR_LEN + len(body)
            if size >= SEND_BATCH:
                framed.chunks.append((b"".join(batch), len(batch) >> 1))
                batch.clear()
                size = 0
        if batch:
            framed.chunks.append((b"".join(batch), len(batch) >> 1))
        framed.index.append(index)
        framed.has_other.append(has_other)

    def send_framed(self, framed: "FramedApply") -> ApplyResult:
        """The I/O half of `apply`: send the framed requests, retry NATed/related entries in
        their other form on EEXIST / ENOENT, count errors."""
        result = ApplyResult()
        if framed.malformed:
            result.sent += framed.malformed
            result.errors[errno.EINVAL] += framed.malformed
        retry_err = errno.EEXIST if framed.likely_new else errno.ENOENT
        again = []
        for i, err in self._send_chunks(framed, result):
            if framed.has_other[i] and err == retry_err:
                again.append(framed.entries[framed.index[i]])
            else:
                result.errors[err] += 1
        if again:
            # framed again as a whole, the other form first: a resync into a table that
            # already holds its NATed entries retries all of them (one by one in Python, that
            # cost a former Master ~120 us an entry, 2.4 s of 200k, on the loaded lab)
            result.retried = len(again)
            second = self.frame_apply(again, not framed.likely_new, framed.hold)
            for _, err in self._send_chunks(second, ApplyResult()):
                result.errors[err] += 1
        return result

    def _send_chunks(self, framed: "FramedApply", result: ApplyResult) -> list[tuple[int, int]]:
        """Send `framed`'s chunks; return [(request index, errno)] of its error replies."""
        failures: list[tuple[int, int]] = []
        mmsg.send_all(self.sock, [data for data, _ in framed.chunks])
        result.sent += sum(count for _, count in framed.chunks)
        # one drain for the whole batch: the error replies of a batch (< 40 bytes each, and
        # only for failures) fit the receive buffer, and each recv() costs the writer thread
        # a GIL hand-over
        self._drain_replies(result, failures)
        seq0, n = framed.seq0, framed.count
        return [(i, err) for s, err in failures if (i := (s - seq0) & 0xFFFFFFFF) < n]  # else not ours

    def delete(self, keys: Iterable[bytes], family: int = socket.AF_UNSPEC) -> ApplyResult:
        """Delete by key (orig tuple [+ zone] attribute bytes). AF_UNSPEC: the family is read
        from the key's address attribute. ENOENT counts entries already gone."""
        return self._send_keyed(CT_DELETE, ((key, b"") for key in keys), family)

    def set_timeouts(self, items: Iterable[tuple[bytes, int]]) -> ApplyResult:
        """Update each (key, seconds) entry's timeout: an update request (no NLM_F_CREATE)
        of the key and CTA_TIMEOUT alone. ENOENT counts entries gone meanwhile."""
        timeout = ctmsg.NLA_HDR.pack(8, ctmsg.CTA_TIMEOUT)
        return self._send_keyed(CT_NEW, ((key, timeout + ctmsg.BE32.pack(s)) for key, s in items))

    def make_liberal(self, tcp_keys: Iterable[bytes]) -> ApplyResult:
        """Mark each TCP entry BE_LIBERAL in both directions, in place: an update of the key
        and CTA_PROTOINFO alone, no gap for a packet to fall in (a delete and create would
        leave one; ctnetlink cannot reset an entry's window tracking). Its windows stay
        stale, but a liberal entry checks only RSTs against them (that their sequence is not
        below the stale highest ACK, which a live session's is not). ENOENT counts entries
        gone meanwhile."""
        liberal = encode_tcp_liberal()
        return self._send_keyed(CT_NEW, ((key, liberal) for key in tcp_keys))

    def _send_keyed(self, msg_type: int, requests: Iterable[tuple[bytes, bytes]],
                    family: int = socket.AF_UNSPEC) -> ApplyResult:
        """One plain request (NLM_F_REQUEST) per (key, more attributes)."""
        hdr = NFGEN_HDR.pack
        requests = list(requests)
        seq0 = self._next_seq(len(requests) + 1)

        def messages():
            seq = seq0
            for key, more in requests:
                fam = family or _family_of_key(key)
                yield hdr(NFGEN_HDR_LEN + len(key) + len(more), msg_type, NLM_F_REQUEST, seq, 0, fam, 0, 0) + key + more
                seq = (seq + 1) & 0xFFFFFFFF

        return self.send_batched(messages())

    def send_batched(self, messages: Iterable[bytes]) -> ApplyResult:
        """Send prepared requests, ~256 KiB per send(); count error replies by errno."""
        result = ApplyResult()
        batch: list[bytes] = []
        size = 0
        count = 0
        for m in messages:
            batch.append(m)
            size += len(m)
            count += 1
            if size >= SEND_BATCH:
                self._send_and_drain(b"".join(batch), count, result)
                batch.clear()
                size = count = 0
        if batch:
            self._send_and_drain(b"".join(batch), count, result)
        return result

    def send_prepared(self, data: bytes, count: int) -> ApplyResult:
        """Send `count` requests encoded beforehand (one buffer, at most a few SEND_BATCH) and
        count the error replies: for injectors that must not spend time encoding."""
        result = ApplyResult()
        self._send_and_drain(data, count, result)
        return result

    def _send_and_drain(self, data: bytes, count: int, result: ApplyResult) -> None:
        self.sock.send(data)
        result.sent += count
        self._drain_replies(result)

    def _drain_replies(self, result: ApplyResult, failures: list | None = None) -> None:
        while True:
            try:
                buf = self.sock.recv(RECV_SIZE, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno != errno.ENOBUFS:
                    raise
                result.lost_replies = True
                continue
            errors: list = []
            _, bad, _ = parse_messages_counted(buf, errors=errors)
            self.malformed += bad
            for seq, err in errors:
                if not err:  # 0 is an ACK
                    continue
                if failures is None:
                    result.errors[err] += 1
                else:
                    failures.append((seq, err))

    def flush(self, family: int = socket.AF_UNSPEC) -> None:
        """Delete every entry (IPCTNL_MSG_CT_DELETE without attributes), waiting for the ACK."""
        self._request_ack(CT_DELETE, family)

    def _request_ack(self, msg_type: int, family: int, body: bytes = b"") -> None:
        seq = self._next_seq()
        self.sock.send(ctmsg.request(msg_type, NLM_F_REQUEST | NLM_F_ACK, family, seq, body))
        while True:
            buf = self.sock.recv(RECV_SIZE)
            errors: list = []
            parse_messages_counted(buf, errors=errors)
            for eseq, err in errors:
                if eseq == seq:
                    if err:
                        raise OSError(err, os.strerror(err))
                    return


def _cut(data: bytes, width: int, count: int, chunks: list[tuple[bytes, int]]) -> None:
    """Split `count` requests of `width` bytes each into sends of about SEND_BATCH bytes."""
    per = max(1, SEND_BATCH // width)
    for first in range(0, count, per):
        chunks.append((data[first * width:(first + per) * width], min(per, count - first)))


def is_tcp_key(key: bytes) -> bool:
    # slices for a key in the kernel's layout (~1 against ~10 us for the walk): a
    # switchover asks this of every entry of the table
    fields = fast_key_fields(key)
    return (fields[0] if fields is not None else tuple_info(key)[0]) == socket.IPPROTO_TCP


def _family_of_key(key: bytes) -> int:
    # CTA_TUPLE_IP is the first child: its first address attribute says v4 (1, 2) or v6 (3, 4)
    try:
        t = ctmsg.NLA_HDR.unpack_from(key, 8)[1] & ctmsg.NLA_TYPE_MASK
    except struct.error:
        return socket.AF_INET
    return socket.AF_INET6 if t in (ctmsg.CTA_IP_V6_SRC, ctmsg.CTA_IP_V6_DST) else socket.AF_INET


def _set_buf(sock: socket.socket, opt: int, force_opt: int, size: int) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, force_opt, size)  # root: above net.core.*mem_max
    except PermissionError:
        sock.setsockopt(socket.SOL_SOCKET, opt, size)


# --- namespaces -------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


class entered_netns:
    """Context manager: this thread in /run/netns/NAME, back to its own namespace on exit."""

    def __init__(self, name: str):
        self.path = name if name.startswith("/") else f"/run/netns/{name}"

    def __enter__(self):
        self._home = os.open(f"/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(self.path, os.O_RDONLY)
        try:
            _setns(target)
        except BaseException:
            os.close(self._home)
            raise
        finally:
            os.close(target)
        return self

    def __exit__(self, *exc):
        try:
            _setns(self._home)
        finally:
            os.close(self._home)
