"""Two failover machines joined in memory (h11's way of testing both sides at once).

Time is simulated: adverts take `delay` seconds on each path; a path can be cut;
a node can crash (stops sending and receiving) and come back.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

from failover import advert as wire
from failover.actions import AddFloatingIPs, RemoveFloatingIPs, SendAdvert, Transition
from failover.machine import FailoverMachine, Timing

PATHS = ("lan2", "wan1", "lan1")  # path 0 = HA link, then the monitored interfaces


@dataclass
class Node:
    name: str
    machine: FailoverMachine
    vips: bool = False
    crashed: bool = False
    counter: int = 0
    transitions: list[Transition] = field(default_factory=list)


class PairSim:
    def __init__(self, timing: Timing | None = None, prio_a: int = 150, prio_b: int = 100,
                 delay: float = 0.0002, stagger: float = 0.0):
        self.timing = timing or Timing(interval=0.01, dead_count=3)
        self.delay = delay
        self.now = 0.0
        self.cut: set[int] = set()
        self.links_down: dict[str, set[str]] = {"fw1": set(), "fw2": set()}
        self.nodes = {
            name: Node(name, FailoverMachine(hostname=name, priority=prio, timing=self.timing,
                                             monitored=("wan1", "lan1"), path_count=3))
            for name, prio in (("fw1", prio_a), ("fw2", prio_b))
        }
        self._queue: list[tuple[float, int, str, wire.Advert]] = []
        self._seq = 0
        self.both_master_time = 0.0
        self.none_master_time = 0.0
        self._start_at = {"fw1": 0.0, "fw2": stagger}
        self._started: set[str] = set()

    # ---- driving -------------------------------------------------------------------

    def other(self, name: str) -> str:
        return "fw2" if name == "fw1" else "fw1"

    def _apply(self, node: Node, actions: list) -> None:
        for a in actions:
            if isinstance(a, SendAdvert):
                self._send(node, a.flags)
            elif isinstance(a, AddFloatingIPs):
                node.vips = True
            elif isinstance(a, RemoveFloatingIPs):
                node.vips = False
            elif isinstance(a, Transition):
                node.transitions.append(a)

    def _send(self, node: Node, extra: int) -> None:
        if node.crashed:
            return
        m = node.machine
        for path in range(len(PATHS)):
            node.counter += 1
            adv = wire.Advert(group=1, state=m.wire_state(), priority=m.effective_priority(),
                              hostname=node.name, version="1", counter=node.counter, path=path,
                              flags=m.advert_flags() | extra)
            self._seq += 1
            heapq.heappush(self._queue, (self.now + self.delay, self._seq, self.other(node.name), adv))

    def _deliverable(self, dst: str, adv: wire.Advert) -> bool:
        if adv.path in self.cut:
            return False
        name = PATHS[adv.path]
        return name not in self.links_down[dst] and name not in self.links_down[adv.hostname]

    def run_until(self, t_end: float, step: float = 0.0005) -> None:
        while self.now < t_end:
            self.now = round(self.now + step, 7)
            for name, at in self._start_at.items():
                if name not in self._started and self.now >= at:
                    self._started.add(name)
                    node = self.nodes[name]
                    self._apply(node, node.machine.start(self.now, {"wan1": True, "lan1": True}))
            while self._queue and self._queue[0][0] <= self.now:
                _, _, dst, adv = heapq.heappop(self._queue)
                node = self.nodes[dst]
                if node.crashed or dst not in self._started or not self._deliverable(dst, adv):
                    continue
                self._apply(node, node.machine.on_advert(adv, self.now))
            for node in self.nodes.values():
                if not node.crashed and node.name in self._started:
                    self._apply(node, node.machine.on_timer(self.now))
            masters = self.vip_holders()
            if len(masters) > 1:
                self.both_master_time += step
            elif not masters:
                self.none_master_time += step

    # ---- faults --------------------------------------------------------------------

    def crash(self, name: str) -> None:
        node = self.nodes[name]
        node.crashed = True
        node.vips = False  # a dead node answers nothing

    def restart(self, name: str) -> None:
        node = self.nodes[name]
        node.machine = FailoverMachine(hostname=name, priority=node.machine.priority,
                                       timing=self.timing, monitored=("wan1", "lan1"), path_count=3)
        node.crashed = False
        self._apply(node, node.machine.start(self.now, {"wan1": True, "lan1": True}))

    def link(self, name: str, ifname: str, up: bool) -> None:
        (self.links_down[name].discard if up else self.links_down[name].add)(ifname)
        node = self.nodes[name]
        if not node.crashed:
            self._apply(node, node.machine.on_link(ifname, up, self.now))

    # ---- looking ---------------------------------------------------------------------

    def states(self) -> dict[str, str]:
        return {n: node.machine.state for n, node in self.nodes.items()}

    def vip_holders(self) -> list[str]:
        return [n for n, node in self.nodes.items() if node.vips and not node.crashed]
