"""Request bookkeeping of the dispatcher service, reported as `control.DispatcherStats` (no torch).

Only the service's event loop thread touches it, so it needs no lock. Latencies of the last
`window_s` live in a bounded EventWindow, so quantiles describe now and memory stays bounded.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from infscaled.protocol.control import DispatcherStats
from infscaled.protocol.window import QUANTILES, EventWindow, percentile, rate, span


@dataclass
class RequestStats:
    requests: int = 0
    samples: int = 0
    rejected: int = 0
    timed_out: int = 0
    inflight: int = 0
    latency_sum_s: float = 0.0
    window: EventWindow = field(default_factory=EventWindow)  # (t, samples, latency_s)
    sequences: EventWindow = field(default_factory=EventWindow)  # generation: (t, ttft_s, tpot_s)
    started: float = field(default_factory=time.monotonic)

    def finished(self, samples: int, latency_s: float, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self.requests += 1
        self.samples += samples
        self.latency_sum_s += latency_s
        self.window.add(now, samples, latency_s)

    def generated(self, tokens: int, latency_s: float, ttft_s: float, tpot_s: float | None,
                  now: float | None = None) -> None:
        """A finished generation sequence: `tokens` count as its samples."""
        now = time.monotonic() if now is None else now
        self.finished(tokens, latency_s, now)
        self.sequences.add(now, ttft_s, -1.0 if tpot_s is None else tpot_s)

    def snapshot(self, inflight_micro_batches: int, now: float | None = None, replayed: int = 0,
                 duplicates: int = 0) -> DispatcherStats:
        """The report; `replayed` and `duplicates` are the dispatcher core's counters (dispatch/core.py)."""
        now = time.monotonic() if now is None else now
        seqs = self.sequences.snapshot(now)
        ttft = sorted(e[1] for e in seqs)
        tpot = sorted(e[2] for e in seqs if e[2] >= 0)
        events = self.window.snapshot(now)
        covered = span(now, self.started, self.window.window_s)
        latencies = sorted(e[2] for e in events)
        p50, p90, p99 = (percentile(latencies, q) for q in QUANTILES)
        return DispatcherStats(
            requests=self.requests, samples=self.samples, rejected=self.rejected, timed_out=self.timed_out,
            inflight_requests=self.inflight, inflight_micro_batches=inflight_micro_batches,
            window_s=self.window.window_s, requests_per_s=rate(len(events), covered),
            samples_per_s=rate(sum(e[1] for e in events), covered),
            latency_p50_s=p50, latency_p90_s=p90, latency_p99_s=p99, latency_sum_s=self.latency_sum_s,
            ttft_p50_s=percentile(ttft, 0.5), ttft_p99_s=percentile(ttft, 0.99),
            tpot_p50_s=percentile(tpot, 0.5), tpot_p99_s=percentile(tpot, 0.99),
            replayed=replayed, duplicates=duplicates)
