"""From a validated job config and what the model looks like to a JobPlan (pure, no torch).

`infscaled run` (one host) and the controller (many hosts) both plan through here, so a
job file means the same pipeline, and fails with the same message, whichever runs it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

from infscaled.config import JobConfig, check_against_model, check_builtin
from infscaled.planning import edge_count, make_plan
from infscaled.planning.partition import balance
from infscaled.protocol.plan import GenerationPlan, JobPlan, Node


def check_model(cfg: JobConfig, unit_count: int, builtin_names: Sequence[str]) -> JobConfig:
    """The model-aware checks (builtin name, unit ranges vs the real unit count): ConfigError."""
    if cfg.model.source.startswith("builtin:"):
        check_builtin(cfg, builtin_names)
    return check_against_model(cfg, unit_count)


def stage_ranges(cfg: JobConfig, unit_weights: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """The file's `layers`, or `stages` balanced by parameter count."""
    pipe = cfg.pipeline
    if pipe.layers is not None:
        return tuple(pipe.layers)
    return balance(unit_weights, pipe.stage_count)


def explicit_edges(cfg: JobConfig) -> tuple[tuple[Node, Node], ...]:
    return tuple((Node.parse(a), Node.parse(b)) for a, b in cfg.pipeline.edges)


def loop_edges(cfg: JobConfig) -> tuple[tuple[Node, Node], ...]:
    """A generation job's decode loop: last stage -> first stage of each replica chain (none with
    one stage: that stage feeds its own tokens back)."""
    replicas = cfg.pipeline.replicas
    if cfg.generation is None or len(replicas) < 2:
        return ()
    last = len(replicas) - 1
    return tuple((Node(last, r), Node(0, r)) for r in range(replicas[0]))


def generation_plan(cfg: JobConfig) -> GenerationPlan | None:
    gen = cfg.generation
    if gen is None:
        return None
    return GenerationPlan(gen.kv_budget_tokens, gen.max_batch_sequences,
                          gen.micro_batches_in_flight or cfg.pipeline.stage_count, gen.max_new_tokens)


def ports_needed(cfg: JobConfig) -> int:
    pipe = cfg.pipeline
    return edge_count(pipe.replicas, pipe.graph, explicit_edges(cfg), loop_edges(cfg))


def plan_job(cfg: JobConfig, unit_weights: Sequence[int], devices: Sequence[str], ports: Sequence[int],
             host: str, hosts: Mapping[Node, str] | None = None) -> JobPlan:
    """The plan for a job already checked with `check_model`. `devices` has one entry per stage
    replica (stage-major), `ports` one per edge, `hosts` where each node runs (default `host`)."""
    pipe = cfg.pipeline
    plan = make_plan(
        job=cfg.name, model_source=cfg.model.source, dtype=cfg.model.dtype, seed=cfg.model.seed,
        ranges=stage_ranges(cfg, unit_weights), replicas=pipe.replicas, graph=pipe.graph,
        explicit_edges=explicit_edges(cfg), devices=devices, policy=pipe.policy,
        micro_batch_size=pipe.micro_batch_size, max_inflight=pipe.max_inflight, max_wait_ms=pipe.max_wait_ms,
        edge_timeout_s=pipe.edge_timeout_s, host=host, ports=ports, base_dir=cfg.base_dir, hosts=hosts,
        extra_edges=loop_edges(cfg), generation=generation_plan(cfg), cuda_graphs=pipe.cuda_graphs,
        compile_layers=pipe.compile,
    )
    return replace(plan, recovery=cfg.recovery)
