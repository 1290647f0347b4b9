"""The matrix rewrite (ctbatch) gives the very requests ctcreate.prepare gives, one by one."""

import ipaddress
import socket
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from statesync import ctbatch
from statesync import ctbuild as cb
from statesync.ctconst import CTA_TIMEOUT, IPS_ASSURED, IPS_CONFIRMED, IPS_EXPECTED, IPS_SEEN_REPLY
from statesync.ctcreate import prepare
from statesync.ctnetlink import CtSocket, FramedApply, synthetic_entries
from tests.unit.test_ctmsg import entries as any_entries

NLMSG = struct.Struct("=IHHII")


@st.composite
def nat_entries(draw):
    """Port-protocol entries with every NAT class: none, SNAT, DNAT, both (and port-only)."""
    family = draw(st.sampled_from([socket.AF_INET, socket.AF_INET6]))
    proto = draw(st.sampled_from([6, 17, 132]))
    base = ("198.18.0.0", "198.19.0.0", "203.0.113.0") if family == socket.AF_INET else (
        "2001:db8:18::", "2001:db8:19::", "2001:db8:203::")
    src = ipaddress.ip_address(base[0]) + draw(st.integers(0, 0xFFFF))
    dst = ipaddress.ip_address(base[1]) + draw(st.integers(0, 0xFFFF))
    sport, dport = draw(st.integers(1, 0xFFFF)), draw(st.integers(1, 0xFFFF))
    orig = cb.Tuple(proto, str(src), str(dst), sport, dport)
    nat_addr = str(ipaddress.ip_address(base[2]) + draw(st.integers(1, 0xFF)))
    snat_addr, snat_port, dnat_addr, dnat_port = draw(st.tuples(st.booleans(), st.booleans(), st.booleans(),
                                                                st.booleans()))
    reply = cb.Tuple(proto, nat_addr if dnat_addr else str(dst), nat_addr if snat_addr else str(src),
                     (dport ^ 0x55) or 1 if dnat_port else dport, (sport ^ 0xAA) or 1 if snat_port else sport)
    kw = dict(status=draw(st.sampled_from([IPS_CONFIRMED, IPS_SEEN_REPLY | IPS_ASSURED | IPS_CONFIRMED,
                                           IPS_SEEN_REPLY | IPS_ASSURED, IPS_EXPECTED | IPS_CONFIRMED])),
              timeout=draw(st.integers(0, 2**32 - 1)),
              mark=draw(st.none() | st.integers(0, 2**32 - 1)),
              zone=draw(st.none() | st.integers(1, 0xFFFF)),
              tcp_state=draw(st.integers(0, 9)),
              sctp=(draw(st.integers(1, 7)), draw(st.integers(0, 2**32 - 1)), draw(st.integers(0, 2**32 - 1))))
    return orig, reply, kw


def requests(framed: FramedApply) -> list[tuple[int, bytes, bool]]:
    """(seq, request with seq zeroed, has another form) for every request, from the chunks."""
    out = []
    i = 0
    for data, count in framed.chunks:
        off, seen = 0, 0
        while off < len(data):
            length, _, _, seq, _ = NLMSG.unpack_from(data, off)
            msg = bytearray(data[off:off + length])
            msg[8:12] = b"\0\0\0\0"
            out.append((seq, bytes(msg), bool(framed.has_other[i])))
            i += 1
            seen += 1
            off += length
        assert seen == count, "a chunk's count is not the number of requests in it"
    assert i == framed.count
    return out


@pytest.fixture(scope="module")
def ct():
    with CtSocket() as sock:
        yield sock


def compare(ct, entries, likely_new, hold=0):
    framed = ct.frame_apply(entries, likely_new, hold)
    reference = FramedApply([], framed.seq0, entries, [], [], likely_new, hold=hold)
    ct._frame_one_by_one(list(range(len(entries))), framed.seq0, reference)
    reference.index, reference.has_other = ctbatch.concat(reference.index, int), ctbatch.concat(reference.has_other, bool)
    got, want = requests(framed), requests(reference)
    # the matrix emits its requests grouped by NAT class: same requests, in another order
    assert sorted(r[1:] for r in got) == sorted(r[1:] for r in want)
    assert sorted(r[0] for r in got) == [framed.seq0 + i for i in range(len(got))]
    assert framed.malformed == reference.malformed
    return framed


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(entries=st.lists(nat_entries() | any_entries(), min_size=1, max_size=40), likely_new=st.booleans(),
       hold=st.sampled_from([0, 1, 600, 432000, 2**32 - 1]))
def test_matrix_and_prepare_give_the_same_requests(monkeypatch_min_group, entries, likely_new, hold, ct):
    encoded = [cb.encode_entry(orig, reply, **kw) for orig, reply, kw in entries]
    compare(ct, encoded, likely_new, hold)


def top_level(body: bytes) -> dict[int, list[tuple[int, bytes]]]:
    """{attribute type: [(offset, value bytes)]} of a request body's top-level attributes."""
    out: dict[int, list] = {}
    off = 0
    while off + 4 <= len(body):
        alen, atype = struct.unpack_from("=HH", body, off)
        out.setdefault(atype & 0x7FFF, []).append((off, body[off + 4:off + alen]))
        off += (alen + 3) & ~3
    return out


@settings(max_examples=200, deadline=None)
@given(entry=nat_entries(), hold=st.integers(1, 2**32 - 1))
def test_a_hold_raises_the_timeout_and_nothing_else(entry, hold):
    orig, reply, kw = entry
    _, attrs = cb.encode_entry(orig, reply, **kw)
    for plain, held in zip(prepare(attrs), prepare(attrs, hold)):
        if plain is None:
            assert held is None
            continue
        (at, value), = top_level(plain)[CTA_TIMEOUT]
        assert struct.unpack(">I", top_level(held)[CTA_TIMEOUT][0][1])[0] == max(kw["timeout"], hold)
        assert held[:at + 4] == plain[:at + 4] and held[at + 8:] == plain[at + 8:]


@pytest.fixture
def monkeypatch_min_group(monkeypatch):
    monkeypatch.setattr(ctbatch, "MIN_GROUP", 1)  # every group through the matrix, however small


def test_a_burst_goes_through_the_matrix(ct):
    burst = [tuple(e) for e in synthetic_entries(500)]
    framed = compare(ct, burst, True)
    compare(ct, burst, True, hold=432000)
    lay = ctbatch.learn(burst[0][1])
    assert lay is not None, "the kernel's TCP+SNAT layout must take the fast path"
    assert lay.timeout >= 0, "the matrix must know where the timeout is, to hold it"
    out = ctbatch.frame_group(burst[0][0], [a for _, a in burst], 1, True)
    assert not len(out.rest) and len(out.order) == 500 and out.has_other.all()
    assert framed.count == 500


def test_entries_the_matrix_refuses_go_one_by_one(ct):
    burst = [tuple(e) for e in synthetic_entries(100)]
    bad = bytearray(burst[7][1])
    bad[0:2] = (len(bad) + 4).to_bytes(2, "little")  # first attribute overruns: malformed
    odd = bytearray(burst[9][1])
    odd[4:8] = odd[8:12]  # a header that is not the layout's: the matrix must not cut it blindly
    burst[7] = (burst[7][0], bytes(bad))
    burst[9] = (burst[9][0], bytes(odd))
    fam = burst[0][0]
    out = ctbatch.frame_group(fam, [a for _, a in burst], 1, True)
    assert set(out.rest.tolist()) == {7, 9} and len(out.order) == 98
    framed = compare(ct, burst, True)
    assert framed.malformed >= 1
