"""Many datagrams per system call: recvmmsg(2) for the Master's event socket, sendmmsg(2)
for the Backup's kernel writes.

The kernel sends each conntrack event as a datagram of its own, and Python's socket has
no recvmmsg: one recv() per event cost ~2 us of call and copy plus the parse of a lone
message (~3 us on this machine), the Master's largest cost in a burst. Here one call
fills up to SLOTS fixed-size slots of one buffer, and the messages are parsed as arrays
(ctblock.parse_at) like a dump's datagram.
"""

from __future__ import annotations

import ctypes
import errno
import os

import numpy as np

SLOTS = 256
SLOT_BYTES = 4096  # an event is < 1 KiB; a longer datagram is reported truncated (MSG_TRUNC)
MSG_DONTWAIT = 0x40
MSG_TRUNC = 0x20
MSG_WAITFORONE = 0x10000


class _Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class _Msghdr(ctypes.Structure):
    _fields_ = [("msg_name", ctypes.c_void_p), ("msg_namelen", ctypes.c_uint32),
                ("msg_iov", ctypes.POINTER(_Iovec)), ("msg_iovlen", ctypes.c_size_t),
                ("msg_control", ctypes.c_void_p), ("msg_controllen", ctypes.c_size_t),
                ("msg_flags", ctypes.c_int)]


class _Mmsghdr(ctypes.Structure):
    _fields_ = [("msg_hdr", _Msghdr), ("msg_len", ctypes.c_uint)]


_libc = ctypes.CDLL(None, use_errno=True)
_recvmmsg = getattr(_libc, "recvmmsg", None)
if _recvmmsg is not None:
    _recvmmsg.argtypes = (ctypes.c_int, ctypes.POINTER(_Mmsghdr), ctypes.c_uint, ctypes.c_int, ctypes.c_void_p)
    _recvmmsg.restype = ctypes.c_int

_sendmmsg = getattr(_libc, "sendmmsg", None)
if _sendmmsg is not None:
    _sendmmsg.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int)
    _sendmmsg.restype = ctypes.c_int
UIO_MAXIOV = 1024  # the kernel's cap on datagrams per sendmmsg call

_STRIDE = ctypes.sizeof(_Mmsghdr) // 4
_LEN_AT = _Mmsghdr.msg_len.offset // 4
_FLAGS_AT = (_Mmsghdr.msg_hdr.offset + _Msghdr.msg_flags.offset) // 4


class Truncated(Exception):
    """A datagram longer than a slot: its end is lost (the caller treats it as an overrun)."""


class DatagramReader:
    """recvmmsg into one preallocated buffer of SLOTS slots."""

    available = _recvmmsg is not None

    def __init__(self, fd: int, slots: int = SLOTS, slot_bytes: int = SLOT_BYTES):
        self.fd = fd
        self.slots, self.slot_bytes = slots, slot_bytes
        self._buf = (ctypes.c_char * (slots * slot_bytes))()
        self._iov = (_Iovec * slots)()
        self._msgs = (_Mmsghdr * slots)()
        base = ctypes.addressof(self._buf)
        for i in range(slots):
            self._iov[i].iov_base = base + i * slot_bytes
            self._iov[i].iov_len = slot_bytes
            self._msgs[i].msg_hdr.msg_iov = ctypes.pointer(self._iov[i])
            self._msgs[i].msg_hdr.msg_iovlen = 1
        self._words = np.frombuffer(self._msgs, np.uint32).reshape(slots, _STRIDE)

    def read(self, block: bool = False) -> tuple[bytes, list[int], list[int]]:
        """(buffer, slot offsets, datagram lengths) of what was queued; empty when nothing.
        Raises OSError (ENOBUFS: the queue overran) and Truncated."""
        # blocking: wait for the first datagram only, then take what is queued
        n = _recvmmsg(self.fd, self._msgs, self.slots, MSG_WAITFORONE if block else MSG_DONTWAIT, None)
        if n < 0:
            err = ctypes.get_errno()
            if err in (errno.EAGAIN, errno.EWOULDBLOCK):
                return b"", [], []
            raise OSError(err, os.strerror(err))
        if n == 0:
            return b"", [], []
        words = self._words[:n]
        if (words[:, _FLAGS_AT] & MSG_TRUNC).any():
            raise Truncated(f"a datagram longer than {self.slot_bytes} bytes")
        lengths = words[:, _LEN_AT].tolist()
        buf = ctypes.string_at(self._buf, n * self.slot_bytes)
        return buf, list(range(0, n * self.slot_bytes, self.slot_bytes)), lengths


def send_all(sock, datagrams: list[bytes]) -> None:
    """Send each datagram, in order: one sendmmsg call per 1,024 of them.

    The Backup's writer thread sends a batch as ~32 KiB datagrams, the kernel's work for each
    ~1 ms. One send() per datagram gave the GIL up and took it back from the loop thread
    every time; here the whole batch is one call without the GIL. The kernel still yields
    the CPU between datagrams (cond_resched), as between separate sends."""
    if _sendmmsg is None or len(datagrams) < 2:
        for d in datagrams:
            sock.send(d)
        return
    n = len(datagrams)
    iov = (_Iovec * n)()
    msgs = (_Mmsghdr * n)()
    iov_base, iov_size = ctypes.addressof(iov), ctypes.sizeof(_Iovec)
    for i, d in enumerate(datagrams):  # the list keeps the bytes alive through the calls
        iov[i].iov_base = ctypes.cast(ctypes.c_char_p(d), ctypes.c_void_p).value
        iov[i].iov_len = len(d)
        hdr = msgs[i].msg_hdr
        hdr.msg_iov = ctypes.cast(iov_base + i * iov_size, ctypes.POINTER(_Iovec))
        hdr.msg_iovlen = 1
    fd, base, size, sent = sock.fileno(), ctypes.addressof(msgs), ctypes.sizeof(_Mmsghdr), 0
    while sent < n:
        r = _sendmmsg(fd, base + sent * size, min(n - sent, UIO_MAXIOV), 0)
        if r < 0:
            err = ctypes.get_errno()
            if err == errno.EINTR:
                continue
            raise OSError(err, os.strerror(err))
        sent += r
