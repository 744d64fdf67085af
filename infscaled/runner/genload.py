"""Generation workloads: prompts and output lengths drawn from the job's [generation] ranges,
closed loop or Poisson arrivals, and per-sequence timing (time to first token, time per output
token). Greedy and with fixed lengths (no stop ids), so runs are comparable and checkable.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from infscaled.config import JobConfig
from infscaled.config.messages import config_error
from infscaled.generation.params import SamplingParams
from infscaled.planning.job import micro_batches_in_flight
from infscaled.protocol.control import StageStats
from infscaled.runner.summary import label_table, percentile

Submit = Callable[[list[int], SamplingParams, Callable[[int, bool, str | None], None]], Any]


@dataclass
class SeqOutcome:
    index: int
    prompt: list[int]
    max_new: int
    submitted: float = 0.0
    first_at: float = 0.0
    last_at: float = 0.0
    tokens: list[int] = field(default_factory=list)
    error: str | None = None
    done: bool = False
    text: str = ""  # through the HTTP API: the text and the usage count instead of the ids
    count: int = 0

    @property
    def produced(self) -> int:
        return len(self.tokens) or self.count

    @property
    def ttft_s(self) -> float:
        return self.first_at - self.submitted

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first (None for a single token)."""
        return (self.last_at - self.first_at) / (self.produced - 1) if self.produced > 1 else None


def check_lengths(cfg: JobConfig, max_positions: int) -> None:
    """The workload's longest prompt plus longest output must fit the model's context."""
    assert cfg.generation is not None
    prompt, output = cfg.generation.prompt_tokens[1], cfg.generation.output_tokens[1]
    if max_positions and prompt + output > max_positions:
        raise config_error(cfg.path, "generation.output_tokens", list(cfg.generation.output_tokens),
                           f"lengths with prompt + output <= {max_positions} (the context of {cfg.model.source})",
                           f"the longest prompt ({prompt} tokens) plus the longest output ({output}) needs "
                           f"{prompt + output} positions")


def default_concurrency(cfg: JobConfig) -> int:
    """Closed-loop sequences in flight: workload.concurrency, else enough to fill every chain's
    micro-batches in the loop."""
    assert cfg.generation is not None
    gen = cfg.generation
    return cfg.workload.concurrency or gen.max_batch_sequences * micro_batches_in_flight(cfg) * cfg.pipeline.replicas[0]


def greedy_reference(cfg: JobConfig, work: list[tuple[list[int], int]]) -> list[list[int]]:
    """The new token ids Hugging Face `generate` (greedy, the monolithic model with the weights
    the stages get) makes of each (prompt, new tokens): what --verify compares with."""
    import torch

    from infscaled.models.sources import resolve
    from infscaled.models.stage import Monolith

    model: Any = Monolith(resolve(cfg.model.source), "cpu", cfg.model.dtype, cfg.model.seed).model
    out = []
    with torch.inference_mode():
        for prompt, new in work:
            ids = torch.tensor([prompt])
            tokens = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                                    pad_token_id=0, eos_token_id=None)
            out.append(tokens[0, len(prompt):].tolist())
    return out


def gen_requests(cfg: JobConfig, vocab_size: int, count: int) -> Iterator[tuple[list[int], int]]:
    """(prompt token ids, new tokens) per request, deterministic for the workload's seed."""
    assert cfg.generation is not None
    rng = random.Random(cfg.workload.seed)
    for _ in range(count):
        prompt = [rng.randrange(vocab_size) for _ in range(rng.randint(*cfg.generation.prompt_tokens))]
        yield prompt, rng.randint(*cfg.generation.output_tokens)


def drive_generation(submit: Submit, requests: Iterator[tuple[list[int], int]], count: int, rate: float,
                     concurrency: int) -> tuple[list[SeqOutcome], float]:
    """Send `count` sequences (closed loop with `concurrency` live, or Poisson at `rate`/s);
    returns every outcome and the wall time, once all ended."""
    outcomes: list[SeqOutcome] = []
    slots = threading.Semaphore(max(1, concurrency)) if rate <= 0 else None
    ended = threading.Semaphore(0)
    arrivals = random.Random(count)
    start = next_at = time.monotonic()
    for i, (prompt, new) in enumerate(requests):
        if i == count:
            break
        if slots is not None:
            slots.acquire()
        else:
            next_at += arrivals.expovariate(rate)
            time.sleep(max(0.0, next_at - time.monotonic()))
        o = SeqOutcome(i, prompt, new, submitted=time.monotonic())
        outcomes.append(o)

        def consume(token: int, done: bool, error: str | None, o: SeqOutcome = o) -> None:
            now = time.monotonic()
            if error is not None:
                o.error = error
            else:
                o.first_at = o.first_at or now
                o.last_at = now
                o.tokens.append(token)
            if done:
                o.done = True
                if slots is not None:
                    slots.release()
                ended.release()

        try:
            submit(prompt, SamplingParams(max_new_tokens=new, temperature=0.0), consume)
        except Exception as exc:  # noqa: BLE001 - a refused sequence is an outcome, not a crash
            consume(-1, True, str(exc))
    for _ in outcomes:
        ended.acquire()
    return outcomes, time.monotonic() - start


@dataclass
class GenSummary:
    job: str
    outcomes: list[SeqOutcome]
    wall_s: float
    stages: list[StageStats]
    failure: str | None = None
    verified: int = 0
    mismatched: int = 0
    scaling: list[Any] = field(default_factory=list)  # runner.scaling.ScaleEvent, from --scale-at
    # The dispatcher's counters (dispatch/sequences.py); None where the run cannot see them (`up`).
    replayed: int | None = None  # sequences continued on another chain after a loss
    duplicates: int | None = None  # late tokens dropped: from a chain the sequence had left

    @property
    def completed(self) -> list[SeqOutcome]:
        return [o for o in self.outcomes if o.error is None]

    @property
    def failed(self) -> int:
        return len(self.outcomes) - len(self.completed)

    @property
    def output_tokens(self) -> int:
        return sum(o.produced for o in self.completed)

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.wall_s if self.wall_s > 0 else 0.0

    def middle_tokens_per_s(self) -> float:
        """Tokens/s over the middle half of the run (from 1/4 to 3/4 of its wall time): the steady
        rate, without the first steps (graph captures, compilation) and the closing drain. Each
        sequence's tokens after its first count as spread evenly between its first and last."""
        if not self.outcomes or self.wall_s <= 0:
            return 0.0
        start = min(o.submitted for o in self.outcomes)
        lo, hi = start + self.wall_s / 4, start + self.wall_s * 3 / 4
        tokens = 0.0
        for o in self.completed:
            if o.produced and lo <= o.first_at <= hi:
                tokens += 1
            if o.produced > 1 and o.last_at > o.first_at:
                overlap = min(hi, o.last_at) - max(lo, o.first_at)
                tokens += (o.produced - 1) * max(0.0, overlap) / (o.last_at - o.first_at)
        return tokens / (hi - lo)

    @property
    def ok(self) -> bool:
        return self.failed == 0 and self.failure is None and self.mismatched == 0

    def quantiles_ms(self) -> dict[str, float]:
        ttft = [o.ttft_s * 1000 for o in self.completed]
        tpot = [t * 1000 for o in self.completed if (t := o.tpot_s) is not None]
        return {"ttft_p50": percentile(ttft, 50), "ttft_p99": percentile(ttft, 99),
                "tpot_p50": percentile(tpot, 50), "tpot_p99": percentile(tpot, 99)}

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "job": self.job, "completed": len(self.completed), "failed": self.failed, "wall_s": self.wall_s,
            "output_tokens": self.output_tokens, "tokens_per_s": self.tokens_per_s,
            "tokens_per_s_middle": self.middle_tokens_per_s(),
            "latency_ms": self.quantiles_ms(),
            "stages": [{"node": s.node, "busy": s.busy, "micro_batches": s.micro_batches} for s in self.stages],
        }
        if self.verified:
            doc["verify"] = {"checked": self.verified, "mismatched": self.mismatched}
        if self.scaling:
            doc["scaling"] = [e.to_json() for e in self.scaling]
        if self.replayed is not None:
            doc["recovery"] = {"replayed": self.replayed, "duplicates_dropped": self.duplicates}
        if self.failure:
            doc["failure"] = self.failure
        errors = sorted({o.error for o in self.outcomes if o.error})
        if errors:
            doc["errors"] = errors[:20]
        return doc

    def write_json(self, path: str) -> None:
        import json
        from pathlib import Path

        Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n")


def render_generation(summary: GenSummary) -> Any:
    q = summary.quantiles_ms()
    rows = [("sequences completed", str(len(summary.completed))), ("sequences failed", str(summary.failed)),
            ("output tokens", str(summary.output_tokens)), ("tokens/s", f"{summary.tokens_per_s:.1f}"),
            ("tokens/s, middle half of the run", f"{summary.middle_tokens_per_s():.1f}"),
            ("time to first token p50 / p99", f"{q['ttft_p50']:.1f} / {q['ttft_p99']:.1f} ms"),
            ("time per output token p50 / p99", f"{q['tpot_p50']:.2f} / {q['tpot_p99']:.2f} ms")]
    if summary.verified:
        checked = f"{summary.verified} checked, {summary.mismatched} mismatched"
        rows.append(("verified (greedy == HF generate)", checked))
    if summary.replayed is not None:
        rows.append(("continued on another chain / late tokens dropped", f"{summary.replayed} / {summary.duplicates}"))
    table = label_table(f"job {summary.job} (generation)", rows, summary.failure)
    if not summary.scaling:
        return table
    from rich.console import Group

    from infscaled.runner.scaling import render_events

    return Group(table, render_events(summary.scaling))
