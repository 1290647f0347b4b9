"""`hasync lab ...`: build the pair, run the daemons, inject faults, show the figures."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

from hasync.lab import faults, nsctl
from hasync.lab.nodeconfigs import write_hasync_configs
from hasync.lab.process import start_process, stop_process
from hasync.lab.state import FIREWALLS, NODES, Lab, list_labs, load
from hasync.lab.topology import build, teardown

# the namespaces' processes import this checkout even when it is not pip-installed
_ROOT = str(Path(__file__).resolve().parents[2])
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (_ROOT, os.environ.get("PYTHONPATH", "")) if p)

PROBE_PORT = 7000
SESSIONS_PORT = 7001


def start_hasync(lab: Lab, node: str) -> int:
    return start_process(lab, node, [sys.executable, "-m", "hasync", "--config",
                                     lab.configs[node], "run"], "hasync")


faults.register_daemon_starter("hasync", start_hasync)


def start_daemons(lab: Lab) -> None:
    for fw in FIREWALLS:
        lab.pids[fw] = start_hasync(lab, fw)
    lab.save()


def stop_daemon(lab: Lab, node: str) -> None:
    pid = lab.pids.pop(node, None)
    if pid:
        stop_process(pid)
    lab.save()


def up(name: str = "lab", *, tag: str | None = None, start: bool = True, wait: float = 15.0,
       owner_pid: int | None = None, **overrides: Any) -> Lab:
    """Build the lab, write both nodes' configs, start both daemons, wait for the roles."""
    lab = build(name, tag, owner_pid=owner_pid)
    try:
        write_hasync_configs(lab, **overrides)
        if start:
            start_daemons(lab)
            if wait:
                wait_until(lab, lambda s: s["fw1"] == "MASTER" and s["fw2"] == "BACKUP", wait)
    except BaseException:
        teardown(lab)
        raise
    return lab


def states(lab: Lab) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for fw in FIREWALLS:
        s = nsctl.try_status(lab, fw)
        out[fw] = s.get("state") if s else None
    return out


def wait_until(lab: Lab, predicate: Callable[[dict], bool], timeout: float) -> dict:
    """Poll both daemons' states until predicate(states) holds; raise with the last seen."""
    deadline = time.monotonic() + timeout
    seen: dict = {}
    while time.monotonic() < deadline:
        seen = states(lab)
        if predicate(seen):
            return seen
        time.sleep(0.05)
    raise TimeoutError(f"lab {lab.name}: states {seen} after {timeout} s; {heartbeat_report(lab)}")


def heartbeat_report(lab: Lab, log_lines: int = 12) -> str:
    """Each firewall's heartbeat timing and log tail: which node stalled, if one did (a false
    "peer lost" follows a Master that did not run). For the message of a failed wait or test."""
    logs = {fw: _marked_lines(lab.node_dir(fw) / "hasync.log", log_lines, HEARTBEAT_LOG_MARKS)
            for fw in FIREWALLS}
    timing = {fw: {k: v for k, v in ((nsctl.try_status(lab, fw) or {}).get("heartbeats") or {}).items()
                   if k in ("local_stalls", "longest_local_stall_ms", "max_send_gap_ms")}
              for fw in FIREWALLS}
    return f"heartbeat timing: {timing}; logs: {logs}"


# the log lines that tell a role change's story; the sync service's lines would crowd them out
HEARTBEAT_LOG_MARKS = (" -> ", "last heard", "not running", "no heartbeat sent", "link ")


def _marked_lines(path: Path, lines: int, marks: tuple[str, ...]) -> str:
    """The last `lines` lines of the file at `path` that hold one of `marks`."""
    try:
        text = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return ""
    return "\n".join([line for line in text if any(mark in line for mark in marks)][-lines:])


def lab_status(lab: Lab) -> dict[str, Any]:
    from hasync.lab.process import is_running

    nodes = {}
    for node in NODES:
        pid = lab.pids.get(node)
        entry: dict[str, Any] = {"namespace": lab.ns(node), "pid": pid,
                                 "running": bool(pid and is_running(pid))}
        if node in FIREWALLS:
            entry["config"] = lab.configs.get(node)
            entry["replicated_dir"] = lab.replicated_dirs.get(node)
            entry["status"] = nsctl.try_status(lab, node)
        nodes[node] = entry
    return {"name": lab.name, "daemon": lab.daemon, "workdir": lab.workdir,
            "faults": faults.active_faults(lab), "nodes": nodes}


# ---- traffic ------------------------------------------------------------------------


def _start_ready(lab: Lab, node: str, name: str, argv: list[str], timeout: float) -> None:
    """Start a traffic process in `node`, record it for teardown, wait for its ready file."""
    ready = Path(lab.workdir) / f"{name}.ready"
    ready.unlink(missing_ok=True)
    lab.pids[name] = start_process(lab, node, [*argv, "--ready-file", str(ready)], name)
    lab.save()
    _wait_file(ready, timeout)


def _stop_report(lab: Lab, names: tuple[str, ...], out: Path, timeout: float) -> dict[str, Any]:
    """Stop traffic processes (client first, so it writes its report) and read the report."""
    for name in names:
        pid = lab.pids.pop(name, None)
        if pid:
            stop_process(pid, timeout=timeout)
    lab.save()
    _wait_file(out, 10)
    return json.loads(out.read_text())


def _server_ip(lab: Lab) -> str:
    return lab.addresses["server"]["eth0"].split("/")[0]


def start_probe(lab: Lab, out: Path, interval_ms: float = 2.0) -> None:
    """UDP echo on the server, a prober on the client, both recorded for teardown."""
    _start_ready(lab, "server", "server-echo", [sys.executable, "-m", "hasync.lab.probe", "echo",
                                                "--bind", "0.0.0.0", "--port", str(PROBE_PORT)], 10)
    _start_ready(lab, "client", "client-probe", [
        sys.executable, "-m", "hasync.lab.probe", "udp", "--target", _server_ip(lab),
        "--port", str(PROBE_PORT), "--interval-ms", str(interval_ms), "--out", str(out)], 10)


def stop_probe(lab: Lab, out: Path) -> dict[str, Any]:
    return _stop_report(lab, ("client-probe", "server-echo"), out, 5.0)


def _wait_file(path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout} s")
        time.sleep(0.02)


def gaps_between(report: dict[str, Any], start_wall: float, end_wall: float) -> float:
    """The largest client-visible outage (ms) that began inside [start_wall, end_wall)."""
    gaps = [o["gap_ms"] for o in report.get("outages", [])
            if start_wall - 0.05 <= o["start_wall"] < end_wall]
    return max(gaps, default=0.0)


def switchover(lab: Lab, node: str, timeout: float = 15.0) -> dict[str, Any]:
    """Ask `node` for a switchover; while the Backup's table is still resyncing the daemon
    refuses (its sessions would break), so ask again until it is accepted."""
    deadline = time.monotonic() + timeout
    while True:
        reply = nsctl.ask(lab, node, "switchover")
        if reply.get("ok") or "not in sync" not in reply.get("error", "") \
                or time.monotonic() > deadline:
            return reply
        time.sleep(0.1)


# ---- the demo -------------------------------------------------------------------------


def start_sessions(lab: Lab, out: Path, count: int) -> None:
    """A TCP echo server on the server, `count` long-lived sessions from the client."""
    _start_ready(lab, "server", "sessions-server", [sys.executable, "-m", "hasync.lab.sessions",
                                                    "server", "--port", str(SESSIONS_PORT)], 10)
    _start_ready(lab, "client", "sessions-client", [
        sys.executable, "-m", "hasync.lab.sessions", "client", "--target", _server_ip(lab),
        "--port", str(SESSIONS_PORT), "--count", str(count), "--interval-ms", "100",
        "--out", str(out)], 30)


def stop_sessions(lab: Lab, out: Path) -> dict[str, Any]:
    return _stop_report(lab, ("sessions-client", "sessions-server"), out, 10.0)


def demo(name: str = "lab", keep: bool = False, sessions: int = 200, out=print) -> dict[str, Any]:
    fresh = name not in list_labs()
    lab = up(name, sync_enabled=True) if fresh else load(name)
    figures: dict[str, Any] = {}
    try:
        probe_out = Path(lab.workdir) / "demo-probe.json"
        probe_out.unlink(missing_ok=True)
        sessions_out = Path(lab.workdir) / "demo-sessions.json"
        sessions_out.unlink(missing_ok=True)
        out(f"lab {lab.name}: fw1 and fw2 up, state sync on; roles {states(lab)}")
        start_probe(lab, probe_out)
        out("client probing the server through both floating IPs every 2 ms")
        start_sessions(lab, sessions_out, sessions)
        out(f"{sessions} TCP sessions open from client to server through fw1's SNAT")
        time.sleep(1.5)  # let every session's conntrack entry reach the Backup

        t0 = time.time()
        out("crashing the Master (fw1): daemon SIGKILLed, its links dead")
        faults.fail(lab, "fw1", "crash")
        wait_until(lab, lambda s: s["fw2"] == "MASTER", 10)
        time.sleep(1.0)
        t1 = time.time()
        out(f"fw2 took over: {nsctl.try_status(lab, 'fw2').get('cause')}")

        out("restoring fw1 (it reboots and preempts back)")
        faults.restore(lab, "fw1")
        wait_until(lab, lambda s: s["fw1"] == "MASTER" and s["fw2"] == "BACKUP", 15)
        time.sleep(1.0)
        t2 = time.time()

        out("graceful switchover to fw2")
        switchover(lab, "fw1")
        wait_until(lab, lambda s: s["fw2"] == "MASTER", 10)
        time.sleep(1.0)
        t3 = time.time()
        switchover(lab, "fw2")
        wait_until(lab, lambda s: s["fw1"] == "MASTER", 10)
        time.sleep(0.5)

        from bench.config import configsync_demo_step

        change = configsync_demo_step(lab)
        out(f"config sync: {Path(change['path']).name} written on fw1 ("
            + (f"in place on fw2 after {change['latency_ms']} ms)" if change["replicated"]
               else "NOT replicated)"))

        report = stop_probe(lab, probe_out)
        held = stop_sessions(lab, sessions_out)
        figures = {
            "crash_gap_ms": gaps_between(report, t0, t1),
            "failback_gap_ms": gaps_between(report, t1, t2),
            "switchover_gap_ms": gaps_between(report, t2, t3),
            "probes_sent": report["sent"],
            "probes_lost": report["lost"],
            "sessions": held["established"],
            "sessions_survived": held["sessions_ok"],
            "sessions_reset": held["sessions_reset"],
            "max_session_stall_ms": held["max_stall_ms"],
            "config_sync_ms": change["latency_ms"],
        }
        out("")
        out(f"{'event':<28}{'client-visible gap':>20}")
        out(f"{'Master crash -> Backup':<28}{figures['crash_gap_ms']:>17.1f} ms")
        out(f"{'failback (preemption)':<28}{figures['failback_gap_ms']:>17.1f} ms")
        out(f"{'graceful switchover':<28}{figures['switchover_gap_ms']:>17.1f} ms")
        out(f"TCP sessions through NAT that carried on through crash, failback and two switchovers: "
            f"{held['sessions_ok']}/{held['established']} (resets {held['sessions_reset']}, "
            f"longest stall {held['max_stall_ms']:.0f} ms)")
        out(f"probes: {report['sent']} sent, {report['lost']} lost "
            f"(one every 2 ms; a gap below 6 ms is not an outage)")
    finally:
        if not keep:
            teardown(lab)
            out(f"lab {lab.name} torn down")
    return figures


# ---- the command line ----------------------------------------------------------------


def add_parser(sub: Any, func: Callable) -> None:
    lab = sub.add_parser("lab", help="a firewall pair in network namespaces on this machine")
    lsub = lab.add_subparsers(dest="lab_cmd", required=True)
    s = lsub.add_parser("up", help="build the lab and start both daemons")
    s.add_argument("--name", default="lab")
    s.add_argument("--no-start", action="store_true", help="build only, start no daemon")
    s.add_argument("--sync", action="store_true", help="enable state sync")
    s = lsub.add_parser("down", help="stop everything and remove the namespaces")
    s.add_argument("--name", default="lab")
    s = lsub.add_parser("status", help="namespaces, daemon PIDs, their status")
    s.add_argument("--name", default="lab")
    s.add_argument("--json", action="store_true")
    s = lsub.add_parser("exec", help="run a command in a node: hasync lab exec fw1 -- CMD")
    s.add_argument("--name", default="lab")
    s.add_argument("node", choices=NODES)
    s.add_argument("argv", nargs=argparse.REMAINDER)
    s = lsub.add_parser("fail", help="inject a fault: crash|poweroff|wan1|lan1|halink")
    s.add_argument("--name", default="lab")
    s.add_argument("node", choices=FIREWALLS)
    s.add_argument("kind", choices=faults.KINDS)
    s = lsub.add_parser("restore", help="undo a node's faults (restarts a crashed daemon)")
    s.add_argument("--name", default="lab")
    s.add_argument("node", choices=FIREWALLS)
    s = lsub.add_parser("demo", help="traffic, a Master crash, failback, switchover: the figures")
    s.add_argument("--name", default="demo")
    s.add_argument("--sessions", type=int, default=200, help="long-lived TCP sessions to carry")
    s.add_argument("--keep", action="store_true", help="leave the lab up afterwards")
    lab.set_defaults(func=func)


def main(args: argparse.Namespace) -> int:
    cmd = args.lab_cmd
    if cmd == "up":
        overrides = {"sync_enabled": True} if args.sync else {}
        lab = up(args.name, start=not args.no_start, **overrides)
        print(f"lab {lab.name} is up: {states(lab) if not args.no_start else 'no daemons'}")
        return 0
    if cmd == "down":
        teardown(args.name)
        print(f"lab {args.name} is down")
        return 0
    if cmd == "demo":
        demo(args.name, keep=args.keep, sessions=args.sessions)
        return 0
    lab = load(args.name)
    if cmd == "status":
        st = lab_status(lab)
        if args.json:
            print(json.dumps(st, indent=2, default=str))
        else:
            for node, entry in st["nodes"].items():
                s = entry.get("status") or {}
                print(f"{node:<7} {entry['namespace']:<16} pid {entry['pid']} "
                      f"{'running' if entry['running'] else 'not running'}"
                      + (f"  {s.get('icon')} {s.get('role')} {s.get('state')}" if s else ""))
        return 0
    if cmd == "exec":
        argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
        if not argv:
            raise SystemExit("hasync lab exec: give a command after --")
        os.execvp("ip", ["ip", "netns", "exec", lab.ns(args.node), *argv])
    if cmd == "fail":
        faults.fail(lab, args.node, args.kind)
        print(f"{args.node}: {args.kind} injected")
        return 0
    if cmd == "restore":
        faults.restore(lab, args.node)
        print(f"{args.node}: restored")
        return 0
    return 2
