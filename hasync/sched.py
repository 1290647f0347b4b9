"""Scheduling classes: the heartbeat process may run SCHED_FIFO; what it starts must not."""

from __future__ import annotations

import os
import shutil


def normal_class_argv(argv: list[str]) -> list[str]:
    """`argv` wrapped so it runs in the normal class even when started from a real-time
    thread (a child inherits SCHED_FIFO: a busy hook would then starve the machine)."""
    if os.sched_getscheduler(0) == os.SCHED_OTHER or shutil.which("chrt") is None:
        return argv
    return ["chrt", "--other", "0", *argv]
