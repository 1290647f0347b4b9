"""`hasync run`: the daemon's process shell.

The heartbeat loop (failover/service.py) runs in this process, optionally at a
real-time priority so a busy machine cannot starve it; the sync service is a
separate child process (statesync), so bulk replication never delays a heartbeat,
and so is the web page (hasync.web) when [web] enabled = true.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable

from failover.machine import INIT
from hasync import config as cfgmod
from hasync import logs
from hasync.metrics import MetricsServer, TransitionCounter
from hasync.sdnotify import Notifier

log = logging.getLogger("hasync")


def setup_logging(hostname: str, fmt: str = "journal", level: int = logging.INFO) -> logging.Handler:
    """The daemon's logging: see hasync.logs (journal prefixes or JSON, repeat limiter)."""
    return logs.setup(hostname, fmt, level)


class SystemdBridge:
    """What the daemon tells systemd and the metrics about state changes.

    Wraps the on_transition callback: counts transitions for the metrics, sends
    READY=1 the first time the node leaves INIT (it joined the pair, or knows it is
    alone), and keeps `systemctl status` showing the current state.
    """

    def __init__(self, notifier: Notifier, transitions: TransitionCounter,
                 then: Callable[[Any], None] | None = None):
        self.notifier = notifier
        self.transitions = transitions
        self.then = then
        self.ready_sent = False

    def on_transition(self, t: Any) -> None:
        self.transitions.record(t.new, t.cause)
        if t.new != INIT:
            self.state_settled(t.new, t.cause)
        if self.then is not None:
            self.then(t)

    def state_settled(self, state: str, cause: str = "") -> None:
        text = f"{state} ({cause})" if cause else state
        if not self.ready_sent:
            self.ready_sent = True
            self.notifier.ready(text)
        else:
            self.notifier.status(text)


def set_realtime(priority: int) -> None:
    """SCHED_FIFO for the heartbeat process: the reason keepalived has vrrp_rt_priority.

    Every thread of the process, not just the loop's: the threads share the GIL, and a
    normal-class thread preempted while holding it stalls the real-time loop behind the
    whole machine's load (measured: 11-14 ms late adverts at 5 ms intervals under load,
    with only the main thread real-time). Child processes are started in the normal
    class (hasync.sched.normal_class_argv).
    """
    if priority <= 0:
        return
    param = os.sched_param(priority)
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setscheduler(int(tid), os.SCHED_FIFO, param)
        except (PermissionError, OSError) as exc:
            log.warning("could not set real-time priority %d on thread %s: %s", priority, tid, exc)


def run(config_path: Path) -> int:
    from failover.service import FailoverService

    notifier = Notifier.from_environ()  # unset: hooks and the sync child must not speak for us
    cfg = cfgmod.load(config_path)
    log_handler = setup_logging(cfg.hostname, cfg.log_format)
    from failover.vip import FloatingIPs

    floating = [ip for g in cfg.groups for ip in g.floating_ips]
    cfgmod.validate_against_system(cfg, FloatingIPs().system_view(exclude=floating))
    sync = None
    metrics = None
    web = None
    try:
        if cfg.sync.enabled and cfg.group is not None:
            from statesync.supervisor import SyncSupervisor

            sync = SyncSupervisor(cfg)
            sync.start()
            if not sync.wait_started():
                log.warning("sync service has not answered yet: joining the pair without it")
        transitions = TransitionCounter()
        if cfg.metrics_port:
            # before set_realtime: the HTTP thread must not inherit SCHED_FIFO
            try:
                metrics = MetricsServer(cfg.metrics_address, cfg.metrics_port, transitions=transitions)
            except OSError as exc:  # failover matters more than its metrics: run without them
                log.error("metrics endpoint %s:%d not started: %s", cfg.metrics_address,
                          cfg.metrics_port, exc)
        if cfg.web.enabled and cfg.path is not None:
            from hasync.web.supervisor import WebChild

            web = WebChild(cfg)  # started before set_realtime, like the metrics thread
            web.start()
        set_realtime(cfg.realtime_priority)
        bridge = SystemdBridge(notifier, transitions, sync.on_transition if sync else None)
        service = FailoverService(cfg, sync=sync, on_transition=bridge.on_transition,
                                  notifier=notifier, metrics=metrics)
        log.info("hasync %s started (group %s)", cfg.hostname,
                 cfg.group.id if cfg.group else "none")
        state = service.status().get("state")
        if state != INIT:  # no group, or disabled: there is no pair to join first
            bridge.state_settled(str(state))
        service.run()
    finally:
        notifier.stopping()
        if metrics is not None:
            metrics.close()
        if sync is not None:
            sync.stop()
        if web is not None:
            web.stop()
        log.info("hasync %s stopped", cfg.hostname)
        logs.flush_suppressed(log_handler)
        notifier.close()
    return 0
