"""What a switchover costs the node that hands the Master role over, at N entries.

    python -m bench.switchover [--entries 200000] [--runs 3] [--json] [--quiet]

Each run has a lab of its own: inject N synthetic ESTABLISHED entries (a tenth of them SNAT)
into fw1's kernel, wait until fw2's kernel holds them, then `switchover` on fw1. fw1 becomes
Backup with a table it filled as Master: it makes its TCP entries liberal (their windows go
stale) and takes a resync from fw2, which updates entries it already holds. Read from fw1:

- **synced s**: the switchover asked -> fw1's sync service reports a resync completed as Backup.
- **CPU s** (user / sys): fw1's sync process, from the switchover over a fixed window long
  enough for its kernel writer to finish (5 s + 1 s per 20k entries).
- **dip**: most entries missing from fw1's kernel at any moment (polled every 10 ms); a
  former Master that deleted entries to re-create them showed 16,384 here.

`--back` measures the hand-back instead: after the first switchover, fw2, which took the
entries over from its copy of the table, switches back to fw1, and the same figures are read
from fw2. Entries it wrote as Backup are liberal already; only what its kernel made or changed
as Master needs marking.
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from typing import Any, Callable

from bench._table import Column, emit_json, progress, render, summarize
from bench.sync import ConntrackCount, PreparedBurst, conntrack_room, inject, sync_lab, sync_status, wait_for_count
from hasync.lab import commands
from hasync.lab.state import Lab
from hasync.lab.topology import teardown
from statesync.ctnetlink import CtSocket, synthetic_entries

COLUMNS = [
    Column("entries", "entries", "{:,}"),
    Column("synced_s", "synced s (median)", "{:.2f}"),
    Column("synced_max", "(max)", "{:.2f}"),
    Column("cpu_s", "CPU s (median)", "{:.2f}"),
    Column("user_s", "user", "{:.2f}"),
    Column("sys_s", "sys", "{:.2f}"),
    Column("dip", "dip (max)", "{:,}"),
    Column("runs", "runs"),
]
CLK_TCK = os.sysconf("SC_CLK_TCK")


def process_cpu(pid: int) -> tuple[float, float]:
    """(user, sys) seconds of a process, all its threads."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


class LowWater:
    """The lowest value of count() while it runs, polled in a thread."""

    def __init__(self, count: Callable[[], int]):
        self.count, self.low, self._stop = count, count(), threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.wait(0.01):
            self.low = min(self.low, self.count())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.low


def hand_over(lab: Lab, node: str, count: ConntrackCount, n: int) -> dict[str, Any]:
    """`switchover` on `node` (Master); time until it is synced as Backup, its sync CPU, the dip."""
    status = sync_status(lab, node)
    pid, resync_before = status["pid"], status.get("last_resync")
    user0, sys0 = process_cpu(pid)
    held = count()
    watch = LowWater(count)
    t0 = time.monotonic()
    reply = commands.switchover(lab, node)
    if not reply.get("ok"):
        raise RuntimeError(f"switchover refused: {reply}")
    deadline = t0 + 60 + n / 5000
    while True:
        status = sync_status(lab, node)
        if (status.get("role") == "backup" and status.get("synced")
                and status.get("last_resync") not in (None, resync_before)):
            synced = time.monotonic() - t0
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"{node} not synced as Backup after {deadline - t0:.0f} s")
        time.sleep(0.02)
    time.sleep(max(0.0, t0 + 5 + n / 20000 - time.monotonic()))
    low = watch.stop()
    user1, sys1 = process_cpu(pid)
    return {"synced_s": synced, "user_s": user1 - user0, "sys_s": sys1 - sys0,
            "cpu_s": user1 - user0 + sys1 - sys0, "dip": held - low}


def one_run(n: int, burst: PreparedBurst, say: Callable[[str], None], back: bool = False) -> dict[str, Any]:
    lab = sync_lab(say)
    master = fw1_count = fw2_count = None
    try:
        master = CtSocket.open_in(lab.ns("fw1"))
        fw1_count, fw2_count = ConntrackCount(lab.ns("fw1")), ConntrackCount(lab.ns("fw2"))
        base = fw2_count()
        _, _, failed = inject(master, burst)
        if failed:
            raise RuntimeError(f"{failed} of {n} entries refused by fw1's kernel")
        if wait_for_count(fw2_count, base + n, 60 + n / 5000)[0] is None:
            raise RuntimeError("fw2's kernel never held the burst")
        time.sleep(1.0)  # fw2's writer done, its copy of the table whole
        first = hand_over(lab, "fw1", fw1_count, n)
        if not back:
            return first
        # fw2 took the entries over as they were replicated to it: it hands them back
        return hand_over(lab, "fw2", fw2_count, n)
    finally:
        for thing in (master, fw1_count, fw2_count):
            if thing is not None:
                thing.close()
        teardown(lab)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.switchover", description=__doc__.split("\n")[0])
    p.add_argument("--entries", type=int, action="append", help="entries (repeatable; default 200000)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--back", action="store_true",
                   help="measure the hand-back: fw2, which took the entries over from its copy, "
                        "switches back to fw1")
    p.add_argument("--json", action="store_true")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    sizes = sorted(set(args.entries or [200_000]))
    say = progress(not args.quiet)
    rows, raw = [], {}
    with conntrack_room(max(sizes), say):
        for n in sizes:
            burst = PreparedBurst.of(synthetic_entries(n))
            runs = raw[str(n)] = []
            for i in range(args.runs):
                say(f"{n:,} entries, run {i + 1}/{args.runs}")
                runs.append(one_run(n, burst, say, args.back))
                say("  synced after {synced_s:.2f} s, CPU {cpu_s:.2f} s, dip {dip:,}".format(**runs[-1]))
            median = {k: summarize([r[k] for r in runs])["median"] for k in ("synced_s", "cpu_s", "user_s", "sys_s")}
            rows.append({"entries": n, "runs": len(runs), **median,
                         "synced_max": max(r["synced_s"] for r in runs), "dip": max(r["dip"] for r in runs)})
    print(render(COLUMNS, rows))
    if args.json:
        emit_json({"rows": rows, "runs": raw})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
