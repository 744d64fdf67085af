"""Sliding-window helpers for live metrics (no torch, no I/O).

Workers and the dispatcher record one event per micro-batch or request; reports every second
read sums, rates and percentiles over the last `window_s`. Events are kept in a deque trimmed
on every read and write, so memory is bounded by the event rate times the window, and
`max_events` caps it even under a burst.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Sequence

DEFAULT_WINDOW_S = 5.0
DEFAULT_MAX_EVENTS = 4096
QUANTILES = (0.5, 0.9, 0.99)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) of ascending values, nearest-rank; 0.0 when there are none."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile {q} outside 0..1")
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(q * len(sorted_values)))
    return float(sorted_values[rank - 1])


def trim(events: deque[tuple[float, ...]], now: float, window_s: float) -> None:
    """Drop events older than `window_s` before `now` (events are in time order)."""
    while events and events[0][0] < now - window_s:
        events.popleft()


class EventWindow:
    """Timestamped events `(t, v1, v2, ...)` of the last `window_s`; thread-safe (several
    threads of a stage replica record into one window while the stats path reads it)."""

    def __init__(self, window_s: float = DEFAULT_WINDOW_S, max_events: int = DEFAULT_MAX_EVENTS) -> None:
        if window_s <= 0:
            raise ValueError(f"window_s must be positive, got {window_s}")
        self.window_s = window_s
        self._events: deque[tuple[float, ...]] = deque(maxlen=max_events)
        self._lock = threading.Lock()

    def add(self, t: float, *values: float) -> None:
        with self._lock:
            self._events.append((t, *values))
            trim(self._events, t, self.window_s)

    def snapshot(self, now: float) -> list[tuple[float, ...]]:
        """The events still inside the window at `now`, oldest first."""
        with self._lock:
            trim(self._events, now, self.window_s)
            return list(self._events)

    def sums(self, now: float, width: int) -> tuple[int, list[float]]:
        """(event count, per-value sums) over the window; `width` is the number of values per event."""
        events = self.snapshot(now)
        totals = [0.0] * width
        for e in events:
            for i in range(width):
                totals[i] += e[i + 1]
        return len(events), totals


class NullWindow(EventWindow):
    """A window that records nothing: live metrics switched off (INFSCALED_METRICS=off), so the
    data path does no bookkeeping at all; benchmarks compare the two."""

    def add(self, t: float, *values: float) -> None:
        return None


def span(now: float, started: float | None, window_s: float) -> float:
    """Seconds the window really covers: the whole window, or less right after start-up, so
    rates are not understated during the first seconds."""
    if started is None:
        return 0.0
    return max(0.0, min(window_s, now - started))


def rate(total: float, seconds: float) -> float:
    """total / seconds, 0.0 for an empty span."""
    return total / seconds if seconds > 0 else 0.0


def mean(total: float, count: int) -> float:
    return total / count if count else 0.0
