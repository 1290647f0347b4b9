"""The sync service seen from the failover process: a child process, kept alive.

The failover loop must never wait behind bulk sync work, so the sync service runs
as a separate process (like keepalived's VRRP and checker children) and this class
is all the failover process knows of it: it restarts the child with backoff, passes
role changes in order, and keeps a recent copy of the child's status so that
`hasync status` never blocks on it. The one deliberate wait: in "cache" mode a
takeover waits for the cache commit, so floating IPs never come up before the
state is in the kernel (the keepalived #2254 failure).
"""

from __future__ import annotations

import logging
import queue
import subprocess
import sys
import threading
import time
from typing import Any

from failover.actions import Transition
from failover.machine import MASTER
from hasync import control
from hasync.config import NodeConfig

log = logging.getLogger("hasync.sync")

STATUS_EVERY_S = 0.5
COMMIT_WAIT_S = 10.0
SYNC_NICE = 10


def sync_socket_name(cfg: NodeConfig) -> str:
    return cfg.control_socket + "-sync"


class SyncSupervisor:
    def __init__(self, cfg: NodeConfig):
        self.cfg = cfg
        self.socket = sync_socket_name(cfg)
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        self._status: dict[str, Any] | None = None
        self._role = "backup"
        self._requests: queue.Queue = queue.Queue()
        self._stopping = threading.Event()
        self._reconfiguring = threading.Event()
        self._threads: list[threading.Thread] = []

    # ---- lifecycle --------------------------------------------------------------

    def start(self) -> None:
        self._spawn()
        for target in (self._keep_alive, self._worker):
            t = threading.Thread(target=target, name=f"sync-{target.__name__}", daemon=True)
            t.start()
            self._threads.append(t)

    def _spawn(self) -> None:
        # bulk work yields the CPU to heartbeats: a normal (not real-time) scheduling class, even
        # when the failover process runs SCHED_FIFO, and a lower priority within it
        argv = ["chrt", "--other", "0", "nice", "-n", str(SYNC_NICE),
                sys.executable, "-m", "statesync.service", "--config", str(self.cfg.path)]
        self.proc = subprocess.Popen(argv)
        log.info("sync service started, pid %d", self.proc.pid)

    def _keep_alive(self) -> None:
        backoff = 0.2
        while not self._stopping.is_set():
            proc = self.proc
            if proc is None:
                return
            code = proc.wait()
            if self._stopping.is_set():
                return
            if self._reconfiguring.is_set():
                self._reconfiguring.clear()
                log.info("sync service restarting with the new configuration")
                self._status = None
                self._spawn()
                self._requests.put(({"cmd": "role", "role": self._role}, None))
                continue
            log.error("sync service exited with %s; restarting in %.1f s", code, backoff)
            self._status = None
            if self._stopping.wait(backoff):
                return
            backoff = min(backoff * 2, 10.0)
            self.restarts += 1
            self._spawn()
            self._requests.put(({"cmd": "role", "role": self._role}, None))

    def reconfigure(self, cfg: NodeConfig) -> bool:
        """Take a reloaded config. A changed [sync] section restarts the child (the kernel
        keeps every entry meanwhile, and the new child resyncs); True if it did."""
        changed = cfg.sync != self.cfg.sync or cfg.path != self.cfg.path
        self.cfg = cfg
        proc = self.proc
        if changed and proc is not None and proc.poll() is None:
            self._reconfiguring.set()
            proc.terminate()
        return changed

    def stop(self) -> None:
        self._stopping.set()
        self._requests.put(None)
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    # ---- talking to the child ---------------------------------------------------

    def _ask(self, cmd: str, timeout: float = 2.0, **kw: Any) -> dict[str, Any]:
        try:
            return control.request(self.socket, cmd, timeout=timeout, **kw)
        except (OSError, ValueError) as exc:
            return {"ok": False, "error": f"sync service unreachable: {exc}"}

    def _worker(self) -> None:
        """Role changes in order, and a fresh status copy every STATUS_EVERY_S."""
        while not self._stopping.is_set():
            try:
                item = self._requests.get(timeout=STATUS_EVERY_S)
            except queue.Empty:
                item = ({"cmd": "status"}, None)
            if item is None:
                return
            req, done = item
            cmd, args = req["cmd"], {k: v for k, v in req.items() if k != "cmd"}
            if cmd == "role":
                # always the newest role: a retried older request must never win over it
                args["role"] = self._role
            reply = self._ask(cmd, timeout=COMMIT_WAIT_S, **args)
            if cmd == "role" and not reply.get("ok"):
                # the child may still be starting: keep the role for its next answer
                time.sleep(0.05)
                if not self._stopping.is_set() and self.proc and self.proc.poll() is None:
                    self._requests.put((req, done))
                    continue
            if cmd == "status":
                self._status = reply if reply.get("ok", True) else None
            if done is not None:
                done.set()

    def on_transition(self, t: Transition) -> None:
        self._role = "master" if t.new == MASTER else "backup"
        done = threading.Event()
        self._requests.put(({"cmd": "role", "role": self._role}, done))
        if t.new == MASTER and self.cfg.sync.mode == "cache":
            if not done.wait(COMMIT_WAIT_S):
                log.error("cache commit did not finish in %.0f s; taking over anyway", COMMIT_WAIT_S)

    # ---- what the failover process shows --------------------------------------

    def status(self) -> dict[str, Any] | None:
        s = self._status
        if s is None:
            return {"running": bool(self.proc and self.proc.poll() is None),
                    "restarts": self.restarts, "connected": False}
        return {**s, "restarts": self.restarts, "running": True}

    def reasons(self) -> list[str]:
        s = self._status
        if self.proc is None or self.proc.poll() is not None:
            return ["state sync service is not running"]
        if s is None:
            return ["state sync service is not answering yet"]
        if s.get("refused_reason"):
            return [f"state sync refused: {s['refused_reason']}"]
        if not s.get("connected"):
            return ["state sync: not connected to the peer"]
        return [f"state sync: {e}" for e in s.get("problems", [])]

    def ready(self) -> bool:
        """May this node take the Master role from a live peer: is its table complete?
        A Master's table is the truth whether or not a peer is connected."""
        s = self._status
        return bool(s and (s.get("synced") or s.get("role") == "master"))

    def resync(self, config: bool = False) -> dict[str, Any]:
        return self._ask("resync", timeout=5.0, config=config)
