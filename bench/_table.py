"""What every benchmark prints: one aligned table, and with --json one JSON object as the last line.

Shared by bench/failover.py, bench/sync.py and bench/config.py, so it knows nothing about
any of them: rows are plain dicts, columns say which key to show and how.
"""

from __future__ import annotations

import json
import statistics
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence, TextIO


@dataclass(frozen=True)
class Column:
    key: str
    title: str
    fmt: str = "{}"  # applied to a present, non-None value: "{:.1f}", "{:,}"
    align: str = ">"  # ">" numbers, "<" words
    missing: str = "-"  # shown for None or an absent key


def _cell(column: Column, row: dict[str, Any]) -> str:
    value = row.get(column.key)
    return column.missing if value is None else column.fmt.format(value)


def render(columns: Sequence[Column], rows: Iterable[dict[str, Any]]) -> str:
    """The table as text: a header, a rule, one line per row; every column as wide as its widest cell."""
    cells = [[_cell(c, row) for c in columns] for row in rows]
    widths = [max([len(c.title)] + [len(line[i]) for line in cells]) for i, c in enumerate(columns)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(f"{v:{c.align}{w}}" for v, c, w in zip(values, columns, widths)).rstrip()

    out = [line([c.title for c in columns]), "  ".join("-" * w for w in widths)]
    out += [line(values) for values in cells]
    return "\n".join(out)


def summarize(values: Sequence[float]) -> dict[str, Any]:
    """median, max, min and count of a run's samples (None each when there are none)."""
    if not values:
        return {"median": None, "max": None, "min": None, "runs": 0}
    return {"median": statistics.median(values), "max": max(values), "min": min(values), "runs": len(values)}


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, or None when either is missing or the denominator is zero."""
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def emit_json(obj: Any, stream: TextIO = sys.stdout) -> None:
    """One JSON object on one line; call it last so `| tail -1 | jq` always finds it."""
    stream.write(json.dumps(obj, sort_keys=True, default=str) + "\n")
    stream.flush()


def progress(enabled: bool = True, stream: TextIO = sys.stderr) -> Callable[[str], None]:
    """A logger for "what is running now" lines: to stderr, so stdout stays table + JSON."""

    def say(message: str) -> None:
        if enabled:
            stream.write(message + "\n")
            stream.flush()

    return say
