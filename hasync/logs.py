"""Logging for the daemon: journal-friendly lines or JSON lines, and a repeat limiter.

Formats:
- "journal": under systemd ($JOURNAL_STREAM set, stderr connected to the journal) each
  line is `<N>logger: message` where N is the syslog priority (sd-daemon(3)); the journal
  adds time and host itself. Run by hand, a plain `time host logger LEVEL message` line.
- "json": one object per line: ts (RFC 3339, UTC), level, logger, msg, host, plus every
  `extra={...}` field given to the log call, for log shippers.

The limiter: a flood of one message (a forged heartbeat every millisecond, a flapping
link) must not fill the disk or drown the one line that matters. The same template
(logger, level, format string, not the formatted text) logged more than `burst` times
within `window_s` seconds is suppressed; when the window ends a line says how many
repeats were suppressed.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from datetime import datetime, timezone
from typing import Any, Callable, TextIO

FORMATS = ("journal", "json")
DEFAULT_BURST = 20
DEFAULT_WINDOW_S = 10.0

# logging level -> syslog priority (sd-daemon(3) prefixes)
_PRIORITY = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))

# attributes every LogRecord has; anything else came from `extra=` and goes into JSON
_RECORD_FIELDS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "taskName"}


def syslog_priority(levelno: int) -> int:
    for level, priority in _PRIORITY:
        if levelno >= level:
            return priority
    return 7  # debug


def journal_connected(env: dict[str, str] | os._Environ = os.environ, stream: TextIO | None = None) -> bool:
    """True if `stream` (stderr) is the journal stream systemd gave us ($JOURNAL_STREAM = dev:inode)."""
    value = env.get("JOURNAL_STREAM", "")
    if not value:
        return False
    stream = sys.stderr if stream is None else stream
    try:
        st = os.fstat(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return False  # not a real file descriptor (tests, a closed stderr)
    return value == f"{st.st_dev}:{st.st_ino}"


class JournalFormatter(logging.Formatter):
    """`<N>logger: message`; every line of a traceback carries the prefix, so the journal
    keeps them at the record's priority instead of the default one."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        prefix = f"<{syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in text.split("\n"))


class JsonFormatter(logging.Formatter):
    def __init__(self, hostname: str):
        super().__init__()
        self.hostname = hostname

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            "host": self.hostname,
        }
        for key, value in vars(record).items():
            if key not in _RECORD_FIELDS and key not in out:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


class RepeatLimiter(logging.Filter):
    """Drop a template's records past `burst` per `window_s`; report the count afterwards.

    Attach to a handler; `report` is where the "suppressed" lines go (the handler's
    `handle`). Reports come when the template shows up again after its window, or when
    any record arrives after a sweep period, or on `flush_suppressed()` (at shutdown).
    """

    def __init__(self, report: Callable[[logging.LogRecord], Any], burst: int = DEFAULT_BURST,
                 window_s: float = DEFAULT_WINDOW_S, clock: Callable[[], float] = time.monotonic,
                 max_templates: int = 4096):
        super().__init__()
        if burst < 1 or window_s <= 0:
            raise ValueError("burst must be >= 1 and window_s > 0")
        self.report = report
        self.burst = burst
        self.window_s = window_s
        self.clock = clock
        self.max_templates = max_templates
        self.suppressed_total = 0
        # template -> [window start, records in window, suppressed in window, a sample record]
        self._windows: dict[tuple, list] = {}
        self._next_sweep = clock() + window_s

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "suppressed_repeats", None) is not None:
            return True  # our own report line
        now = self.clock()
        if now >= self._next_sweep:
            self._sweep(now)
        key = (record.name, record.levelno, record.pathname, record.lineno, str(record.msg))
        window = self._windows.get(key)
        if window is None or now - window[0] >= self.window_s:
            if window is not None:
                self._report(window)
            elif len(self._windows) >= self.max_templates:
                self._sweep(now, everything=True)
            self._windows[key] = [now, 1, 0, record]
            return True
        window[1] += 1
        if window[1] <= self.burst:
            return True
        window[2] += 1
        window[3] = record
        self.suppressed_total += 1
        return False

    def flush_suppressed(self) -> None:
        self._sweep(float("inf"), everything=True)

    def _sweep(self, now: float, everything: bool = False) -> None:
        self._next_sweep = now + self.window_s
        for key, window in list(self._windows.items()):
            if everything or now - window[0] >= self.window_s:
                del self._windows[key]
                self._report(window)

    def _report(self, window: list) -> None:
        start, _count, suppressed, sample = window
        if not suppressed:
            return
        line = logging.LogRecord(
            sample.name, sample.levelno, sample.pathname, sample.lineno,
            "suppressed %d repeats of %r in %.0f s", (suppressed, str(sample.msg), self.window_s),
            None)
        line.suppressed_repeats = suppressed
        self.report(line)


def setup(hostname: str, fmt: str = "journal", level: int = logging.INFO, *,
          stream: TextIO | None = None, env: dict[str, str] | os._Environ | None = None,
          burst: int = DEFAULT_BURST, window_s: float = DEFAULT_WINDOW_S) -> logging.Handler:
    """Route the root logger to stderr (or `stream`) in `fmt`, rate-limited. Returns the handler."""
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r} is not one of {', '.join(FORMATS)}")
    stream = sys.stderr if stream is None else stream
    env = os.environ if env is None else env
    handler = logging.StreamHandler(stream)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(hostname))
    elif journal_connected(env, stream):
        handler.setFormatter(JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter(f"%(asctime)s {hostname} %(name)s %(levelname)s %(message)s"))
    handler.addFilter(RepeatLimiter(handler.handle, burst=burst, window_s=window_s))
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level)
    return handler


def flush_suppressed(handler: logging.Handler) -> None:
    """Write the pending "suppressed" lines (call at shutdown)."""
    for f in handler.filters:
        if isinstance(f, RepeatLimiter):
            f.flush_suppressed()
