"""`infscaled run`: one job on this host, end to end, with a summary."""

from __future__ import annotations

import logging
from dataclasses import replace

import torch

from infscaled.config import JobConfig
from infscaled.models import inputs
from infscaled.models.base import InputSpec
from infscaled.models.sources import ResolvedModel
from infscaled.models.stage import Monolith
from infscaled.runner.genload import (
    GenSummary,
    check_lengths,
    default_concurrency,
    drive_generation,
    gen_requests,
    greedy_reference,
    render_generation,
)
from infscaled.runner.launcher import LocalJob, Prepared, prepare
from infscaled.runner.scaling import FaultStep, ScaleSchedule, ScaleStep
from infscaled.runner.summary import Summary, Verification, render, summarize
from infscaled.runner.workload import Outcome, RunResult, drive, requests_for

log = logging.getLogger(__name__)

# Allowed |pipeline - monolith| per element: float32 differs only by summation order;
# half precision rounds every stage boundary.
TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2, "float16": 1e-2}


def run_job(cfg: JobConfig, *, requests: int | None = None, rate: float | None = None, verify: bool = False,
            progress: bool = False, log_level: int = logging.WARNING,
            scale_at: list[ScaleStep | FaultStep] | None = None) -> Summary | GenSummary:
    if requests is not None or rate is not None:
        wl = cfg.workload
        cfg = replace(cfg, workload=replace(wl, requests=requests if requests is not None else wl.requests,
                                            rate=rate if rate is not None else wl.rate))
    if cfg.generation is not None:
        return run_generation(cfg, verify=verify, log_level=log_level, scale_at=scale_at)
    prepared = prepare(cfg)
    wl = cfg.workload
    concurrency = wl.concurrency or cfg.pipeline.micro_batch_size * cfg.pipeline.max_inflight
    with LocalJob(prepared, log_level=log_level) as job:
        stream = requests_for(wl, prepared.spec, wl.requests)
        schedule = ScaleSchedule(job, scale_at or [])
        schedule.start()
        run = _drive_with_progress(job, stream, wl.requests, wl.rate, concurrency, progress)
        schedule.stop()
        job.stop()
        stages = [h.stats for h in job.state.workers.values() if h.stats is not None]
        summary = summarize(cfg.name, run, sorted(stages, key=lambda s: s.node), job.state.failure)
        summary.scaling = schedule.events
        if job.dispatcher is not None:
            summary.replayed, summary.duplicates = job.dispatcher.replayed, job.dispatcher.duplicates
    if verify:
        summary.verify = verify_outcomes(prepared, run.completed)
    return summary


def _drive_with_progress(job: LocalJob, stream, count: int, rate: float, concurrency: int,  # type: ignore[no-untyped-def]
                         progress: bool) -> RunResult:
    if not progress:
        return drive(job.submit, stream, count, rate, concurrency)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), transient=True) as bar:
        task = bar.add_task(f"{job.plan.job}", total=count)

        def tick(_: Outcome) -> None:
            bar.advance(task)

        return drive(job.submit, stream, count, rate, concurrency, on_done=tick)


def verify_outcomes(prepared: Prepared, outcomes: list[Outcome]) -> Verification:
    """Compare every result with the monolithic model run on that request alone."""
    return verify_results(prepared.resolved, prepared.spec, prepared.plan.dtype, prepared.plan.seed, outcomes)


def verify_results(resolved: ResolvedModel, spec: InputSpec, dtype_name: str, seed: int,
                   outcomes: list[Outcome]) -> Verification:
    mono = Monolith(resolved, "cpu", dtype_name, seed)
    tol = TOLERANCE[dtype_name]
    v = Verification()
    dtype = next(mono.stage.parameters()).dtype
    for o in outcomes:
        assert o.result is not None
        expected = mono.forward(inputs.collate(spec, [o.request], dtype))
        got = o.result.to(expected.dtype)
        err = float((got - expected).abs().max()) if got.shape == expected.shape else float("inf")
        v.checked += 1
        v.max_abs_err = max(v.max_abs_err, err)
        if not (got.shape == expected.shape and torch.allclose(got, expected, atol=tol, rtol=tol)):
            v.mismatched += 1
    return v


def run_generation(cfg: JobConfig, *, verify: bool = False, log_level: int = logging.WARNING,
                   scale_at: list[ScaleStep | FaultStep] | None = None) -> GenSummary:
    """A generation job's workload: greedy sequences of the [generation] lengths; `verify` checks
    every sequence against Hugging Face `generate` on the monolithic model."""
    assert cfg.generation is not None
    prepared = prepare(cfg)
    check_lengths(cfg, prepared.spec.max_positions)
    wl = cfg.workload
    work = list(gen_requests(cfg, prepared.spec.vocab_size, wl.requests))
    with LocalJob(prepared, log_level=log_level) as job:
        schedule = ScaleSchedule(job, scale_at or [])
        schedule.start()
        outcomes, wall = drive_generation(job.generator.submit, iter(work), wl.requests, wl.rate,
                                          default_concurrency(cfg))
        schedule.stop()
        job.stop()
        stages = sorted((h.stats for h in job.state.workers.values() if h.stats is not None), key=lambda s: s.node)
        summary = GenSummary(cfg.name, outcomes, wall, stages, job.state.failure)
        summary.scaling = schedule.events
        summary.replayed, summary.duplicates = job.generator.replayed, job.generator.duplicates
    if verify:
        expected = greedy_reference(cfg, [(o.prompt, o.max_new) for o in summary.completed])
        summary.verified = len(expected)
        summary.mismatched = sum(o.tokens != e for o, e in zip(summary.completed, expected, strict=True))
    return summary


def render_summary(summary: Summary | GenSummary) -> object:
    """The rich table of either kind of run."""
    return render_generation(summary) if isinstance(summary, GenSummary) else render(summary)
