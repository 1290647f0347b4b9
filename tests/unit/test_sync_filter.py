"""Which entries the Master replicates: decided on the raw key, no decode per attribute."""

import socket

from statesync.ctnetlink import key_of, synthetic_entries
from statesync.filter import EntryFilter


def keys(n=5, family=socket.AF_INET):
    return [key_of(attrs) for _, attrs in synthetic_entries(n, family=family)]


def test_plain_entries_pass():
    f = EntryFilter(["198.51.100.0/30"])  # the HA link: not these entries
    assert all(f.accepts(k) for k in keys()) and f.ignored == 0


def test_ignored_networks_protocols_and_garbage():
    assert not any(EntryFilter(["198.19.0.0/16"]).accepts(k) for k in keys())  # destination side
    assert not any(EntryFilter(["198.18.0.0/16"]).accepts(k) for k in keys())  # source side
    assert not any(EntryFilter(ignore_protocols=["tcp"]).accepts(k) for k in keys())
    assert all(EntryFilter(ignore_protocols=["udp", "icmp"]).accepts(k) for k in keys())
    v6 = keys(family=socket.AF_INET6)
    assert all(EntryFilter(["198.18.0.0/15"]).accepts(k) for k in v6)
    assert not any(EntryFilter(["2001:db8:18::/64"]).accepts(k) for k in v6)
    f = EntryFilter()
    assert not f.accepts(b"\x08\x00") and f.malformed == 1


import ipaddress  # noqa: E402

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from statesync import ctbuild as cb  # noqa: E402
from statesync.ctconst import CTA_TUPLE_ORIG  # noqa: E402
from tests.unit.test_ctmsg import tuples  # noqa: E402

NETS = ["198.18.0.0/16", "198.19.0.0/24", "198.18.0.0/15", "203.0.113.0/24", "2001:db8:18::/64",
        "2001:db8:19::/120", "198.51.100.0/30"]


@settings(max_examples=300)
@given(tuples(), st.lists(st.sampled_from(NETS), max_size=3), st.lists(st.sampled_from(["tcp", "udp", "icmp",
                                                                                         "sctp", "icmpv6"]), max_size=2))
def test_the_fast_paths_decide_as_the_addresses_say(t, nets, protos):
    key = cb.encode_tuple(CTA_TUPLE_ORIG, t)
    src, dst = ipaddress.ip_address(t.src), ipaddress.ip_address(t.dst)
    ignored = {EntryFilter(ignore_protocols=[p])._protocols.__iter__().__next__() for p in protos}
    want = t.proto not in ignored and not any(
        a in ipaddress.ip_network(n) for n in nets for a in (src, dst) if a.version == ipaddress.ip_network(n).version)
    assert EntryFilter(nets, protos).accepts(key) == want


v4_port_tuples = st.builds(
    lambda proto, s, d, sp, dp: cb.Tuple(proto, str(ipaddress.ip_address("198.18.0.0") + s),
                                         str(ipaddress.ip_address("198.19.0.0") + d), sp, dp),
    st.sampled_from([6, 17, 132]), st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.integers(1, 0xFFFF),
    st.integers(1, 0xFFFF))


@settings(max_examples=100)
@given(st.lists(v4_port_tuples, min_size=16, max_size=60),
       st.lists(st.sampled_from(NETS), max_size=3),
       st.lists(st.sampled_from(["tcp", "udp", "sctp"]), max_size=2))
def test_a_block_of_keys_is_filtered_as_one_by_one(ts, nets, protos):
    changes = [(1, socket.AF_INET, cb.encode_tuple(CTA_TUPLE_ORIG, t), b"", 0) for t in ts]
    one_by_one = EntryFilter(nets, protos)
    want = [c for c in changes if one_by_one.accepts(c[2])]
    block = EntryFilter(nets, protos)
    assert block.select_changes(changes) == want and block.ignored == one_by_one.ignored
