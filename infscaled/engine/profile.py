"""Diagnostics only: a CUDA stage's GPU activity over a few steady-state micro-batches, as a
Chrome trace (torch profiler), when INFSCALED_PROFILE_DIR is set (workers inherit it).

Both programs call `StepTrace.step()` once per micro-batch they launch: a forward stage traces
micro-batches 30-39, a generation stage 300-339 (its first few hundred are prefills and the first
decode steps of each bucket; decode steps are short, so forty of them show the gaps between
steps). INFSCALED_PROFILE_STEPS="FIRST:COUNT" traces micro-batches FIRST..FIRST+COUNT-1 instead
(e.g. later in a run whose warm-up launches thousands). The trace goes to DIR/stage-<node>.json;
`python -m benchmarks.trace_summary FILE` prints per-stream busy time and the compute stream's
idle gaps (docs/gpu.md).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

log = logging.getLogger(__name__)

PROFILE_ENV = "INFSCALED_PROFILE_DIR"
STEPS_ENV = "INFSCALED_PROFILE_STEPS"


def steps_window(value: str | None, first: int, count: int) -> tuple[int, int]:
    """The traced window (first micro-batch, how many) from INFSCALED_PROFILE_STEPS ("FIRST:COUNT",
    FIRST >= 0, COUNT >= 1), else the program's own; a malformed value is said in a warning and
    the program's own window kept (a diagnostic never stops a stage)."""
    if not value:
        return first, count
    parts = value.split(":")
    try:
        chosen = int(parts[0]), int(parts[1])
        if len(parts) != 2 or chosen[0] < 0 or chosen[1] < 1:
            raise ValueError
    except (ValueError, IndexError):
        log.warning("%s=%r is not FIRST:COUNT (FIRST >= 0, COUNT >= 1): tracing micro-batches %d..%d",
                    STEPS_ENV, value, first, first + count - 1)
        return first, count
    return chosen


class StepTrace:
    def __init__(self, first: int, count: int) -> None:
        self.dir = os.environ.get(PROFILE_ENV) or None
        self.first, self.count = steps_window(os.environ.get(STEPS_ENV), first, count) if self.dir else (first, count)
        self._steps = 0
        self._profiler: Any = None

    def step(self, node: object, device: torch.device) -> None:
        """A micro-batch is about to be launched: start or stop the trace around the chosen ones."""
        if self.dir is None or device.type != "cuda":
            return
        n = self._steps
        self._steps += 1
        if n == self.first:
            from torch.profiler import ProfilerActivity, profile

            # GPU activity only: recording every CPU op would slow the launching thread and
            # starve the GPU, so the trace would not show the steady state it is meant to show.
            self._profiler = profile(activities=[ProfilerActivity.CUDA])
            self._profiler.__enter__()
        elif n == self.first + self.count and self._profiler is not None:
            torch.cuda.synchronize(device)
            self._profiler.__exit__(None, None, None)
            path = os.path.join(self.dir, f"stage-{node}.json")
            self._profiler.export_chrome_trace(path)
            self._profiler = None
            log.warning("stage %s: profiler trace of micro-batches %d..%d written to %s", node, self.first,
                        self.first + self.count - 1, path)
