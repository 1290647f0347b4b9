"""Reload hooks: `sync.reload_hooks` maps a path or glob to a command run after a
matching path was applied (e.g. `nft -f /etc/nftables.conf`).

A burst of applied paths runs each matching command once. Commands run without a
shell (shlex split, like failover.hooks), in their own process group, off the loop:
`poll()` reaps them. A failure (exit status, timeout, cannot start) is reported in
status until the same command succeeds again; it is never retried by itself.
"""

from __future__ import annotations

import fnmatch
import os
import shlex
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from typing import Mapping

TIMEOUT_S = 30.0
_TAIL = 300


@dataclass
class _Running:
    command: str
    paths: list[str]
    proc: subprocess.Popen
    stderr: object
    started: float


@dataclass
class HookRunner:
    hooks: Mapping[str, str]
    timeout_s: float = TIMEOUT_S
    failures: dict[str, dict] = field(default_factory=dict)  # command -> last failure
    runs: int = 0
    _running: list[_Running] = field(default_factory=list)
    _queued: dict[str, list[str]] = field(default_factory=dict)

    def commands_for(self, path: str) -> list[str]:
        return [cmd for pattern, cmd in self.hooks.items() if fnmatch.fnmatchcase(path, pattern)]

    def applied(self, path: str) -> None:
        for cmd in self.commands_for(path):
            self._queued.setdefault(cmd, []).append(path)

    def start_queued(self) -> None:
        """Start each queued command once (one that is still running waits for its end)."""
        busy = {r.command for r in self._running}
        for cmd in [c for c in self._queued if c not in busy]:
            paths = self._queued.pop(cmd)
            err = tempfile.TemporaryFile()
            env = {**os.environ, "HASYNC_CONFIG_PATHS": " ".join(paths)}
            try:
                proc = subprocess.Popen(shlex.split(cmd), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=err, env=env, start_new_session=True)
            except (OSError, ValueError) as exc:
                err.close()
                self._failed(cmd, paths, f"cannot start: {exc}", None)
                continue
            self.runs += 1
            self._running.append(_Running(cmd, paths, proc, err, time.monotonic()))

    def poll(self, now: float) -> None:
        still = []
        for r in self._running:
            rc = r.proc.poll()
            if rc is None and now - r.started > self.timeout_s:
                os.killpg(r.proc.pid, signal.SIGKILL)
                r.proc.wait()
                self._failed(r.command, r.paths, f"timed out after {self.timeout_s:.0f} s", None, r)
            elif rc is None:
                still.append(r)
            elif rc != 0:
                self._failed(r.command, r.paths, f"exit status {rc}", rc, r)
            else:
                self.failures.pop(r.command, None)
                r.stderr.close()
        self._running = still
        if self._queued:
            self.start_queued()

    @property
    def busy(self) -> bool:
        return bool(self._running or self._queued)

    def _failed(self, cmd: str, paths: list[str], why: str, rc: int | None, r: _Running | None = None) -> None:
        tail = ""
        if r is not None:
            r.stderr.seek(0)
            tail = r.stderr.read()[-_TAIL:].decode(errors="replace").strip()
            r.stderr.close()
        self.failures[cmd] = {"command": cmd, "paths": paths[:10], "error": why, "rc": rc, "stderr": tail,
                              "at": time.time()}

    def close(self) -> None:
        for r in self._running:
            if r.proc.poll() is None:
                os.killpg(r.proc.pid, signal.SIGKILL)
                r.proc.wait()
            r.stderr.close()
        self._running = []
