"""Per-agent Prometheus series (host CPU and RAM, each device's utilisation and memory) and the
fleet's aggregates, built so that a scrape does not grow with the fleet on the event loop.

At 10,000 agents with 8 GPUs each, every agent's and device's series are 180,000 samples and
14 MB of text; rendering them all on each `GET /metrics` held the loop 0.5-3 s (agents' pongs
timed out behind it). So:

- `GET /metrics` carries the controller's own series, the jobs', and the fleet's aggregates
  (counts, devices in use, mean utilisation: kept by FleetViews as agents change); it carries
  the per-agent series too while the fleet is small (`metrics_agent_series_max`).
- `GET /metrics/agents` serves the per-agent series of the whole fleet, one agent (`agent=`),
  a job's agents (`job=`), or one of `shards` stable slices (`shard=i&shards=n`, by a hash of
  the id), so Prometheus can spread the fleet over several scrape targets.
- Each agent's lines are rendered once per usage report it sends (cached against the report
  object), and a large selection is streamed in pieces that yield to the loop between them.
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from aiohttp import web

from infscaled.controller.export import PREFIX, Family, escape, format_value
from infscaled.controller.job import Rejected
from infscaled.protocol.messages import HostMetrics
from infscaled.protocol.watch import FleetSummary

CHUNK: Final = 500  # agents assembled between two yields to the event loop
MAX_SHARDS: Final = 1000

# (name, help); the order in which the families appear.
AGENT_FAMILIES: Final = (
    ("agent_cpu_ratio", "Whole-host CPU busy fraction."),
    ("agent_memory_used_bytes", "Host RAM in use (total minus available)."),
    ("device_utilization_ratio", "Fraction of NVML's sample period a kernel ran."),
    ("device_memory_used_bytes", "Device memory in use."),
)
_HEADERS: Final = tuple(f"# HELP {PREFIX}{name} {text}\n# TYPE {PREFIX}{name} gauge\n" for name, text in AGENT_FAMILIES)

Lines = tuple[str, str, str, str]  # one agent's lines of each family in AGENT_FAMILIES


def agent_lines(u: HostMetrics) -> Lines:
    """One agent's samples as text lines; a device that was not measured (NVML) has none."""
    agent = escape(u.agent_id)
    util, mem = [], []
    for d in u.devices:
        labels = f'{{agent="{agent}",device="{escape(d.id)}"}}'
        if d.util_ratio >= 0:
            util.append(f"{PREFIX}device_utilization_ratio{labels} {format_value(d.util_ratio)}\n")
        if d.memory_used_bytes >= 0:
            mem.append(f"{PREFIX}device_memory_used_bytes{labels} {format_value(d.memory_used_bytes)}\n")
    return (f'{PREFIX}agent_cpu_ratio{{agent="{agent}"}} {format_value(u.cpu_ratio)}\n',
            f'{PREFIX}agent_memory_used_bytes{{agent="{agent}"}} {format_value(u.ram_used_bytes)}\n',
            "".join(util), "".join(mem))


class AgentSeries:
    """Every agent's lines, rebuilt only for agents whose usage report changed since the last use."""

    def __init__(self) -> None:
        self._cache: dict[str, tuple[HostMetrics, Lines]] = {}
        self._shards: dict[int, tuple[object, list[list[str]]]] = {}  # shards -> (fleet key, ids per shard)

    def shard_ids(self, key: object, ids: Sequence[str], shards: int, shard: int) -> list[str]:
        """The ids of one shard, from a split of `ids` kept until `key` (the fleet's membership) changes."""
        kept = self._shards.get(shards)
        if kept is None or kept[0] != key:
            split: list[list[str]] = [[] for _ in range(shards)]
            for agent_id in ids:
                split[shard_of(agent_id, shards)].append(agent_id)
            if len(self._shards) >= 4:  # a few scrape layouts at a time
                self._shards.clear()
            kept = self._shards[shards] = (key, split)
        return kept[1][shard]

    def lines(self, u: HostMetrics) -> Lines:
        cached = self._cache.get(u.agent_id)
        if cached is not None and cached[0] is u:
            return cached[1]
        lines = agent_lines(u)
        self._cache[u.agent_id] = (u, lines)
        return lines

    def render(self, usage: Iterable[HostMetrics]) -> str:
        """The four families over `usage`, at once (a small selection)."""
        parts: list[list[str]] = [[h] for h in _HEADERS]
        for u in usage:
            for part, line in zip(parts, self.lines(u), strict=True):
                part.append(line)
        return "".join("".join(p) for p in parts)

    async def stream(self, usage: Sequence[HostMetrics], chunk: int = CHUNK) -> AsyncIterator[str]:
        """The same over a large selection, in pieces of one family's lines for `chunk` agents,
        yielding to the loop between pieces: the whole fleet (14 MB at 10,000 agents) is never one
        string, and agents' frames are served while it goes out."""
        lines: list[Lines] = []
        for start in range(0, len(usage), chunk):
            lines += [self.lines(u) for u in usage[start:start + chunk]]
            await asyncio.sleep(0)
        for i, header in enumerate(_HEADERS):
            yield header
            for start in range(0, len(lines), chunk):
                yield "".join(agent[i] for agent in lines[start:start + chunk])
                await asyncio.sleep(0)

    def forget_missing(self, known: Iterable[str]) -> None:
        """Drop the lines of agents no longer known (called when the cache outgrows the fleet)."""
        keep = set(known)
        self._cache = {k: v for k, v in self._cache.items() if k in keep}

    def __len__(self) -> int:
        return len(self._cache)


def fleet_families(fleet: FleetSummary, connected: int) -> list[Family]:
    """The fleet's aggregates: what a dashboard of 10,000 hosts plots instead of 10,000 lines."""
    def one(name: str, text: str, value: float) -> Family:
        return Family(name, "gauge", text, [("", {}, value)] if value >= 0 else [])

    return [
        one("agents_connected", "Agents with an open websocket.", connected),
        one("agents_lost", "Agents known to the controller and not connected.", fleet.lost),
        one("fleet_devices", "Devices (GPUs and CPU slots) of the connected agents.", fleet.devices),
        one("fleet_gpus", "GPUs of the connected agents.", fleet.gpus),
        one("fleet_devices_in_use", "Devices held by a job.", fleet.devices_in_use),
        one("fleet_workers", "Worker processes the agents report.", fleet.workers),
        one("fleet_gpu_utilization_ratio", "Mean utilisation over the GPUs that reported (none: no sample).",
            fleet.gpu_util_mean),
        one("fleet_cpu_ratio", "Mean host CPU busy fraction over the agents that reported (none: no sample).",
            fleet.cpu_ratio_mean),
    ]


def shard_of(agent_id: str, shards: int) -> int:
    """A stable slice for an agent id (crc32: the same in every process and run)."""
    return zlib.crc32(agent_id.encode()) % shards


@dataclass(frozen=True)
class AgentMetricsQuery:
    """`GET /metrics/agents` parameters, checked: a bad one is a 400 saying what is allowed."""

    agents: tuple[str, ...] = ()
    job: str = ""
    shard: int = 0
    shards: int = 1

    @classmethod
    def parse(cls, request: web.Request) -> AgentMetricsQuery:
        query = request.query
        unknown = set(query) - {"agent", "job", "shard", "shards"}
        if unknown:
            raise Rejected(400, f"unknown parameter(s) {sorted(unknown)}; allowed: agent (repeatable), job, "
                                "shard with shards")
        agents = tuple(query.getall("agent", ()))
        job = query.get("job", "")
        if agents and job:
            raise Rejected(400, "give agent=... or job=..., not both")
        raw_shards, raw_shard = query.get("shards"), query.get("shard")
        if (raw_shards is None) != (raw_shard is None):
            raise Rejected(400, "shard and shards go together: shard=i&shards=n with 0 <= i < n")
        if raw_shards is None or raw_shard is None:
            return cls(agents, job)
        if not raw_shards.isdigit() or not 1 <= int(raw_shards) <= MAX_SHARDS:
            raise Rejected(400, f"shards={raw_shards!r}: expected an integer from 1 to {MAX_SHARDS}")
        if not raw_shard.isdigit() or int(raw_shard) >= int(raw_shards):
            raise Rejected(400, f"shard={raw_shard!r}: expected an integer from 0 to {int(raw_shards) - 1}")
        return cls(agents, job, int(raw_shard), int(raw_shards))

