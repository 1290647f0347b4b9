"""Two one-core machines on one two-core box, roughly: the lab's fw1 side on CPU 0, fw2's on CPU 1.

An experiment, not a default (`python -m bench.sync --split-cpus`). Unpinned, the injector,
the Master's sync process and the Backup's writer take turns on both cores, and the Backup
can fall behind the burst whenever the other two have them. Pinned, every task of the
processes in fw1's namespace and the bench's own (the injector) run on CPU 0, every task in
fw2's on CPU 1, so the Backup has a core of its own as it would on a machine of its own. What
stays shared: one kernel (the nfnetlink mutex, the conntrack hash, events built for every
insert because a listener exists elsewhere) and the softirq work, which runs on the CPU
that sent the packet.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from typing import Iterator

from hasync.lab.state import Lab

SIDES = (("fw1", 0), ("fw2", 1))


def namespace_pids(lab: Lab, node: str) -> list[int]:
    """The processes running in `node`'s network namespace."""
    listed = subprocess.run(["ip", "netns", "pids", lab.ns(node)], capture_output=True, text=True, check=True)
    return [int(p) for p in listed.stdout.split()]


def pin_process(pid: int, cpu: int) -> int:
    """Every thread of `pid` on `cpu` (threads made later inherit it); how many were pinned."""
    pinned = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return 0
    for tid in tids:
        try:
            os.sched_setaffinity(int(tid), {cpu})
            pinned += 1
        except (ProcessLookupError, PermissionError):
            pass  # gone meanwhile
    return pinned


@contextlib.contextmanager
def split_cpus(lab: Lab) -> Iterator[dict[str, int]]:
    """Pin fw1's processes and this one to CPU 0, fw2's to CPU 1, for the block; then let
    them all run anywhere again. Yields how many threads each side has pinned."""
    if len(os.sched_getaffinity(0)) < 2:
        raise RuntimeError("--split-cpus needs two CPUs")
    everywhere = os.sched_getaffinity(0)
    pinned: dict[str, int] = {}
    pids: list[int] = []
    for node, cpu in SIDES:
        node_pids = namespace_pids(lab, node)
        pids += node_pids
        pinned[node] = sum(pin_process(pid, cpu) for pid in node_pids)
    own = pin_process(os.getpid(), 0)
    pinned["fw1"] += own
    try:
        yield pinned
    finally:
        for pid in pids + [os.getpid()]:
            with contextlib.suppress(FileNotFoundError):
                for tid in os.listdir(f"/proc/{pid}/task"):
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.sched_setaffinity(int(tid), everywhere)
