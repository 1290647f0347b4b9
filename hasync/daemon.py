"""`hasync run`: the daemon's process shell.

The heartbeat loop (failover/service.py) runs in this process, optionally at a
real-time priority so a busy machine cannot starve it; the sync service is a
separate child process (statesync), so bulk replication never delays a heartbeat.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from hasync import config as cfgmod

log = logging.getLogger("hasync")


def setup_logging(hostname: str, level: int = logging.INFO) -> None:
    # under systemd the journal adds its own timestamp; keep lines short and greppable
    fmt = f"%(asctime)s {hostname} %(name)s %(levelname)s %(message)s"
    logging.basicConfig(stream=sys.stderr, level=level, format=fmt, force=True)


def set_realtime(priority: int) -> None:
    """SCHED_FIFO for the heartbeat process: the reason keepalived has vrrp_rt_priority."""
    if priority <= 0:
        return
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
    except (PermissionError, OSError) as exc:
        log.warning("could not set real-time priority %d: %s", priority, exc)


def run(config_path: Path) -> int:
    from failover.service import FailoverService

    cfg = cfgmod.load(config_path)
    setup_logging(cfg.hostname)
    from failover.vip import FloatingIPs

    floating = [ip for g in cfg.groups for ip in g.floating_ips]
    cfgmod.validate_against_system(cfg, FloatingIPs().system_view(exclude=floating))
    sync = None
    if cfg.sync.enabled and cfg.group is not None:
        from statesync.supervisor import SyncSupervisor

        sync = SyncSupervisor(cfg)
        sync.start()
    set_realtime(cfg.realtime_priority)
    service = FailoverService(cfg, sync=sync, on_transition=sync.on_transition if sync else None)
    log.info("hasync %s started (group %s)", cfg.hostname,
             cfg.group.id if cfg.group else "none")
    try:
        service.run()
    finally:
        if sync is not None:
            sync.stop()
        log.info("hasync %s stopped", cfg.hostname)
    return 0
