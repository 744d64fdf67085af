"""The controller's state as watchers see it: agent and job views, and `FleetViews`, which keeps
every agent's view between ticks and rebuilds only those that changed.

`Registry.changed` names the agents whose registration, state or workers changed,
`Registry.usage_changed` those that reported new usage; device
holders are compared with the previous tick's (`JobStore.device_users`, a walk over the jobs'
nodes, not the fleet). The fleet summary is kept by subtracting an agent's old share and adding
its new one, so a tick costs what changed, whatever the size of the fleet.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import OrderedDict

from infscaled.controller.jobs import LIVE, Job, JobStore
from infscaled.controller.registry import CONNECTED, LOST, Agent, Registry
from infscaled.protocol.control import StageStats
from infscaled.protocol.messages import HostMetrics
from infscaled.protocol.plan import DISPATCHER, Node
from infscaled.protocol.watch import (
    AgentView,
    DeviceView,
    EdgeView,
    FleetSummary,
    JobView,
    ReplicaView,
    StageView,
    bottleneck_stage,
)

Share = tuple[int, int, int, int, int, int, int, float, int, float, int]
_NO_SHARE: Share = (0, 0, 0, 0, 0, 0, 0, 0.0, 0, 0.0, 0)
CATCH_UP_CHUNK = 500  # agent views built between two yields to the event loop


def agent_view(agent: Agent, users: dict[tuple[str, str], str]) -> AgentView:
    """One agent as watchers and `GET /v1/agents` show it."""
    info, usage = agent.info, agent.usage
    measured = {d.id: d for d in usage.devices} if usage is not None else {}
    devices = []
    for d in info.devices:
        m = measured.get(d.id)
        devices.append(DeviceView(d.id, d.kind, d.name, d.memory_bytes, users.get((agent.id, d.id), ""),
                                  m.util_ratio if m else -1.0, m.memory_used_bytes if m else -1))
    return AgentView(
        id=agent.id, host=info.host, state=agent.state, reason=agent.lost_reason, advertise=info.advertise,
        cpu_cores=info.cpu_cores, ram_bytes=info.ram_bytes,
        cpu_ratio=usage.cpu_ratio if usage is not None else -1.0,
        ram_used_bytes=usage.ram_used_bytes if usage is not None else -1,
        workers=agent.workers, devices=devices)


def job_view(job: Job, now: float) -> JobView:
    """One job with its latest stats; a job that is not live shows none (they would read as current)."""
    stats: dict[str, tuple[StageStats, float]] = {}
    dispatcher = None
    if job.state in LIVE:
        for at, msg in job.metrics.values():
            age = round(max(0.0, now - at), 3)
            stats.update({s.node: (s, age) for s in msg.stages})
            dispatcher = msg.dispatcher or dispatcher
    replicas = []
    for name, status in job.nodes.items():
        if name == str(DISPATCHER):
            continue
        node = Node.parse(name)
        st, age = stats.get(name, (None, -1.0))
        replicas.append(ReplicaView(name, node.stage, node.replica, status.agent, status.device, status.state,
                                    status.pid, status.reason, st, age))
    replicas.sort(key=lambda r: (r.stage, r.replica))
    # After live scaling the plan, not the submitted file, says how many replicas a stage has.
    counts = [s.replicas for s in job.plan.stages] if job.plan is not None else list(job.cfg.pipeline.replicas)
    stages = [StageView(i, a, b, counts[i]) for i, (a, b) in enumerate(job.ranges)]
    edges = [EdgeView(str(e.src), str(e.dst), _edge_rate(str(e.src), str(e.dst), stats))
             for e in (job.plan.edges if job.plan is not None else ())]
    return JobView(job.id, job.name, str(job.state), job.reason, job.cfg.model.source, job.created, stages,
                   replicas, edges, dispatcher, bottleneck_stage(replicas), job.cfg.generation is not None)


def _edge_rate(src: str, dst: str, stats: dict[str, tuple[StageStats, float]]) -> float:
    """Measured where the data arrives; the dispatcher reports no per-edge rates, so an edge into
    it carries what its (single-output) sender computed."""
    if dst == str(DISPATCHER):
        return stats[src][0].samples_per_s if src in stats else 0.0
    if dst not in stats:
        return 0.0
    return next((r.samples_per_s for r in stats[dst][0].inputs if r.src == src), 0.0)


def _share(view: AgentView, usage: HostMetrics | None) -> Share:
    """What one agent adds to the fleet summary: agents, connected, lost, devices, gpus, in use,
    workers, GPU util sum and count, CPU ratio sum and count (devices count while connected).
    Usage comes apart from the view: a usage-only change does not rebuild the view."""
    up = view.state == CONNECTED
    if not up:
        return (1, 0, int(view.state == LOST), 0, 0, 0, 0, 0.0, 0, 0.0, 0)
    gpus = {d.id for d in view.devices if d.kind == "cuda"}
    utils = [d.util_ratio for d in usage.devices if d.id in gpus and d.util_ratio >= 0] if usage else []
    cpu = usage.cpu_ratio if usage is not None and usage.cpu_ratio >= 0 else -1.0
    return (1, 1, 0, len(view.devices), len(gpus), sum(1 for d in view.devices if d.job), view.workers,
            sum(utils), len(utils), max(cpu, 0.0), int(cpu >= 0))


class FleetViews:
    """Every agent's latest view, and the order in which views and usage changed (for deltas).

    A usage report only records that the agent's usage changed (`changed_since` hands out the
    agent's latest HostMetrics as it came); its view is rebuilt when something else changes. So
    a busy fleet's reports cost the summary's arithmetic, not a view and its encoding each.
    """

    def __init__(self, registry: Registry, jobs: JobStore) -> None:
        self.registry = registry
        self.jobs = jobs
        self.views: dict[str, AgentView] = {}  # usage as of the view's build; newer in the agent
        self.version = 0  # increases with every view rebuilt or removed, and every usage change
        self._changed_at: OrderedDict[str, int] = OrderedDict()  # id -> version of its last change, oldest first
        self._usage_at: OrderedDict[str, int] = OrderedDict()  # the same for usage-only changes
        self._shares: dict[str, Share] = {}
        self._totals: list[float] = [0] * len(_NO_SHARE)
        self._users: dict[tuple[str, str], str] = {}
        self._order: tuple[int, list[str], dict[str, int]] = (-1, [], {})

    def order_key(self) -> int:
        """Changes whenever `ordered_ids` would be rebuilt (an agent added or forgotten)."""
        return len(self.registry.agents) + (self.registry.forgotten << 32)

    def ordered_ids(self) -> tuple[list[str], dict[str, int]]:
        """Agent ids in registration order and each one's position, for `GET /v1/agents` pages.
        Rebuilt only when an id was added (the count grows: a known id that registers again
        keeps its place) or forgotten (Registry.forgotten grows)."""
        agents = self.registry.agents
        key = self.order_key()
        if self._order[0] != key:
            ids = list(agents)
            self._order = (key, ids, {agent_id: i for i, agent_id in enumerate(ids)})
        return self._order[1], self._order[2]

    def refresh(self) -> None:
        """Rebuild the views of the agents that changed since the last call; note usage changes."""
        registry = self.registry
        changed, registry.changed = registry.changed, set()
        usage_only, registry.usage_changed = registry.usage_changed - changed, set()
        users = self.jobs.device_users()
        if users != self._users:
            changed.update(key[0] for key in users.keys() | self._users.keys()
                           if users.get(key) != self._users.get(key))
            usage_only -= changed
            self._users = users
        self._rebuild(changed, users)
        for agent_id in usage_only:
            agent, view = registry.agents.get(agent_id), self.views.get(agent_id)
            if agent is None or view is None:  # gone, or not seen yet: its first view has its usage
                continue
            self.version += 1
            self._usage_at[agent_id] = self.version
            self._usage_at.move_to_end(agent_id)
            self._set_share(agent_id, _share(view, agent.usage))

    async def catch_up(self, chunk: int = CATCH_UP_CHUNK) -> None:
        """Build the views still pending a chunk at a time, yielding to the loop in between: the
        first watcher of a fleet of 10,000 must not hold the loop (and the agents' pongs) for the
        whole build. The users of devices are the last known; `refresh` corrects any since."""
        while len(self.registry.changed) > chunk:
            ids = set(itertools.islice(self.registry.changed, chunk))
            self.registry.changed -= ids
            self._rebuild(ids, self._users)
            await asyncio.sleep(0)

    def _rebuild(self, changed: set[str], users: dict[tuple[str, str], str]) -> None:
        registry = self.registry
        for agent_id in sorted(changed):  # sorted: agents new in one tick appear in id order
            self.version += 1
            self._changed_at[agent_id] = self.version
            self._changed_at.move_to_end(agent_id)
            self._usage_at.pop(agent_id, None)  # the new view holds the latest usage
            agent = registry.agents.get(agent_id)
            if agent is None:
                self.views.pop(agent_id, None)
                self._set_share(agent_id, _NO_SHARE)
                continue
            view = self.views[agent_id] = agent_view(agent, users)
            self._set_share(agent_id, _share(view, agent.usage))

    def _set_share(self, agent_id: str, share: Share) -> None:
        for i, v in enumerate(self._shares.pop(agent_id, _NO_SHARE)):
            self._totals[i] -= v
        if share is not _NO_SHARE:
            self._shares[agent_id] = share
            for i, v in enumerate(share):
                self._totals[i] += v

    def changed_since(self, version: int) -> tuple[list[AgentView], list[str], list[HostMetrics]]:
        """Views rebuilt after `version`, ids removed since then, and the latest usage of agents
        whose usage alone changed since then (walks only those)."""
        views, gone, usage = [], [], []
        for agent_id in reversed(self._changed_at):
            if self._changed_at[agent_id] <= version:
                break
            view = self.views.get(agent_id)
            if view is None:
                gone.append(agent_id)
            else:
                views.append(view)
        for agent_id in reversed(self._usage_at):
            if self._usage_at[agent_id] <= version:
                break
            report = self.registry.agents[agent_id].usage
            if report is not None:
                usage.append(report)
        views.reverse()
        return views, gone, usage

    def summary(self) -> FleetSummary:
        t = self._totals
        return FleetSummary(int(t[0]), int(t[1]), int(t[2]), int(t[3]), int(t[4]), int(t[5]), int(t[6]),
                            round(t[7] / t[8], 4) if t[8] else -1.0, round(t[9] / t[10], 4) if t[10] else -1.0)
