"""Entry points: a TOML job file (or already-parsed data) -> a validated `JobConfig`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

from infscaled.config.messages import MISSING, config_error, read_toml
from infscaled.config.schema import JobConfig
from infscaled.config.sections import (
    parse_generation,
    parse_model,
    parse_pipeline,
    parse_placement,
    parse_recovery,
    parse_workload,
)
from infscaled.config.values import Section

STRING_PATH: Final = "<string>"
# Name of a job parsed from data that gave none (there is no file stem to fall back on).
DEFAULT_NAME: Final = "job"
TOP_LEVEL_KEYS: Final = ("name", "model", "pipeline", "placement", "workload", "generation", "recovery")


def load_job(path: str | Path) -> JobConfig:
    """Read and validate a TOML job file; every problem raises one ConfigError naming file and key."""
    shown = str(path)
    data = read_toml(path, "job file")
    return parse_job(data, shown, base_dir=Path(path).resolve().parent)


def parse_job(
    data: Mapping[str, Any], path: str = STRING_PATH, *, base_dir: str | Path | None = None,
    model_roots: Sequence[str] | None = None,
) -> JobConfig:
    """Validate already-parsed job data (e.g. from the REST API).

    `path` is only used in messages and as the default name; relative paths in the data are
    resolved against `base_dir` (default: the directory of `path`, or the working directory).
    `model_roots` (a controller's): the directories model paths and input files must lie under;
    None allows any (`infscaled run` reads its own user's files).
    """
    if not isinstance(data, Mapping):
        allowed = "a table of [model], [pipeline], [placement], [workload], [generation], [recovery]"
        raise config_error(path, "", None, allowed, "expected a table")
    if base_dir is None:
        base_dir = Path.cwd() if path == STRING_PATH else Path(path).resolve().parent
    base = Path(base_dir).resolve()
    top = Section(path, "", data)
    top.check_keys(TOP_LEVEL_KEYS)
    default_name = DEFAULT_NAME if path == STRING_PATH else Path(path).stem
    name = top.get_str("name", default_name, "a non-empty string")
    if not top.has("model"):
        raise top.error("model", MISSING, "a [model] table with at least `source`", "missing required table")
    model = parse_model(top.table("model"), base, model_roots)
    pipeline = parse_pipeline(top.table("pipeline"))
    return JobConfig(
        name=name,
        path=path,
        base_dir=str(base),
        model=model,
        pipeline=pipeline,
        placement=parse_placement(top.table("placement"), pipeline.replicas),
        workload=parse_workload(top.table("workload"), pipeline.micro_batch_size, base, model_roots),
        generation=parse_generation(top.table("generation"), pipeline) if top.has("generation") else None,
        recovery=parse_recovery(top.table("recovery")),
    )
