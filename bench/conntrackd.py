"""The conntrackd side of bench/sync.py: conntrackd 1.4.7 FTFW over the HA link, external cache.

One conntrackd per firewall, started by PID in its namespace, every path per node under the
lab workdir (several conntrackd share one filesystem: config, lock, UNIX socket, log). The
lab's hasync daemons keep running failover with their own state sync off. The client calls
(`conntrackd -C CONF -s/-c/-f/-n`) talk to the UNIX socket path, so they run from here
without entering the namespace.

A run: inject N entries into fw1's kernel, poll fw2's external cache until it holds N
(`-s cache`), then commit it (`-c`) and poll fw2's kernel until all N are there; that is
the moment hasync's row calls "in the Backup's kernel".
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

from bench.sync import ConntrackCount, HeartbeatWatch, inject, lab_tag, wait_for_count
from hasync.lab import commands
from hasync.lab.process import start_process, stop_process
from hasync.lab.state import Lab
from hasync.lab.topology import teardown
from statesync.ctnetlink import CtSocket

PORT = 3780
SOCKET_BUFFER = 24 << 20  # conntrackd's UDP buffers: big enough for a 200k burst
NETLINK_BUFFER = 32 << 20  # the same event buffer hasync's sync service asks for
NETLINK_BUFFER_MAX = 64 << 20
POLL_S = 0.020  # each poll is a fork+exec of the conntrackd client

_CACHE_ACTIVE = re.compile(r"cache:external\s+active objects:\s*(\d+)")
_OVERRUNS = re.compile(r"netlink overrun:\s*(\d+)")


def config_text(lab: Lab, fw: str, peer: str) -> str:
    own = lab.addresses[fw]["lan2"].split("/")[0]
    other = lab.addresses[peer]["lan2"].split("/")[0]
    node = lab.node_dir(fw)
    return f"""\
Sync {{
    Mode FTFW {{
        DisableExternalCache off
        StartupResync off
    }}
    UDP {{
        IPv4_address {own}
        IPv4_Destination_Address {other}
        Port {PORT}
        Interface lan2
        SndSocketBuffer {SOCKET_BUFFER}
        RcvSocketBuffer {SOCKET_BUFFER}
        Checksum on
    }}
}}
General {{
    Systemd no
    HashSize 65536
    HashLimit 1048576
    LogFile {node}/conntrackd.log
    Syslog off
    LockFile {node}/conntrackd.lock
    NetlinkBufferSize {NETLINK_BUFFER}
    NetlinkBufferSizeMaxGrowth {NETLINK_BUFFER_MAX}
    UNIX {{
        Path {node}/conntrackd.ctl
    }}
}}
"""


def rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except FileNotFoundError:
        pass
    return 0


class ConntrackdBench:
    """conntrackd FTFW between fw1 and fw2 of one lab (hasync sync off)."""

    name = "conntrackd"

    def __init__(self, say: Callable[[str], None], **overrides: Any):
        self.say = say
        self.pids: dict[str, int] = {}
        self.lab = commands.up(f"bs-ctd-{os.getpid()}", tag=lab_tag(), sync_enabled=False, **overrides)
        try:
            self.conf = {}
            for fw, peer in (("fw1", "fw2"), ("fw2", "fw1")):
                path = self.lab.node_dir(fw) / "conntrackd.conf"
                path.write_text(config_text(self.lab, fw, peer))
                self.conf[fw] = str(path)
                self.pids[fw] = start_process(self.lab, fw, ["conntrackd", "-C", str(path)], "conntrackd")
            self._wait_ready()
            self.master = CtSocket.open_in(self.lab.ns("fw1"))
            self.backup = CtSocket.open_in(self.lab.ns("fw2"))
            self.master_count = ConntrackCount(self.lab.ns("fw1"))
            self.backup_count = ConntrackCount(self.lab.ns("fw2"))
        except BaseException:
            self._stop_daemons()
            teardown(self.lab)
            raise

    # --- the conntrackd client ---------------------------------------------------------

    def client(self, fw: str, *args: str, timeout: float = 120.0) -> str:
        out = subprocess.run(["conntrackd", "-C", self.conf[fw], *args], capture_output=True,
                             text=True, timeout=timeout)
        if out.returncode != 0:
            raise RuntimeError(f"conntrackd {' '.join(args)} on {fw}: {out.stderr.strip() or out.stdout.strip()}")
        return out.stdout

    def external_count(self) -> int:
        match = _CACHE_ACTIVE.search(self.client("fw2", "-s", "cache"))
        return int(match.group(1)) if match else 0

    def overruns(self) -> int:
        """Event-socket overruns of both daemons (each one costs a full kernel resync)."""
        total = 0
        for fw in ("fw1", "fw2"):
            match = _OVERRUNS.search(self.client(fw, "-s", "runtime"))
            total += int(match.group(1)) if match else 0
        return total

    def _wait_ready(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.client("fw1", "-s", "cache", timeout=2.0)
                self.client("fw2", "-s", "cache", timeout=2.0)
                return
            except (RuntimeError, subprocess.TimeoutExpired):
                if time.monotonic() > deadline:
                    log = Path(self.lab.node_dir("fw1")) / "conntrackd.log"
                    raise RuntimeError(f"conntrackd did not start; {log}: "
                                       f"{log.read_text()[-500:] if log.exists() else 'no log'}")
                time.sleep(0.1)

    def _stop_daemons(self) -> None:
        for pid in self.pids.values():
            stop_process(pid)
        self.pids.clear()

    def close(self) -> None:
        for thing in (self.master, self.backup, self.master_count, self.backup_count):
            try:
                thing.close()
            except OSError:
                pass
        self._stop_daemons()
        teardown(self.lab)

    # --- a run -------------------------------------------------------------------------

    def _empty(self) -> tuple[int, int]:
        """Both kernels and all four caches empty; returns the residual (fw2 kernel, fw2 external)
        counts: the lab's own flows (heartbeats) come back at once."""
        self.master.flush()
        self.backup.flush()
        for fw in ("fw1", "fw2"):
            self.client(fw, "-f")
        wait_for_count(self.external_count, 16, 30.0, at_least=False)
        time.sleep(0.2)
        return self.backup_count(), self.external_count()

    def _poll_external(self, n: int, timeout: float) -> float | None:
        done, _ = wait_for_count(self.external_count, n, timeout)
        return done

    def _commit(self, target: int, timeout: float) -> tuple[float, float | None]:
        """`conntrackd -c` on fw2; (command seconds, monotonic time all were in the kernel)."""
        start = time.monotonic()
        self.client("fw2", "-c", timeout=timeout)
        took = time.monotonic() - start
        done, _ = wait_for_count(self.backup_count, target, timeout)
        return took, done

    def run(self, n: int, entries: list, watch_heartbeats: bool) -> dict[str, Any]:
        base, base_external = self._empty()
        timeout = 60.0 + n / 10_000
        overruns0 = self.overruns()
        rss0 = {fw: rss_bytes(pid) for fw, pid in self.pids.items()}
        watch = HeartbeatWatch(self.lab).start() if watch_heartbeats else None
        start, end, failed = inject(self.master, entries)
        in_cache = self._poll_external(base_external + n, timeout)
        heartbeat = watch.stop() if watch else None
        commit_s, done = self._commit(base + n, timeout) if in_cache else (None, None)
        time.sleep(0.2)
        in_backup = self.backup_count() - base
        rss1 = {fw: rss_bytes(pid) for fw, pid in self.pids.items()}
        row: dict[str, Any] = {
            "inject_failed": failed,
            "burst_ms": (end - start) * 1000,
            "inject_rate": n / (end - start) if end > start else None,
            "external_after_burst_ms": max(0.0, (in_cache - end) * 1000) if in_cache else None,
            "commit_s": commit_s,
            "after_burst_ms": max(0.0, (done - end) * 1000) if done else None,
            "k2k_rate": n / (done - start) if done else None,
            "lost": max(0, n - in_backup),
            "overruns": self.overruns() - overruns0,
            "rss_before": rss0, "rss_after": rss1,
            "mem_per_entry": (sum(rss1.values()) - sum(rss0.values())) / n,
            "mem_total_per_entry": sum(rss1.values()) / n,
            "heartbeat": heartbeat,
        }
        row["resync_s"] = self._resync(base_external + min(n, in_backup), base + min(n, in_backup), timeout)
        return row

    def _resync(self, external_target: int, target: int, timeout: float) -> float | None:
        """fw2 forgets everything (kernel + external cache), asks fw1 for a full resync (-n),
        then commits: until the kernel count is back."""
        self.backup.flush()
        self.client("fw2", "-f", "external")
        wait_for_count(self.external_count, 16, 10.0, at_least=False)
        start = time.monotonic()
        self.client("fw2", "-n")
        if self._poll_external(external_target, timeout) is None:
            return None
        _, done = self._commit(target, timeout)
        return (done - start) if done else None
