"""The HA icon as the seed defines it: grey (disabled), green (working), red (failover
would not work), with the role word and the reasons for red. Pure: facts in, a dict out."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from failover.machine import BACKUP, DISABLED, FAULT, INIT, MASTER, FailoverMachine

ROLE_WORD = {MASTER: "Master", BACKUP: "Backup", FAULT: "Backup", INIT: "Backup"}


@dataclass
class NodeFacts:
    """What the shell knows beside the machine."""

    version: str
    config_digest: bytes
    ha_link: str
    ha_link_up: bool
    path_names: tuple[str, ...]  # path index -> interface name
    sync: dict[str, Any] | None = None  # the sync service's status, if it runs
    sync_reasons: list[str] = field(default_factory=list)


def reasons_for_red(m: FailoverMachine, facts: NodeFacts, now: float) -> list[str]:
    reasons: list[str] = []
    dead = m.timing.dead_interval
    if m.state == FAULT:
        reasons.append(f"FAULT: {m.cause} on this node")
    if not facts.ha_link_up:
        reasons.append(f"HA link {facts.ha_link} is down")
    peer = m.peer
    if peer.stopped:
        reasons.append(f"peer {peer.hostname} has stopped")
    elif not peer.alive(now, dead):
        reasons.append("peer lost: no heartbeats on any path" if peer.last_seen
                       else "peer not seen yet")
    else:
        silent = [facts.path_names[i] for i in range(len(facts.path_names))
                  if i not in peer.paths_alive(now, dead)]
        if silent:
            reasons.append("no heartbeats from the peer on " + ", ".join(silent))
        if peer.state in (FAULT, DISABLED):
            reasons.append(f"peer {peer.hostname} is {peer.state}: it could not take over")
        if peer.version != facts.version:
            reasons.append(f"software release differs: this node {facts.version}, "
                           f"peer {peer.version}")
        if peer.config_digest != facts.config_digest:
            reasons.append("HA group definition (group id, floating IPs) differs from the peer's")
        if peer.state == MASTER and m.state == MASTER:
            reasons.append("both nodes are Master")
        if peer.state == m.state == BACKUP:
            reasons.append("no Master")
    reasons.extend(facts.sync_reasons)
    return reasons


def summarize(m: FailoverMachine | None, facts: NodeFacts | None, enabled: bool,
              now: float) -> dict[str, Any]:
    if not enabled:
        return {"icon": "grey", "role": "", "state": DISABLED, "reasons": [], "peer": None}
    if m is None or facts is None:
        # the seed: enabling HA turns the icon green; the role word comes with a group
        return {"icon": "green", "role": "", "state": "NO GROUP", "reasons": [], "peer": None}
    reasons = reasons_for_red(m, facts, now)
    peer = m.peer
    peer_info = None
    if peer.hostname:
        seen = max(peer.last_seen.values()) if peer.last_seen else None
        peer_info = {
            "hostname": peer.hostname,
            "state": peer.state,
            "priority": peer.priority,
            "version": peer.version,
            "alive": peer.alive(now, m.timing.dead_interval),
            "last_seen_ms_ago": None if seen is None else round((now - seen) * 1000, 1),
            "paths_alive": sorted(facts.path_names[i]
                                  for i in peer.paths_alive(now, m.timing.dead_interval)
                                  if i < len(facts.path_names)),
        }
    return {
        "icon": "red" if reasons else "green",
        "role": ROLE_WORD.get(m.state, ""),
        "state": m.state,
        "cause": m.cause,
        "reasons": reasons,
        "peer": peer_info,
        "priority": m.effective_priority(),
        "yielded": m.yielded,
        "last_switchover_error": m.last_switchover_error,
    }
