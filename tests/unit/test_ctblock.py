"""A buffer of many messages parsed as arrays (ctblock) gives what parse_changes gives."""

import socket

from hypothesis import given, settings
from hypothesis import strategies as st

from statesync import ctblock, ctmsg
from statesync import ctbuild as cb
from statesync.ctconst import (
    CT_DELETE, CT_NEW, EV_NEW, NFGEN_HDR, NFGEN_HDR_LEN, NLM_F_CREATE, NLM_F_EXCL, NLMSG_DONE, NLMSG_ERROR,
    NLMSGHDR,
)
from tests.unit.test_ctmsg import entries

FLAGS = [0, NLM_F_CREATE | NLM_F_EXCL]


@st.composite
def messages(draw, zones=True):
    """A conntrack message (new, update or destroy) of a random entry, or DONE / ERROR."""
    what = draw(st.sampled_from(["entry"] * 8 + ["done", "error"]))
    seq = draw(st.integers(0, 2**32 - 1))
    if what == "done":
        return NLMSGHDR.pack(20, NLMSG_DONE, 2, seq, 0) + b"\0" * 4
    if what == "error":
        return NLMSGHDR.pack(36, NLMSG_ERROR, 0, seq, 0) + (-draw(st.integers(0, 120))).to_bytes(4, "little",
                                                                                             signed=True) + b"\0" * 16
    orig, reply, kw = draw(entries())
    if not zones:
        kw["zone"] = None  # a zone sends the whole buffer through the walk
    family, attrs = cb.encode_entry(orig, reply, **kw)
    mtype = draw(st.sampled_from([CT_NEW, CT_DELETE]))
    flags = draw(st.sampled_from(FLAGS)) if mtype == CT_NEW else 0
    return NFGEN_HDR.pack(NFGEN_HDR_LEN + len(attrs), mtype, flags, seq, draw(st.integers(0, 2**32 - 1)),
                          family, 0, 0) + attrs


@settings(max_examples=300, deadline=None)
@given(st.lists(messages(zones=False), min_size=0, max_size=40) | st.lists(messages(), min_size=0, max_size=20),
       st.sampled_from([0, EV_NEW]))
def test_the_arrays_give_what_the_walk_gives(msgs, kind):
    buf = b"".join(msgs)
    errors_a, errors_b = [], []
    got = ctblock.parse_block(buf, errors=errors_a, kind=kind)
    want = ctmsg.parse_changes(buf, errors=errors_b, kind=kind)
    assert got == want and errors_a == errors_b


def test_a_dump_of_one_layout_takes_the_array_path(monkeypatch):
    entries_ = cb.synthetic_entries(200)
    buf = b"".join(NFGEN_HDR.pack(NFGEN_HDR_LEN + len(a), CT_NEW, 2, 1, 0, f, 0, 0) + a for f, a in entries_)
    monkeypatch.setattr(ctblock, "parse_changes", None)  # the walk would raise: not used here
    changes, bad, done = ctblock.parse_block(buf, kind=EV_NEW)
    assert bad == 0 and not done and len(changes) == 200
    assert [c[2] for c in changes] == [ctmsg.key_of(a) for _, a in entries_]
    assert all(c[0] == EV_NEW and c[1] == socket.AF_INET for c in changes)


def _slots(datagrams, width=2048):
    """Datagrams laid out as mmsg.DatagramReader lays them: one per fixed-size slot."""
    buf = b"".join(d + b"\xee" * (width - len(d)) for d in datagrams)  # junk after each one
    return buf, [i * width for i in range(len(datagrams))], [len(d) for d in datagrams]


@settings(max_examples=300, deadline=None)
@given(st.lists(messages(zones=False), min_size=0, max_size=40) | st.lists(messages(), min_size=0, max_size=20),
       st.integers(0, 3))
def test_slots_give_what_each_datagram_gives(msgs, merge):
    # events come one message per datagram; a datagram of several (merge) takes the walk
    datagrams = [b"".join(msgs[i:i + 1 + merge]) for i in range(0, len(msgs), 1 + merge)]
    errors_a, errors_b = [], []
    got = ctblock.parse_slots(*_slots(datagrams), errors=errors_a)
    want = ([], 0, False)
    for d in datagrams:
        c, bad, done = ctmsg.parse_changes(d, errors=errors_b)
        want = (want[0] + c, want[1] + bad, want[2] or done)
    assert got == want and errors_a == errors_b


def test_events_in_slots_take_the_array_path(monkeypatch):
    entries_ = cb.synthetic_entries(64)
    msgs = [NFGEN_HDR.pack(NFGEN_HDR_LEN + len(a), CT_NEW, NLM_F_CREATE | NLM_F_EXCL, 0, 0, f, 0, 0) + a
            for f, a in entries_]
    monkeypatch.setattr(ctblock, "parse_changes", None)
    changes, bad, done = ctblock.parse_slots(*_slots(msgs))
    assert bad == 0 and not done
    assert [c[2] for c in changes] == [ctmsg.key_of(a) for _, a in entries_]
