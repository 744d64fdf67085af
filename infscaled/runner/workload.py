"""Drive a job with its workload: closed loop (fixed concurrency) or Poisson arrivals.

Requests come from the job's `[workload]` (random, seeded) or its input file. Every
request's latency and outcome is recorded; nothing is dropped silently.
"""

from __future__ import annotations

import functools
import itertools
import random
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from infscaled.config import WorkloadConfig
from infscaled.errors import InfscaledError, PipelineFailedError
from infscaled.models.base import InputSpec
from infscaled.models.inputs import example_request


@dataclass
class Outcome:
    """One request's fate."""

    index: int
    request: torch.Tensor
    latency_s: float = 0.0
    result: torch.Tensor | None = None
    error: str | None = None


@dataclass
class RunResult:
    outcomes: list[Outcome] = field(default_factory=list)
    wall_s: float = 0.0
    # Requests never sent because the pipeline had already failed (they count as failed).
    unsent: int = 0
    unsent_reason: str | None = None

    @property
    def completed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.error is None and o.result is not None]

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.error is not None]


def requests_for(wl: WorkloadConfig, spec: InputSpec, count: int) -> Iterator[torch.Tensor]:
    """The workload's requests, deterministic for a given seed."""
    if wl.input_file:
        from safetensors.torch import load_file

        tensors = list(load_file(wl.input_file).values())
        if not tensors:
            raise InfscaledError(f"{wl.input_file}: no tensors in the input file")
        for i in range(count):
            yield tensors[i % len(tensors)]
        return
    rng = random.Random(wl.seed)
    gen = torch.Generator().manual_seed(wl.seed)
    for _ in range(count):
        samples = rng.randint(*wl.samples)
        seq_len = rng.randint(*wl.seq_len)
        yield example_request(spec, samples, seq_len, gen)


def drive(submit: Callable[[torch.Tensor], Future[torch.Tensor]], requests: Iterator[torch.Tensor], count: int,
          rate: float, concurrency: int, on_done: Callable[[Outcome], None] | None = None) -> RunResult:
    """Send `count` requests; closed loop with `concurrency` outstanding when rate == 0,
    else Poisson arrivals at `rate` requests/s. Returns when every request has an outcome."""
    result = RunResult()
    all_done = threading.Event()
    pipeline_failed = threading.Event()
    remaining = [count]
    lock = threading.Lock()
    slots = threading.Semaphore(max(1, concurrency)) if rate <= 0 else None
    arrivals = random.Random(count)

    def finish(outcome: Outcome, started: float, fut: Future[torch.Tensor]) -> None:
        outcome.latency_s = time.monotonic() - started
        exc = fut.exception()
        if isinstance(exc, PipelineFailedError):
            pipeline_failed.set()
        if exc is not None:
            outcome.error = str(exc)
        else:
            outcome.result = fut.result()
        if slots is not None:
            slots.release()
        if on_done is not None:
            on_done(outcome)
        with lock:
            remaining[0] -= 1
            if remaining[0] == 0:
                all_done.set()

    start = time.monotonic()
    next_at = start
    sent = 0
    for i, x in enumerate(itertools.islice(requests, count)):
        sent = i + 1
        if slots is not None:
            slots.acquire()
        else:
            next_at += arrivals.expovariate(rate)
            delay = next_at - time.monotonic()
            if delay > 0:
                pipeline_failed.wait(delay)  # paces arrivals; a failure ends the wait early
        outcome = Outcome(i, x)
        result.outcomes.append(outcome)
        began = time.monotonic()
        try:
            fut = submit(x)
        except PipelineFailedError as exc:
            # Nothing sent from now on can succeed: stop pacing and count the rest as failed.
            result.outcomes.pop()
            result.unsent, result.unsent_reason = count - i, str(exc)
            with lock:
                remaining[0] -= count - i
                if remaining[0] == 0:
                    all_done.set()
            break
        except InfscaledError as exc:
            failed: Future[torch.Tensor] = Future()
            failed.set_exception(exc)
            fut = failed
        fut.add_done_callback(functools.partial(finish, outcome, began))
    if result.unsent == 0 and sent < count:  # the request source ran dry early
        with lock:
            remaining[0] -= count - sent
            if remaining[0] == 0:
                all_done.set()
    if count > 0:
        all_done.wait()
    result.wall_s = time.monotonic() - start
    return result
