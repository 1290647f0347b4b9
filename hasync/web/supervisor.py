"""The web page seen from the daemon: a child process, restarted with backoff if it dies.

The web server must never share a loop (or a scheduling class) with the
heartbeats, so it runs as `python -m hasync.web.server` in its own process, like
the sync service; the daemon only starts it, restarts it and stops it.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import threading

from hasync.config import NodeConfig

log = logging.getLogger("hasync.web")

MAX_BACKOFF_S = 30.0


class WebChild:
    def __init__(self, cfg: NodeConfig):
        if cfg.path is None:
            raise ValueError("the web page needs the daemon's config file (cfg.path)")
        self.argv = [sys.executable, "-m", "hasync.web.server", "--config", str(cfg.path)]
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        self._stopping = threading.Event()
        self._lock = threading.Lock()  # a restart and stop() never cross: no child outlives stop()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._spawn()
        self._thread = threading.Thread(target=self._keep_alive, name="web-keep-alive", daemon=True)
        self._thread.start()

    def _spawn(self) -> None:
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL)
        log.info("web page started, pid %d", self.proc.pid)

    def _keep_alive(self) -> None:
        backoff = 0.5
        while not self._stopping.is_set():
            code = self.proc.wait()
            if self._stopping.is_set():
                return
            # exit 1 is "cannot listen" (address not there yet, port taken): worth retrying slowly
            log.error("web page exited with %s; restarting in %.1f s", code, backoff)
            if self._stopping.wait(backoff):
                return
            backoff = min(backoff * 2, MAX_BACKOFF_S)
            with self._lock:
                if self._stopping.is_set():
                    return
                self.restarts += 1
                self._spawn()

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

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
