"""Retention: which finished jobs the manager deletes, by age and by count.

Pure policy, no I/O: the manager's sweeper (``JobManager._retain``) asks ``due`` which of
its finished jobs to delete, every RETENTION_INTERVAL_S, and deletes them through the
normal delete path. Running jobs are never offered, so never deleted; nor counted.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

from jobworker.engine.model import JobRecord

__all__ = [
    "DURATION_UNITS",
    "RETENTION_INTERVAL_S",
    "RetentionPolicy",
    "describe_ids",
    "format_duration",
    "parse_duration",
]

# How often the sweeper looks for jobs to delete (and once at start): retention is counted
# in minutes to days, so a minute late costs nothing, and a sweep of nothing costs a scan.
RETENTION_INTERVAL_S = 60.0
DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
IDS_SHOWN = 10  # ranges of ids a retention log line names before it says "..."


def parse_duration(text: str) -> float:
    """``7d``, ``12h``, ``30m``, ``90s`` or ``90`` (seconds) as seconds; ValueError naming
    the text if it is none of these, or not more than 0."""
    word = text.strip().lower()
    unit = word[-1:] if word[-1:] in DURATION_UNITS else "s"
    number = word[:-1] if word[-1:] in DURATION_UNITS else word
    try:
        seconds = float(number) * DURATION_UNITS[unit]
    except ValueError:
        raise ValueError(f"not a duration (e.g. 7d, 12h, 30m, 90s): {text!r}") from None
    if not 0 < seconds < float("inf"):
        raise ValueError(f"must be more than 0 seconds: {text!r}")
    return seconds


def format_duration(seconds: float) -> str:
    """``seconds`` in the largest unit that divides it (``7d``, ``90m``, ``1.5s``)."""
    for unit, size in sorted(DURATION_UNITS.items(), key=lambda item: -item[1]):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


@dataclass(frozen=True)
class RetentionPolicy:
    """Delete finished jobs that ended more than ``max_age`` seconds ago, and those beyond
    the newest ``max_count`` finished ones (None: no such limit). Off when both are None."""

    max_age: float | None = None
    max_count: int | None = None

    @property
    def enabled(self) -> bool:
        return self.max_age is not None or self.max_count is not None

    def describe(self) -> str:
        """The policy in words, for the log: ``ended over 7d ago, beyond the newest 100``."""
        parts = []
        if self.max_age is not None:
            parts.append(f"ended over {format_duration(self.max_age)} ago")
        if self.max_count is not None:
            parts.append(f"beyond the newest {self.max_count}")
        return " or ".join(parts) or "off"

    def due(self, finished: Sequence[JobRecord], now: dt.datetime) -> list[JobRecord]:
        """The jobs of ``finished`` (ended jobs, in id order) to delete now, oldest first.

        By count, the oldest by id go (ids grow with creation time and are never reused);
        by age, those whose end (for a job that has none: LOST, its start) is more than
        ``max_age`` before ``now``."""
        doomed: set[str] = set()
        if self.max_count is not None and len(finished) > self.max_count:
            doomed.update(record.id for record in finished[: len(finished) - self.max_count])
        if self.max_age is not None:
            cutoff = now - dt.timedelta(seconds=self.max_age)
            doomed.update(
                record.id for record in finished if (record.end_time or record.start_time) < cutoff
            )
        return [record for record in finished if record.id in doomed]


def describe_ids(ids: Sequence[str]) -> str:
    """Ids in ascending order as ranges: ``1-3, 7, 9-12``; after IDS_SHOWN ranges, ``...``."""
    ranges: list[tuple[int, int]] = []
    for number in map(int, ids):
        if ranges and number == ranges[-1][1] + 1:
            ranges[-1] = (ranges[-1][0], number)
        else:
            ranges.append((number, number))
    words = [str(low) if low == high else f"{low}-{high}" for low, high in ranges]
    if len(words) > IDS_SHOWN:
        words = [*words[:IDS_SHOWN], "..."]
    return ", ".join(words)
