"""How late the controller's event loop runs a timer: the longest delay over the last minute.

Everything the controller does (agents' frames and pongs, the API, watch ticks, scrapes) shares
one event loop; work that holds it delays everything else, and an agent whose pong comes later
than half its ping period drops its link. A 100 ms timer's overshoot measures that hold from the
inside (it also counts the time the process waited for a CPU), and `/metrics` publishes the
longest of the last minute as `infscaled_controller_loop_lag_seconds`.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Final

from infscaled.controller.export import Family

PERIOD_S: Final = 0.1
WINDOW_S: Final = 60


class LoopLag:
    def __init__(self) -> None:
        self._maxima: deque[tuple[int, float]] = deque(maxlen=WINDOW_S)  # (second, longest lag in it)

    def record(self, at: float, lag_s: float) -> None:
        second = int(at)
        if self._maxima and self._maxima[-1][0] == second:
            if lag_s > self._maxima[-1][1]:
                self._maxima[-1] = (second, lag_s)
        else:
            self._maxima.append((second, lag_s))

    def longest_s(self, now: float) -> float:
        """The longest lag in the last WINDOW_S seconds; -1 before the first measurement."""
        recent = [lag for second, lag in self._maxima if second > now - WINDOW_S]
        return max(recent, default=-1.0)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            await asyncio.sleep(PERIOD_S)
            self.record(started, max(0.0, loop.time() - started - PERIOD_S))

    def family(self, now: float) -> Family:
        longest = self.longest_s(now)
        return Family("controller_loop_lag_seconds", "gauge",
                      f"Longest delay of the event loop running a {PERIOD_S:g} s timer in the last {WINDOW_S} s.",
                      [("", {}, longest)] if longest >= 0 else [])
