"""Config sync latency: close() on the Master's replicated dir -> rename on the Backup's.

    python -m bench.config [--edits 50] [--burst 1000] [--json] [--quiet]

One lab with state sync on (config sync rides the same CURVE channel). The Backup's
directory is watched from this process with watchdog (the namespaces share one
filesystem and this process's clock), so each sample is the time from the return of
the Master-side close() to the inotify event of the rename into place on the Backup.
Rows: single edits of a small file (p50/p99), single one-line edits of a 1 MB file,
and a burst of N small files (time until the last one is in place). Bytes on the
wire per edit come from the Master's `bytes_sent` counter. Targets (issue 4):
single edit p99 <= 100 ms; 1,000 small files converged in <= 2 s.
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import threading
import time
from pathlib import Path

from watchdog.events import FileSystemEventHandler
from watchdog.observers import Observer

from bench._table import Column, emit_json, progress, render
from hasync import control
from hasync.lab import commands, nsctl
from hasync.lab.topology import teardown


class _Arrivals(FileSystemEventHandler):
    """Times at which names land (renamed into place) in the Backup's directory."""

    def __init__(self):
        self.cond = threading.Condition()
        self.at: dict[str, float] = {}

    def on_moved(self, event):
        now = time.monotonic()
        with self.cond:
            self.at[os.path.basename(os.fsdecode(event.dest_path))] = now
            self.cond.notify_all()

    def wait(self, names, timeout: float) -> float | None:
        deadline = time.monotonic() + timeout
        with self.cond:
            while not all(n in self.at for n in names):
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.cond.wait(left)
            return max(self.at[n] for n in names)

    def forget(self, names) -> None:
        with self.cond:
            for n in names:
                self.at.pop(n, None)


def _sync_status(lab, fw: str) -> dict:
    try:
        return nsctl.in_netns(lab.ns(fw), control.request, "@hasync-sync", "status", timeout=5.0)
    except OSError:  # the daemon has not started its sync child yet
        return {}


def _write(path: Path, data: bytes) -> float:
    with open(path, "wb") as f:
        f.write(data)
    return time.monotonic()  # after close()


def _percentile(values, q: float):
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


class Probe:
    def __init__(self, lab):
        self.lab = lab
        self.master = Path(lab.replicated_dirs["fw1"])
        self.backup = Path(lab.replicated_dirs["fw2"])
        self.arrivals = _Arrivals()
        self.observer = Observer()
        self.observer.schedule(self.arrivals, str(self.backup), recursive=False)
        self.observer.start()

    def close(self):
        self.observer.stop()
        self.observer.join(2)

    def edit(self, name: str, data: bytes, timeout: float = 10.0) -> float | None:
        self.arrivals.forget([name])
        t0 = _write(self.master / name, data)
        t1 = self.arrivals.wait([name], timeout)
        return None if t1 is None else (t1 - t0) * 1000

    def wait_quiet(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and _sync_status(self.lab, "fw1").get("config", {}).get("behind", 1):
            time.sleep(0.05)


def configsync_demo_step(lab) -> dict:
    """Write one file in the Master's replicated dir; how long until it is on the Backup."""
    probe = Probe(lab)
    try:
        name = f"demo-{secrets.token_hex(3)}.conf"
        ms = probe.edit(name, f"# written by the demo at {time.time():.3f}\n".encode())
        return {"path": str(probe.master / name), "backup_path": str(probe.backup / name),
                "replicated": ms is not None, "latency_ms": None if ms is None else round(ms, 1)}
    finally:
        probe.close()


def _bytes_sent(lab) -> int:
    return _sync_status(lab, "fw1")["config"]["bytes_sent"]


def measure(lab, edits: int, burst: int, say, stages: bool = False) -> list[dict]:
    probe = Probe(lab)
    rows = []
    try:
        for label, size in (("small file edit", 200), ("1 MB file, one-line edit", 1 << 20)):
            say(f"{label} x{edits}")
            line = b"add rule inet filter forward ip saddr 198.18.0.1 accept\n"
            body = bytearray((line * (size // len(line) + 1))[:size])
            name = f"edit-{size}.conf"
            probe.edit(name, bytes(body))
            probe.wait_quiet()
            samples, sent0 = [], _bytes_sent(lab)
            for i in range(edits):
                body[size // 2:size // 2 + 8] = f"{i:08d}".encode()
                ms = probe.edit(name, bytes(body))
                if ms is not None:
                    samples.append(ms)
                time.sleep(0.02)
            probe.wait_quiet()
            per_edit = (_bytes_sent(lab) - sent0) / edits
            rows.append({"case": label, "n": len(samples), "p50_ms": _percentile(samples, 0.5),
                         "p99_ms": _percentile(samples, 0.99), "max_ms": max(samples) if samples else None,
                         "bytes_per_edit": round(per_edit), "lost": edits - len(samples)})
            if stages:
                for fw in ("fw1", "fw2"):
                    got = _sync_status(lab, fw).get("config", {}).get("stage_ms", {})
                    say(f"  {fw} stages (ms, last {edits}+): " + ", ".join(
                        f"{k} p50 {v['p50']:.1f} max {v['max']:.1f}" for k, v in sorted(got.items())))
        say(f"burst of {burst} small files")
        names = [f"burst-{i:05d}.conf" for i in range(burst)]
        sent0 = _bytes_sent(lab)
        t_first = time.monotonic()
        for i, name in enumerate(names):
            t_last = _write(probe.master / name, f"# file {i}\nset x {i}\n".encode())
        done = probe.arrivals.wait(names, 60)
        probe.wait_quiet()
        rows.append({"case": f"burst of {burst} files", "n": burst,
                     "p50_ms": None, "p99_ms": None,
                     "converged_ms": None if done is None else round((done - t_last) * 1000, 1),
                     "total_ms": None if done is None else round((done - t_first) * 1000, 1),
                     "bytes_per_edit": round((_bytes_sent(lab) - sent0) / burst),
                     "lost": sum(1 for n in names if n not in probe.arrivals.at)})
    finally:
        probe.close()
    return rows


COLUMNS = [
    Column("case", "case", align="<"),
    Column("n", "n"),
    Column("p50_ms", "p50 ms", "{:.1f}"),
    Column("p99_ms", "p99 ms", "{:.1f}"),
    Column("max_ms", "max ms", "{:.1f}"),
    Column("converged_ms", "last close->all in place ms", "{:.1f}"),
    Column("total_ms", "first write->all in place ms", "{:.1f}"),
    Column("bytes_per_edit", "bytes/edit", "{:,}"),
    Column("lost", "lost"),
]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench.config", description=__doc__.splitlines()[0])
    p.add_argument("--edits", type=int, default=50)
    p.add_argument("--burst", type=int, default=1000)
    p.add_argument("--json", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--stages", action="store_true", help="print each node's per-stage durations (status stage_ms)")
    args = p.parse_args(argv)
    say = progress(not args.quiet)
    tag = f"cfb{secrets.token_hex(2)}"
    say("building the lab")
    lab = commands.up(f"bench-config-{tag}", tag=tag, owner_pid=os.getpid(), sync_enabled=True)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not _sync_status(lab, "fw2").get("config", {}).get("in_sync"):
            time.sleep(0.1)
        rows = measure(lab, args.edits, args.burst, say, args.stages)
    finally:
        teardown(lab)
    print(render(COLUMNS, rows))
    if args.json:
        emit_json({"bench": "config", "rows": rows,
                   "targets": {"single_edit_p99_ms": 100, "burst_1000_converged_ms": 2000}})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
