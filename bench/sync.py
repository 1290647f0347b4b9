"""Conntrack replication throughput: how fast a burst on the Master reaches the Backup's kernel.

    python -m bench.sync --entries 50000 [--entries 200000 ...] [--runs 3] [--json] [--quiet]
                         [--systems hasync,conntrackd]

One lab per system, reused across sizes. Each run: flush both kernels' tables, wait for the
sync channel, inject N synthetic ESTABLISHED+SNAT entries into fw1's kernel (requests encoded
before the clock starts and only sent during the burst, ~32 KiB per send; `--injector apply`:
CtSocket.apply per 5000, encoding inside the burst, as in earlier figures), poll fw2's conntrack count every 10 ms until all N are there, then flush fw2 and time
a full resync. The count is read from the per-namespace nf_conntrack_count sysctl through a
file descriptor opened inside fw2's namespace (a pread costs microseconds, a dump of 200k
entries about a second), so the poll itself does not slow the machine it measures.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from bench._table import Column, emit_json, progress, ratio, render, summarize
from bench.cpusplit import split_cpus
from hasync.lab import commands, nsctl
from hasync.lab.process import namespace_pids
from hasync.lab.state import Lab
from hasync.lab.topology import teardown
from statesync.ctnetlink import SEND_BATCH, CtSocket, synthetic_entries, to_create_message

POLL_S = 0.010
HEARTBEAT_SAMPLE_S = 0.050
INJECT_BATCH = 5000


def lab_tag() -> str:
    """Namespaces become hsx-bs-<random>-<role>: ours alone, whoever else runs a lab."""
    return f"x-bs-{secrets.token_hex(2)}"


# --- the kernel side: counts and table writes in a lab namespace ------------------------

class ConntrackCount:
    """nf_conntrack_count of one namespace, read through an fd opened inside it.

    A net sysctl file is bound to the namespace of the task that opened it, so one
    open in a thread that joined the namespace is enough; later preads work from here.
    """

    def __init__(self, netns: str):
        self.fd = nsctl.in_netns(netns, os.open, "/proc/sys/net/netfilter/nf_conntrack_count", os.O_RDONLY)

    def __call__(self) -> int:
        return int(os.pread(self.fd, 32, 0))

    def close(self) -> None:
        os.close(self.fd)


def wait_for_count(count: Callable[[], int], target: int, timeout: float,
                   at_least: bool = True) -> tuple[float | None, int]:
    """Poll until count() reaches target (or falls to it, at_least=False); (monotonic time or None, last)."""
    deadline = time.monotonic() + timeout
    while True:
        seen = count()
        if (seen >= target) if at_least else (seen <= target):
            return time.monotonic(), seen
        if time.monotonic() > deadline:
            return None, seen
        time.sleep(POLL_S)


@dataclass
class PreparedBurst:
    """A burst's create requests encoded before the clock starts, in ~SEND_BATCH buffers:
    the injector then only calls send(), so it loads the sync path instead of capping it
    (the Python encoder alone manages ~40-80k entries/s on this machine)."""

    chunks: list[tuple[bytes, int]]  # (requests, how many)

    @classmethod
    def of(cls, entries: list) -> "PreparedBurst":
        chunks, batch, size = [], [], 0
        for seq, (family, attrs) in enumerate(entries, 1):
            msg = to_create_message(family, attrs, seq)
            batch.append(msg)
            size += len(msg)
            if size >= SEND_BATCH:
                chunks.append((b"".join(batch), len(batch)))
                batch, size = [], 0
        if batch:
            chunks.append((b"".join(batch), len(batch)))
        return cls(chunks)


def inject(sock: CtSocket, entries, batch: int = INJECT_BATCH) -> tuple[float, float, int]:
    """Write entries into the kernel; (start, end, failed) with monotonic times.

    `entries`: a PreparedBurst (send only), or a list of (family, attrs) applied with
    CtSocket.apply `batch` at a time (encoding included: the injector of earlier figures)."""
    failed = 0
    start = time.monotonic()
    chunks = getattr(entries, "chunks", None)  # duck-typed: `python -m bench.sync` runs as __main__
    if chunks is not None:
        for data, count in chunks:
            failed += sock.send_prepared(data, count).failed
    else:
        for i in range(0, len(entries), batch):
            failed += sock.apply(entries[i:i + batch]).failed
    return start, time.monotonic(), failed


def service_rss_bytes(lab: Lab, fw: str) -> int:
    """VmRSS of the sync service: the child of `fw`'s daemon running statesync.service."""
    daemon = lab.pids.get(fw)
    total = 0
    for pid in namespace_pids(lab.ns(fw)):
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
            if ppid != daemon or b"statesync.service" not in cmdline:
                continue
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        except (FileNotFoundError, ProcessLookupError, ValueError):
            continue
    return total


# --- heartbeat watch during the burst --------------------------------------------------

@dataclass
class HeartbeatWatch:
    """Samples fw1/fw2 status every 50 ms in a thread: any role change is a false failover."""

    lab: Lab
    samples: int = 0
    failed_samples: int = 0
    max_last_seen_ms: float = 0.0
    transitions: list = field(default_factory=list)
    unexpected_state_samples: int = 0  # fw1 not MASTER or fw2 not BACKUP when sampled
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> "HeartbeatWatch":
        self._baseline = {fw: self._transition(fw) for fw in ("fw1", "fw2")}
        self._thread = threading.Thread(target=self._run, name="bs-heartbeat-watch", daemon=True)
        self._thread.start()
        return self

    def _transition(self, fw: str) -> Any:
        status = nsctl.try_status(self.lab, fw) or {}
        return status.get("last_transition", {}).get("time"), status.get("state")

    def _run(self) -> None:
        expected = {"fw1": "MASTER", "fw2": "BACKUP"}
        while not self._stop.wait(HEARTBEAT_SAMPLE_S):
            for fw in ("fw1", "fw2"):
                status = nsctl.try_status(self.lab, fw)
                if status is None:
                    self.failed_samples += 1
                    continue
                self.samples += 1
                seen = (status.get("peer") or {}).get("last_seen_ms_ago")
                if seen is not None:
                    self.max_last_seen_ms = max(self.max_last_seen_ms, float(seen))
                last = status.get("last_transition") or {}
                if last.get("time") != self._baseline[fw][0]:  # a transition since the last sample
                    self.transitions.append((fw, last))
                    self._baseline[fw] = (last.get("time"), status.get("state"))
                if status.get("state") != expected[fw]:
                    self.unexpected_state_samples += 1

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        if self._thread:
            self._thread.join()
        return {"samples": self.samples, "failed_samples": self.failed_samples,
                "max_peer_last_seen_ms": round(self.max_last_seen_ms, 1),
                "false_failover": bool(self.transitions or self.unexpected_state_samples),
                "unexpected_state_samples": self.unexpected_state_samples, "transitions": self.transitions}


# --- hasync ------------------------------------------------------------------------------

def sync_status(lab: Lab, fw: str) -> dict[str, Any]:
    return (nsctl.try_status(lab, fw) or {}).get("sync") or {}


def sync_ready(lab: Lab) -> bool:
    """Both sync services connected, fw1's acting as the sender and fw2's as the receiver."""
    one, two = sync_status(lab, "fw1"), sync_status(lab, "fw2")
    return bool(one.get("connected") and two.get("connected")
                and one.get("role") == "master" and two.get("role") == "backup")


def wait_sync_connected(lab: Lab, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sync_ready(lab):
            return
        time.sleep(0.05)
    raise RuntimeError(f"state sync not ready: fw1 {sync_status(lab, 'fw1').get('role')}, "
                       f"fw2 {sync_status(lab, 'fw2').get('role')}")


def sync_lab(say: Callable[[str], None], attempts: int = 3, **overrides: Any) -> Lab:
    """A lab with state sync on and ready. A fresh lab can come up with fw1's sync service left
    in the backup role (role changes reordered while the service starts): rebuild then."""
    for attempt in range(attempts):
        lab = commands.up(f"bs-sync-{os.getpid()}", tag=lab_tag(), sync_enabled=True, **overrides)
        try:
            wait_sync_connected(lab, timeout=10.0)
            return lab
        except RuntimeError as exc:
            say(f"hasync lab attempt {attempt + 1}: {exc}; rebuilding")
            teardown(lab)
        except BaseException:
            teardown(lab)
            raise
    raise RuntimeError(f"state sync never became ready in {attempts} labs")


class HasyncBench:
    """hasync's state sync between fw1 and fw2 of one lab."""

    name = "hasync"

    def __init__(self, say: Callable[[str], None], **overrides: Any):
        self.say = say
        self.lab = sync_lab(say, **overrides)
        self.master = CtSocket.open_in(self.lab.ns("fw1"))
        self.backup = CtSocket.open_in(self.lab.ns("fw2"))
        self.master_count = ConntrackCount(self.lab.ns("fw1"))
        self.backup_count = ConntrackCount(self.lab.ns("fw2"))

    def close(self) -> None:
        for thing in (self.master, self.backup, self.master_count, self.backup_count):
            try:
                thing.close()
            except OSError:
                pass
        teardown(self.lab)

    def _empty_tables(self) -> tuple[int, int]:
        """Flush fw1 (the deletes replicate) then fw2; return the residual counts (heartbeat flows)."""
        self.master.flush()
        wait_for_count(self.backup_count, 16, 30.0, at_least=False)
        self.backup.flush()
        wait_sync_connected(self.lab)
        time.sleep(0.2)  # let the deletes' tail drain before taking the baseline
        return self.master_count(), self.backup_count()

    def run(self, n: int, entries: list, watch_heartbeats: bool) -> dict[str, Any]:
        _, base = self._empty_tables()
        overruns0 = sync_status(self.lab, "fw1").get("overruns", 0) + sync_status(self.lab, "fw2").get("overruns", 0)
        rss0 = {fw: service_rss_bytes(self.lab, fw) for fw in ("fw1", "fw2")}
        watch = HeartbeatWatch(self.lab).start() if watch_heartbeats else None
        start, end, failed = inject(self.master, entries)
        done, seen = wait_for_count(self.backup_count, base + n, 60.0 + n / 10_000)
        heartbeat = watch.stop() if watch else None
        time.sleep(0.2)  # a late straggler still counts as delivered, not lost
        in_backup = self.backup_count() - base
        rss1 = {fw: service_rss_bytes(self.lab, fw) for fw in ("fw1", "fw2")}
        overruns = (sync_status(self.lab, "fw1").get("overruns", 0)
                    + sync_status(self.lab, "fw2").get("overruns", 0) - overruns0)
        row: dict[str, Any] = {
            "inject_failed": failed,
            "burst_ms": (end - start) * 1000,
            "inject_rate": n / (end - start) if end > start else None,
            "after_burst_ms": max(0.0, (done - end) * 1000) if done else None,
            "k2k_rate": n / (done - start) if done else None,
            "lost": max(0, n - in_backup),
            "overruns": overruns,
            "rss_before": rss0,
            "rss_after": rss1,
            "mem_per_entry": (sum(rss1.values()) - sum(rss0.values())) / n,
            "mem_total_per_entry": sum(rss1.values()) / n,
            "heartbeat": heartbeat,
        }
        row["resync_s"], row["resync_dumped"] = self._resync(base + min(n, in_backup))
        return row

    def _resync(self, target: int) -> tuple[float | None, bool]:
        """Flush fw2's table, ask fw2's daemon for a full snapshot, time until the count is back
        (and whether fw1 dumped for it)."""
        self.backup.flush()
        wait_for_count(self.backup_count, 16, 10.0, at_least=False)
        dumps = sync_status(self.lab, "fw1").get("dumps", 0)
        start = time.monotonic()
        nsctl.ask(self.lab, "fw2", "resync")
        done, _ = wait_for_count(self.backup_count, target, 60.0 + target / 10_000)
        # served from the Master's table (statesync.table), or from a dump (its first resync)
        dumped = sync_status(self.lab, "fw1").get("dumps", 0) > dumps
        return ((done - start) if done else None), dumped


# --- the run -----------------------------------------------------------------------------

CONNTRACK_MAX = "/proc/sys/net/netfilter/nf_conntrack_max"
CONNTRACK_BUCKETS = "/sys/module/nf_conntrack/parameters/hashsize"


@contextlib.contextmanager
def conntrack_room(entries: int, say: Callable[[str], None], tables: int = 2):
    """Room for `entries` in each firewall's table for the run, put back afterwards.

    nf_conntrack_max is one limit for every namespace's own count, writable only from the
    host's namespace (where the bench runs); this machine boots with 262,144, too few for
    the 1,000,000-entry burst. The hash table is one for all namespaces and holds the N
    entries of each of `tables` firewalls: it gets at least tables x N buckets, so that each
    one's entries have the chains they would have on a machine of their own sized with N
    buckets for N sessions, as an operator would size it. (A 1M resync with N buckets: the writer's kernel time
    10.3-10.5 s against 9.2-9.7 s with 2N, resync 18.4-20.5 s against 15.9-18.6 s, 4 each,
    alternating. The NAT source hash is sized once, when nf_nat loads: 262,144 here.)"""
    settings = []
    wanted = {CONNTRACK_MAX: entries + 65536, CONNTRACK_BUCKETS: 1 << max(tables * entries - 1, 1).bit_length()}
    for path, value in wanted.items():
        with open(path) as f:
            before = int(f.read())
        if value > before:
            say(f"{path} {before} -> {value} for the run")
            with open(path, "w") as f:
                f.write(str(value))
            settings.append((path, before))
    try:
        yield
    finally:
        for path, before in reversed(settings):
            with open(path, "w") as f:
                f.write(str(before))

COLUMNS = [
    Column("entries", "entries", "{:,}"),
    Column("system", "system", align="<"),
    Column("burst_ms", "burst ms", "{:.0f}"),
    Column("inject_rate", "inject/s", "{:,.0f}"),
    Column("after_burst_ms", "in-Backup after burst ms", "{:.0f}"),
    Column("after_burst_max", "(max)", "{:.0f}"),
    Column("k2k_rate", "kernel-to-kernel/s", "{:,.0f}"),
    Column("lost", "lost (max)", "{:,}"),
    Column("overruns", "overruns", "{}"),
    Column("resync_s", "resync s", "{:.2f}"),
    Column("rss_per_entry", "RSS B/entry", "{:.0f}"),
    Column("hb_last_seen", "peer last seen max ms", "{:.1f}"),
    Column("false_failover", "false failover", align="<"),
    Column("ratio", "hasync/conntrackd", "{:.2f}"),
]


def median_of(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return summarize(values)["median"]


def summary_row(system: str, n: int, runs: list[dict]) -> dict[str, Any]:
    hb = [r["heartbeat"] for r in runs if r.get("heartbeat")]
    after = [r["after_burst_ms"] for r in runs if r.get("after_burst_ms") is not None]
    return {
        "entries": n, "system": system,
        "burst_ms": median_of(runs, "burst_ms"), "inject_rate": median_of(runs, "inject_rate"),
        "after_burst_ms": median_of(runs, "after_burst_ms"),
        "after_burst_max": max(after) if len(after) == len(runs) and after else None,
        "k2k_rate": median_of(runs, "k2k_rate"),
        "lost": max(r["lost"] for r in runs), "overruns": sum(r.get("overruns") or 0 for r in runs),
        "resync_s": median_of(runs, "resync_s"), "rss_per_entry": median_of(runs, "mem_total_per_entry"),
        "rss_growth_per_entry": median_of(runs, "mem_per_entry"),
        "hb_last_seen": max(h["max_peer_last_seen_ms"] for h in hb) if hb else None,
        "false_failover": ("yes" if any(h["false_failover"] for h in hb) else "no") if hb else None,
        "runs": len(runs),
    }


def bench_system(make: Callable[[], Any], sizes: list[int], runs: int, say,
                 injector: str = "prepared", split: bool = False) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    bench = make()
    try:
        with split_cpus(bench.lab) if split else contextlib.nullcontext() as pinned:
            if pinned:
                say(f"{bench.name}: threads pinned, fw1 side on CPU 0: {pinned['fw1']}, fw2 side on CPU 1: {pinned['fw2']}")
            _bench_sizes(bench, sizes, runs, say, injector, out)
    finally:
        bench.close()
    return out


def _bench_sizes(bench: Any, sizes: list[int], runs: int, say, injector: str, out: dict[int, list[dict]]) -> None:
    for n in sizes:
        entries = synthetic_entries(n)
        if injector == "prepared":
            entries = PreparedBurst.of(entries)
        out[n] = []
        for i in range(runs):
            say(f"{bench.name}: {n:,} entries, run {i + 1}/{runs}")
            row = bench.run(n, entries, watch_heartbeats=(n == max(sizes)))
            say(f"  burst {row['burst_ms']:.0f} ms, after burst {row['after_burst_ms']} ms, "
                f"lost {row['lost']}, resync {row['resync_s']} s")
            out[n].append(row)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.sync", description=__doc__.split("\n")[0])
    p.add_argument("--entries", type=int, action="append", help="burst size (repeatable; default 50000, 200000)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--systems", default="hasync,conntrackd")
    p.add_argument("--heartbeat-ms", type=int, default=None,
                   help="the labs' heartbeat interval (default: the lab's 5 ms, dead after 3)")
    p.add_argument("--realtime-priority", type=int, default=None,
                   help="SCHED_FIFO priority of the hasync failover processes (default: the lab's 50; "
                        "0: the normal class)")
    p.add_argument("--no-backup-copy", action="store_true",
                   help="hasync with sync.backup_copy = false: the Backup keeps no copy of the table")
    p.add_argument("--injector", choices=("prepared", "apply"), default="prepared",
                   help="prepared: requests encoded before the burst, only sent during it (default); "
                        "apply: CtSocket.apply per 5000 entries, encoding inside the burst (older figures)")
    p.add_argument("--split-cpus", action="store_true",
                   help="an experiment: fw1's processes and the injector on CPU 0, fw2's on CPU 1 "
                        "(bench/cpusplit.py), roughly two one-core machines")
    p.add_argument("--json", action="store_true")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    sizes = sorted(set(args.entries or [50_000, 200_000]))
    say = progress(not args.quiet)
    systems = [s for s in args.systems.split(",") if s]
    if args.split_cpus and "conntrackd" in systems:
        # tried: conntrackd runs at a realtime priority, and pinned beside the injector it kept
        # CPU 0 to itself; one 200k run had not finished after 10 minutes
        p.error("--split-cpus starves the injector behind conntrackd's realtime priority on CPU 0: "
                "use it with --systems hasync")

    overrides = {} if args.heartbeat_ms is None else {"heartbeat_interval_ms": args.heartbeat_ms}
    hasync_overrides = dict(overrides)
    if args.realtime_priority is not None:
        hasync_overrides["realtime_priority"] = args.realtime_priority
    if args.no_backup_copy:
        hasync_overrides["sync_backup_copy"] = False
    makers: dict[str, Callable[[], Any]] = {"hasync": lambda: HasyncBench(say, **hasync_overrides)}
    if "conntrackd" in systems:
        try:
            from bench.conntrackd import ConntrackdBench
            makers["conntrackd"] = lambda: ConntrackdBench(say, **overrides)
        except ImportError:
            say("conntrackd: bench/conntrackd.py not available, skipped")

    results: dict[str, dict[int, list[dict]]] = {}
    with conntrack_room(max(sizes), say):
        for system in systems:
            if system in makers:
                results[system] = bench_system(makers[system], sizes, args.runs, say, args.injector,
                                               args.split_cpus)

    rows = []
    for n in sizes:
        per = {s: summary_row(s, n, results[s][n]) for s in results}
        if "hasync" in per and "conntrackd" in per:
            per["hasync"]["ratio"] = ratio(per["hasync"]["k2k_rate"], per["conntrackd"]["k2k_rate"])
        rows += per.values()
    print(render(COLUMNS, rows))
    print("targets: 200k in the Backup's kernel <= 100 ms after the burst, 0 lost, "
          ">= 2x conntrackd kernel-to-kernel/s, 1M full resync <= 10 s")
    if args.json:
        emit_json({"injector": args.injector, "split_cpus": args.split_cpus, "rows": rows, "runs": {s: {str(n): r for n, r in v.items()} for s, v in results.items()}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
