"""Failover gap, hasync vs keepalived, in the same run on the same lab topology.

    python -m bench.failover [--runs 5] [--interval-ms 10] [--hog-seconds 0] [--json]

For each contender (keepalived VRRPv3 at --interval-ms, hasync at the same interval with
dead_count 3, hasync at its lab default of 5 ms) one lab is built, one after another (the
machine has 2 cores: never two labs at once). A client probes the server through both
floating IPs every 1 ms for the whole lab's life; each run of a scenario

    steady (fw1 Master, holding both IPs) -> inject on fw1 -> wait until fw2 holds both IPs
    -> +0.5 s -> restore -> wait until fw1 holds them again (and, for hasync, the roles) -> +1 s

and its gap is the largest probe outage that began inside [inject, takeover + 0.5 s): what a
client of the pair saw. The failback (restore -> settle) outage is kept too, in the JSON.

--hog-seconds N runs a second experiment: 2 busy loops in each firewall namespace for N s
while both daemons are watched every 0.2 s; every role change is a false failover.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from pyroute2 import IPRoute

from bench._table import Column, emit_json, progress, ratio, render, summarize
from hasync.lab import commands, faults, nsctl
from hasync.lab.inspect import holder_of_floating_ips
from hasync.lab.keepalived import start_keepalived, write_keepalived_configs
from hasync.lab.process import pid_in_netns, start_process, stop_process, wait_exit
from hasync.lab.state import FIREWALLS, Lab
from hasync.lab.topology import teardown

SCENARIOS = ("crash", "wan1", "lan1", "switchover")
SCENARIO_TITLES = {"crash": "node crash", "wan1": "WAN link down", "lan1": "LAN link down",
                   "switchover": "graceful switchover"}
# the targets, for hasync at its lab defaults (ms of client-visible gap)
TARGETS_MS = {"crash": 20.0, "wan1": 10.0, "lan1": 10.0, "switchover": 5.0}

LAB_DEFAULT_INTERVAL_MS = 5  # hasync/lab/nodeconfigs.py's heartbeat_interval_ms
PROBE_INTERVAL_MS = 1.0
AFTER_TAKEOVER_S = 0.5
SETTLE_S = 1.0
TAKEOVER_TIMEOUT_S = 10.0
STEADY_TIMEOUT_S = 20.0
POLL_S = 0.02
HOG_POLL_S = 0.2
HOG_LOOPS_PER_NODE = 2
HOG_ARGV = [sys.executable, "-c", "while True: pass"]


# ---- waiting on the lab ----------------------------------------------------------------


def wait_for(what: str, predicate: Callable[[], bool], timeout: float,
             describe: Callable[[], Any] | None = None) -> float:
    """Poll until predicate() holds; returns the wall time it was seen.

    On timeout the TimeoutError names `what` and, given `describe`, what was seen instead.
    """
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return time.time()
        if time.monotonic() > deadline:
            seen = f"; seen {describe()}" if describe else ""
            raise TimeoutError(f"{what} not seen within {timeout} s{seen}")
        time.sleep(POLL_S)


def sole_holder(holders: dict[str, list[str]], fw: str) -> bool:
    """Whether `fw`, and only `fw`, serves every floating IP (on a live port)."""
    return bool(holders) and all(h == [fw] for h in holders.values())


# ---- the contenders --------------------------------------------------------------------


class Contender(Protocol):
    kind: str
    interval_ms: float

    @property
    def label(self) -> str: ...

    def up(self, name: str) -> Lab: ...

    def steady(self, lab: Lab) -> bool: ...

    def hand_over(self, lab: Lab) -> None: ...

    def hand_back(self, lab: Lab) -> None: ...

    def describe(self, lab: Lab) -> dict[str, Any]: ...

    def log_path(self, lab: Lab, fw: str) -> Path: ...

    def transition_lines(self, text: str) -> int: ...

    def observe(self, lab: Lab) -> Any: ...


@dataclass
class HasyncPair:
    interval_ms: float = LAB_DEFAULT_INTERVAL_MS
    dead_count: int = 3
    realtime_priority: int = 50  # the lab's default (SCHED_FIFO heartbeats); 0: normal class
    lab_default: bool = False  # label it as the lab's default configuration
    kind: str = "hasync"

    @property
    def label(self) -> str:
        rt = f" rt{self.realtime_priority}" if self.realtime_priority else " normal class"
        return f"hasync {self.interval_ms:g}ms{' (default)' if self.lab_default else ''}{rt}"

    def up(self, name: str) -> Lab:
        overrides: dict[str, Any] = {"heartbeat_interval_ms": self.interval_ms, "dead_count": self.dead_count,
                                     "realtime_priority": self.realtime_priority}
        return commands.up(name, owner_pid=os.getpid(), **overrides)

    def steady(self, lab: Lab) -> bool:
        return commands.states(lab) == {"fw1": "MASTER", "fw2": "BACKUP"} and \
            sole_holder(holder_of_floating_ips(lab), "fw1")

    def hand_over(self, lab: Lab) -> None:
        reply = nsctl.ask(lab, "fw1", "switchover")
        if not reply.get("ok"):
            raise RuntimeError(f"fw1 refused the switchover: {reply}")

    def hand_back(self, lab: Lab) -> None:
        # after a switchover fw1 has yielded and does not preempt: ask fw2 to hand back
        wait_for("fw2 MASTER with fw1 BACKUP", lambda: commands.states(lab) == {"fw1": "BACKUP", "fw2": "MASTER"},
                 STEADY_TIMEOUT_S, lambda: self.describe(lab))
        reply = nsctl.ask(lab, "fw2", "switchover")
        if not reply.get("ok"):
            raise RuntimeError(f"fw2 refused the switchover back: {reply}")

    def describe(self, lab: Lab) -> dict[str, Any]:
        return {"states": commands.states(lab), "holders": holder_of_floating_ips(lab)}

    def log_path(self, lab: Lab, fw: str) -> Path:
        return lab.node_dir(fw) / "hasync.log"

    def transition_lines(self, text: str) -> int:
        return sum(" state " in line and " -> " in line for line in text.splitlines())

    def observe(self, lab: Lab) -> Any:
        # (state, time of the newest transition) per node; None: the daemon did not answer in time
        out = {}
        for fw in FIREWALLS:
            s = nsctl.try_status(lab, fw)
            out[fw] = None if s is None else (s.get("state"), (s.get("last_transition") or {}).get("time"))
        return out


@dataclass
class KeepalivedPair:
    interval_ms: float = 10
    kind: str = "keepalived"

    @property
    def label(self) -> str:
        return f"keepalived {self.interval_ms:g}ms"

    def up(self, name: str) -> Lab:
        lab = commands.up(name, start=False, wait=0, owner_pid=os.getpid())
        try:
            write_keepalived_configs(lab, self.interval_ms / 1000.0)
            for fw in FIREWALLS:
                start_keepalived(lab, fw)
        except BaseException:
            teardown(lab)
            raise
        return lab

    def steady(self, lab: Lab) -> bool:
        return sole_holder(holder_of_floating_ips(lab), "fw1")

    def hand_over(self, lab: Lab) -> None:
        # keepalived's graceful stop: on SIGTERM the Master sends a priority-0 advert, drops the VIPs
        pid = lab.pids.pop("fw1")
        lab.save()
        os.kill(pid, signal.SIGTERM)
        if not wait_exit(pid, 5.0):
            stop_process(pid)

    def hand_back(self, lab: Lab) -> None:
        start_keepalived(lab, "fw1")  # priority 150 preempts fw2 (100)

    def describe(self, lab: Lab) -> dict[str, Any]:
        return {"holders": holder_of_floating_ips(lab)}

    def log_path(self, lab: Lab, fw: str) -> Path:
        return lab.node_dir(fw) / "keepalived.log"

    def transition_lines(self, text: str) -> int:
        return sum("Entering" in line and "STATE" in line for line in text.splitlines())

    def observe(self, lab: Lab) -> Any:
        return {ip: tuple(h) for ip, h in holder_of_floating_ips(lab).items()}


def contenders(interval_ms: float, only: set[str] | None = None) -> list[Contender]:
    """keepalived and hasync at `interval_ms`, hasync at the lab default; `only` picks by
    "keepalived", "hasync" (equal interval), "default"."""
    pairs: list[Contender] = [KeepalivedPair(interval_ms), HasyncPair(interval_ms)]
    if interval_ms != LAB_DEFAULT_INTERVAL_MS:
        pairs.append(HasyncPair(LAB_DEFAULT_INTERVAL_MS, lab_default=True))
    else:
        pairs[1].lab_default = True
    if not only:
        return pairs

    def key(c: Contender) -> str:
        return "default" if getattr(c, "lab_default", False) and c.interval_ms != interval_ms else c.kind

    return [c for c in pairs if key(c) in only]


def lab_name(contender: Contender, purpose: str) -> str:
    slug = contender.label.replace(" ", "").replace("(", "").replace(")", "")
    return f"bf-{purpose}-{slug}-{os.getpid()}"


# ---- one failover run ------------------------------------------------------------------


@dataclass
class Window:
    scenario: str
    inject_wall: float
    takeover_wall: float
    end_wall: float  # takeover + 0.5 s: the failover window ends here
    settled_wall: float  # fw1 back in charge + 1 s: the failback window ends here


def crash(lab: Lab, node: str) -> None:
    """A node crash as it happens: the daemon and the data plane stop together.

    faults.fail(..., "crash") alone SIGKILLs the daemon and waits for its process group
    to be gone (up to ~1 s for keepalived's VRRP child) before it downs lan1/wan1: the
    peer then takes over while the crashed node still forwards, and the client sees no
    outage at all. So the links go down here right after the SIGKILL, over a netlink
    socket opened beforehand (~3 ms per link), and faults.fail does the rest (reaping,
    silencing lan2, recording the fault for restore).
    """
    pid = lab.pids.get(node)
    with IPRoute(netns=lab.ns(node)) as ipr:
        links = [ipr.link_lookup(ifname=ifname)[0] for ifname in ("lan1", "wan1")]
        if pid and pid_in_netns(pid, lab.ns(node)):
            os.killpg(pid, signal.SIGKILL)
        for index in links:
            ipr.link("set", index=index, state="down")
    faults.fail(lab, node, "crash")


def inject(contender: Contender, lab: Lab, scenario: str) -> None:
    if scenario == "switchover":
        contender.hand_over(lab)
    elif scenario == "crash":
        crash(lab, "fw1")
    else:
        faults.fail(lab, "fw1", scenario)


def undo(contender: Contender, lab: Lab, scenario: str) -> None:
    if scenario == "switchover":
        contender.hand_back(lab)
    else:
        faults.restore(lab, "fw1")  # a crashed daemon comes back via the starter registered for its kind


def one_run(contender: Contender, lab: Lab, scenario: str) -> Window:
    t_inject = time.time()
    inject(contender, lab, scenario)
    t_taken = wait_for("fw2 holding both floating IPs",
                       lambda: sole_holder(holder_of_floating_ips(lab), "fw2"), TAKEOVER_TIMEOUT_S,
                       lambda: contender.describe(lab))
    time.sleep(AFTER_TAKEOVER_S)
    t_end = time.time()
    undo(contender, lab, scenario)
    wait_for("fw1 back in charge", lambda: contender.steady(lab), STEADY_TIMEOUT_S,
             lambda: contender.describe(lab))
    time.sleep(SETTLE_S)
    return Window(scenario, t_inject, t_taken, t_end, time.time())


@dataclass
class ContenderResult:
    label: str
    kind: str
    interval_ms: float
    lab_default: bool = False  # hasync at the lab's defaults: the targets apply to it
    gaps_ms: dict[str, list[float]] = field(default_factory=dict)
    failback_gaps_ms: dict[str, list[float]] = field(default_factory=dict)
    takeover_seen_ms: dict[str, list[float]] = field(default_factory=dict)  # inject -> IPs seen on fw2 (polled)
    errors: list[str] = field(default_factory=list)
    probes: dict[str, int] = field(default_factory=dict)


def measure_failover(contender: Contender, scenarios: list[str], runs: int,
                     say: Callable[[str], None]) -> ContenderResult:
    result = ContenderResult(contender.label, contender.kind, contender.interval_ms,
                             lab_default=getattr(contender, "lab_default", False))
    name = lab_name(contender, "fo")
    say(f"[{contender.label}] building lab {name}")
    lab = contender.up(name)
    windows: list[Window] = []
    try:
        wait_for("fw1 in charge", lambda: contender.steady(lab), STEADY_TIMEOUT_S)
        probe_out = Path(lab.workdir) / "probe.json"
        commands.start_probe(lab, probe_out, PROBE_INTERVAL_MS)
        time.sleep(SETTLE_S)
        for run in range(runs):
            for scenario in scenarios:
                try:
                    windows.append(one_run(contender, lab, scenario))
                except (TimeoutError, RuntimeError) as exc:
                    # one broken run is a finding, not the end of the benchmark: note it and recover
                    result.errors.append(f"run {run + 1} {scenario}: {exc}")
                    say(f"[{contender.label}] run {run + 1} {scenario} FAILED: {exc}")
                    recover(contender, lab)
            say(f"[{contender.label}] run {run + 1}/{runs} done")
        report = commands.stop_probe(lab, probe_out)
    finally:
        teardown(lab)
    for w in windows:
        result.gaps_ms.setdefault(w.scenario, []).append(
            commands.gaps_between(report, w.inject_wall, w.end_wall))
        result.failback_gaps_ms.setdefault(w.scenario, []).append(
            commands.gaps_between(report, w.end_wall, w.settled_wall))
        result.takeover_seen_ms.setdefault(w.scenario, []).append(
            round((w.takeover_wall - w.inject_wall) * 1000, 1))
    result.probes = {"sent": report.get("sent", 0), "lost": report.get("lost", 0)}
    return result


def recover(contender: Contender, lab: Lab) -> None:
    """Back to steady state after a failed run, or raise (the lab is then torn down)."""
    if faults.active_faults(lab).get("fw1"):
        faults.restore(lab, "fw1")
    if contender.kind == "keepalived" and "fw1" not in lab.pids:
        start_keepalived(lab, "fw1")
    try:
        wait_for("fw1 in charge after a failed run", lambda: contender.steady(lab), STEADY_TIMEOUT_S / 2)
    except TimeoutError:
        if contender.kind != "hasync":
            raise
        nsctl.ask(lab, "fw2", "switchover")  # fw1 may have yielded (a switchover half done)
        wait_for("fw1 in charge after a failed run", lambda: contender.steady(lab), STEADY_TIMEOUT_S / 2)
    time.sleep(SETTLE_S)


# ---- false failovers under a CPU hog ------------------------------------------------------


def count_changes(samples: list[Any]) -> int:
    """How many times an observation differed from the one before it (None: no answer, skipped)."""
    seen = [s for s in samples if s is not None]
    return sum(1 for a, b in zip(seen, seen[1:]) if a != b)


def hasync_transitions(samples: list[dict[str, Any]]) -> int:
    """New transitions per node: each node's (state, last transition time) changing counts once."""
    return sum(count_changes([s.get(fw) if s else None for s in samples]) for fw in FIREWALLS)


def measure_hog(contender: Contender, seconds: float, say: Callable[[str], None]) -> dict[str, Any]:
    name = lab_name(contender, "hog")
    say(f"[{contender.label}] CPU hog for {seconds:g} s in lab {name}")
    lab = contender.up(name)
    hogs: list[str] = []
    samples: list[Any] = []
    try:
        wait_for("fw1 in charge", lambda: contender.steady(lab), STEADY_TIMEOUT_S)
        time.sleep(SETTLE_S)
        log_start = {fw: contender.log_path(lab, fw).stat().st_size for fw in FIREWALLS}
        for fw in FIREWALLS:
            for i in range(HOG_LOOPS_PER_NODE):
                key = f"{fw}-hog{i}"
                lab.pids[key] = start_process(lab, fw, HOG_ARGV, "hog")
                hogs.append(key)
        lab.save()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            samples.append(contender.observe(lab))
            time.sleep(HOG_POLL_S)
        for key in hogs:
            stop_process(lab.pids.pop(key))
        lab.save()
        logged = 0
        for fw in FIREWALLS:
            with open(contender.log_path(lab, fw), errors="replace") as f:
                f.seek(log_start[fw])
                logged += contender.transition_lines(f.read())
    finally:
        teardown(lab)
    polled = hasync_transitions(samples) if contender.kind == "hasync" else count_changes(samples)
    unanswered = sum(1 for s in samples if s is None or (isinstance(s, dict) and None in s.values()))
    return {"daemon": contender.label, "seconds": seconds, "samples": len(samples),
            "transitions_polled": polled, "transitions_logged": logged, "unanswered_polls": unanswered}


# ---- the report --------------------------------------------------------------------------


def rows_of(results: list[ContenderResult], scenarios: list[str]) -> list[dict[str, Any]]:
    keepalived = next((r for r in results if r.kind == "keepalived"), None)
    rows = []
    for scenario in scenarios:
        for r in results:
            s = summarize(r.gaps_ms.get(scenario, []))
            row: dict[str, Any] = {"scenario": SCENARIO_TITLES[scenario], "scenario_key": scenario,
                                   "daemon": r.label, "median_ms": s["median"], "max_ms": s["max"],
                                   "runs": s["runs"], "gaps_ms": r.gaps_ms.get(scenario, []),
                                   "failback_gaps_ms": r.failback_gaps_ms.get(scenario, []),
                                   "takeover_seen_ms": r.takeover_seen_ms.get(scenario, [])}
            if r.kind == "hasync" and keepalived and r.interval_ms == keepalived.interval_ms:
                k = summarize(keepalived.gaps_ms.get(scenario, []))
                row["ratio"] = ratio(s["median"], k["median"])
            if r.lab_default:
                row["target_ms"] = TARGETS_MS[scenario]
                row["met"] = None if s["max"] is None else ("yes" if s["max"] <= TARGETS_MS[scenario] else "no")
            rows.append(row)
    return rows


FAILOVER_COLUMNS = [
    Column("scenario", "scenario", align="<"),
    Column("daemon", "daemon", align="<"),
    Column("median_ms", "median gap ms", "{:.1f}"),
    Column("max_ms", "max gap ms", "{:.1f}"),
    Column("runs", "runs"),
    Column("ratio", "hasync/keepalived", "{:.2f}"),
    Column("target_ms", "target ms", "<= {:g}"),
    Column("met", "met (max)"),
]

HOG_COLUMNS = [
    Column("daemon", "daemon under CPU hog", align="<"),
    Column("seconds", "seconds", "{:g}"),
    Column("transitions_polled", "false failovers (polled)"),
    Column("transitions_logged", "transitions (logs)"),
    Column("unanswered_polls", "unanswered polls"),
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.failover", description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=5, help="runs per scenario and daemon (0: skip the gaps)")
    p.add_argument("--interval-ms", type=int, default=10,
                   help="keepalived advert_int and the equal-interval hasync (>= 10: VRRPv3 counts centiseconds)")
    p.add_argument("--hog-seconds", type=float, default=0, help="CPU-hog false-failover test length (0: skip)")
    p.add_argument("--hog-daemons", default="default,normal,keepalived",
                   help="hog test contenders: default (hasync 5 ms, SCHED_FIFO 50 as in the lab), "
                        "normal (the same in the normal scheduling class), keepalived")
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"subset of {','.join(SCENARIOS)}")
    p.add_argument("--daemons", default="keepalived,hasync,default",
                   help="subset of keepalived (at --interval-ms), hasync (same interval), default (hasync 5 ms)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = p.parse_args(argv)
    scenarios = [s for s in args.scenarios.split(",") if s]
    unknown = set(scenarios) - set(SCENARIOS)
    if unknown:
        p.error(f"unknown scenarios {sorted(unknown)}")
    if args.interval_ms < 10:
        p.error("--interval-ms below 10: keepalived (VRRPv3) cannot advertise faster than every 10 ms")
    say = progress(not args.quiet)
    started = time.monotonic()

    results = [measure_failover(c, scenarios, args.runs, say)
               for c in contenders(args.interval_ms, set(args.daemons.split(",")))] \
        if args.runs > 0 else []
    rows = rows_of(results, scenarios)
    hog_rows: list[dict[str, Any]] = []
    if args.hog_seconds > 0:
        available: dict[str, Contender] = {
            "default": HasyncPair(LAB_DEFAULT_INTERVAL_MS, lab_default=True),
            "normal": HasyncPair(LAB_DEFAULT_INTERVAL_MS, lab_default=True, realtime_priority=0),
            "keepalived": KeepalivedPair(args.interval_ms),
        }
        hog_pairs = [available[name] for name in args.hog_daemons.split(",") if name]
        hog_rows = [measure_hog(c, args.hog_seconds, say) for c in hog_pairs]

    if rows:
        print(f"failover gap seen by a client probing every {PROBE_INTERVAL_MS:g} ms through both floating IPs "
              f"(gap 0 = no outage above {3 * PROBE_INTERVAL_MS:g} ms)")
        print(render(FAILOVER_COLUMNS, rows))
        for r in results:
            if r.errors:
                print(f"{r.label}: {len(r.errors)} failed run(s): " + "; ".join(r.errors))
    if hog_rows:
        if rows:
            print()
        print(render(HOG_COLUMNS, hog_rows))
    elapsed = time.monotonic() - started
    print(f"elapsed {elapsed:.0f} s")
    if args.json:
        emit_json({
            "benchmark": "failover", "interval_ms": args.interval_ms, "runs": args.runs,
            "probe_interval_ms": PROBE_INTERVAL_MS, "scenarios": scenarios,
            "rows": rows, "hog": hog_rows, "elapsed_s": round(elapsed, 1),
            "contenders": [{"label": r.label, "kind": r.kind, "interval_ms": r.interval_ms,
                            "probes": r.probes, "errors": r.errors} for r in results],
        })
    return 0 if not any(r.errors for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
