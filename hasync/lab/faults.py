"""Fault injection: pull a cable, cut the HA link, crash a node — and undo it.

Link faults act where an operator would: a LAN/WAN cable is pulled at the
switch (the switch-side veth end goes down), so the firewall's own interface
loses carrier and its daemon learns it from a netlink link event, exactly as
with a real cable. The HA link has no switch, so its fault sets the node's own
lan2 down (the peer's lan2 loses carrier too, as with a cut cable).

A crash SIGKILLs the node's daemon (and its process group), downs lan1 and
wan1 in one batch (so the floating IPs it held answer nobody) and silences
lan2 with a netdev drop-all table instead of downing it: a veth loses carrier
when its other end goes down, and the survivor must detect a dead peer by
missed heartbeats (as behind any switch or media converter), not by a carrier
event that keepalived, for one, treats as its own FAULT. `poweroff` is the
harsher variant: all three interfaces down, so the survivor's lan2 loses
carrier too. `restore` after either "reboots" the node: the floating IPs and
conntrack table it held are gone, base addresses come back, and the daemon
is restarted through the starter registered for the lab's daemon kind (or
the one passed in).
"""

from __future__ import annotations

from typing import Callable

from hasync.lab.process import LabCommandError, freeze, ip_batch, kill_now, pid_in_netns, run
from hasync.lab.state import FIREWALLS, Lab
from hasync.lab.topology import firewall_interface_commands

KINDS = ("crash", "poweroff", "wan1", "lan1", "halink")
NODE_DOWN_KINDS = ("crash", "poweroff")
SILENCE_TABLE = "hasync_lab_crashed"


def _silence_ruleset(ifname: str) -> str:
    # netdev hooks see every frame (ARP included) before and after the stack
    return f"""\
table netdev {SILENCE_TABLE} {{
    chain ingress {{ type filter hook ingress device "{ifname}" priority -500; policy drop; }}
    chain egress {{ type filter hook egress device "{ifname}" priority -500; policy drop; }}
}}
"""

# interface fault -> (namespace role holding the cable end to pull, link name there)
_CABLE_END = {
    "lan1": lambda node: ("lsw", node),
    "wan1": lambda node: ("wsw", node),
    "halink": lambda node: (node, "lan2"),
}

DaemonStarter = Callable[[Lab, str], int]
_starters: dict[str, DaemonStarter] = {}


def register_daemon_starter(kind: str, starter: DaemonStarter) -> None:
    """Let `restore` restart a crashed node's daemon of this kind ("hasync", "keepalived").

    `starter(lab, node)` starts the daemon and returns its PID; restore records it.
    """
    _starters[kind] = starter


def _check(lab: Lab, node: str, kind: str | None = None) -> None:
    if node not in FIREWALLS:
        raise ValueError(f"faults apply to firewalls {FIREWALLS}, not {node!r}")
    if kind is not None and kind not in KINDS:
        raise ValueError(f"unknown fault kind {kind!r} (expected one of {KINDS})")


def _set_cable(lab: Lab, node: str, kind: str, state: str) -> None:
    role, link = _CABLE_END[kind](node)
    ip_batch([f"link set {link} {state}"], netns=lab.ns(role))


def fail(lab: Lab, node: str, kind: str) -> None:
    """Inject fault `kind` (crash|poweroff|wan1|lan1|halink) on firewall `node` and record it."""
    _check(lab, node, kind)
    if kind in NODE_DOWN_KINDS:
        # the node dies all at once: its daemon frozen first (it runs no more code, so it
        # cannot report its own links going down), at once the links that forward traffic,
        # then the HA link silenced, and only then the daemon killed and reaped (which may
        # take a while for some daemons)
        pid = lab.pids.pop(node, None)
        if pid and pid_in_netns(pid, lab.ns(node)):
            freeze(pid)
        else:
            pid = None
        downed = [ifname for ifname in lab.addresses[node] if kind == "poweroff" or ifname != "lan2"]
        ip_batch([f"link set {ifname} down" for ifname in downed], netns=lab.ns(node))
        if kind == "crash":
            run(lab, node, ["nft", "-f", "-"], input=_silence_ruleset("lan2"))
        if pid:
            kill_now(pid)
    else:
        _set_cable(lab, node, kind, "down")
    active = lab.faults.setdefault(node, [])
    if kind not in active:
        active.append(kind)
    lab.save()


def _reboot_network(lab: Lab, node: str) -> None:
    # A rebooted node keeps nothing from before: flush every address (the
    # floating IPs it held), put the base ones back, and empty its conntrack table.
    run(lab, node, ["nft", "delete", "table", "netdev", SILENCE_TABLE], check=False)
    flush = [f"address flush dev {ifname}" for ifname in lab.addresses[node]]
    ip_batch(flush + firewall_interface_commands(lab, node), netns=lab.ns(node))
    try:
        run(lab, node, ["conntrack", "-F"])
    except LabCommandError:
        pass  # an empty table reports an error on some versions; nothing to flush then


def restore(lab: Lab, node: str, start_daemon: DaemonStarter | None = None) -> list[str]:
    """Undo every active fault on `node`; returns the nodes whose daemon needs a restart.

    After a crash the daemon is restarted with `start_daemon` (or the starter
    registered for `lab.daemon`) and its PID recorded in lab.pids; without a
    starter the node is returned so the caller restarts it.
    """
    _check(lab, node)
    active = lab.faults.get(node, [])
    needs_restart: list[str] = []
    for kind in active:
        if kind in NODE_DOWN_KINDS:
            _reboot_network(lab, node)
        else:
            _set_cable(lab, node, kind, "up")
    crashed = any(kind in NODE_DOWN_KINDS for kind in active)
    lab.faults.pop(node, None)
    if crashed:
        starter = start_daemon or _starters.get(lab.daemon)
        if starter is None:
            needs_restart.append(node)
        else:
            lab.pids[node] = starter(lab, node)
    lab.save()
    return needs_restart


def active_faults(lab: Lab) -> dict[str, list[str]]:
    return {node: list(kinds) for node, kinds in lab.faults.items() if kinds}
