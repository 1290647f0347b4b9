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
from hasync.child import ChildProcess
from hasync.config import NodeConfig

log = logging.getLogger("hasync.sync")

STATUS_EVERY_S = 0.5
COMMIT_WAIT_S = 10.0
START_WAIT_S = 5.0  # the longest a starting daemon waits for its sync child (see wait_started)
SYNC_NICE = 10


def sync_socket_name(cfg: NodeConfig) -> str:
    return cfg.control_socket + "-sync"


class SyncSupervisor:
    def __init__(self, cfg: NodeConfig):
        self.cfg = cfg
        self.socket = sync_socket_name(cfg)
        self.child = ChildProcess("sync service", self._argv(cfg), on_spawn=self._on_spawn)
        self._status: dict[str, Any] | None = None
        self._role = "backup"
        self._requests: queue.Queue = queue.Queue()
        self._stopping = threading.Event()
        self._answered = threading.Event()  # the child answered once: its start-up is over

    @staticmethod
    def _argv(cfg: NodeConfig) -> list[str]:
        # bulk work yields the CPU to heartbeats: a lower priority within the normal class
        return ["nice", "-n", str(SYNC_NICE), sys.executable, "-m", "statesync.service",
                "--config", str(cfg.path)]

    @property
    def proc(self) -> subprocess.Popen | None:
        return self.child.proc

    @property
    def restarts(self) -> int:
        return self.child.restarts

    # ---- lifecycle --------------------------------------------------------------

    def start(self) -> None:
        self.child.start()
        threading.Thread(target=self._worker, name="sync-worker", daemon=True).start()

    def _on_spawn(self) -> None:
        # a new child knows nothing: forget the old one's status, hand it the current role
        self._status = None
        self._requests.put(({"cmd": "role", "role": self._role}, None))

    def reconfigure(self, cfg: NodeConfig) -> bool:
        """Take a reloaded config. A changed [sync] section restarts the child (the kernel
        keeps every entry meanwhile, and the new child resyncs); True if it did."""
        changed = cfg.sync != self.cfg.sync or cfg.path != self.cfg.path
        self.cfg = cfg
        if changed:
            self.child.argv = self._argv(cfg)
            self.child.restart()
        return changed

    def wait_started(self, timeout: float = START_WAIT_S) -> bool:
        """Until the child first answers. Its start-up dumps the conntrack table (held keys),
        and a dump stalls a CPU for ~15 ms (statesync.service): a node that joins its pair only
        after that cannot mistake the stall for a lost peer. False at the timeout."""
        return self._answered.wait(timeout)

    def stop(self) -> None:
        self._stopping.set()
        self._requests.put(None)
        self.child.stop()

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
                if not self._stopping.is_set() and self.child.running():
                    self._requests.put((req, done))
                    continue
            if reply.get("ok"):
                self._answered.set()
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
            return {"running": self.child.running(),
                    "restarts": self.restarts, "connected": False}
        return {**s, "restarts": self.restarts, "running": True}

    def reasons(self) -> list[str]:
        s = self._status
        if not self.child.running():
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
