"""Random packet loss on a lab link, for a kernel without sch_netem.

An nftables netdev table on the interface drops a share of frames at random
(`numgen random mod 100 < percent`) on ingress and egress, so both directions
through this end of the link lose that share. The netdev hooks see frames
before the IP stack (ingress) and after it (egress), like a lossy cable.

By default only the sync channel's TCP segments (either port equal to
`only_tcp_port`) are dropped: heartbeats must keep arriving, or the test would
measure a failover instead of sync under loss. With `only_tcp_port=None` every
frame may be dropped except the heartbeats' UDP datagrams (`spare_udp_port`).

The rules carry counters, so a test can prove the loss really happened.
"""

from __future__ import annotations

import json

from hasync.config import DEFAULT_HEARTBEAT_PORT, DEFAULT_SYNC_PORT
from hasync.lab.process import run
from hasync.lab.state import Lab

TABLE_PREFIX = "hasync_lab_lossy_"
PRIORITY = -400  # before the stack's own filters; after faults' drop-all table (-500)


def table_name(ifname: str) -> str:
    # nft identifiers allow [A-Za-z0-9_]; interface names may hold '-' or '.'
    return TABLE_PREFIX + "".join(c if c.isalnum() else "_" for c in ifname)


def lossy_ruleset(ifname: str, percent: int, only_tcp_port: int | None = DEFAULT_SYNC_PORT,
                  spare_udp_port: int = DEFAULT_HEARTBEAT_PORT) -> str:
    """The nft script that (re)creates the lossy table of `ifname` (atomic replace)."""
    if not isinstance(percent, int) or not 0 <= percent <= 100:
        raise ValueError(f"percent must be an integer 0..100, not {percent!r}")
    # nft refuses `< 100` against `mod 100` (out of the value's range): all is a plain drop
    drop = "counter drop" if percent == 100 else f"numgen random mod 100 < {percent} counter drop"
    if only_tcp_port is not None:
        rules = [f"tcp dport {int(only_tcp_port)} {drop}", f"tcp sport {int(only_tcp_port)} {drop}"]
    else:
        rules = [f"udp dport {int(spare_udp_port)} accept", drop]
    body = "\n".join(f"        {rule}" for rule in rules)
    table = table_name(ifname)
    chains = "\n".join(
        f"    chain {hook} {{\n"
        f'        type filter hook {hook} device "{ifname}" priority {PRIORITY}; policy accept;\n'
        f"{body}\n    }}"
        for hook in ("ingress", "egress"))
    # declare-then-delete makes the replace work whether or not the table exists
    return (f"table netdev {table} {{}}\ndelete table netdev {table}\n"
            f"table netdev {table} {{\n{chains}\n}}\n")


def lossy(lab: Lab, node: str, ifname: str, percent: int, only_tcp_port: int | None = DEFAULT_SYNC_PORT,
          spare_udp_port: int = DEFAULT_HEARTBEAT_PORT) -> None:
    """Drop `percent`% of `ifname`'s frames in `node` (see the module doc for which ones)."""
    run(lab, node, ["nft", "-f", "-"],
        input=lossy_ruleset(ifname, percent, only_tcp_port, spare_udp_port))


def clear(lab: Lab, node: str, ifname: str) -> None:
    """Remove the loss from `ifname` in `node` (nothing to do when there is none)."""
    run(lab, node, ["nft", "delete", "table", "netdev", table_name(ifname)], check=False)


def dropped(lab: Lab, node: str, ifname: str) -> int:
    """Frames the lossy table of `ifname` has dropped so far (0 when there is no table)."""
    out = run(lab, node, ["nft", "-j", "list", "table", "netdev", table_name(ifname)], check=False)
    if out.returncode != 0:
        return 0
    total = 0
    for item in json.loads(out.stdout).get("nftables", []):
        for expr in (item.get("rule") or {}).get("expr", []):
            if isinstance(expr, dict) and "counter" in expr:
                total += int(expr["counter"].get("packets", 0))
    return total
