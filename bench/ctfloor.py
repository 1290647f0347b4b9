"""The kernel's floor for conntrack writes here: what no sync daemon can beat in the lab.

    python -m bench.ctfloor [--entries 1000000] [--runs 3] [--json] [--quiet]

Two empty namespaces of their own (hsx-cf-<random>-a/-b, no links, no traffic). The same
prepared create requests as bench/sync.py's injector (encoded before the clock starts, ~32 KiB
per send) go into namespace a's table, a run each:

- **no listener** — nothing on the machine subscribes to conntrack events;
- **listener elsewhere** — a ctnetlink event socket is open in namespace b, as the Master's
  sync service is in fw1 while the Backup writes into fw2. Kernel 6.18 tracks event listeners
  for all namespaces at once, so every insert in a then carries the event extension and goes
  through the event path although nothing in a listens;
- **listener elsewhere, 2 writers** — the same, the requests split between two sockets sent
  from two threads: would a Backup with two kernel writers insert faster? (ctnetlink runs a
  create under the subsystem's mutex, so the answer is the kernel's, measured.)

The table is flushed between runs; medians over the runs. bench/sync.py makes room for
large N in the same way (nf_conntrack_max and the hash, put back afterwards).
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import subprocess
import threading
import time

from bench._table import Column, emit_json, progress, ratio, render
from bench.sync import PreparedBurst, conntrack_room, inject
from statesync.ctnetlink import CtSocket, synthetic_entries

COLUMNS = [
    Column("case", "case", align="<"),
    Column("entries", "entries", "{:,}"),
    Column("seconds", "seconds (median)", "{:.2f}"),
    Column("rate", "creates/s", "{:,.0f}"),
    Column("us_each", "us per create", "{:.1f}"),
    Column("failed", "failed", "{:,}"),
    Column("slowdown", "vs no listener", "{:.2f}"),
]
CASES = ("no listener", "listener elsewhere", "listener elsewhere, 2 writers")


def inject_two_writers(a: CtSocket, b: CtSocket, burst: PreparedBurst) -> tuple[float, float, int]:
    """The burst's chunks alternately over two sockets, each sent from a thread of its own
    (send() releases the GIL: the kernel work of both can run at once, if the kernel lets it)."""
    failed = [0, 0]

    def send(i: int, sock: CtSocket) -> None:
        for data, count in burst.chunks[i::2]:
            failed[i] += sock.send_prepared(data, count).failed

    threads = [threading.Thread(target=send, args=(i, s)) for i, s in enumerate((a, b))]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return start, time.monotonic(), sum(failed)


def measure(entries: int, runs: int, say) -> list[dict]:
    tag = f"hsx-cf-{secrets.token_hex(2)}"
    writer_ns, listener_ns = f"{tag}-a", f"{tag}-b"
    made = []
    try:
        for ns in (writer_ns, listener_ns):
            subprocess.run(["ip", "netns", "add", ns], check=True)
            made.append(ns)
        with conntrack_room(entries, say, tables=1):  # one namespace holds entries
            burst = PreparedBurst.of(synthetic_entries(entries))
            times: dict[str, list[float]] = {case: [] for case in CASES}
            failed = dict.fromkeys(CASES, 0)
            writer = CtSocket.open_in(writer_ns)
            second = CtSocket.open_in(writer_ns)
            try:
                for run in range(runs):
                    for case in CASES:  # side by side in each run: the machine drifts
                        listener = CtSocket.open_in(listener_ns, events=True) if case != CASES[0] else None
                        try:
                            if case == CASES[2]:
                                start, end, bad = inject_two_writers(writer, second, burst)
                            else:
                                start, end, bad = inject(writer, burst)
                        finally:
                            if listener is not None:
                                listener.close()
                        writer.flush()
                        times[case].append(end - start)
                        failed[case] += bad
                        say(f"run {run + 1}/{runs} {case}: {end - start:.2f} s")
                        time.sleep(0.5)
            finally:
                writer.close()
                second.close()
    finally:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], check=False)
    rows = []
    for case in CASES:
        seconds = statistics.median(times[case])
        rows.append({"case": case, "entries": entries, "seconds": seconds, "rate": entries / seconds,
                     "us_each": seconds / entries * 1e6, "failed": failed[case], "runs": times[case]})
    for row in rows:
        row["slowdown"] = ratio(row["seconds"], rows[0]["seconds"])
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ctfloor", description=__doc__.split("\n\n")[0])
    p.add_argument("--entries", type=int, default=1_000_000)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--json", action="store_true", help="print one JSON object last")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = p.parse_args(argv)
    if args.entries < 1 or args.runs < 1:
        p.error("--entries and --runs must be at least 1")
    rows = measure(args.entries, args.runs, progress(not args.quiet))
    print(render(COLUMNS, rows))
    if args.json:
        emit_json({"rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
