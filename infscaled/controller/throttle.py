"""Rate-limited warnings: a flood of the same rejection costs a few log lines, not the disk."""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Any


class Throttle:
    """Rate-limited logging per key: one line at once, then one per `interval_s` with a count."""

    def __init__(self, logger: logging.Logger, interval_s: float = 10.0) -> None:
        self.logger, self.interval_s = logger, interval_s
        self._last: dict[str, float] = {}
        self._suppressed: Counter[str] = Counter()

    def warning(self, key: str, message: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._last.get(key, -self.interval_s) < self.interval_s:
            self._suppressed[key] += 1
            return
        self._last[key] = now
        if len(self._last) > 10_000:  # keys are bounded by kinds, but an address may be in one
            self._last.clear()
        more = self._suppressed.pop(key, 0)
        self.logger.warning(message + (f" (and {more} more like it since the last such line)" if more else ""),
                            *args)
