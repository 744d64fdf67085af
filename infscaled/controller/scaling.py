"""Scaling a running job through the controller (PATCH /v1/jobs/{id}, `infscaled job scale`).

The next epoch comes from the same pure planning as `infscaled run --scale-at`
(planning/scale.py); this module only finds devices and ports on the agents and tells them:
each agent concerned gets one ChangeTopology with the replicas it starts (built with the new
epoch's plan) and the edge changes of the nodes it runs. Removed replicas are marked
`retiring`: they drain (the edges into them are closed after what was queued) and exit 0, and
their exit then retires them instead of failing the job. One scaling at a time per job: the
next is refused (409) until every added replica is ready and every removed one has gone.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from infscaled.controller.job import GONE, Job, JobState, NodeStatus, Rejected
from infscaled.controller.registry import SendError
from infscaled.planning.assign import PlacementError, device_kind
from infscaled.planning.scale import ScaleChange, ScaleError, ScaleShape, apply_scale, scale_shape
from infscaled.protocol.control import EdgeRef
from infscaled.protocol.messages import ChangeTopology, NodeTopology
from infscaled.protocol.plan import DISPATCHER, JobPlan, Node, plan_to_dict
from infscaled.protocol.topology import TopologyUpdate

if TYPE_CHECKING:
    from infscaled.controller.jobs import JobStore

log = logging.getLogger(__name__)


def scaling_in_progress(job: Job) -> bool:
    return any(s.retiring or s.state in ("assigned", "starting") for s in job.nodes.values())


async def scale(store: JobStore, job_id: str, stage: int | None, replicas: int) -> Job:
    """Scale `stage` (a forward job) or the replica chains (a generation job: `stage` None) of a
    running job to `replicas`; Rejected(400 / 404 / 409) says why when it cannot."""
    job = store.get(job_id)
    if job.state is not JobState.RUNNING or job.plan is None:
        raise Rejected(409, f"{job.describe()}; only a running job can be scaled")
    if scaling_in_progress(job):
        raise Rejected(409, f"job {job.id} is still changing (replicas starting or draining); retry when it is done")
    plan = job.plan
    try:
        shape = scale_shape(plan, stage, replicas)
    except ScaleError as exc:
        raise Rejected(400, f"cannot scale job {job.id}: {exc}") from None
    if not shape.changed:
        return job
    wants = [(n, device_kind(job.nodes[str(job.plan.nodes(n.stage)[0])].device)) for n in shape.added]
    try:
        placed = place(store, job, wants)
    except PlacementError as exc:
        raise Rejected(409, f"cannot scale job {job.id}: no free device for "
                            f"{', '.join(map(str, shape.added))}: {exc}") from None
    change, agent_of = apply_on_agents(store, job, shape, placed)
    for node in shape.removed:
        job.nodes[str(node)].retiring = True
    what = f"stage {stage}" if stage is not None else "replica chains"
    store.event_log.emit("job_scaled", f"job {job.id}: {what} -> {replicas} (epoch {change.plan.epoch}): "
                         + ", ".join([f"+{n}" for n in shape.added] + [f"-{n}" for n in shape.removed]),
                         job=job.id, state=str(job.state))
    log.info("job %s: %s -> %d replicas, epoch %d", job.id, what, replicas, change.plan.epoch)
    store.persist(job)
    try:
        await send_epoch(store, job, change.plan, change.updates, agent_of, shape.added)
    except SendError as exc:
        await store.fail(job, f"scaling failed: {exc}")
        raise Rejected(503, f"scaling job {job.id} failed: {exc}") from None
    store.touch()
    return job


async def send_epoch(store: JobStore, job: Job, plan: JobPlan, updates: Mapping[Node, TopologyUpdate],
                     agent_of: Mapping[Node, str], start: Iterable[Node] = (), stop: Iterable[Node] = ()) -> None:
    """One ChangeTopology per agent concerned: the replicas it starts (with `plan`), the updates
    of the nodes it runs, the nodes it retires. SendError if an agent cannot be reached."""
    start, stop = list(start), list(stop)
    agents = sorted({agent_of[n] for n in [*start, *stop, *updates] if n in agent_of})
    plan_doc = plan_to_dict(plan)
    service = {}
    if DISPATCHER in start:
        service = {"dispatcher_port": job.dispatcher_port, "service_token": job.service_token,
                   "request_timeout_s": job.cfg.workload.request_timeout_s}
    for agent_id in agents:
        msg = ChangeTopology(
            job.id, plan.epoch, plan_doc, start=[str(n) for n in start if agent_of[n] == agent_id],
            updates=[NodeTopology(str(n), [EdgeRef.of(e) for e in u.add], list(u.remove), [str(d) for d in u.dead],
                                  u.complete)
                     for n, u in sorted(updates.items()) if agent_of.get(n) == agent_id],
            ready_timeout_s=store.cfg.ready_timeout_s, stop=[str(n) for n in stop if agent_of[n] == agent_id],
            **(service if agent_of.get(DISPATCHER) == agent_id else {}))
        await store.registry.send(agent_id, msg)


def place(store: JobStore, job: Job, wants: list[tuple[Node, str]]) -> dict[Node, tuple[str, str]]:
    """Free devices (agent, device id) for new replicas, each of the device kind it wants;
    PlacementError when there are not enough."""
    if not wants:
        return {}
    now = time.monotonic()
    busy = {(s.agent, s.device) for other in store.jobs.values() if other.holds_resources(now)
            for s in other.nodes.values() if s.device and s.state not in GONE and not s.retiring}
    store.registry.offers.set_busy(busy)  # applies what changed since the last placement
    policy = job.cfg.placement.policy if job.cfg.placement.policy != "static" else "pack"
    return store.registry.offers.place(wants, policy, None)


def apply_on_agents(store: JobStore, job: Job, shape: ScaleShape, placed: dict[Node, tuple[str, str]]
                    ) -> tuple[ScaleChange, dict[Node, str]]:
    """The next epoch with the added replicas where `placed` puts them: ports on the senders'
    agents, the job's plan, nodes and held ports updated. Returns the change and each node's agent."""
    assert job.plan is not None
    agent_of = {n: placed[n][0] for n in shape.added}
    agent_of.update({Node.parse(name): s.agent for name, s in job.nodes.items()})
    ports = reserve_ports(store, job, [agent_of[src] for src, _ in shape.new_edges])
    advertise = {a.id: a.info.advertise for a in store.registry}
    change = apply_scale(job.plan, shape, {n: _plan_device(placed[n][1]) for n in shape.added}, ports,
                         {n: advertise[placed[n][0]] for n in shape.added})
    job.plan = change.plan
    for node in shape.added:
        job.nodes[str(node)] = NodeStatus(placed[node][0], placed[node][1])
    held: dict[str, list[int]] = {job.dispatcher_agent: [job.dispatcher_port]}
    for edge in change.plan.edges:
        held.setdefault(agent_of[edge.src], []).append(edge.port)
    job.ports = {a: tuple(p) for a, p in held.items()}
    return change, agent_of


def reserve_ports(store: JobStore, job: Job, senders: list[str]) -> list[int]:
    """One free port per new edge, in the range of the agent hosting its sender. The search goes
    round the range from where the last one ended, so a port just released (a dead node's, or a
    removed edge whose listener a restarting dispatcher may still hold) is not handed out again
    at once."""
    used: dict[str, set[int]] = {}
    now = time.monotonic()
    for other in store.jobs.values():
        if other.holds_resources(now):
            for agent_id, ports in other.ports.items():
                used.setdefault(agent_id, set()).update(ports)
    out = []
    for agent_id in senders:
        first, last = store.registry.agents[agent_id].info.port_range
        taken = used.setdefault(agent_id, set())
        start = min(max(store.port_cursor.get(agent_id, first), first), last)
        port = next((p for p in itertools.chain(range(start, last + 1), range(first, start)) if p not in taken), None)
        if port is None:
            raise Rejected(409, f"cannot scale job {job.id}: agent {agent_id} has no free port in {first}..{last}")
        store.port_cursor[agent_id] = port + 1 if port < last else first
        taken.add(port)
        out.append(port)
    return out


def _plan_device(device_id: str) -> str:
    return "cpu" if device_kind(device_id) == "cpu" else device_id


__all__ = ["DISPATCHER", "apply_on_agents", "place", "scale", "scaling_in_progress", "send_epoch"]
