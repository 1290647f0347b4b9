"""Releasing held entries after a takeover: which entries, down to which timeout."""

import socket

from hypothesis import given, settings
from hypothesis import strategies as st

from statesync import ctbuild as cb
from statesync import ctmsg, holdrelease
from statesync.ctconst import IPS_ASSURED, IPS_CONFIRMED, IPS_SEEN_REPLY

from .test_ctmsg import entries

# distinct values, so a wrong (protocol, state) lookup shows
CEILINGS = {which: 1000 + i for i, which in enumerate(holdrelease.SYSCTLS)}


def expected_ceiling(family: int, attrs: bytes):
    """The reference: the full (slow) decoder's view of protocol, state and status."""
    d = ctmsg.decode_entry(family, attrs)
    proto, info = d["orig"]["proto"], d.get("protoinfo", {})
    if proto == socket.IPPROTO_TCP:
        state = info.get("tcp", {}).get("state")
    elif proto == socket.IPPROTO_SCTP:
        state = info.get("sctp", {}).get("state")
    elif proto == socket.IPPROTO_UDP:
        state = 1 if d["status"] & IPS_SEEN_REPLY else 0
    else:
        state = 0
    return CEILINGS.get((proto, state))


@settings(max_examples=400)
@given(entries())
def test_ceiling_matches_the_full_decoder(e):
    orig, reply, kw = e
    family, attrs = cb.encode_entry(orig, reply, **kw)
    key = ctmsg.key_of(attrs)
    found = holdrelease.ceiling_of(key, attrs, CEILINGS)
    want = expected_ceiling(family, attrs)
    assert found == (None if want is None else (kw["timeout"], want))
    released = holdrelease.releases([(family, key, attrs)], CEILINGS)
    assert released == ([(key, want)] if want is not None and kw["timeout"] > want else [])


def test_held_tcp_states_come_down_to_their_own_sysctl():
    ceilings = {(6, 3): 432000, (6, 7): 120, (6, 8): 10}
    held = 432000 - 60  # written with the 5-day hold a minute ago
    rows = []
    for i, state in enumerate((3, 7, 8, 9)):  # ESTABLISHED, TIME_WAIT, CLOSE, SYN_SENT2 (no sysctl)
        orig = cb.Tuple(6, "198.18.0.1", "198.19.0.1", 30000 + i, 443)
        family, attrs = cb.encode_entry(orig, timeout=held, tcp_state=state)
        rows.append((family, ctmsg.key_of(attrs), attrs))
    out = holdrelease.releases(rows, ceilings)
    assert out == [(rows[1][1], 120), (rows[2][1], 10)]


def test_udp_uses_the_stream_timeout_once_a_reply_was_seen():
    ceilings = {(17, 0): 30, (17, 1): 120}
    rows = []
    for i, status in enumerate((IPS_CONFIRMED, IPS_CONFIRMED | IPS_SEEN_REPLY | IPS_ASSURED)):
        family, attrs = cb.encode_entry(cb.Tuple(17, "2001:db8:18::1", "2001:db8:19::1", 5000 + i, 53),
                                        status=status, timeout=3600, zone=7)
        rows.append((family, ctmsg.key_of(attrs), attrs))
    assert holdrelease.releases(rows, ceilings) == [(rows[0][1], 30), (rows[1][1], 120)]


def test_read_ceilings_skips_what_the_namespace_lacks(tmp_path):
    (tmp_path / "nf_conntrack_tcp_timeout_time_wait").write_text("120\n")
    (tmp_path / "nf_conntrack_udp_timeout").write_text("not a number\n")
    assert holdrelease.read_ceilings(str(tmp_path)) == {(6, 7): 120}


def test_read_ceilings_here_has_the_kernel_defaults_for_every_known_protocol():
    ceilings = holdrelease.read_ceilings()
    for which in ((6, 3), (6, 7), (17, 0), (17, 1), (1, 0), (58, 0)):
        assert ceilings.get(which, 0) > 0, which


@settings(max_examples=300)
@given(st.binary(max_size=200), st.binary(max_size=80))
def test_garbage_gives_no_ceiling_and_never_raises(attrs, key):
    found = holdrelease.ceiling_of(key, attrs, CEILINGS)
    assert found is None or (isinstance(found[0], int) and found[1] in CEILINGS.values())


@settings(max_examples=300)
@given(entries(), st.binary(max_size=80))
def test_a_garbage_key_on_a_good_entry_never_raises(e, key):
    orig, reply, kw = e
    _, attrs = cb.encode_entry(orig, reply, **kw)
    found = holdrelease.ceiling_of(key, attrs, CEILINGS)
    assert found is None or found == (kw["timeout"], found[1])
