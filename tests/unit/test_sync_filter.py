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
