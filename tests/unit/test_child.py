"""The daemon's helper processes: restarted when they die, at once on a new config, never after stop."""

from __future__ import annotations

import os
import signal
import sys
import time

from hasync.child import ChildProcess

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]


def wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_a_dead_child_is_restarted_and_counted():
    spawned = []
    child = ChildProcess("test child", SLEEPER, on_spawn=lambda: spawned.append(1))
    child.start()
    try:
        first = child.proc.pid
        os.kill(first, signal.SIGKILL)
        wait_for(lambda: child.proc.pid != first and child.running())
        assert child.restarts == 1 and len(spawned) == 2
    finally:
        child.stop()
    assert not child.running()


def test_restart_on_new_config_is_immediate_and_not_a_failure():
    child = ChildProcess("test child", SLEEPER)
    child.start()
    try:
        first = child.proc.pid
        child.argv = [sys.executable, "-c", "import time; time.sleep(61)"]
        child.restart()
        wait_for(lambda: child.proc.pid != first and child.running(), timeout=2.0)
        assert child.restarts == 0
        assert child.proc.args[-1].endswith("time.sleep(61)")
    finally:
        child.stop()


def test_nothing_outlives_stop():
    child = ChildProcess("test child", SLEEPER)
    child.start()
    pid = child.proc.pid
    child.stop()
    time.sleep(0.5)  # the keep-alive thread must not start a new one
    assert child.proc.pid == pid and not child.running()
