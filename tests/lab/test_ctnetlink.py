"""ctnetlink codec against the real kernel, in namespaces this module creates.

A: a router-like namespace whose own traffic to C goes out through SNAT (TCP,
UDP, ICMP over IPv4 and IPv6, a marked flow, an injected zone entry).
B: an empty namespace standing in for the Backup. Entries captured in A with
our codec (events and dumps) are applied to B; `conntrack -L -o extended` of A
and B must then agree, and deletes/flushes must replicate.
"""

import errno
import os
import re
import secrets
import socket
import subprocess
import time

import pytest

from statesync import ctbuild as cb
from statesync import ctmsg
from statesync.ctconst import (
    CT_NEW, EV_DESTROY, EV_NEW, EV_UPDATE, IPS_ASSURED, IPS_CONFIRMED, IPS_EXPECTED,
    IPS_SEEN_REPLY, IPS_SRC_NAT, NFGEN_HDR, NFGEN_HDR_LEN, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST,
)
from statesync.ctcreate import prepare
from statesync.ctnetlink import CtSocket, Overrun, encode_expectation, entered_netns

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
]


def sh(*args, ns=None, check=True):
    cmd = (["ip", "netns", "exec", ns] if ns else []) + [str(a) for a in args]
    return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=60)


class Namespaces:
    def __init__(self):
        self.names = []

    def new(self, role):
        name = f"hsx-ct-{role}{secrets.token_hex(3)}"
        sh("ip", "netns", "add", name)
        self.names.append(name)
        sh("ip", "link", "set", "lo", "up", ns=name)
        return name

    def close(self):
        for n in self.names:
            subprocess.run(["ip", "netns", "del", n], capture_output=True)


@pytest.fixture
def netns():
    ns = Namespaces()
    try:
        yield ns
    finally:
        ns.close()


# --- comparing tables -----------------------------------------------------------------

_VOLATILE = re.compile(r"\s(packets|bytes|use|delta-time|timeout|id)=\S+")


def conntrack_list(ns):
    """`conntrack -L -o extended` lines, without the fields that differ between kernels by nature."""
    out = sh("conntrack", "-L", "-o", "extended", ns=ns, check=False).stdout
    lines = []
    for line in out.splitlines():
        if not line.strip():
            continue
        fields = line.split()
        # "ipv4 2 tcp 6 599 ESTABLISHED ...": drop the timeout (5th field)
        fields = fields[:4] + fields[5:]
        lines.append(_VOLATILE.sub("", " ".join(fields)))
    return sorted(lines)


def decoded_table(sock, liberal: bool = False):
    """key -> the fields the Backup must reproduce, from our own dump decoder. `liberal`: the
    TCP flags as the Backup writes them, BE_LIBERAL added (ctcreate._tcp_flags_masked)."""
    add = cb.IP_CT_TCP_FLAG_BE_LIBERAL if liberal else 0
    table = {}
    for ev in sock.dump():
        d = ctmsg.decode_entry(ev.family, ev.attrs)
        tcp = d.get("protoinfo", {}).get("tcp", {})
        flags = [tcp[k][0] | add if k in tcp else None for k in ("flags_orig", "flags_reply")]
        table[ev.key] = (d["orig"], d["reply"], d["status"], d.get("mark"), d.get("zone"),
                         tcp.get("state"), *flags, tcp.get("wscale_orig"), tcp.get("wscale_reply"))
    return table


# --- topology: A (SNAT router) <-> C (peer), B empty ------------------------------------

NFT_A = """
table inet hsx_ct {
  chain post {
    type nat hook postrouting priority srcnat; policy accept;
    oifname "a0" ip daddr 192.0.2.10 snat ip to 203.0.113.1
    oifname "a0" ip6 daddr 2001:db8::10 snat ip6 to 2001:db8:203::1
  }
  chain out {
    type filter hook output priority filter; policy accept;
    udp dport 5353 ct mark set 42
  }
}
"""


def build_pair(netns):
    a, b, c = netns.new("a"), netns.new("b"), netns.new("c")
    va = f"hsxct{secrets.token_hex(2)}a"  # created in the root namespace, renamed once moved
    vc = va[:-1] + "c"
    sh("ip", "link", "add", va, "type", "veth", "peer", "name", vc)
    sh("ip", "link", "set", va, "netns", a, "name", "a0")
    sh("ip", "link", "set", vc, "netns", c, "name", "c0")
    for ns, dev, v4, v6 in ((a, "a0", "192.0.2.2/24", "2001:db8::2/64"), (c, "c0", "192.0.2.10/24", "2001:db8::10/64")):
        sh("ip", "addr", "add", v4, "dev", dev, ns=ns)
        sh("ip", "-6", "addr", "add", v6, "dev", dev, "nodad", ns=ns)
        sh("ip", "link", "set", dev, "up", ns=ns)
    sh("ip", "addr", "add", "203.0.113.1/32", "dev", "a0", ns=a)
    sh("ip", "-6", "addr", "add", "2001:db8:203::1/128", "dev", "a0", "nodad", ns=a)
    sh("ip", "route", "add", "203.0.113.0/24", "dev", "c0", ns=c)
    sh("ip", "-6", "route", "add", "2001:db8:203::/64", "dev", "c0", ns=c)
    for ns in (a, b):  # events then carry counters and timestamps, which must not reach B
        sh("sysctl", "-qw", "net.netfilter.nf_conntrack_acct=1", ns=ns, check=False)
        sh("sysctl", "-qw", "net.netfilter.nf_conntrack_timestamp=1", ns=ns, check=False)
    subprocess.run(["ip", "netns", "exec", a, "nft", "-f", "-"], input=NFT_A, text=True, check=True,
                   capture_output=True)
    return a, b, c


def make_traffic(a, c):
    """Sessions from A to C through SNAT; returns the sockets to keep them open."""
    keep = []
    with entered_netns(c):
        srv4 = socket.create_server(("192.0.2.10", 8080))
        srv6 = socket.create_server(("2001:db8::10", 8080), family=socket.AF_INET6)
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind(("192.0.2.10", 5353))
    keep += [srv4, srv6, udp]
    with entered_netns(a):
        for addr, fam in (("192.0.2.10", socket.AF_INET), ("2001:db8::10", socket.AF_INET6)):
            cl = socket.socket(fam, socket.SOCK_STREAM)
            cl.settimeout(5)
            cl.connect((addr, 8080))
            keep.append(cl)
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        u.settimeout(5)
        u.sendto(b"ping", ("192.0.2.10", 5353))
        keep.append(u)
    for srv in (srv4, srv6):
        conn, _ = srv.accept()
        conn.sendall(b"hello")
        keep.append(conn)
    data, peer = udp.recvfrom(64)
    udp.sendto(b"pong", peer)
    for cl in keep[3:5]:
        assert cl.recv(5) == b"hello"
    assert u.recvfrom(64)[0] == b"pong"
    with entered_netns(a):
        echo(socket.AF_INET, "192.0.2.10")
        echo(socket.AF_INET6, "2001:db8::10")
    # a zoned, marked entry the way an operator injects one
    sh("conntrack", "-I", "-p", "tcp", "-s", "198.18.0.1", "-d", "198.19.0.1", "--sport", "1000",
       "--dport", "443", "-t", "600", "--state", "ESTABLISHED", "-u", "SEEN_REPLY,ASSURED",
       "-m", "7", "-w", "5", ns=a)
    return keep


def echo(family, dst, ident=0x4242):
    """One ICMP/ICMPv6 echo request and its reply (no ping binary here: a raw socket)."""
    v6 = family == socket.AF_INET6
    with socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_ICMPV6 if v6 else socket.IPPROTO_ICMP) as s:
        s.settimeout(5)
        hdr = bytes((128 if v6 else 8, 0, 0, 0)) + ident.to_bytes(2, "big") + b"\0\1" + b"hsx-ct"
        if not v6:  # the kernel fills in the ICMPv6 checksum, not the ICMP one
            total = sum(int.from_bytes(hdr[i:i + 2], "big") for i in range(0, len(hdr), 2))
            total = (total & 0xFFFF) + (total >> 16)
            csum = ~((total & 0xFFFF) + (total >> 16)) & 0xFFFF
            hdr = hdr[:2] + csum.to_bytes(2, "big") + hdr[4:]
        s.sendto(hdr, (dst, 0))
        want = 129 if v6 else 0
        while True:
            data = s.recv(2048)
            icmp = data if v6 else data[(data[0] & 0xF) * 4:]
            if icmp[0] == want:
                return


def read_events(sock, quiet=0.3, limit=5.0):
    out = []
    deadline = time.monotonic() + limit
    last = time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - last < quiet:
        got = sock.recv_batch(block=False)
        if got:
            out += got
            last = time.monotonic()
        else:
            time.sleep(0.02)
    return out


def replay(sock, events):
    """Apply events in order, as the Backup does: runs of the same kind per call."""
    i = 0
    total = {}
    while i < len(events):
        j = i
        while j < len(events) and events[j].kind == events[i].kind:
            j += 1
        run = events[i:j]
        if run[0].kind == EV_DESTROY:
            res = sock.delete(e.key for e in run)
        else:
            res = sock.apply(((e.family, e.attrs) for e in run), likely_new=run[0].kind == EV_NEW)
        for k, v in res.errors.items():
            total[k] = total.get(k, 0) + v
        i = j
    return total


def test_events_and_dump_replicate_to_another_kernel(netns):
    a, b, c = build_pair(netns)
    ev = CtSocket.open_in(a, events=True)
    sa, sb = CtSocket.open_in(a), CtSocket.open_in(b)
    keep = []
    try:
        keep = make_traffic(a, c)
        events = read_events(ev)
        kinds = {e.kind for e in events}
        # events caused by packets carry port id 0, the one `conntrack -I` caused carries its port
        injected = [e for e in events if e.kind == EV_NEW and ctmsg.zone_of(e.attrs) == 5]
        assert len(injected) == 1 and injected[0].portid != 0
        assert all(e.portid == 0 for e in events if e.kind == EV_NEW and e is not injected[0])
        assert EV_NEW in kinds and EV_UPDATE in kinds
        # events and dumps key an entry the same way
        table_a = decoded_table(sa, liberal=True)
        assert {e.key for e in events if e.kind == EV_NEW} == set(table_a)
        families = {e.family for e in events}
        assert families == {socket.AF_INET, socket.AF_INET6}
        protos = {ctmsg.tuple_info(k)[0] for k in table_a}
        assert {socket.IPPROTO_TCP, socket.IPPROTO_UDP, socket.IPPROTO_ICMP, socket.IPPROTO_ICMPV6} <= protos

        # 1) replay the event stream into B
        errors = replay(sb, events)
        assert errors == {}
        assert conntrack_list(b) == conntrack_list(a)
        assert decoded_table(sb) == table_a  # incl. NAT status bits, TCP flags and window scale

        nat = [v for v in table_a.values() if v[2] & IPS_SRC_NAT]
        assert len(nat) >= 5  # TCP, UDP, ICMP over v4, TCP, ICMPv6 over v6
        assert any(v[3] == 42 for v in table_a.values())  # ct mark from the ruleset
        assert any(v[4] == 5 and v[3] == 7 for v in table_a.values())  # zone + mark injected

        # 2) a dump applied to an empty B gives the same table
        sb.flush()
        assert sh("conntrack", "-C", ns=b).stdout.strip() == "0"
        res = sb.apply((e.family, e.attrs) for e in sa.dump())
        assert res.failed == 0 and res.sent == len(table_a)
        assert decoded_table(sb) == table_a

        # 3) applying again updates in place (create-or-update), nothing fails
        res = sb.apply(((e.family, e.attrs) for e in sa.dump()), likely_new=False)
        assert res.failed == 0 and len(decoded_table(sb)) == len(table_a)
        assert res.retried == 0  # update first: every entry is there
        # ... and so does a create first: each NATed entry's create meets EEXIST and is sent
        # again in its update form (the retry is framed anew, as a batch), the rest update
        res = sb.apply((e.family, e.attrs) for e in sa.dump())
        assert res.failed == 0 and len(nat) <= res.retried < len(table_a)
        assert decoded_table(sb) == table_a
        # the reverse: update first into an empty table, each NATed entry's ENOENT retried
        # as a create, the rest created at once
        sb.flush()
        res = sb.apply(((e.family, e.attrs) for e in sa.dump()), likely_new=False)
        assert res.failed == 0 and len(nat) <= res.retried < len(table_a)
        assert decoded_table(sb) == table_a

        # 4) a delete in A replicates through its DESTROY event
        sh("conntrack", "-D", "-p", "udp", "--orig-port-dst", "5353", ns=a)
        sh("conntrack", "-D", "-w", "5", ns=a)
        gone = [e for e in read_events(ev) if e.kind == EV_DESTROY]
        assert len(gone) == 2
        res = sb.delete(e.key for e in gone)
        assert res.failed == 0
        assert conntrack_list(b) == conntrack_list(a)
        assert sb.delete(e.key for e in gone).errors == {2: 2}  # ENOENT: already gone

        # 5) flush
        sb.flush()
        assert sh("conntrack", "-C", ns=b).stdout.strip() == "0"
    finally:
        for s in keep:
            s.close()
        for s in (ev, sa, sb):
            s.close()


def test_kernel_create_rules(netns):
    """What the create path accepts on this kernel: the facts ctcreate relies on."""
    b = netns.new("b")
    with CtSocket.open_in(b) as s:
        def send(family, attrs, flags=NLM_F_REQUEST | NLM_F_CREATE):
            return dict(s.send_batched([ctmsg.request(CT_NEW, flags, family, 1, attrs)]).errors)

        plain = cb.Tuple(6, "198.18.0.1", "198.19.0.1", 1000, 80)
        fam, unconfirmed = cb.encode_entry(plain, status=IPS_SEEN_REPLY | IPS_ASSURED)
        assert send(fam, unconfirmed) == {16: 1}  # EBUSY without IPS_CONFIRMED ...
        assert s.apply([(fam, unconfirmed)]).failed == 0  # ... which prepare() sets
        assert send(fam, cb.encode_entry(plain)[1]) == {}  # NLM_F_CREATE w/o EXCL updates in place

        # NAT: the range is taken on create only, and makes the status bits
        nat_o = cb.Tuple(6, "198.18.0.2", "198.19.0.1", 1000, 80)
        nat_r = cb.Tuple(6, "198.19.0.1", "203.0.113.1", 80, 2000)
        fam, natted = cb.encode_entry(nat_o, nat_r)
        assert send(fam, natted) == {}
        stored = {e.key: e for e in s.dump()}[ctmsg.key_of(natted)]
        assert not ctmsg.status_of(stored.attrs) & IPS_SRC_NAT  # NATed reply alone: no NAT bits
        s.flush()
        create, update = prepare(natted)
        assert send(fam, create, NLM_F_REQUEST | NLM_F_CREATE | NLM_F_EXCL) == {}
        assert send(fam, create) == {95: 1}  # EOPNOTSUPP: NAT on an existing entry
        assert send(fam, update) == {}
        stored = {e.key: e for e in s.dump()}[ctmsg.key_of(natted)]
        assert ctmsg.status_of(stored.attrs) & IPS_SRC_NAT
        assert ctmsg.decode_entry(fam, stored.attrs)["reply"]["dport"] == 2000

        # related entries: master on create only, IPS_EXPECTED set by the kernel
        master_t = cb.Tuple(6, "198.18.0.3", "198.19.0.1", 1000, 21)
        s.apply([cb.encode_entry(master_t)])
        fam, rel = cb.encode_entry(cb.Tuple(6, "198.19.0.1", "198.18.0.3", 20, 40000),
                                   status=IPS_EXPECTED | IPS_SEEN_REPLY | IPS_ASSURED | IPS_CONFIRMED)
        master = cb.encode_tuple(ctmsg.CTA_TUPLE_MASTER, master_t)
        assert send(fam, rel + master) == {16: 1}  # EXPECTED in a create: EBUSY
        res = s.apply([(fam, rel + master)])
        assert res.failed == 0
        stored = {e.key: e for e in s.dump()}[ctmsg.key_of(rel)]
        assert ctmsg.decode_entry(fam, stored.attrs)["master"]["dport"] == 21
        assert s.apply([(fam, rel + master)]).failed == 0  # update path: master stripped
        assert send(fam, rel + master) == {95: 1}

        # attributes only the kernel owns are accepted (ignored) on this kernel
        extra = (cb.be32(ctmsg.CTA_ID, 1) + cb.be32(ctmsg.CTA_USE, 1)
                 + cb.nest(ctmsg.CTA_COUNTERS_ORIG, cb.nla(1, bytes(8)), cb.nla(2, bytes(8))))
        fam, attrs = cb.encode_entry(cb.Tuple(17, "198.18.0.4", "198.19.0.1", 53, 53))
        assert send(fam, attrs + extra) == {}


def test_200k_synthetic_entries_land_and_dump_back(netns):
    b = netns.new("b")
    n = 200_000
    ents = cb.synthetic_entries(n)
    with CtSocket.open_in(b) as s:
        res = s.apply(ents)
        assert res.failed == 0 and res.sent == n and not res.lost_replies
        assert int(sh("conntrack", "-C", ns=b).stdout) == n
        keys = {e.key for e in s.dump(socket.AF_INET)}
        assert keys == {ctmsg.key_of(a) for _, a in ents}
        s.flush()
        assert int(sh("conntrack", "-C", ns=b).stdout) == 0


def test_event_overrun_raises(netns):
    b = netns.new("b")
    with CtSocket.open_in(b, events=True, rcvbuf=64 << 10) as ev, CtSocket.open_in(b) as s:
        assert s.apply(cb.synthetic_entries(5000)).failed == 0  # 5000 NEW events, nobody reading
        with pytest.raises(Overrun):
            while ev.recv_batch(block=False):
                pass
        # the caller resyncs from a dump; once the queue is drained, events flow again
        assert sum(1 for _ in s.dump()) == 5000
        read_events(ev)
        assert s.apply(cb.synthetic_entries(3, start=10_000)).failed == 0
        fresh = read_events(ev)
        assert [e.kind for e in fresh] == [EV_NEW] * 3
        assert {e.portid for e in fresh} == {s.portid}  # our own injections are recognisable


def test_expectations_dump_and_create_replicate(netns):
    a, b = netns.new("a"), netns.new("b")
    master_t = cb.Tuple(6, "198.18.0.1", "198.19.0.1", 40000, 21)
    helper = cb.nest(ctmsg.CTA_HELP, cb.nla(ctmsg.CTA_HELP_NAME, b"ftp\0"))
    fam, master = cb.encode_entry(master_t)
    expected = cb.Tuple(6, "198.19.0.1", "198.18.0.1", 0, 50000)
    mask = cb.Tuple(6, "255.255.255.255", "255.255.255.255", 0, 0xFFFF)
    with CtSocket.open_in(a) as sa, CtSocket.open_in(b) as sb:
        assert sa.apply([(fam, master + helper)]).failed == 0
        assert sa.apply_expectations([encode_expectation(master_t, expected, mask, 300)]).failed == 0
        exps = list(sa.dump_expectations())
        assert len(exps) == 1 and ctmsg.tuple_info(exps[0].key)[4] == 50000
        # without its master (and helper) on B the kernel refuses it ...
        assert sb.apply_expectations((e.family, e.attrs) for e in exps).failed == 1
        # ... with them it lands, the same as on A
        assert sb.apply([(fam, master + helper)]).failed == 0
        assert sb.apply_expectations((e.family, e.attrs) for e in exps).failed == 0
        listing = [re.sub(r"^\d+ ", "", line)
                   for line in sh("conntrack", "-L", "expect", ns=a).stdout.splitlines()]
        assert listing and listing == [re.sub(r"^\d+ ", "", line)
                                       for line in sh("conntrack", "-L", "expect", ns=b).stdout.splitlines()]
        assert [e.key for e in sb.dump_expectations()] == [e.key for e in exps]
        sb.flush_expectations()
        assert list(sb.dump_expectations()) == []


def test_make_liberal_marks_tcp_entries_in_place(netns):
    """CtSocket.make_liberal: BE_LIBERAL set in both directions of an existing TCP entry,
    its other flags, state and timeout kept, no destroy and no create (no gap); a key we do
    not hold is ENOENT, nothing else."""
    b = netns.new("b")
    with CtSocket.open_in(b) as s, CtSocket.open_in(b, events=True) as ev:
        fam, tcp = cb.encode_entry(cb.Tuple(6, "198.18.0.1", "198.19.0.1", 1000, 80))
        _, absent = cb.encode_entry(cb.Tuple(6, "198.18.0.9", "198.19.0.1", 1000, 80))
        # written as is (prepare would add BE_LIBERAL): the flags of a Master's own entry
        raw = NFGEN_HDR.pack(NFGEN_HDR_LEN + len(tcp), CT_NEW, NLM_F_REQUEST | NLM_F_CREATE, 1, 0, fam, 0, 0)
        assert s.send_batched([raw + tcp]).failed == 0
        key = ctmsg.key_of(tcp)
        before = decoded_table(s)[key]
        flags_at = (6, 7)  # flags_orig, flags_reply in decoded_table's row
        assert all(not before[i] & cb.IP_CT_TCP_FLAG_BE_LIBERAL for i in flags_at), before[5:]
        ev.recv_batch(block=False)
        res = s.make_liberal([key, ctmsg.key_of(absent)])
        assert res.ok == 1 and dict(res.errors) == {errno.ENOENT: 1}, res
        after = decoded_table(s)[key]
        assert all(after[i] == before[i] | cb.IP_CT_TCP_FLAG_BE_LIBERAL for i in flags_at), after
        assert after[:6] == before[:6] and after[8:] == before[8:]
        time.sleep(0.05)
        assert all(e.kind not in (EV_NEW, EV_DESTROY) for e in ev.recv_batch(block=False))


def test_held_entries_get_their_kernel_timeouts_back(netns):
    """A Backup's copies carry the hold; after a takeover holdrelease cuts each to its state's
    default as this namespace's sysctls say (checked with the conntrack tool), and leaves an
    ESTABLISHED entry (its default is the hold), a zoned one and an IPv6 one right too."""
    from statesync import holdrelease

    b = netns.new("b")
    hold = 432000
    rows = {
        "tcp-established": cb.encode_entry(cb.Tuple(6, "198.18.0.1", "198.19.0.1", 1000, 80)),
        "tcp-time-wait": cb.encode_entry(cb.Tuple(6, "198.18.0.2", "198.19.0.1", 1000, 80),
                                         tcp_state=7),
        "udp-unreplied": cb.encode_entry(cb.Tuple(17, "198.18.0.3", "198.19.0.1", 1000, 53),
                                         status=IPS_CONFIRMED, zone=9),
        "udp-stream": cb.encode_entry(cb.Tuple(17, "2001:db8:18::1", "2001:db8:19::1", 1000, 53)),
        "icmp": cb.encode_entry(cb.Tuple(1, "198.18.0.4", "198.19.0.1", 7, 8 << 8)),
    }
    sh("sysctl", "-qw", "net.netfilter.nf_conntrack_udp_timeout_stream=77", ns=b)
    with CtSocket.open_in(b) as s:
        assert s.send_framed(s.frame_apply(list(rows.values()), hold=hold)).failed == 0
        assert all(ctmsg.timeout_of(c[3]) > hold - 60 for c in s.dump_changes())
        with entered_netns(b):
            ceilings = holdrelease.read_ceilings()
        assert ceilings[(17, 1)] == 77
        items = holdrelease.releases([c[1:] for c in s.dump_changes()], ceilings)
        assert len(items) == 4
        assert s.set_timeouts(items).ok == 4

    def timeout(*args):  # "udp 17 29 src=...": the third field
        line = sh("conntrack", "-L", *args, ns=b).stdout.split()
        return int(line[2]) if line else None

    left = {
        "tcp-established": timeout("-p", "tcp", "-s", "198.18.0.1"),
        "tcp-time-wait": timeout("-p", "tcp", "-s", "198.18.0.2"),
        "udp-unreplied": timeout("-p", "udp", "-s", "198.18.0.3", "-w", "9"),
        "udp-stream": timeout("-f", "ipv6", "-p", "udp"),
        "icmp": timeout("-p", "icmp"),
    }
    assert left["tcp-established"] > 431000, left
    assert 100 <= left["tcp-time-wait"] <= 120, left
    assert 20 <= left["udp-unreplied"] <= 30, left
    assert 60 <= left["udp-stream"] <= 77, left
    assert 20 <= left["icmp"] <= 30, left


def test_an_entry_made_without_the_event_extension_never_reports_its_destroy(netns):
    """Why statesync.ctsysctl sets nf_conntrack_events=1: an entry written while the setting
    leaves out the event extension (0 here; 2 with no listener on the machine, as on a Backup
    box) stays mute to a listener opened later (the new Master's); with 1 it reports."""
    from statesync import ctsysctl

    b = netns.new("b")
    mute = cb.encode_entry(cb.Tuple(17, "198.18.0.1", "198.19.0.1", 1000, 53))
    heard = cb.encode_entry(cb.Tuple(17, "198.18.0.2", "198.19.0.1", 1000, 53))
    sh("sysctl", "-qw", "net.netfilter.nf_conntrack_events=0", ns=b)
    with CtSocket.open_in(b) as s:
        assert s.apply([mute]).failed == 0
        with entered_netns(b):
            assert ctsysctl.ensure_events() is None
        assert sh("sysctl", "-n", "net.netfilter.nf_conntrack_events", ns=b).stdout.strip() == "1"
        assert s.apply([heard]).failed == 0
        with CtSocket.open_in(b, events=True) as ev:  # the listener comes after both writes
            assert s.delete([ctmsg.key_of(mute[1]), ctmsg.key_of(heard[1])]).failed == 0
            gone = [e.key for e in read_events(ev) if e.kind == EV_DESTROY]
    assert gone == [ctmsg.key_of(heard[1])]


def test_a_mark_only_update_is_completed_into_a_whole_tcp_entry(netns):
    """ctnetlink's UPDATE event for a mark change on an established flow carries no
    CTA_PROTOINFO (the kernel adds it only with a TCP state change). statesync.table
    completes it from the entry's NEW event, and B's kernel, given only the completed
    record (as a cache-mode commit or a re-seat would), holds the flow ESTABLISHED, marked."""
    from statesync.table import StateTable

    a, b, c = build_pair(netns)
    sh("nft", "add", "rule", "inet", "hsx_ct", "out", "tcp", "dport", "8081",
       "tcp", "flags", "&", "psh", "==", "psh", "ct", "mark", "set", "9", ns=a)
    table = StateTable()
    with CtSocket.open_in(a, events=True) as ev:
        with entered_netns(c):
            srv = socket.create_server(("192.0.2.10", 8081))
        with entered_netns(a):
            cl = socket.create_connection(("192.0.2.10", 8081), timeout=5)
        conn, _ = srv.accept()
        seen = read_events(ev)  # the handshake: NEW, then ESTABLISHED with protoinfo
        table.on_changes([(e.kind, e.family, e.key, e.attrs, 0) for e in seen])
        cl.sendall(b"x")  # PSH: the rule sets the mark, the state stays
        assert conn.recv(1) == b"x"
        updates = [e for e in read_events(ev) if e.kind == EV_UPDATE]
        for s in (cl, conn, srv):
            s.close()
    assert len(updates) == 1, updates
    raw = updates[0]
    assert ctmsg.mark_of(raw.attrs) == 9
    assert ctmsg.find_attr(raw.attrs, ctmsg.CTA_PROTOINFO) is None  # the premise
    out = table.on_changes([(raw.kind, raw.family, raw.key, raw.attrs, 0)])
    assert table.completed == 1
    with CtSocket.open_in(b) as sb:
        assert sb.apply([(raw.family, out[0][3])]).failed == 0
    line = sh("conntrack", "-L", "-p", "tcp", "--dport", "8081", ns=b).stdout
    assert "ESTABLISHED" in line and "mark=9" in line and "dst=203.0.113.1" in line, line
