"""Job files: TOML -> validated frozen dataclasses, with one actionable ConfigError per problem.

Stays free of torch and transformers so the controller and TUI can import it cheaply.
"""

from infscaled.config.load import load_job, parse_job
from infscaled.config.messages import format_error
from infscaled.config.model_checks import check_against_model, check_builtin
from infscaled.config.schema import (
    AUTO_DEVICES,
    DTYPES,
    GRAPHS,
    PLACEMENT_POLICIES,
    POLICIES,
    JobConfig,
    ModelConfig,
    PipelineConfig,
    PlacementConfig,
    WorkloadConfig,
)
from infscaled.errors import ConfigError

__all__ = [
    "AUTO_DEVICES",
    "DTYPES",
    "GRAPHS",
    "PLACEMENT_POLICIES",
    "POLICIES",
    "ConfigError",
    "JobConfig",
    "ModelConfig",
    "PipelineConfig",
    "PlacementConfig",
    "WorkloadConfig",
    "check_against_model",
    "check_builtin",
    "format_error",
    "load_job",
    "parse_job",
]
