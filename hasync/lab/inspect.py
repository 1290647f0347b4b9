"""Reading the lab's live state back (addresses, link state) for tests and benchmarks."""

from __future__ import annotations

import json

from hasync.lab.process import run
from hasync.lab.state import FIREWALLS, Lab


def addresses_on(lab: Lab, node: str, *, serving_only: bool = False) -> dict[str, set[str]]:
    """interface -> its IPv4 addresses with prefix ("192.0.2.1/24") in `node`'s namespace.

    `serving_only` skips interfaces that are down or without carrier: an address
    left on a dead port (a crashed node, a pulled cable) answers nobody.
    """
    out = run(lab, node, ["ip", "-j", "-4", "address", "show"]).stdout
    found: dict[str, set[str]] = {}
    for link in json.loads(out or "[]"):
        if serving_only and not {"UP", "LOWER_UP"} <= set(link.get("flags", [])):
            continue
        found[link["ifname"]] = {f"{a['local']}/{a['prefixlen']}" for a in link.get("addr_info", [])}
    return found


def holder_of_floating_ips(lab: Lab) -> dict[str, list[str]]:
    """floating IP -> the firewalls serving it on a live port (more than one: split brain)."""
    holders: dict[str, list[str]] = {ip: [] for ip in lab.addresses["floating"].values()}
    for fw in FIREWALLS:
        present = set().union(*addresses_on(lab, fw, serving_only=True).values())
        for ip in holders:
            if ip in present:
                holders[ip].append(fw)
    return holders


def link_state(lab: Lab, node: str, ifname: str) -> dict:
    """{'operstate': 'UP'|'DOWN'|..., 'carrier': bool, 'admin_up': bool} of one interface."""
    out = run(lab, node, ["ip", "-j", "link", "show", "dev", ifname]).stdout
    link = json.loads(out)[0]
    flags = set(link.get("flags", []))
    return {"operstate": link.get("operstate"), "carrier": "LOWER_UP" in flags, "admin_up": "UP" in flags}
