"""recvmmsg(2) by ctypes: many datagrams per call, each in its slot, a long one reported."""

import socket

import pytest

from statesync.mmsg import DatagramReader, Truncated

pytestmark = pytest.mark.skipif(not DatagramReader.available, reason="libc has no recvmmsg")


@pytest.fixture
def pair():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    yield a, b
    a.close()
    b.close()


def test_queued_datagrams_come_in_slots_in_order(pair):
    a, b = pair
    sent = [bytes([i]) * (i * 7 + 1) for i in range(10)]
    for d in sent:
        a.send(d)
    reader = DatagramReader(b.fileno(), slots=4, slot_bytes=128)
    got = []
    while True:
        buf, offsets, lengths = reader.read()
        if not offsets:
            break
        assert len(offsets) <= 4
        got += [buf[o:o + n] for o, n in zip(offsets, lengths)]
    assert got == sent


def test_a_blocking_read_returns_what_is_queued(pair):
    a, b = pair
    a.send(b"one")
    a.send(b"two")
    buf, offsets, lengths = DatagramReader(b.fileno(), slots=8, slot_bytes=64).read(block=True)
    assert [buf[o:o + n] for o, n in zip(offsets, lengths)] == [b"one", b"two"]


def test_a_datagram_longer_than_a_slot_is_reported(pair):
    a, b = pair
    a.send(b"x" * 100)
    with pytest.raises(Truncated):
        DatagramReader(b.fileno(), slots=2, slot_bytes=64).read()


def test_a_closed_descriptor_raises(pair):
    reader = DatagramReader(pair[1].fileno(), slots=2, slot_bytes=64)
    pair[1].close()
    with pytest.raises(OSError):
        reader.read()
