"""The heartbeat codec: round trip, authentication, replay."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from failover import advert as wire

KEYS = {1: b"k" * 32, 2: b"n" * 32}

adverts = st.builds(
    wire.Advert,
    group=st.integers(0, 255),
    state=st.sampled_from(wire.STATES),
    priority=st.integers(0, 255),
    hostname=st.text(min_size=1, max_size=60).filter(lambda s: len(s.encode()) < 256),
    version=st.text(max_size=20),
    counter=st.integers(0, 2**64 - 1),
    path=st.integers(0, 255),
    interval_us=st.integers(0, 2**32 - 1),
    flags=st.integers(0, 255),
    sync_position=st.integers(0, 2**64 - 1),
    config_digest=st.binary(min_size=8, max_size=8),
)


@given(adverts, st.sampled_from([1, 2]))
def test_round_trip(adv, key_id):
    data = wire.encode(adv, key_id, KEYS[key_id])
    back = wire.decode(data, KEYS)
    assert back == dataclasses.replace(adv, key_id=key_id)


@given(adverts, st.integers(0, 10_000), st.integers(1, 255))
def test_any_flipped_byte_is_rejected(adv, pos, xor):
    data = bytearray(wire.encode(adv, 1, KEYS[1]))
    data[pos % len(data)] ^= xor
    with pytest.raises(wire.AdvertError):
        wire.decode(bytes(data), KEYS)


@given(st.binary(max_size=600))
def test_garbage_is_an_advert_error_never_a_crash(data):
    with pytest.raises(wire.AdvertError):
        wire.decode(data, KEYS)


def sample(counter=5, path=0):
    return wire.Advert(group=1, state="MASTER", priority=150, hostname="fw1", version="0.1.0",
                       counter=counter, path=path)


def test_wrong_key_is_forged():
    data = wire.encode(sample(), 1, b"x" * 32)
    with pytest.raises(wire.AdvertError) as exc:
        wire.decode(data, KEYS)
    assert exc.value.reason == "forged"


def test_unknown_key_id():
    data = wire.encode(sample(), 9, b"x" * 32)
    with pytest.raises(wire.AdvertError) as exc:
        wire.decode(data, KEYS)
    assert exc.value.reason == "unknown_key"


def test_key_rotation_accepts_old_and_new():
    assert wire.decode(wire.encode(sample(), 1, KEYS[1]), KEYS).key_id == 1
    assert wire.decode(wire.encode(sample(), 2, KEYS[2]), KEYS).key_id == 2


def test_replay_window_per_path():
    window = wire.ReplayWindow()
    assert window.accept(sample(5, path=0))
    assert not window.accept(sample(5, path=0))  # the same datagram again
    assert not window.accept(sample(4, path=0))  # an older one
    assert window.accept(sample(5, path=1))  # the same counter on another path is its own copy
    assert window.accept(sample(6, path=0))


def test_counter_survives_restart_without_state():
    first = wire.Counter()
    a = [first.next() for _ in range(1000)]
    second = wire.Counter()  # a restarted daemon
    assert second.next() > a[-1]
