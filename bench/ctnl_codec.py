"""Micro-benchmark of the lean ctnetlink codec against pyroute2's conntrack API.

Prints one table (median of --runs runs, msgs or entries per second):
  decode (key+attrs)    what the Master does per event: header walk + raw key slice
  decode (filter)       the same plus tuple_info/status/mark, what a filter reads
  decode (full dict)    decode_entry, the debug/test path
  pyroute2 decode       nfct_msg.decode() + ConntrackEntry (what Conntrack.dump_entries builds)
  prepare (create form) ctcreate.prepare on captured NAT entries (Backup side, pure)
  apply -> kernel       CtSocket.apply of synthetic NATed entries into an empty namespace
  events <- kernel      CtSocket.recv_batch of the NEW events that apply caused (one datagram each)
  update -> kernel      the same entries again, likely_new=False (update in place)
  dump <- kernel        CtSocket.dump of the table, keyed
  conntrack -L          the C tool listing the same table (reference)
  delete -> kernel      CtSocket.delete of every key

Runs in a namespace it creates (hsx-ct-bench-*), removed at exit.
Usage: python -m bench.ctnl_codec [--entries 50000] [--runs 5] [--pyroute2-msgs 3000]
"""

from __future__ import annotations

import argparse
import secrets
import socket
import statistics
import subprocess
import time

from statesync import ctbuild, ctcreate, ctmsg
from statesync.ctnetlink import RECV_SIZE, CtSocket


def capture_dump_buffers(sock: CtSocket) -> list[bytes]:
    """The raw recv() buffers of a full dump, as the kernel packs them."""
    sock.sock.send(ctmsg.request(ctmsg.CT_GET, ctmsg.NLM_F_REQUEST | ctmsg.NLM_F_DUMP, socket.AF_UNSPEC, 77))
    bufs = []
    while True:
        buf = sock.sock.recv(RECV_SIZE)
        bufs.append(buf)
        _, _, done = ctmsg.parse_messages_counted(buf)
        if done:
            return bufs


def split_messages(bufs: list[bytes]) -> list[bytes]:
    out = []
    for buf in bufs:
        off = 0
        while off + 16 <= len(buf):
            mlen, mtype = ctmsg.NLMSGHDR.unpack_from(buf, off)[:2]
            if mtype >> 8 == ctmsg.NFNL_SUBSYS_CTNETLINK:
                out.append(buf[off:off + mlen])
            off += ctmsg.align4(mlen)
    return out


def rate(n: int, fn) -> float:
    t0 = time.perf_counter()
    fn()
    return n / (time.perf_counter() - t0)


def decode_keys(bufs):
    for buf in bufs:
        ctmsg.parse_messages_counted(buf)


def decode_filter(bufs):
    for buf in bufs:
        for ev in ctmsg.parse_messages(buf):
            ctmsg.tuple_info(ev.key)
            ctmsg.status_of(ev.attrs)
            ctmsg.mark_of(ev.attrs)


def decode_full(bufs):
    for buf in bufs:
        for ev in ctmsg.parse_messages(buf):
            ctmsg.decode_entry(ev.family, ev.attrs)


def decode_pyroute2(msgs):
    from pyroute2.conntrack import ConntrackEntry
    from pyroute2.netlink.nfnetlink.nfctsocket import nfct_msg

    for raw in msgs:
        m = nfct_msg(raw)
        m.decode()
        g = m.get_attr
        ConntrackEntry(m["nfgen_family"], g("CTA_TUPLE_ORIG"), g("CTA_TUPLE_REPLY"), g("CTA_STATUS"),
                       g("CTA_TIMEOUT"), g("CTA_PROTOINFO"), g("CTA_MARK"), g("CTA_ID"), g("CTA_USE"),
                       g("CTA_ZONE"))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--entries", type=int, default=50_000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--pyroute2-msgs", type=int, default=3_000)
    args = ap.parse_args(argv)
    n = args.entries
    ns = f"hsx-ct-bench-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    results: dict[str, list[float]] = {}

    def record(name, value):
        results.setdefault(name, []).append(value)

    try:
        entries = ctbuild.synthetic_entries(n)
        with CtSocket.open_in(ns) as s:
            for _ in range(args.runs):
                s.flush()
                res = None

                def do_apply():
                    nonlocal res
                    res = s.apply(entries)
                # subscribed for this apply only; it must hold every NEW event (~1 KiB of skb each)
                ev = CtSocket.open_in(ns, events=True, rcvbuf=max(64 << 20, n << 11))
                record("apply -> kernel", rate(n, do_apply))
                assert res.failed == 0, res
                got = 0

                def drain_events():
                    nonlocal got
                    while got < n:
                        got += len(ev.recv_batch())
                record("events <- kernel (recv)", rate(n, drain_events))
                ev.close()
                record("update -> kernel", rate(n, lambda: s.apply(entries, likely_new=False)))
                record("dump <- kernel", rate(n, lambda: sum(1 for _ in s.dump())))
                t0 = time.perf_counter()
                subprocess.run(["ip", "netns", "exec", ns, "conntrack", "-L"], check=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                record("conntrack -L (C tool)", n / (time.perf_counter() - t0))
                bufs = capture_dump_buffers(s)
                msgs = split_messages(bufs)
                assert len(msgs) == n, (len(msgs), n)
                captured = [(ev.family, ev.attrs) for b in bufs for ev in ctmsg.parse_messages(b)]
                record("decode (key+attrs)", rate(n, lambda: decode_keys(bufs)))
                record("decode (filter fields)", rate(n, lambda: decode_filter(bufs)))
                record("decode (full dict)", rate(n, lambda: decode_full(bufs)))
                k = min(args.pyroute2_msgs, n)
                record("pyroute2 decode", rate(k, lambda: decode_pyroute2(msgs[:k])))
                record("prepare (create form)", rate(n, lambda: [ctcreate.prepare(a) for _, a in captured]))
                keys = [ctmsg.key_of(a) for _, a in captured]
                record("delete -> kernel", rate(n, lambda: s.delete(keys)))
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)

    py = statistics.median(results["pyroute2 decode"])
    print(f"ctnetlink codec, {n} NATed TCP entries, median of {args.runs} runs")
    print(f"{'operation':<26}{'per second':>14}{'vs pyroute2':>14}")
    for name, vals in results.items():
        med = statistics.median(vals)
        ratio = f"{med / py:>13.1f}x" if name.startswith("decode") or name.startswith("pyroute2") else ""
        print(f"{name:<26}{med:>14,.0f}{ratio:>14}")


if __name__ == "__main__":
    main()
