"""The controller daemon: agents' registry, jobs, placement, the REST API and the inference proxy.

Never imports torch or transformers (nor models/, worker/, runner/): it starts fast and plans
from what agents report. Entry point: `run(cfg)`; config: `load_controller_config(path)`.
"""

from infscaled.controller.auth import find_token, load_or_create_token
from infscaled.controller.config import (
    ControllerConfig,
    default_state_dir,
    load_controller_config,
    parse_controller_config,
)
from infscaled.controller.run import run

__all__ = [
    "ControllerConfig",
    "default_state_dir",
    "find_token",
    "load_controller_config",
    "load_or_create_token",
    "parse_controller_config",
    "run",
]
