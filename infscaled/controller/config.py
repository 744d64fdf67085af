"""The controller's TOML config -> a frozen dataclass (see configs/controller.toml for a commented copy).

Errors use the job file's message shape (`FILE: KEY = VALUE: PROBLEM; allowed: ...`), raised
as ConfigError, so a bad daemon config reads like a bad job file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Final

from infscaled.config.messages import read_toml
from infscaled.config.values import Section

STATE_DIR_ENV: Final = "INFSCALED_STATE_DIR"
TOKEN_ENV: Final = "INFSCALED_TOKEN"
DEFAULT_PORT: Final = 8470


def default_state_dir() -> str:
    """$INFSCALED_STATE_DIR, else ~/.local/state/infscaled."""
    return os.environ.get(STATE_DIR_ENV) or str(Path("~/.local/state/infscaled").expanduser())


@dataclass(frozen=True)
class ControllerConfig:
    """[controller] table of the daemon config."""

    host: str = "127.0.0.1"
    """Address the REST API and the agents' websocket listen on; 0.0.0.0 / :: expose it (logged)."""
    port: int = DEFAULT_PORT
    """TCP port; 0 picks a free one (tests)."""
    token: str | None = field(default=None, repr=False)
    """Bearer token; $INFSCALED_TOKEN wins over it; neither -> <state_dir>/token (created once)."""
    state_dir: str = field(default_factory=default_state_dir)
    """Where the token file lives."""
    heartbeat_interval_s: float = 3.0
    """How often agents send a heartbeat (told to them in Welcome)."""
    heartbeat_timeout_s: float = 10.0
    """An agent silent this long is lost and its jobs fail."""
    host_metrics_interval_s: float = 5.0
    """How often agents sample host and GPU usage (told in Welcome); they send a sample only when it
    changed, so 10,000 agents send at most 2,000 a second and an idle fleet far fewer."""
    reconnect_rate_per_s: float = 1000.0
    """Registrations a second the fleet should spread a reconnect over after a controller restart:
    Welcome tells each agent to wait uniformly up to (known agents / this) seconds before its first
    attempt, so 10,000 agents come back within ~10 s instead of all at once."""
    inspect_timeout_s: float = 120.0
    """How long an agent may take to build a model's skeleton when a job is submitted."""
    send_timeout_s: float = 10.0
    """Timeout of one websocket send to an agent."""
    ready_timeout_s: float = 300.0
    """How long every worker of a job has to report ready (sent to agents in Deploy)."""
    stop_grace_s: float = 15.0
    """How long a stopping job waits for its workers' exit reports before it counts as stopped."""
    shutdown_grace_s: float = 5.0
    """On shutdown: how long to wait for running jobs to stop, and for in-flight requests."""
    connect_timeout_s: float = 5.0
    """Inference proxy: timeout of connecting to a job's dispatcher."""
    request_timeout_s: float = 120.0
    """Inference proxy: timeout of one whole request to a job's dispatcher."""
    max_body_bytes: int = 64 << 20
    """Largest request body (job files, inference inputs)."""


TOP_LEVEL_KEYS: Final = ("controller",)
_TIMEOUTS: Final = tuple(f.name for f in fields(ControllerConfig) if f.name.endswith("_s"))


def load_controller_config(path: str | Path) -> ControllerConfig:
    """Read and validate a controller TOML file; every problem is one ConfigError naming file and key."""
    shown = str(path)
    data = read_toml(path, "config file")
    return parse_controller_config(data, shown, base_dir=Path(path).resolve().parent)


def parse_controller_config(data: Mapping[str, Any], path: str = "<string>", *,
                            base_dir: str | Path | None = None) -> ControllerConfig:
    """Validate already-parsed data; a relative state_dir is resolved against `base_dir`."""
    top = Section(path, "", data)
    top.check_keys(TOP_LEVEL_KEYS)
    sec = top.table("controller")
    sec.check_keys(tuple(f.name for f in fields(ControllerConfig)))
    defaults = ControllerConfig(state_dir="")
    timeouts = {name: sec.get_float(name, getattr(defaults, name), 0.0, lo_open=True) for name in _TIMEOUTS}
    if timeouts["heartbeat_timeout_s"] <= timeouts["heartbeat_interval_s"]:
        raise sec.error(
            "heartbeat_timeout_s", timeouts["heartbeat_timeout_s"],
            f"a number > controller.heartbeat_interval_s ({timeouts['heartbeat_interval_s']:g})",
            "an agent would be lost between two heartbeats",
        )
    token = sec.get_str("token", "", "a non-empty string without spaces") or None
    if token is not None and (token != token.strip() or " " in token):
        raise sec.error("token", "<hidden>", "a non-empty string without spaces", "contains spaces")
    state_dir = sec.get_str("state_dir", "", "a directory path") or default_state_dir()
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    return ControllerConfig(
        host=sec.get_str("host", defaults.host, "an IP address or host name to listen on, e.g. '127.0.0.1'"),
        port=sec.get_int("port", defaults.port, 0, 65535),
        token=token,
        state_dir=str((base / Path(state_dir).expanduser()).resolve()),
        max_body_bytes=sec.get_int("max_body_bytes", defaults.max_body_bytes, 1024),
        **timeouts,
    )
