"""The kernel setting replication depends on: every entry carries the event extension.

nf_conntrack_events defaults to 2 ("autodetect") on current kernels: an entry gets the
event extension only if a ctnetlink event listener exists when it is created, and an
entry without it never reports an update or its destroy, not even to a listener that
comes later. A Backup on its own machine has no listener (only a Master reads events),
so every entry it writes would be mute after a takeover, and entries made while the
sync service restarts would be mute for good. 1 ("always") closes both holes; the
extension is allocated anyway whenever a listener exists, so it costs nothing new.

The table's size as the kernel counts it is read here too (`table_count`): a cheap check
that a Backup's copy of the table is not ahead of its kernel.
"""

from __future__ import annotations

import logging

log = logging.getLogger("hasync.sync")

EVENTS_SYSCTL = "/proc/sys/net/netfilter/nf_conntrack_events"
COUNT_SYSCTL = "/proc/sys/net/netfilter/nf_conntrack_count"  # this namespace's entries
ALWAYS = 1


def ensure_events(path: str = EVENTS_SYSCTL) -> str | None:
    """Set nf_conntrack_events to 1 in this namespace. None if it is 1 now, else the problem
    (in status): the setting could not be read or written."""
    try:
        with open(path) as f:
            before = int(f.read())
    except (OSError, ValueError) as exc:
        return f"cannot read {path}: {exc}"
    if before == ALWAYS:
        return None
    try:
        with open(path, "w") as f:
            f.write(f"{ALWAYS}\n")
    except OSError as exc:
        return (f"nf_conntrack_events is {before} and cannot be set to 1 ({exc.strerror}): entries "
                "made while no event listener runs will not replicate their updates and destroys")
    log.info("nf_conntrack_events %d -> 1: every entry reports its updates and destroy", before)
    return None


def table_count(path: str = COUNT_SYSCTL) -> int | None:
    """How many entries this namespace's conntrack table holds; None if it cannot be read."""
    try:
        with open(path) as f:
            return int(f.read())
    except (OSError, ValueError):
        return None
