"""Notify hooks: operator commands run on every state transition, off the failover loop.

Hooks are slow (they reload services, send mail) and heartbeats are due every few
milliseconds, so they run on one worker thread, the one thread of the failover
process. One worker gives the ordering guarantee for free: transitions run in the
order they were queued, and for each transition the commands run one after the
other, never two at once.

Each command is split with shlex and run without a shell, in its own process group
so that a timeout kills whatever it started too. Its stderr goes to a temporary file
(not a pipe: a grandchild that escaped the group could hold a pipe open forever) and
the tail of it is logged with the exit status.
"""

from __future__ import annotations

import os
import queue
import shlex
import signal
import subprocess
import tempfile
import threading
import time
from typing import Callable, Mapping, Sequence
from hasync.sched import normal_class_argv

# variables every hook can rely on (empty when the caller does not know one)
HOOK_VARIABLES = ("HASYNC_STATE", "HASYNC_OLD_STATE", "HASYNC_CAUSE", "HASYNC_GROUP", "HASYNC_FLOATING_IPS")
MAX_PENDING = 1024  # a flapping pair must not queue hooks without bound
_STDERR_TAIL = 400  # bytes of a hook's stderr kept for the log
_STOP = object()


def transition_env(state: str, old_state: str, cause: str, group: int | str,
                   floating_ips: Sequence[object] = ()) -> dict[str, str]:
    """The HASYNC_* environment of one transition (floating IPs space-separated)."""
    return {
        "HASYNC_STATE": state,
        "HASYNC_OLD_STATE": old_state,
        "HASYNC_CAUSE": cause,
        "HASYNC_GROUP": str(group),
        "HASYNC_FLOATING_IPS": " ".join(str(ip) for ip in floating_ips),
    }


class HookRunner:
    """Runs `commands` for each notified transition, in order, on one worker thread."""

    def __init__(self, commands: Sequence[str], timeout_s: float, log: Callable[[str], None]):
        self._argvs = [shlex.split(command) for command in commands]  # a bad quote fails here, at start-up
        self._timeout_s = timeout_s
        self._log = log
        self._pending: queue.Queue = queue.Queue(MAX_PENDING)
        self._current: subprocess.Popen | None = None
        self._abandon = threading.Event()  # set by close() when its wait ran out
        self.runs = 0  # commands started
        self.failures = 0  # non-zero exit, killed by a signal, or could not start
        self.timeouts = 0  # killed for running past timeout_s (also counted in failures)
        self.dropped = 0  # transitions not run: queue full, or abandoned at close
        self._worker = threading.Thread(target=self._work, name="hasync-hooks", daemon=True)
        self._worker.start()

    def configure(self, commands: Sequence[str], timeout_s: float) -> None:
        """New hooks from a reloaded config, for the transitions from now on."""
        self._argvs = [shlex.split(command) for command in commands]
        self._timeout_s = timeout_s

    def notify(self, env: Mapping[str, str]) -> None:
        """Queue one transition; returns at once (never blocks the caller)."""
        if not self._argvs:
            return
        full_env = dict(os.environ)
        full_env.update({name: "" for name in HOOK_VARIABLES})
        full_env.update({str(k): str(v) for k, v in env.items()})
        try:
            self._pending.put_nowait(full_env)
        except queue.Full:
            self.dropped += 1
            self._log(f"hook queue full ({MAX_PENDING}): transition to {full_env['HASYNC_STATE']} not run")

    def close(self, wait_s: float) -> bool:
        """Run what is queued for up to `wait_s`; then kill the running hook and drop the rest.

        True if everything queued ran to completion.
        """
        try:
            self._pending.put(_STOP, timeout=wait_s)
        except queue.Full:
            pass
        self._worker.join(wait_s)
        if not self._worker.is_alive():
            return True
        self._abandon.set()
        current = self._current
        if current is not None:
            _kill_group(current)
        self._worker.join(1.0)
        return False

    def _work(self) -> None:
        while True:
            env = self._pending.get()
            if env is _STOP:
                return
            if self._abandon.is_set():
                self.dropped += 1
                continue
            for argv in self._argvs:
                if self._abandon.is_set():
                    break
                self._run(argv, env)

    def _run(self, argv: list[str], env: dict[str, str]) -> None:
        self.runs += 1
        name = shlex.join(argv)
        with tempfile.TemporaryFile() as stderr:
            started = time.monotonic()
            try:
                process = subprocess.Popen(
                    normal_class_argv(argv), env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                    stderr=stderr, start_new_session=True, close_fds=True,
                )
            except OSError as err:
                self.failures += 1
                self._log(f"hook {name}: could not start: {err}")
                return
            self._current = process
            try:
                status = process.wait(self._timeout_s)
                timed_out = False
            except subprocess.TimeoutExpired:
                _kill_group(process)
                status = process.wait()
                timed_out = True
            finally:
                self._current = None
            elapsed_ms = (time.monotonic() - started) * 1000
            if timed_out:
                self.timeouts += 1
                self.failures += 1
                self._log(f"hook {name}: killed after {self._timeout_s:g} s timeout{_tail(stderr)}")
            elif status != 0:
                self.failures += 1
                how = f"killed by signal {-status}" if status < 0 else f"exit status {status}"
                self._log(f"hook {name}: {how} after {elapsed_ms:.0f} ms{_tail(stderr)}")
            else:
                self._log(f"hook {name}: ok in {elapsed_ms:.0f} ms")


def _kill_group(process: subprocess.Popen) -> None:
    # the hook leads its own session/group (start_new_session), so its pgid is its pid;
    # once reaped that pid may be reused, so never signal a process already waited for
    if process.returncode is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _tail(stderr) -> str:
    stderr.seek(0, os.SEEK_END)
    size = stderr.tell()
    stderr.seek(max(0, size - _STDERR_TAIL))
    text = stderr.read().decode(errors="replace").strip()
    return f": {text}" if text else ""
