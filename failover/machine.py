"""The failover state machine: sans-I/O, time passed in, actions out.

  start / enable / monitored links all up again
        |
        v
      INIT --peer is Master, or outranks us--> BACKUP
        |                                       |  ^
        | nobody heard for the dead time,       |  | the peer outranks us (split healed),
        | or we outrank the peer                |  | or we handed over (switchover)
        v                                       v  |
      MASTER <--peer lost / resigned / FAULT----+  |
        +------------------------------------------+
  any state but DISABLED --monitored interface down--> FAULT
  any state --disable--> DISABLED          any state --shutdown--> STOPPED

Failure is detected from adverts on every path (the HA link and each monitored
interface), so a cut HA link alone never makes two Masters. A Master that must
go (fault, disable, shutdown, switchover) says so in its advert (RESIGN) and the
Backup takes over at once instead of waiting for the dead timer.

Leadership between two live nodes is one function both sides compute alike
(`_leader`): a node that yielded (after a switchover) does not lead, even once it took
over from a peer that only went quiet for a moment (until it hears the peer below
it); then a node whose
conntrack table is in sync beats one whose is not; then the higher priority, then the
lower hostname.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from failover import advert as wire
from failover.actions import (
    Action, AddFloatingIPs, Announce, RemoveFloatingIPs, SendAdvert, Transition,
)

INIT, BACKUP, MASTER, FAULT, DISABLED, STOPPED = (
    "INIT", "BACKUP", "MASTER", "FAULT", "DISABLED", "STOPPED",
)
FLAG_YIELD = wire.FLAG_YIELD
NEVER = float("inf")


@dataclass(frozen=True)
class Timing:
    interval: float  # seconds between adverts
    dead_count: int
    preempt: str = "on"  # on | off | delay
    preempt_delay: float = 0.0
    garp_count: int = 3
    garp_interval: float = 0.05

    @property
    def dead_interval(self) -> float:
        return self.interval * self.dead_count


@dataclass
class PeerView:
    """What the last adverts told us about the peer."""

    hostname: str = ""
    state: str = ""
    priority: int = 0
    flags: int = 0
    version: str = ""
    config_digest: bytes = b""
    sync_position: int = 0
    counter: int = 0  # the newest advert's counter: older ones carry stale state
    last_seen: dict[int, float] = field(default_factory=dict)  # path index -> time
    stopped: bool = False

    def alive(self, now: float, dead_interval: float) -> bool:
        return not self.stopped and any(now - t <= dead_interval for t in self.last_seen.values())

    def paths_alive(self, now: float, dead_interval: float) -> set[int]:
        return {p for p, t in self.last_seen.items() if now - t <= dead_interval}


class FailoverMachine:
    def __init__(
        self, *, hostname: str, priority: int, timing: Timing,
        monitored: tuple[str, ...], enabled: bool = True, path_count: int = 1,
    ):
        self.hostname = hostname
        self.priority = priority
        self.timing = timing
        self.monitored = monitored
        self.path_count = path_count  # heartbeat paths (HA link + monitored interfaces)
        # set by the shell: our conntrack table holds the Master's (sync resynced). A node
        # that just came back must not take the role from a live Master before that, or
        # the sessions it takes over have no state (keepalived #2254).
        self.state_ready = True
        self.enabled = enabled
        self.state = DISABLED if not enabled else INIT
        self.cause = "start"
        self.peer = PeerView()
        self.links_down: set[str] = set()
        self.yielded = False  # handed over by switchover: do not lead by ourselves
        self.takeover_requested = False  # asking the Master to hand over
        self.resigning = False  # Master waiting for the peer to take over
        self.stopping = False
        self.last_switchover_error = ""
        self._next_advert = 0.0
        self._init_deadline = NEVER
        self._preempt_at = NEVER
        self._resign_deadline = NEVER
        self._garp_due: list[float] = []

    # ---- inputs -------------------------------------------------------------------

    def start(self, now: float, links_up: dict[str, bool]) -> list[Action]:
        self.links_down = {name for name in self.monitored if not links_up.get(name, False)}
        self._next_advert = now
        if self.state == INIT:
            if self.links_down:
                return self._enter(FAULT, self._fault_cause(), now)
            self._init_deadline = now + self.timing.dead_interval
        return self.on_timer(now)

    def on_advert(self, adv: wire.Advert, now: float) -> list[Action]:
        peer = self.peer
        peer.last_seen[adv.path] = now
        if adv.hostname == peer.hostname and adv.counter < peer.counter:
            # an older advert overtaken by a newer one on another path: it proves the
            # path is alive, but its state is stale (e.g. sent just before a RESIGN)
            return []
        peer.counter = adv.counter
        peer.hostname, peer.state, peer.priority = adv.hostname, adv.state, adv.priority
        peer.flags, peer.version = adv.flags, adv.version
        peer.config_digest, peer.sync_position = adv.config_digest, adv.sync_position
        peer.stopped = adv.has(wire.FLAG_SHUTDOWN) and adv.state != MASTER
        if peer.stopped:
            peer.last_seen.clear()
        return self._decide(now)

    def on_link(self, ifname: str, up: bool, now: float) -> list[Action]:
        if ifname not in self.monitored:
            return []
        if up:
            self.links_down.discard(ifname)
        else:
            self.links_down.add(ifname)
        if self.state in (DISABLED, STOPPED):
            return []
        if self.links_down and self.state != FAULT:
            return self._enter(FAULT, self._fault_cause(), now)
        if not self.links_down and self.state == FAULT:
            # back through INIT: what we last heard from the peer may be stale (it may have
            # left FAULT at the same moment), so decide on its next advert or the dead timer
            out = self._enter(INIT, f"monitored interface {ifname} up", now)
            self._init_deadline = now + self.timing.dead_interval
            return out
        return []

    def on_stall(self, seconds: float, now: float) -> None:
        """This node was not running for `seconds`: the peer's silence over that time proves
        nothing, so its last-heard times move forward by it (never past now)."""
        seen = self.peer.last_seen
        for path in seen:
            seen[path] = min(now, seen[path] + seconds)
        if self._init_deadline != NEVER:
            self._init_deadline += seconds

    def on_timer(self, now: float) -> list[Action]:
        out: list[Action] = []
        if self.state in (INIT, BACKUP) and not self.peer.alive(now, self.timing.dead_interval):
            if self.state == BACKUP or now >= self._init_deadline:
                cause = "peer lost" if self.peer.last_seen or self.state == BACKUP else "no peer seen"
                if self.peer.stopped:
                    cause = "peer stopped"
                # silence may be a stall, not a death: if the peer is heard as Master again,
                # an operator's switchover to it must win over our priority
                out += self._enter(MASTER, cause, now, keep_yield=cause == "peer lost")
        if now >= self._preempt_at:
            self._preempt_at = NEVER
            if self.state == BACKUP and self.peer.state == MASTER:
                self.takeover_requested = True
                out.append(SendAdvert())
        if now >= self._resign_deadline:
            out += self._resign_timed_out(now)
        while self._garp_due and self._garp_due[0] <= now:
            self._garp_due.pop(0)
            if self.state == MASTER:
                out.append(Announce())
        if now >= self._next_advert and self.state != STOPPED:
            out.append(SendAdvert())
            self._next_advert = now + self.timing.interval
        return out

    def next_deadline(self) -> float:
        deadlines = [self._next_advert, self._preempt_at, self._resign_deadline]
        if self._garp_due:
            deadlines.append(self._garp_due[0])
        if self.state == INIT:
            deadlines.append(self._init_deadline)
        if self.state in (INIT, BACKUP) and self.peer.last_seen:
            deadlines.append(max(self.peer.last_seen.values()) + self.timing.dead_interval + 1e-6)
        return min(deadlines)

    # ---- operator commands ------------------------------------------------------

    def set_enabled(self, enabled: bool, now: float) -> list[Action]:
        if enabled == self.enabled:
            return []
        self.enabled = enabled
        if not enabled:
            return self._enter(DISABLED, "disabled by operator", now)
        self.yielded = False
        out = self._enter(INIT, "enabled by operator", now)
        self._init_deadline = now + self.timing.dead_interval
        if self.links_down:
            return out + self._enter(FAULT, self._fault_cause(), now)
        return out + self._decide(now)

    def switchover(self, now: float) -> tuple[bool, str, list[Action]]:
        """Graceful hand-over to the other node. Returns (accepted, message, actions)."""
        peer_ok = self.peer.alive(now, self.timing.dead_interval) and self.peer.state in (BACKUP, INIT)
        if self.state == MASTER:
            if not peer_ok:
                return False, "no eligible peer: the peer is not a live Backup", []
            if not self.peer.flags & wire.FLAG_STATE_READY:
                return False, "the peer's state table is not in sync yet: its sessions would break", []
            self.yielded = True
            return True, "handing over to the peer", self._resign(now)
        if self.state == BACKUP:
            if not (self.peer.alive(now, self.timing.dead_interval) and self.peer.state == MASTER):
                return False, "no live Master to take over from", []
            if not self.state_ready:
                return False, "this node's state table is not in sync yet: its sessions would break", []
            self.yielded = False
            self.takeover_requested = True
            return True, "asking the Master to hand over", [SendAdvert()]
        return False, f"switchover is not possible in state {self.state}", []

    def shutdown(self, now: float) -> list[Action]:
        self.stopping = True
        if self.state == MASTER and self.peer.alive(now, self.timing.dead_interval) \
                and self.peer.state in (BACKUP, INIT):
            return self._resign(now, wire.FLAG_SHUTDOWN)
        return self._enter(STOPPED, "shutdown", now)

    # ---- what we say about ourselves ------------------------------------------

    def advert_flags(self) -> int:
        flags = 0
        if self.resigning:
            flags |= wire.FLAG_RESIGN
        if self.stopping:
            flags |= wire.FLAG_SHUTDOWN
        if self.takeover_requested:
            flags |= wire.FLAG_TAKEOVER_REQ
        if self.yielded:
            flags |= FLAG_YIELD
        if self.state_ready:
            flags |= wire.FLAG_STATE_READY
        return flags

    def wire_state(self) -> str:
        return MASTER if self.state == STOPPED and self.resigning else (
            DISABLED if self.state == STOPPED else self.state)

    def effective_priority(self) -> int:
        return 0 if self.state in (FAULT, DISABLED, STOPPED) else self.priority

    # ---- decisions --------------------------------------------------------------

    def _decide(self, now: float) -> list[Action]:
        peer, state = self.peer, self.state
        if state in (DISABLED, FAULT, STOPPED):
            return []
        peer_resigning = peer.state == MASTER and bool(peer.flags & wire.FLAG_RESIGN)
        if state == MASTER and peer.state in (BACKUP, INIT) and not self.resigning:
            # a yield kept through a peer-lost takeover: the peer came back below us, so
            # there are no two Masters left to settle
            self.yielded = False
        if state == MASTER:
            if peer.state == MASTER and not peer_resigning:
                if self.stopping:
                    return self._enter(STOPPED, "shutdown: peer took over", now)
                if self.resigning or not self._leader():
                    return self._enter(BACKUP, "switchover" if self.resigning else
                                       f"peer {peer.hostname} outranks us", now)
                # split healed and we stay: make every neighbour point at us again
                self._schedule_garp(now)
                return [Announce(), SendAdvert()]
            if (peer.flags & wire.FLAG_TAKEOVER_REQ and peer.flags & wire.FLAG_STATE_READY
                    and peer.state == BACKUP and not self.resigning):
                self.yielded = True
                return self._resign(now)
            return []
        # INIT or BACKUP
        if peer.state == MASTER:
            if peer_resigning:
                return self._enter(MASTER, f"peer {peer.hostname} resigned", now)
            if state == INIT:
                return self._enter(BACKUP, f"peer {peer.hostname} is Master", now)
            self._consider_preempt(now)
            return []
        if peer.state in (FAULT, DISABLED):
            return self._enter(MASTER, f"peer {peer.hostname} is {peer.state}", now)
        if peer.state in (BACKUP, INIT):
            if self._leader():
                return self._enter(MASTER, "elected", now)
            if state == INIT:
                return self._enter(BACKUP, f"peer {peer.hostname} outranks us", now)
        return []

    def _leader(self) -> bool:
        """Do we lead rather than the peer? Both nodes compute the same answer."""
        # a node whose table is not in sync never outranks one whose table is: after a split
        # the freshly restarted node must not win and wipe the sessions the other one carries
        mine = (not self.yielded, self.state_ready, self.priority, _neg(self.hostname))
        theirs = (not (self.peer.flags & FLAG_YIELD), bool(self.peer.flags & wire.FLAG_STATE_READY),
                  self.peer.priority, _neg(self.peer.hostname))
        return mine > theirs

    def _consider_preempt(self, now: float) -> None:
        t = self.timing
        # only once the peer is heard on every path: a link that just came back may not
        # pass frames yet (a switch port waits for its own delayed link event)
        all_paths = len(self.peer.paths_alive(now, t.dead_interval)) >= self.path_count
        wants = (t.preempt != "off" and not self.yielded and all_paths and self.state_ready
                 and self.priority > self.peer.priority and not self.takeover_requested)
        if not wants:
            self._preempt_at = NEVER
        elif self._preempt_at == NEVER:
            self._preempt_at = now + (t.preempt_delay if t.preempt == "delay" else 0.0)

    def _resign(self, now: float, extra_flag: int = 0) -> list[Action]:
        self.resigning = True
        self._resign_deadline = now + self.timing.dead_interval
        return [SendAdvert(extra_flag)]

    def _resign_timed_out(self, now: float) -> list[Action]:
        self._resign_deadline = NEVER
        if not self.resigning:
            return []
        self.resigning = False
        if self.stopping:
            return self._enter(STOPPED, "shutdown", now)
        self.yielded = False
        self.last_switchover_error = "the peer did not take over in time"
        return []

    def _enter(self, new: str, cause: str, now: float, keep_yield: bool = False) -> list[Action]:
        old = self.state
        if new == old:
            return []
        self.state, self.cause = new, cause
        self._preempt_at = NEVER
        self._resign_deadline = NEVER
        was_resigning, self.resigning = self.resigning, False
        out: list[Action] = []
        if new == MASTER:
            self.yielded = self.yielded and keep_yield
            self.takeover_requested = False
            self._schedule_garp(now)
            out += [Transition(old, new, cause), AddFloatingIPs(), Announce(), SendAdvert()]
        else:
            if new != BACKUP:
                self.takeover_requested = False
            if old == MASTER:
                flags = wire.FLAG_RESIGN if new != BACKUP or was_resigning else 0
                out += [RemoveFloatingIPs(), SendAdvert(flags)]
                self._garp_due.clear()
            else:
                out.append(SendAdvert())
            out.append(Transition(old, new, cause))
        self._next_advert = now + self.timing.interval
        return out

    def _schedule_garp(self, now: float) -> None:
        t = self.timing
        self._garp_due = [now + t.garp_interval * i for i in range(1, t.garp_count)]

    def _fault_cause(self) -> str:
        names = ", ".join(sorted(self.links_down))
        return f"monitored interface {names} down"


def _neg(hostname: str) -> tuple[int, ...]:
    """Order hostnames so that the lower one ranks higher."""
    return tuple(-b for b in hostname.encode())
