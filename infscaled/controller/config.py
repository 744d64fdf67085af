"""The controller's TOML config -> a frozen dataclass (see configs/controller.toml for a commented copy).

Errors use the job file's message shape (`FILE: KEY = VALUE: PROBLEM; allowed: ...`), raised
as ConfigError, so a bad daemon config reads like a bad job file.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Final

from infscaled.config.limits import MAX_NESTING
from infscaled.config.messages import MISSING, read_toml
from infscaled.config.state import default_state_dir
from infscaled.config.values import Section

TOKEN_ENV: Final = "INFSCALED_TOKEN"
DEFAULT_PORT: Final = 8470


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
    """Where the token file and the database (controller.db: agents, jobs, events) live."""
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
    adopt_timeout_s: float = 30.0
    """After a restart: how long the agents of a live job have to register again before it fails."""
    stop_grace_s: float = 15.0
    """How long a stopping job waits for its workers' exit reports before it counts as stopped."""
    shutdown_grace_s: float = 5.0
    """On shutdown: how long to wait for running jobs to stop, and for in-flight requests."""
    connect_timeout_s: float = 5.0
    """Inference proxy: timeout of connecting to a job's dispatcher."""
    request_timeout_s: float = 120.0
    """Inference proxy: timeout of one whole request to a job's dispatcher."""
    max_body_bytes: int = 64 << 20
    """Largest request body (inference inputs pass through to the dispatcher unparsed)."""
    max_json_bytes: int = 8 << 20
    """Largest JSON body the controller parses itself (JSON job submissions, OpenAI requests)."""
    max_json_depth: int = MAX_NESTING
    """Deepest nesting of brackets / braces in such a body (checked before parsing)."""
    header_timeout_s: float = 10.0
    """A connection outside any request this long is closed (slow headers, idle keep-alive)."""
    body_timeout_s: float = 60.0
    """A request body must arrive whole within this (else 408 and the connection closes)."""
    max_connections: int = 4096
    """Open connections in all (capped below the process's file limit at start-up)."""
    max_connections_per_client: int = 256
    """Open connections from one client address; more are closed as they are accepted."""
    max_inspections: int = 2
    """Model inspections (one child process on an agent each) in progress at once."""
    max_waiting_submissions: int = 16
    """Job submissions waiting for an inspection slot; more are answered 429."""
    model_roots: tuple[str, ...] | None = ()
    """Directories a submitted job's model directory must lie under; () allows none, None any
    (only `infscaled up`, which serves its own user's files)."""
    public_metrics: bool = True
    """GET /metrics is readable without the token, like vLLM's and /health, so Prometheus and
    load generators can scrape it; false: it needs the token like the rest of the API."""
    metrics_agent_series_max: int = 100
    """GET /metrics carries every agent's host and device series while at most this many agents
    are connected (0: never); a larger fleet's are at GET /metrics/agents (whole, per agent, per
    job or in shards), and /metrics keeps the fleet's aggregates."""


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
        max_json_bytes=sec.get_int("max_json_bytes", defaults.max_json_bytes, 1024),
        max_json_depth=sec.get_int("max_json_depth", defaults.max_json_depth, 2, 10_000),
        max_connections=sec.get_int("max_connections", defaults.max_connections, 16),
        max_connections_per_client=sec.get_int("max_connections_per_client", defaults.max_connections_per_client, 1),
        max_inspections=sec.get_int("max_inspections", defaults.max_inspections, 1, 64),
        max_waiting_submissions=sec.get_int("max_waiting_submissions", defaults.max_waiting_submissions, 0),
        model_roots=_model_roots(sec, base),
        public_metrics=sec.get_bool("public_metrics", defaults.public_metrics),
        metrics_agent_series_max=sec.get_int("metrics_agent_series_max", defaults.metrics_agent_series_max, 0),
        **timeouts,
    )


def _model_roots(sec: Section, base: Path) -> tuple[str, ...]:
    raw = sec.raw("model_roots")
    allowed = "a list of directories (absolute, or relative to this file), e.g. ['/srv/models']"
    if raw is MISSING:
        return ()
    if not isinstance(raw, list) or not all(isinstance(r, str) and r.strip() for r in raw):
        raise sec.error("model_roots", raw, allowed, "expected a list of non-empty strings")
    return tuple(str((base / Path(r).expanduser()).resolve()) for r in raw)
