"""What a takeover costs with each Backup mode: "kernel" (entries written into the Backup's
kernel as they arrive, the default) against "cache" (held in the sync process and committed
into the kernel when the node becomes Master, as conntrackd's default does).

    python -m bench.takeover [--entries 50000 --entries 200000] [--runs 3] [--json] [--quiet]

Each run has a lab of its own, sync mode set on both nodes: inject N synthetic ESTABLISHED+SNAT
entries into fw1's kernel, wait until fw2 holds all N (its kernel table, or its cache: `cached`
in status), crash fw1, then read from fw2:

- **takeover ms**: fw2's decision to take over -> floating IPs up (`last_takeover_ms` in
  status). In cache mode the daemon waits for the commit before it brings the IPs up: a
  session's packets must not meet a kernel without its entry (keepalived #2254).
- **committed**: entries the takeover wrote into fw2's kernel (0 in kernel mode: they are there),
  and the commit's own time (`last_commit` in fw2's sync status), of it the framing in Python.

Detection (the lab's dead time, 15 ms) comes before both and is the same in both modes. After
the takeover the run checks that fw2's kernel holds the N entries (nf_conntrack_count, read in
fw2's namespace, less a few of the lab's own flows that the crash ends).
"""

from __future__ import annotations

import argparse
import time
from typing import Any, Callable

from bench._table import Column, emit_json, progress, render, summarize
from bench.sync import (ConntrackCount, PreparedBurst, conntrack_room, inject, sync_lab, sync_status,
                        wait_for_count)
from hasync.lab import commands, faults, nsctl
from hasync.lab.topology import teardown
from statesync.ctnetlink import CtSocket, synthetic_entries

MODES = ("kernel", "cache")
OWN_FLOWS = 16  # the lab's heartbeat and sync-channel entries: some go with the crashed peer

COLUMNS = [
    Column("entries", "entries", "{:,}"),
    Column("mode", "mode", align="<"),
    Column("takeover_ms", "takeover ms (median)", "{:.1f}"),
    Column("takeover_max", "(max)", "{:.1f}"),
    Column("committed", "committed at takeover", "{:,}"),
    Column("commit_ms", "of which commit ms", "{:.0f}"),
    Column("frame_ms", "(framing ms)", "{:.0f}"),
    Column("runs", "runs"),
]


def _wait(what: str, count: Callable[[], int], target: int, timeout: float) -> None:
    done, seen = wait_for_count(count, target, timeout)
    if done is None:
        raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}: {seen} of {target}")


def one_run(mode: str, n: int, burst: PreparedBurst, say: Callable[[str], None]) -> dict[str, Any]:
    lab = sync_lab(say, sync_mode=mode)
    master = backup_count = None
    try:
        master = CtSocket.open_in(lab.ns("fw1"))
        backup_count = ConntrackCount(lab.ns("fw2"))
        base = backup_count()
        _, _, failed = inject(master, burst)
        if failed:
            raise RuntimeError(f"{failed} of {n} entries refused by fw1's kernel")
        if mode == "kernel":
            _wait("fw2's kernel table", backup_count, base + n, 60 + n / 5000)
        else:
            _wait("fw2's cache", lambda: sync_status(lab, "fw2").get("cached", 0), n, 60 + n / 5000)
            if backup_count() >= base + n:
                raise RuntimeError("cache mode wrote the entries into the Backup's kernel before the takeover")
        faults.fail(lab, "fw1", "crash")
        commands.wait_until(lab, lambda s: s["fw2"] == "MASTER", 30)
        if backup_count() < base + n - OWN_FLOWS:
            raise RuntimeError(f"fw2 took over with {backup_count() - base} of {n} entries in its kernel")
        status = nsctl.try_status(lab, "fw2") or {}
        commit = {}
        deadline = time.monotonic() + 3  # the daemon's copy of the sync status is up to 0.5 s old
        while mode == "cache" and not commit and time.monotonic() < deadline:
            commit = sync_status(lab, "fw2").get("last_commit") or {}
            time.sleep(0.1)
        return {"takeover_ms": status.get("last_takeover_ms"), "committed": commit.get("entries", 0),
                "commit_ms": commit.get("ms"), "frame_ms": commit.get("frame_ms")}
    finally:
        for thing in (master, backup_count):
            if thing is not None:
                thing.close()
        teardown(lab)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.takeover", description=__doc__.split("\n")[0])
    p.add_argument("--entries", type=int, action="append", help="entries (repeatable; default 50000, 200000)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--json", action="store_true")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    sizes = sorted(set(args.entries or [50_000, 200_000]))
    say = progress(not args.quiet)
    rows, raw = [], {}
    with conntrack_room(max(sizes), say):
        for n in sizes:
            burst = PreparedBurst.of(synthetic_entries(n))
            for i in range(args.runs):
                for mode in MODES:  # side by side in each round: the machine's drift hits both
                    say(f"{mode}: {n:,} entries, run {i + 1}/{args.runs}")
                    row = one_run(mode, n, burst, say)
                    say(f"  takeover {row['takeover_ms']} ms, committed {row['committed']:,}")
                    raw.setdefault(f"{mode}/{n}", []).append(row)
            for mode in MODES:
                runs = raw[f"{mode}/{n}"]
                take = [r["takeover_ms"] for r in runs if r["takeover_ms"] is not None]
                rows.append({"entries": n, "mode": mode, "runs": len(runs),
                             "takeover_ms": summarize(take)["median"], "takeover_max": max(take, default=None),
                             "committed": max(r["committed"] for r in runs),
                             "commit_ms": summarize([r["commit_ms"] for r in runs if r["commit_ms"]])["median"],
                             "frame_ms": summarize([r["frame_ms"] for r in runs if r["frame_ms"]])["median"]})
    print(render(COLUMNS, rows))
    if args.json:
        emit_json({"rows": rows, "runs": raw})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
