"""Watch the replicated roots (watchdog: inotify on Linux) and hand the loop a
debounced batch of changed names.

watchdog's observer thread only records what changed and wakes the loop through a
pipe it can poll; the loop calls `take(now)` and gets the batch once the burst has
been quiet for QUIET_S (or has lasted MAX_DELAY_S), and a file written in place only once its writer
closed it (inotify's close_write; at most WRITE_HOLD_S later): an editor's write-rename-chmod
or a 1,000-file copy becomes one batch. Renames inside the set come out separately
as (old, new) so the sender can carry them without resending the content.
"""

from __future__ import annotations

import os
import threading
from typing import Callable

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from .manifest import Name

QUIET_S = 0.005
MAX_DELAY_S = 0.1
WRITE_HOLD_S = 1.0  # a file modified but never closed (a chmod, a writer kept open) goes after this


class _Handler(FileSystemEventHandler):
    def __init__(self, watcher: "Watcher"):
        self.w = watcher

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in ("opened", "closed_no_write"):
            return
        w = self.w
        src = w.name_of(os.fsdecode(event.src_path))
        dest = w.name_of(os.fsdecode(event.dest_path)) if getattr(event, "dest_path", "") else None
        if event.is_directory:
            if event.event_type in ("moved", "deleted"):
                # a directory moved or removed: every name under it must be looked at again
                w._mark(None, None, rescan=True)
            return
        if event.event_type == "moved" and src is not None and dest is not None:
            w._mark(dest, (src, dest))
        elif event.event_type in ("modified", "created") and src is not None:
            w._mark(src, None, writing=True)  # held until its close (a half-written file is no version)
        else:
            for name in (src, dest):
                if name is not None:
                    w._mark(name, None)


class Watcher:
    def __init__(self, directories, name_of: Callable[[str], Name | None], clock: Callable[[], float]):
        self.name_of = name_of
        self._clock = clock
        self._lock = threading.Lock()
        self._dirty: set[Name] = set()
        self._moves: list[tuple[Name, Name]] = []
        self._rescan = False
        self._writing: dict[Name, float] = {}  # modified, not yet closed: since when
        self._first = self._last = None
        self.last_batch_wait = 0.0  # first event of the last batch -> its take (s)
        self._rfd, self._wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.observer = Observer()
        handler = _Handler(self)
        for d in directories:
            if os.path.isdir(d):
                self.observer.schedule(handler, str(d), recursive=True)
        self.observer.daemon = True
        self.observer.start()

    def fileno(self) -> int:
        return self._rfd

    def _mark(self, name: Name | None, move: tuple[Name, Name] | None, rescan: bool = False,
              writing: bool = False) -> None:
        now = self._clock()
        with self._lock:
            if name is not None:
                self._dirty.add(name)
                if writing:
                    self._writing.setdefault(name, now)
                else:
                    self._writing.pop(name, None)
            if move is not None:
                self._moves.append(move)
            self._rescan |= rescan
            if self._first is None:
                self._first = now
            self._last = now
        try:
            os.write(self._wfd, b"x")
        except BlockingIOError:
            pass  # the pipe is full: the loop is awake anyway

    def next_timer(self) -> float | None:
        with self._lock:
            if self._first is None:
                return None
            return min(self._last + QUIET_S, self._first + MAX_DELAY_S)

    def take(self, now: float) -> tuple[set[Name], list[tuple[Name, Name]], bool] | None:
        """The batch, once it is due; None before."""
        try:
            while os.read(self._rfd, 4096):
                pass
        except BlockingIOError:
            pass
        with self._lock:
            if self._first is None or now < min(self._last + QUIET_S, self._first + MAX_DELAY_S):
                return None
            held = {n for n, t in self._writing.items() if now - t < WRITE_HOLD_S}
            if held and held >= self._dirty and not self._moves and not self._rescan:
                self._first = self._last = now  # only files still being written: look again later
                return None
            batch = (self._dirty - held, self._moves, self._rescan)
            self.last_batch_wait = now - self._first
            for n in self._dirty - held:
                self._writing.pop(n, None)
            self._dirty, self._moves, self._rescan = set(held), [], False
            self._first = self._last = (now if held else None)
        return batch

    def close(self) -> None:
        self.observer.stop()
        self.observer.join(2)
        os.close(self._rfd)
        os.close(self._wfd)
