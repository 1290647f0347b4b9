"""The failover core's I/O primitives against the real kernel, in namespaces made here.

Two namespaces A and B joined by a veth pair (hfa0 in A, hfb0 in B). Code that must
live in a namespace (packet sockets, the link monitor) runs in a child started with
`ip netns exec`, which prints one JSON line back. Latency figures are printed (run
with -s to see them), never asserted: the machine is shared and noisy.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.lab

ROOT = Path(__file__).resolve().parents[2]
VIP4 = ipaddress.ip_interface("192.0.2.1/24")
VIP6 = ipaddress.ip_interface("2001:db8::1/64")
OLD_MAC = "02:00:5e:00:00:99"  # the "old Master" B believes in before the announcement


def _ip(*args: str) -> str:
    return subprocess.run(["ip", *args], check=True, capture_output=True, text=True).stdout


def _in_ns(ns: str, code: str, timeout: float = 60) -> dict:
    """Run python `code` in namespace `ns`; it must print one JSON object last."""
    done = subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def _wait_operstate_up(*links: tuple[str, str]) -> None:
    # until linkwatch has seen the carrier the device keeps its noop qdisc, which
    # silently drops what is sent (up to ~1 s after `link set up`)
    deadline = time.monotonic() + 10
    for ns, dev in links:
        while json.loads(_ip("-n", ns, "-j", "link", "show", dev))[0]["operstate"] != "UP":
            assert time.monotonic() < deadline, f"{ns}/{dev} never came up"
            time.sleep(0.02)


@pytest.fixture
def pair():
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    suffix = secrets.token_hex(4)
    a, b = f"hsx-fio-a{suffix}", f"hsx-fio-b{suffix}"
    created = []
    try:
        for ns in (a, b):
            _ip("netns", "add", ns)
            created.append(ns)
        # made inside A with its peer moved straight into B: nothing touches the host namespace
        _ip("-n", a, "link", "add", "hfa0", "type", "veth", "peer", "name", "hfb0", "netns", b)
        for ns, dev, addr4, addr6 in ((a, "hfa0", "192.0.2.2/24", "2001:db8::2/64"),
                                      (b, "hfb0", "192.0.2.3/24", "2001:db8::3/64")):
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "addr", "add", addr4, "dev", dev)
            _ip("-n", ns, "addr", "add", addr6, "dev", dev, "nodad")
            _ip("-n", ns, "link", "set", dev, "up")
        _wait_operstate_up((a, "hfa0"), (b, "hfb0"))
        yield a, b
    finally:
        for ns in created:
            subprocess.run(["ip", "netns", "del", ns], check=False)


# -- floating IPs -------------------------------------------------------------------


def test_floating_ips_are_idempotent_and_visible_to_the_kernel(pair):
    a, _ = pair
    result = _in_ns(a, f"""
        import ipaddress, json, time
        from pyroute2.netlink.exceptions import NetlinkError
        from failover.vip import FloatingIPs
        vip4, vip6 = ipaddress.ip_interface("{VIP4}"), ipaddress.ip_interface("{VIP6}")
        out = {{}}
        with FloatingIPs() as ips:
            for vip in (vip4, vip6):
                ips.add("hfa0", vip)
                ips.add("hfa0", vip)  # EEXIST is fine
            out["present"] = [ips.present("hfa0", vip4), ips.present("hfa0", vip6)]
            out["addresses"] = [str(x) for x in ips.addresses("hfa0")]
            view = ips.system_view(exclude=[vip4, vip6])
            out["view"] = {{k: [str(x) for x in v] for k, v in view.items()}}
            import subprocess
            out["kernel"] = json.loads(subprocess.run(["ip", "-j", "addr", "show", "dev", "hfa0"],
                                                      capture_output=True, text=True).stdout)
            for vip in (vip4, vip6):
                ips.remove("hfa0", vip)
                ips.remove("hfa0", vip)  # already gone is fine
            out["after_remove"] = [ips.present("hfa0", vip4), ips.present("hfa0", vip6)]
            try:
                ips.add("nosuchdev0", vip4)
                out["missing_device"] = "no error"
            except NetlinkError as err:
                out["missing_device"] = err.code
            # latency of one add + one remove, the cost per floating IP of a takeover
            samples = []
            for vip in [vip4] * 200 + [vip6] * 200:
                t0 = time.perf_counter()
                ips.add("hfa0", vip)
                ips.remove("hfa0", vip)
                samples.append((time.perf_counter() - t0) * 1e6)
            samples.sort()
            out["latency_us"] = {{"median": samples[len(samples) // 2], "p99": samples[int(len(samples) * 0.99)]}}
        print(json.dumps(out))
    """)
    assert result["present"] == [True, True]
    assert str(VIP4) in result["addresses"] and str(VIP6) in result["addresses"]
    assert "192.0.2.2/24" in result["view"]["hfa0"]
    assert str(VIP4) not in result["view"]["hfa0"] and str(VIP6) not in result["view"]["hfa0"]
    assert "127.0.0.1/8" in result["view"]["lo"]
    kernel = {(x["local"], x["prefixlen"]): x for x in result["kernel"][0]["addr_info"]}
    v4 = kernel[(str(VIP4.ip), VIP4.network.prefixlen)]
    assert v4["broadcast"] == "192.0.2.255"
    v6 = kernel[(str(VIP6.ip), VIP6.network.prefixlen)]
    assert v6.get("nodad") is True and not v6.get("tentative")  # usable at once
    assert result["after_remove"] == [False, False]
    assert result["missing_device"] == 19  # ENODEV
    print(f"\nvip add+remove latency: {result['latency_us']}")


# -- gratuitous ARP / unsolicited NA ------------------------------------------------

_CAPTURE = """
    import json, select, socket, sys, time
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
    s.bind(("hfb0", 0))
    print("ready", flush=True)
    frames, deadline = [], time.monotonic() + 10
    while len(frames) < 3 and time.monotonic() < deadline:
        if select.select([s], [], [], 0.2)[0]:
            frame = s.recv(2048)
            ethertype = frame[12:14]
            icmp6_type = frame[54] if ethertype == b"\\x86\\xdd" and frame[20] == 58 else None
            if ethertype == b"\\x08\\x06" or icmp6_type == 136:
                frames.append(frame.hex())
    print(json.dumps({"frames": frames}))
"""


def _icmp6_checksum(src: bytes, dst: bytes, payload: bytes) -> int:
    pseudo = src + dst + struct.pack("!I3xB", len(payload), 58)
    data = pseudo + payload + (b"\0" if len(payload) % 2 else b"")
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def test_announcements_move_the_peers_neighbour_entries(pair):
    a, b = pair
    for vip in (VIP4, VIP6):
        _ip("-n", a, "addr", "add", str(vip), "dev", "hfa0", "nodad" if vip.version == 6 else "noprefixroute")
        # B still maps the floating IP to the old Master
        _ip("-n", b, "neigh", "replace", str(vip.ip), "lladdr", OLD_MAC, "dev", "hfb0", "nud", "stale")
    mac_a = json.loads(_ip("-n", a, "-j", "link", "show", "hfa0"))[0]["address"]

    capture = subprocess.Popen(["ip", "netns", "exec", b, sys.executable, "-c", textwrap.dedent(_CAPTURE)],
                               cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert capture.stdout.readline().strip() == "ready"
        sent = _in_ns(a, f"""
            import ipaddress, json
            from failover.garp import Announcer
            announcer = Announcer()
            ok = [announcer.announce("hfa0", ipaddress.ip_interface(v)) for v in ("{VIP4}", "{VIP6}")]
            missing = announcer.announce("nosuchdev0", ipaddress.ip_interface("{VIP4}"))
            result = {{"ok": ok, "sent": announcer.sent, "missing": missing, "errors": announcer.send_errors}}
            import time
            for v in ("{VIP4}", "{VIP6}"):  # cost of one announcement, sockets already open
                vip = ipaddress.ip_interface(v)
                t0 = time.perf_counter()
                for _ in range(100):
                    announcer.announce("hfa0", vip)
                result[f"announce_us_v{{vip.version}}"] = (time.perf_counter() - t0) * 1e4
            print(json.dumps(result))
        """)
        captured = json.loads(capture.communicate(timeout=30)[0].strip().splitlines()[-1])
    finally:
        if capture.poll() is None:
            capture.kill()
            capture.wait()
    print(f"\nannounce cost, us: IPv4 (2 ARPs) {sent.pop('announce_us_v4'):.1f}, "
          f"IPv6 (1 NA) {sent.pop('announce_us_v6'):.1f}")
    assert sent == {"ok": [True, True], "sent": 3, "missing": False, "errors": 1}

    neighbours = {n["dst"]: n for n in json.loads(_ip("-n", b, "-j", "neigh", "show", "dev", "hfb0"))}
    assert neighbours[str(VIP4.ip)]["lladdr"] == mac_a
    assert neighbours[str(VIP6.ip)]["lladdr"] == mac_a

    mac = bytes.fromhex(mac_a.replace(":", ""))
    frames = [bytes.fromhex(f) for f in captured["frames"]]
    arps = [f for f in frames if f[12:14] == b"\x08\x06"]
    adverts = [f for f in frames if f[12:14] == b"\x86\xdd"]
    assert len(arps) == 2 and len(adverts) == 1
    for frame, op in zip(arps, (1, 2)):
        assert frame[0:6] == b"\xff" * 6 and frame[6:12] == mac
        htype, ptype, hlen, plen, opcode = struct.unpack("!HHBBH", frame[14:22])
        assert (htype, ptype, hlen, plen, opcode) == (1, 0x0800, 6, 4, op)
        assert frame[22:28] == mac  # sender MAC
        assert frame[28:32] == VIP4.ip.packed == frame[38:42]  # sender IP = target IP

    na = adverts[0]
    ipv6, icmp = na[14:54], na[54:]
    payload_len, next_header, hop_limit = struct.unpack("!HBB", ipv6[4:8])
    src, dst = ipv6[8:24], ipv6[24:40]
    assert (next_header, hop_limit) == (58, 255)
    assert src == VIP6.ip.packed and dst == ipaddress.ip_address("ff02::1").packed
    assert na[0:6] == bytes.fromhex("333300000001") and na[6:12] == mac
    icmp = icmp[:payload_len]
    assert icmp[0] == 136 and icmp[1] == 0
    flags = struct.unpack("!I", icmp[4:8])[0]
    assert flags & 0x20000000 and not flags & 0x40000000  # Override set, Solicited clear
    assert icmp[8:24] == VIP6.ip.packed
    assert icmp[24:26] == b"\x02\x01" and icmp[26:32] == mac  # target link-layer address option
    assert _icmp6_checksum(src, dst, icmp) == 0  # a valid checksum sums to zero


@pytest.mark.parametrize("arp_accept, creates_entry", [(0, False), (1, True)])
def test_gratuitous_arp_creates_new_entries_only_with_arp_accept(pair, arp_accept, creates_entry):
    a, b = pair
    _ip("-n", a, "addr", "add", str(VIP4), "dev", "hfa0", "noprefixroute")
    subprocess.run(["ip", "netns", "exec", b, "sysctl", "-qw", f"net.ipv4.conf.hfb0.arp_accept={arp_accept}"],
                   check=True)
    _in_ns(a, f"""
        import ipaddress, json
        from failover.garp import Announcer
        print(json.dumps(Announcer().announce("hfa0", ipaddress.ip_interface("{VIP4}"))))
    """)
    entries = _in_ns(b, f"""
        import json, subprocess, time
        time.sleep(0.2)  # let B's softirq process the frames
        out = subprocess.run(["ip", "-j", "neigh", "show", "dev", "hfb0", "to", "{VIP4.ip}"],
                             capture_output=True, text=True).stdout
        print(json.dumps([n for n in json.loads(out or "[]") if n.get("lladdr")]))
    """)
    assert bool(entries) is creates_entry


# -- link monitor ---------------------------------------------------------------------


def test_link_monitor_reports_carrier_and_admin_changes(pair):
    a, b = pair
    result = _in_ns(a, f"""
        import json, select, time
        from pyroute2 import IPRoute
        from failover.links import LinkMonitor

        monitor = LinkMonitor(["hfa0", "ghost0"])
        here, peer_ns = IPRoute(), IPRoute(netns="{b}")
        own = here.link_lookup(ifname="hfa0")[0]
        peer = peer_ns.link_lookup(ifname="hfb0")[0]
        out = {{"initial": monitor.initial(), "steps": [], "latency_us": []}}

        def wait_change():
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                select.select([monitor], [], [], 0.5)
                changes = monitor.read()
                if changes:
                    return changes
            return []

        def step(name, ipr, index, state):
            t0 = time.perf_counter()
            ipr.link("set", index=index, state=state)
            changes = wait_change()
            out["latency_us"].append([name, (time.perf_counter() - t0) * 1e6])
            out["steps"].append([name, changes])

        step("peer down", peer_ns, peer, "down")  # carrier loss on hfa0
        step("peer up", peer_ns, peer, "up")
        step("own down", here, own, "down")
        step("own up", here, own, "up")
        # unwatched churn is not reported
        here.link("set", index=here.link_lookup(ifname="lo")[0], state="down")
        time.sleep(0.1)
        out["unwatched"] = monitor.read()
        for _ in range(3):  # latency sample: carrier flaps from the peer side
            step("flap down", peer_ns, peer, "down")
            step("flap up", peer_ns, peer, "up")
        t0 = time.perf_counter()
        peer_ns.link("del", index=peer)  # deleting one end deletes the pair
        out["deleted"] = wait_change()
        out["steps"].append(["delete", out["deleted"]])
        out["latency_us"].append(["delete", (time.perf_counter() - t0) * 1e6])
        out["overruns"], out["bad"] = monitor.overruns, monitor.bad_messages
        monitor.close()
        print(json.dumps(out))
    """)
    assert result["initial"] == {"hfa0": True, "ghost0": False}
    steps = result["steps"]
    assert steps[:4] == [
        ["peer down", [["hfa0", False]]],
        ["peer up", [["hfa0", True]]],
        ["own down", [["hfa0", False]]],
        ["own up", [["hfa0", True]]],
    ]
    assert result["unwatched"] == []
    assert all(changes == [["hfa0", name.endswith("up")]] for name, changes in steps[4:-1])
    assert result["deleted"] == [["hfa0", False]]
    assert result["overruns"] == 0 and result["bad"] == 0
    print("\nlink event latency (request sent -> read() returned), us:")
    for name, latency_us in result["latency_us"]:
        print(f"  {name:10s} {latency_us:9.0f}")


def test_link_monitor_heals_an_event_overrun_with_a_dump(pair):
    a, _ = pair
    result = _in_ns(a, """
        import json, select, socket
        from pyroute2 import IPRoute
        from failover.links import LinkMonitor

        monitor = LinkMonitor(["hfa0", "lo"])
        monitor._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)  # kernel minimum
        initial = monitor.initial()
        ipr = IPRoute()
        own, lo = ipr.link_lookup(ifname="hfa0")[0], ipr.link_lookup(ifname="lo")[0]
        for _ in range(50):  # far more events than the tiny buffer holds, none read
            ipr.link("set", index=lo, state="down")
            ipr.link("set", index=lo, state="up")
        ipr.link("set", index=own, state="down")  # the one change that matters, maybe lost
        changes = []
        while monitor.overruns == 0 or monitor._dump_pending:
            if not select.select([monitor], [], [], 5)[0]:
                break
            changes += monitor.read()
        print(json.dumps({"initial": initial, "changes": changes, "overruns": monitor.overruns}))
    """)
    assert result["initial"] == {"hfa0": True, "lo": True}
    assert result["overruns"] >= 1
    assert result["changes"][-1] == ["hfa0", False]  # the dump recovered the final state


def test_link_monitor_drops_garbage_without_crashing():
    """A malformed datagram is counted and dropped (no namespace needed: nothing is sent)."""
    from failover.links import LinkMonitor

    monitor = LinkMonitor(["lo"])
    try:
        state = monitor.initial()
        truncated_newlink = struct.pack("=IHHII", 20, 16, 0, 0, 0) + b"\0" * 4
        assert monitor._apply(truncated_newlink) == []
        assert monitor.bad_messages == 1
        assert monitor._apply(b"\xff" * 7) == []  # shorter than a header: ignored
        assert monitor.read() == [] or monitor.initial() == state
    finally:
        monitor.close()
