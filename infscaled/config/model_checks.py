"""Checks that need facts about the model (its unit count, the builtin names) but no torch.

The models package computes those facts and calls these pure functions, so the messages keep
the job file's shape even though the check runs after loading.
"""

from __future__ import annotations

from collections.abc import Sequence

from infscaled.config.messages import config_error, did_you_mean
from infscaled.config.ranges import layers_allowed, range_problem
from infscaled.config.schema import JobConfig


def check_against_model(cfg: JobConfig, n_units: int) -> JobConfig:
    """Check the stage split against a model of `n_units` units; returns `cfg` when it fits.

    Replicas are already filled in at load time, so nothing needs changing here.
    """
    if n_units < 1:
        raise ValueError(f"a model has at least one unit, got n_units={n_units}")
    pipeline = cfg.pipeline
    if pipeline.stages is not None and pipeline.stages > n_units:
        raise config_error(
            cfg.path,
            "pipeline.stages",
            pipeline.stages,
            f"1..{n_units}",
            f"more stages than the model has units ({n_units})",
        )
    if pipeline.layers is not None:
        problem = range_problem(pipeline.layers, n_units)
        if problem is not None:
            shown = [list(pair) for pair in pipeline.layers]
            raise config_error(cfg.path, "pipeline.layers", shown, layers_allowed(n_units), problem)
    return cfg


def check_builtin(cfg: JobConfig, names: Sequence[str]) -> None:
    """For a "builtin:NAME" source, check that NAME is one of `names`; other sources pass."""
    problem = builtin_problem(cfg.model.source, names)
    if problem is not None:
        allowed, what = problem
        raise config_error(cfg.path, "model.source", cfg.model.source, allowed, what)


def builtin_problem(source: str, names: Sequence[str]) -> tuple[str, str] | None:
    """(allowed, problem) when `source` names a builtin model not in `names`, else None."""
    name = source.removeprefix("builtin:")
    if not source.startswith("builtin:") or name in names:
        return None
    allowed = ", ".join(f"builtin:{n}" for n in sorted(names)) or "(no builtin models are registered)"
    return allowed, f"unknown builtin model{did_you_mean(name, names)}"
