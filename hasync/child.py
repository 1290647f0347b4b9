"""A helper process of the daemon (the sync service, the web page).

Such work must never share a loop or a scheduling class with the heartbeats: it runs
as a child process in the normal class (see hasync.sched), is restarted with backoff
if it dies, restarted at once when its configuration changes, and stopped with the
daemon. A restart and stop() never cross, so no child outlives stop().
"""

from __future__ import annotations

import logging
import subprocess
import threading
from typing import Callable

from hasync.sched import normal_class_argv

log = logging.getLogger("hasync")


class ChildProcess:
    def __init__(self, name: str, argv: list[str], *, max_backoff_s: float = 10.0,
                 on_spawn: Callable[[], None] | None = None):
        self.name = name
        self.argv = argv
        self.max_backoff_s = max_backoff_s
        self.on_spawn = on_spawn  # after every start, e.g. to hand the new child its role
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        self._stopping = threading.Event()
        self._reconfiguring = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._spawn()
        self._thread = threading.Thread(target=self._keep_alive, name=f"{self.name}-keep-alive",
                                        daemon=True)
        self._thread.start()

    def _spawn(self) -> None:
        self.proc = subprocess.Popen(normal_class_argv(self.argv), stdin=subprocess.DEVNULL)
        log.info("%s started, pid %d", self.name, self.proc.pid)
        if self.on_spawn is not None:
            self.on_spawn()

    def _keep_alive(self) -> None:
        backoff = 0.2
        while not self._stopping.is_set():
            proc = self.proc
            if proc is None:
                return
            code = proc.wait()
            if self._reconfiguring.is_set():
                self._reconfiguring.clear()
                log.info("%s restarting with the new configuration", self.name)
            elif not self._stopping.is_set():
                log.error("%s exited with %s; restarting in %.1f s", self.name, code, backoff)
                if self._stopping.wait(backoff):
                    return
                backoff = min(backoff * 2, self.max_backoff_s)
                self.restarts += 1
            with self._lock:
                if self._stopping.is_set():
                    return
                self._spawn()

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def restart(self) -> None:
        """Start it again now (its configuration changed)."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            self._reconfiguring.set()
            proc.terminate()

    def stop(self) -> None:
        with self._lock:
            self._stopping.set()
            proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
