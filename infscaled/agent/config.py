"""Agent settings: one frozen dataclass, validated on construction (ConfigError names key and value)."""

from __future__ import annotations

import ipaddress
import logging
import os
import secrets
import socket
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from infscaled.agent.devices import parse_devices
from infscaled.config.messages import config_error
from infscaled.config.state import default_state_dir

log = logging.getLogger(__name__)

WS_PATH = "/v1/agents/ws"
_SCHEMES = ("http", "https", "ws", "wss")


@dataclass(frozen=True)
class AgentConfig:
    """How an agent reaches its controller, what it offers, and its timeouts."""

    controller: str
    """Controller base URL: http(s)://HOST:PORT or ws(s)://HOST:PORT; the agent dials WS_PATH there."""
    token: str
    """Bearer token the controller expects from agents."""
    agent_id: str = field(default_factory=socket.gethostname)
    """This agent's name at the controller (default: the hostname)."""
    devices: str = "auto"
    """"auto" (NVML, else nvidia-smi, else one CPU slot per core), "cpu:N", or "cuda:0,cuda:1"."""
    advertise: str = ""
    """Address other hosts use for this host's edges; "" = 127.0.0.1 for a loopback controller,
    else the local address that routes to the controller."""
    port_range: tuple[int, int] = (29500, 29999)
    """First and last TCP port the controller may assign to edges hosted here."""
    connect_timeout_s: float = 10.0
    """Opening the websocket (TCP + HTTP upgrade)."""
    handshake_timeout_s: float = 10.0
    """From Register sent to Welcome received."""
    send_timeout_s: float = 10.0
    """Sending one message to the controller."""
    ping_interval_s: float = 5.0
    """Websocket ping period; no pong within half of it drops the link (then reconnect)."""
    backoff_initial_s: float = 0.5
    """First reconnect delay; doubles per failed attempt (with jitter)."""
    backoff_max_s: float = 10.0
    """Longest reconnect delay."""
    stop_grace_s: float = 10.0
    """Stopping a job: how long processes get to drain and exit before SIGTERM (then SIGKILL)."""
    inspect_timeout_s: float = 120.0
    """Building a model's skeleton for an Inspect, in its child process."""
    worker_log_level: int = logging.WARNING
    """Log level of the worker and dispatcher processes."""
    metrics_interval_s: float = 1.0
    """Sending each job's latest worker and dispatcher stats to the controller: at most this often."""
    allow_python_sources: bool = False
    """Run `python:MODULE:FACTORY` model sources: they import and run code on this host."""
    model_roots: tuple[str, ...] | None = None
    """Directories model paths must lie under (checked lexically); None: the controller's check only."""
    max_inspections: int = 2
    """Model inspections (a child process each) at once; more wait their turn."""
    orphan_grace_s: float = 120.0
    """With the controller unreachable, jobs keep serving this long; then the agent stops them."""
    state_dir: str = field(default_factory=default_state_dir)
    """Where the agent keeps the credential its controller issued (agent-<id>.credential, 0600)."""

    def __post_init__(self) -> None:
        url = urlsplit(self.controller)
        if url.scheme not in _SCHEMES or not url.hostname:
            raise config_error("agent", "controller", self.controller, "http(s)://HOST:PORT or ws(s)://HOST:PORT")
        if not self.token:
            raise config_error("agent", "token", self.token, "a non-empty token (the controller's agent token)")
        if not self.agent_id:
            raise config_error("agent", "agent_id", self.agent_id, "a non-empty name")
        try:
            parse_devices(self.devices)
        except ValueError as exc:
            raise config_error("agent", "devices", self.devices,
                               "'auto', 'cpu:N' or 'cuda:I,cuda:J,...'", str(exc)) from None
        if self.max_inspections < 1:
            raise config_error("agent", "max_inspections", self.max_inspections, "an integer >= 1")
        first, last = self.port_range
        if not 1 <= first <= last <= 65535:
            raise config_error("agent", "port_range", list(self.port_range),
                               "[FIRST, LAST] with 1 <= FIRST <= LAST <= 65535")
        for name in ("connect_timeout_s", "handshake_timeout_s", "send_timeout_s", "ping_interval_s",
                     "backoff_initial_s", "backoff_max_s", "stop_grace_s", "inspect_timeout_s",
                     "metrics_interval_s", "orphan_grace_s"):
            if not getattr(self, name) > 0:
                raise config_error("agent", name, getattr(self, name), "a positive number of seconds")

    @property
    def ws_url(self) -> str:
        return self.controller.rstrip("/") + WS_PATH

    @property
    def credential_path(self) -> Path:
        return Path(self.state_dir).expanduser() / f"agent-{self.agent_id}.credential"


def load_credential(cfg: AgentConfig) -> str:
    """The credential this agent id was registered with, "" before its first registration (blocking)."""
    try:
        return cfg.credential_path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return ""


def save_credential(cfg: AgentConfig, credential: str) -> None:
    """Keep an issued credential (file 0600, dir 0700; written whole, then renamed: blocking)."""
    path = cfg.credential_path
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(credential + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    log.info("kept the credential the controller issued to agent %s in %s", cfg.agent_id, path)


def resolve_advertise(cfg: AgentConfig) -> str:
    """The address to advertise (blocking: may resolve the controller's name; call in a thread)."""
    if cfg.advertise:
        return cfg.advertise
    url = urlsplit(cfg.controller)
    host = url.hostname or ""
    if host == "localhost" or _is_loopback(host):
        return "127.0.0.1"
    port = url.port or (443 if url.scheme in ("https", "wss") else 80)
    # A UDP "connect" sends nothing; it only asks the kernel which local address routes there.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((host, port))
            return str(s.getsockname()[0])
        except OSError:
            return socket.gethostbyname(socket.gethostname())


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
