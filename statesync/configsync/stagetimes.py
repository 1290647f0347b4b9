"""Per-stage durations of config sync (ms), for `status` and bench/config.py: where a
slow edit spent its time (debounce, rescan, delta, send; fsync, rename, manifest save)."""

from __future__ import annotations

import time
from collections import deque
from contextlib import contextmanager

KEEP = 128  # recent samples per stage


class StageTimes:
    def __init__(self):
        self._samples: dict[str, deque] = {}

    def add(self, stage: str, ms: float) -> None:
        self._samples.setdefault(stage, deque(maxlen=KEEP)).append(ms)

    @contextmanager
    def measure(self, stage: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(stage, (time.perf_counter() - t0) * 1000)

    def summary(self) -> dict[str, dict]:
        out = {}
        for stage, q in self._samples.items():
            s = sorted(q)
            out[stage] = {"n": len(s), "p50": round(s[len(s) // 2], 2), "max": round(s[-1], 2)}
        return out
