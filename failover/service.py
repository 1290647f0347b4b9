"""The failover daemon's I/O shell: one selector loop around the sans-I/O machine.

It owns the heartbeat sockets, the link monitor, the floating IPs, the control
socket and the hook runner; it reads the clock, feeds events to the machine and
carries out the actions it returns. Nothing here decides anything: decisions are
in failover/machine.py. Bulk work (conntrack sync) lives in another process, so
this loop only ever waits on its own sockets and timers.
"""

from __future__ import annotations

import hashlib
import logging
import selectors
import signal
import socket
import time
from collections import Counter
from typing import Any, Callable

import hasync
from failover import advert as wire
from failover.actions import AddFloatingIPs, Announce, RemoveFloatingIPs, SendAdvert, Transition
from failover.garp import Announcer
from failover.hooks import HookRunner
from failover.links import LinkMonitor, carrier
from failover.machine import MASTER, STOPPED, FailoverMachine, Timing
from failover.paths import HeartbeatPaths
from failover.status import NodeFacts, summarize
from failover.vip import FloatingIPs
from hasync import config as cfgmod
from hasync.config import Group, NodeConfig
from hasync.control import ControlServer

log = logging.getLogger("hasync.failover")


def group_digest(group: Group) -> bytes:
    """What both nodes must agree on: group id and floating IPs (seen in every advert)."""
    text = f"{group.id}|" + ",".join(sorted(str(ip) for ip in group.floating_ips))
    return hashlib.sha256(text.encode()).digest()[:8]


def timing_of(group: Group) -> Timing:
    return Timing(
        interval=group.heartbeat_interval_ms / 1000, dead_count=group.dead_count,
        preempt=group.preempt, preempt_delay=group.preempt_delay_ms / 1000,
        garp_count=group.garp_count, garp_interval=group.garp_interval_ms / 1000,
    )


class GroupRunner:
    """One HA group on this node: the machine plus the sockets it speaks through."""

    def __init__(self, cfg: NodeConfig, group: Group, now: float):
        self.group = group
        self.digest = group_digest(group)
        self.paths = HeartbeatPaths(group, cfg.heartbeat_port)
        self.machine = FailoverMachine(
            hostname=cfg.hostname, priority=group.priority, timing=timing_of(group),
            monitored=tuple(m.interface for m in group.monitors), enabled=cfg.enabled,
            path_count=len(self.paths.paths),
        )
        self.links = LinkMonitor(set(self.paths.names) | {group.ha_link})
        self.netlink_up = dict(self.links.initial())  # as the kernel's link events say
        self.carrier_lost: set[str] = set()  # seen by a direct carrier read before the event
        self.carrier_checked: dict[str, float] = {}
        self.counter = wire.Counter()
        self.last_send = 0.0
        self.max_send_gap = 0.0  # longest time between two adverts sent, since the last status
        self.replay = wire.ReplayWindow()
        self.started = now

    def take_max_send_gap_ms(self) -> float:
        gap, self.max_send_gap = self.max_send_gap, 0.0
        return round(gap * 1000, 2)

    @property
    def link_up(self) -> dict[str, bool]:
        return {name: up and name not in self.carrier_lost for name, up in self.netlink_up.items()}

    def facts(self, sync_status: dict | None, sync_reasons: list[str]) -> NodeFacts:
        return NodeFacts(
            version=hasync.__version__, config_digest=self.digest, ha_link=self.group.ha_link,
            ha_link_up=self.link_up.get(self.group.ha_link, False), path_names=self.paths.names,
            sync=sync_status, sync_reasons=sync_reasons,
        )

    def close(self) -> None:
        self.paths.close()
        self.links.close()


def dispatch_ready(events) -> None:
    """Call each ready socket's handler. A handler may close sockets that are later in the
    same batch (a group deleted or changed through the control socket closes its advert
    sockets): those are skipped, not read (a read would raise EBADF and end the daemon)."""
    for key, _ in events:
        if key.fileobj.fileno() < 0:
            continue
        key.data(key.fileobj)


class FailoverService:
    def __init__(self, cfg: NodeConfig, *, sync: Any = None,
                 on_transition: Callable[[Transition], None] | None = None,
                 notifier: Any = None, metrics: Any = None):
        self.cfg = cfg
        self.notifier = notifier  # hasync.sdnotify.Notifier: systemd readiness and watchdog
        self.metrics = metrics  # hasync.metrics.MetricsServer, or None when off
        self.sync = sync  # statesync control client, or None
        self.on_transition = on_transition
        self.sel = selectors.DefaultSelector()
        self.vips = FloatingIPs()
        self.announcer = Announcer()
        self.hooks = HookRunner(cfg.notify, cfg.notify_timeout_s, log.info)
        self.dropped: Counter[str] = Counter()
        self.received = 0
        self.takeover_started: float | None = None
        self.last_takeover_ms: float | None = None
        self.stalls = 0  # loop turns that woke late by more than half an interval
        self.longest_stall = 0.0
        self.history: list[dict[str, Any]] = []  # recent transitions, newest last
        self.runner: GroupRunner | None = None
        self.control = ControlServer(cfg.control_socket, self.handle_request)
        self.sel.register(self.control, selectors.EVENT_READ, self._on_control)
        self._stop_requested = False
        self._reload_requested = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.sel.register(self._wake_r, selectors.EVENT_READ, self._on_wake)
        if cfg.group is not None:
            self._start_group(cfg.group, time.monotonic())

    # ---- group lifecycle --------------------------------------------------------

    def _start_group(self, group: Group, now: float) -> None:
        r = GroupRunner(self.cfg, group, now)
        self.runner = r
        for path in r.paths.paths:
            self.sel.register(path.sock, selectors.EVENT_READ, self._on_advert_socket(path.index))
        self.sel.register(r.links, selectors.EVENT_READ, self._on_links)
        # the clock after the set-up (a link dump can take a while): the INIT hold must
        # start now, or a node could claim Master before it had a chance to hear the peer
        now = time.monotonic()
        self._execute(r.machine.start(now, r.link_up), now)

    def _stop_group(self, now: float) -> None:
        r = self.runner
        if r is None:
            return
        if r.machine.state == MASTER:
            self._execute([RemoveFloatingIPs()], now)
        r.machine.stopping = True
        self._execute([SendAdvert(wire.FLAG_SHUTDOWN | wire.FLAG_RESIGN)], now)
        for path in r.paths.paths:
            self.sel.unregister(path.sock)
        self.sel.unregister(r.links)
        r.close()
        self.runner = None

    def apply_config(self, new: NodeConfig) -> str:
        """Take a validated config live. Timing and priority apply in place; a changed
        group definition (interfaces, floating IPs, id) restarts the group."""
        now = time.monotonic()
        old, self.cfg = self.cfg, new
        self.hooks.configure(new.notify, new.notify_timeout_s)
        if self.sync is not None:
            self.sync.reconfigure(new)
        r = self.runner
        if r is not None and (new.group is None or _structure(new.group) != _structure(r.group)
                              or old.heartbeat_port != new.heartbeat_port):
            self._stop_group(now)
            r = None
        if r is None and new.group is not None:
            self._start_group(new.group, now)
        elif r is not None and new.group is not None:
            r.group = new.group
            r.machine.timing = timing_of(new.group)
            r.machine.priority = new.group.priority
        if self.runner is not None and self.runner.machine.enabled != new.enabled:
            self._execute(self.runner.machine.set_enabled(new.enabled, now), now)
        return "configuration applied"

    # ---- the loop ---------------------------------------------------------------

    def run(self) -> None:
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGHUP, self._on_signal)
        expected_wake = time.monotonic()
        try:
            while True:
                now = time.monotonic()
                self._after_stall(now - expected_wake)
                now = time.monotonic()
                if self._stop_requested:
                    if self._shutdown_step(now):
                        return
                if self._reload_requested:
                    self._reload_requested = False
                    self._reload_from_file()
                if self.notifier is not None:
                    self.notifier.watchdog_ping(now)  # from this loop: a hung loop gets restarted
                if self.metrics is not None:
                    self.metrics.maybe_publish(now, self.status)
                r = self.runner
                if r is not None:
                    r.machine.state_ready = self.sync is None or self.sync.ready()
                    self._check_silent_paths(r, now)
                    self._execute(r.machine.on_timer(now), now)
                    timeout = max(0.0, r.machine.next_deadline() - time.monotonic())
                else:
                    timeout = 0.5
                wait = min(timeout, 0.5)
                expected_wake = time.monotonic() + wait
                dispatch_ready(self.sel.select(wait))
        finally:
            self.close()

    def _after_stall(self, late: float) -> None:
        """We woke `late` seconds after we meant to: this node was not running (a machine-wide
        stall: measured here up to ~120 ms, even for SCHED_FIFO tasks, while the kernel does bulk
        conntrack work). Read what the peer sent meanwhile before any dead timer fires, and do
        not hold against the peer the time we could not listen."""
        r = self.runner
        if r is None or late <= r.machine.timing.interval / 2:
            return
        self.stalls += 1
        self.longest_stall = max(self.longest_stall, late)
        if late > r.machine.timing.dead_interval / 2:  # enough to matter: say so in the log
            log.warning("this node was not running for %.1f ms (the heartbeat loop woke late)",
                        late * 1000)
        r.machine.on_stall(late, time.monotonic())
        dispatch_ready(self.sel.select(0))

    def _shutdown_step(self, now: float) -> bool:
        r = self.runner
        if r is None or r.machine.state == STOPPED:
            return True
        if not r.machine.stopping:
            self._execute(r.machine.shutdown(now), now)
        return r.machine.state == STOPPED

    def _on_signal(self, signum: int, _frame: Any) -> None:
        if signum == signal.SIGHUP:
            self._reload_requested = True
        else:
            self._stop_requested = True

    def _on_wake(self, sock: socket.socket) -> None:
        try:
            sock.recv(4096)
        except BlockingIOError:
            pass

    def _on_advert_socket(self, path_index: int) -> Callable[[socket.socket], None]:
        def read(sock: socket.socket) -> None:
            r = self.runner
            for _ in range(64):  # drain, bounded so timers still run
                try:
                    data, _addr = sock.recvfrom(2048)
                except BlockingIOError:
                    return
                if r is None:
                    return
                self._on_datagram(r, data, path_index)
        return read

    def _on_datagram(self, r: GroupRunner, data: bytes, path_index: int) -> None:
        try:
            adv = wire.decode(data, self.cfg.auth_keys)
        except wire.AdvertError as exc:
            self.dropped[exc.reason] += 1
            return
        if adv.hostname == self.cfg.hostname:
            self.dropped["own"] += 1  # our own broadcast looped back
            return
        if adv.path != path_index:
            self.dropped["wrong_path"] += 1
            return
        if adv.group != r.group.id:
            self.dropped["other_group"] += 1
            return
        if not r.replay.accept(adv):
            self.dropped["replayed"] += 1
            return
        self.received += 1
        now = time.monotonic()
        self._execute(r.machine.on_advert(adv, now), now)

    def _on_links(self, _mon: Any) -> None:
        r = self.runner
        if r is None:
            return
        now = time.monotonic()
        for ifname, up in r.links.read():
            before = r.link_up.get(ifname)
            r.netlink_up[ifname] = up
            if up and ifname in r.carrier_lost and carrier(ifname):
                r.carrier_lost.discard(ifname)
            log.info("link %s %s (link event)", ifname, "up" if up else "down")
            self._link_changed(r, ifname, before, now)

    def _link_changed(self, r: GroupRunner, ifname: str, before: bool | None, now: float) -> None:
        up = r.link_up.get(ifname, False)
        if up != before:
            self._execute(r.machine.on_link(ifname, up, now), now)

    def _check_silent_paths(self, r: GroupRunner, now: float) -> None:
        """Catch a pulled cable before the kernel's delayed link event: when the peer,
        alive on other paths, falls silent on a monitored interface, read its carrier."""
        m = r.machine
        interval = m.timing.interval
        peer_alive = m.peer.alive(now, m.timing.dead_interval)
        for path in r.paths.paths[1:]:
            name = path.ifname
            seen = m.peer.last_seen.get(path.index)
            silent = peer_alive and seen is not None and now - seen > 1.5 * interval
            if not (silent or name in r.carrier_lost):
                continue
            if now - r.carrier_checked.get(name, 0.0) < interval:
                continue
            r.carrier_checked[name] = now
            before = r.link_up.get(name)
            if carrier(name):
                r.carrier_lost.discard(name)
            elif r.netlink_up.get(name) and name not in r.carrier_lost:
                r.carrier_lost.add(name)
                log.info("link %s down (carrier lost, before the link event)", name)
            self._link_changed(r, name, before, now)

    def _on_control(self, _server: Any) -> None:
        conn = self.control.accept()
        if conn is not None:
            self.sel.register(conn, selectors.EVENT_READ, self._on_control_conn)

    def _on_control_conn(self, conn: socket.socket) -> None:
        fd = conn
        self.sel.unregister(fd)
        if not self.control.readable(conn):
            self.sel.register(conn, selectors.EVENT_READ, self._on_control_conn)

    # ---- actions ----------------------------------------------------------------

    def _execute(self, actions: list, now: float) -> None:
        r = self.runner
        if r is None:
            return
        started = time.monotonic()
        for action in actions:
            if isinstance(action, SendAdvert):
                self._send_advert(r, action.flags)
            elif isinstance(action, (AddFloatingIPs, RemoveFloatingIPs)):
                change = self.vips.add if isinstance(action, AddFloatingIPs) else self.vips.remove
                for mon in r.group.monitors:
                    try:
                        change(mon.interface, mon.floating_ip)
                    except Exception as exc:  # pyroute2's NetlinkError: the interface went away
                        log.error("floating IP %s on %s: %s", mon.floating_ip, mon.interface, exc)
            elif isinstance(action, Announce):
                for mon in r.group.monitors:
                    self.announcer.announce(mon.interface, mon.floating_ip)
            elif isinstance(action, Transition):
                self._on_transition(r, action)
                if action.new == MASTER:
                    self.takeover_started = started
        if self.takeover_started is not None:
            # decision to floating IPs up and announced: the part of a failover this node owns
            self.last_takeover_ms = round((time.monotonic() - self.takeover_started) * 1000, 3)
            self.takeover_started = None

    def _send_advert(self, r: GroupRunner, extra_flags: int) -> None:
        m = r.machine
        now = time.monotonic()
        if r.last_send:  # how late this loop runs: tells a starved node from a lossy path
            gap = now - r.last_send
            r.max_send_gap = max(r.max_send_gap, gap)
            if gap > m.timing.dead_interval:  # the peer may have declared us lost meanwhile
                log.warning("no heartbeat sent for %.1f ms (dead time %.1f ms)",
                            gap * 1000, m.timing.dead_interval * 1000)
        r.last_send = now
        key_id = self.cfg.auth_key_id
        key = self.cfg.auth_keys[key_id]
        flags = m.advert_flags() | extra_flags
        interval_us = int(m.timing.interval * 1e6)
        for path in r.paths.paths:
            adv = wire.Advert(
                group=r.group.id, state=m.wire_state(), priority=m.effective_priority(),
                hostname=self.cfg.hostname, version=hasync.__version__,
                counter=r.counter.next(), path=path.index, interval_us=interval_us,
                flags=flags, config_digest=r.digest,
            )
            r.paths.send(path, wire.encode(adv, key_id, key))

    def _on_transition(self, r: GroupRunner, t: Transition) -> None:
        log.info("state %s -> %s (%s)", t.old, t.new, t.cause)
        if t.cause == "peer lost":
            now = time.monotonic()
            ages = {r.paths.names[p]: round((now - seen) * 1000, 1)
                    for p, seen in r.machine.peer.last_seen.items() if p < len(r.paths.names)}
            log.info("last heard from the peer (ms ago, per path): %s", ages)
        self.history.append({"old": t.old, "new": t.new, "cause": t.cause, "time": time.time()})
        del self.history[:-20]
        if self.on_transition is not None:
            self.on_transition(t)
        self.hooks.notify({
            "HASYNC_STATE": t.new, "HASYNC_OLD_STATE": t.old, "HASYNC_CAUSE": t.cause,
            "HASYNC_GROUP": str(r.group.id),
            "HASYNC_FLOATING_IPS": " ".join(str(ip) for ip in r.group.floating_ips),
        })

    # ---- control requests -------------------------------------------------------

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        r = self.runner
        sync_status = self.sync.status() if self.sync is not None else None
        sync_reasons = self.sync.reasons() if self.sync is not None else []
        facts = r.facts(sync_status, sync_reasons) if r else None
        out = summarize(r.machine if r else None, facts, self.cfg.enabled, now)
        out.update({
            "hostname": self.cfg.hostname,
            "version": hasync.__version__,
            "enabled": self.cfg.enabled,
            "group": r.group.id if r else None,
            "floating_ips": [str(ip) for ip in r.group.floating_ips] if r else [],
            "links": dict(r.link_up) if r else {},
            "heartbeats": {
                "received": self.received,
                "dropped": dict(self.dropped),
                "sent": {p.ifname: p.sent for p in r.paths.paths} if r else {},
                "send_errors": {p.ifname: p.send_errors for p in r.paths.paths} if r else {},
                "max_send_gap_ms": r.take_max_send_gap_ms() if r else None,
                "local_stalls": self.stalls,
                "longest_local_stall_ms": round(self.longest_stall * 1000, 1),
            },
            "last_transition": self.history[-1] if self.history else None,
            "last_takeover_ms": self.last_takeover_ms,
            "hooks": {"runs": self.hooks.runs, "failures": self.hooks.failures,
                      "timeouts": self.hooks.timeouts},
            "sync": sync_status,
        })
        return out

    def handle_request(self, req: dict[str, Any]) -> dict[str, Any]:
        cmd = req["cmd"]
        now = time.monotonic()
        r = self.runner
        if cmd == "status":
            return {"ok": True, **self.status()}
        if cmd == "switchover":
            if r is None:
                return {"ok": False, "error": "no HA group configured"}
            ok, message, actions = r.machine.switchover(now)
            self._execute(actions, now)
            return {"ok": ok, "message" if ok else "error": message}
        if cmd in ("enable", "disable"):
            return self._save_and_apply(cfgmod.with_enabled(self.cfg, cmd == "enable"),
                                        f"HA {cmd}d")
        if cmd == "reload":
            return self._reload_from_file()
        if cmd == "group_show":
            return {"ok": True, "groups": [cfgmod.group_to_dict(g) for g in self.cfg.groups]}
        if cmd in ("group_add", "group_edit"):
            return self._group_change(cmd, req.get("fields") or {})
        if cmd == "group_delete":
            gid = req.get("id")
            if not any(g.id == gid for g in self.cfg.groups):
                return {"ok": False, "error": f"no HA group with id {gid}"}
            return self._save_and_apply(cfgmod.without_group(self.cfg, gid), "HA Group Deleted")
        if cmd == "resync":
            if self.sync is None:
                return {"ok": False, "error": "state sync is not running"}
            return self.sync.resync(config=bool(req.get("config")))
        if cmd == "stop":
            self._stop_requested = True
            return {"ok": True, "message": "stopping"}
        return {"ok": False, "error": f"unknown command {cmd!r}"}

    def _group_change(self, cmd: str, fields: dict[str, Any]) -> dict[str, Any]:
        try:
            if cmd == "group_add":
                if self.cfg.groups:
                    raise cfgmod.ConfigError(
                        "group", "hasync runs one HA group per node; edit the existing group")
                group = cfgmod.group_from_form(fields)
            else:
                base = next((g for g in self.cfg.groups if g.id == fields.get("id", g.id)), None)
                if base is None:
                    raise cfgmod.ConfigError("group.id", f"no HA group with id {fields.get('id')}")
                group = cfgmod.group_from_form({**cfgmod.group_to_form(base), **fields})
            new = cfgmod.with_group(self.cfg, group)
            cfgmod.validate_against_system(new, self.vips.system_view(exclude=self._floating()))
        except cfgmod.ConfigError as exc:
            return {"ok": False, "error": str(exc), "field": exc.field}
        message = "HA Group Added Successfully" if cmd == "group_add" else "HA Group Updated Successfully"
        return self._save_and_apply(new, message)

    def _floating(self) -> list:
        return list(self.runner.group.floating_ips) if self.runner else []

    def _save_and_apply(self, new: NodeConfig, message: str) -> dict[str, Any]:
        if self.cfg.path is not None:
            cfgmod.save(new, self.cfg.path)
        self.apply_config(new)
        return {"ok": True, "message": message}

    def _reload_from_file(self) -> dict[str, Any]:
        if self.cfg.path is None:
            return {"ok": False, "error": "the daemon was not started from a config file"}
        try:
            new = cfgmod.load(self.cfg.path)
            cfgmod.validate_against_system(new, self.vips.system_view(exclude=self._floating()))
        except (cfgmod.ConfigError, OSError) as exc:
            log.error("reload refused: %s", exc)
            return {"ok": False, "error": f"reload refused, the running config stays: {exc}"}
        return {"ok": True, "message": self.apply_config(new)}

    def close(self) -> None:
        now = time.monotonic()
        if self.runner is not None:
            self._stop_group(now)
        self.control.close()
        self.hooks.close(2.0)
        signal.set_wakeup_fd(-1)


def _structure(group: Group) -> tuple:
    """The parts of a group that need new sockets or addresses when they change."""
    return (group.id, group.ha_link, group.peer_address, group.monitors)
