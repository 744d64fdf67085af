"""Replacing lost replicas of a running job through its agents (issue 12; `infscaled run` does the
same in runner/recovery.py, from the same pure planning in planning/recovery.py).

    running ──loss──► degraded ──replacements placed──► recovering ──all READY──► running
                          │                                 │
                          └──── no device / attempts spent ─┴──► failed (with every reason)

A loss is a stage replica that its agent reports exited or failed (a crash, a kill, or a member
the agent killed for a silent heartbeat), or every replica on an agent that was lost. The next
epoch names the dead (every running node drops its edges to them; the dispatcher replays what may
have crossed them and, if a stage has no replica left, holds work), and starts the replacements
on free devices (the dead replica's own device is free again, so the same agent is usual). Once
every replacement is READY, the dispatcher hears that the pipeline is whole again, and the job
is `running`. A replacement that fails is a loss of its own, replaced again after `backoff_s`
(doubling), up to `[recovery] attempts` in a row per replica line (planning.recovery.Ledger: a
replacement that came to serve starts its line afresh).

The dispatcher service is restarted the same way (`recover_dispatcher`), for forward and
generation jobs alike: on its agent, on its HTTP port, with every edge joined again on fresh
ports; the stage replicas hear it was dead (`TopologyUpdate.dead`) and join the newcomer. What it
had in flight is lost with it. The controller's proxy retries forward requests (they are
idempotent) and generation requests whose answer had not started (non-streaming ones included:
the client saw nothing of them) until the new one answers; a stream already under way ends with
an error event saying the dispatcher died (controller/openai_proxy.py). A generation chain frees
the caches of the dead dispatcher's sequences and serves on (engine/programs/generation.py); the
new dispatcher numbers its sequences past the old one's. Its agent lost with it: the job fails
(the service's port is on that host).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from infscaled.controller.job import GONE, Job, JobState
from infscaled.controller.registry import SendError
from infscaled.controller.scaling import apply_on_agents, place, reserve_ports, send_epoch
from infscaled.planning.assign import PlacementError, device_kind
from infscaled.planning.recovery import (
    Ledger,
    backoff,
    complete,
    dispatcher_restart,
    replacement_shape,
    restored,
    with_failure,
)
from infscaled.protocol.plan import DISPATCHER, Node

if TYPE_CHECKING:
    from infscaled.controller.jobs import JobStore

log = logging.getLogger(__name__)

RECOVERABLE = (JobState.RUNNING, JobState.DEGRADED, JobState.RECOVERING)


@dataclass
class Recovery:
    """A job's recovery bookkeeping (in memory: a restarted controller starts counting afresh)."""

    ledger: Ledger = field(default_factory=Ledger)  # attempts and reasons per replica line
    pending: set[str] = field(default_factory=set)  # replacements not READY yet
    whole: bool = True  # False: a stage had no replica left; tell the dispatcher when it has again
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


def can_recover(job: Job, nodes: list[str]) -> bool:
    """Whether losing `nodes` is recovered from (else the job fails)."""
    if not (job.state in RECOVERABLE and job.plan is not None and job.plan.recovery.enabled):
        return False
    if str(DISPATCHER) not in nodes:
        return True
    # The dispatcher alone: restarted on its agent. With stage replicas, or with its agent: not,
    # the job fails with the reason.
    status = job.nodes.get(str(DISPATCHER))
    return nodes == [str(DISPATCHER)] and status is not None and status.state != "lost"


async def recover_dispatcher(store: JobStore, job: Job, why: str) -> None:
    """Start the dispatcher service again on its agent and port; its edges join on fresh ports."""
    rec = job.recovery
    async with rec.lock:
        assert job.plan is not None
        name = str(DISPATCHER)
        tries, history = rec.ledger.next_try([name], [f"dispatcher: {why}"])
        policy = job.plan.recovery
        if tries > policy.attempts:
            await store.fail(job, f"gave up after {policy.attempts} restart(s) of the dispatcher: {'; '.join(history)}")
            return
        store.set_state(job, JobState.DEGRADED, f"dispatcher lost: {why}")
        if tries > 1:
            await asyncio.sleep(backoff(policy, tries))
            if job.state not in RECOVERABLE:
                return
        agent_of = {Node.parse(n): s.agent for n, s in job.nodes.items()}
        mine = [e for e in job.plan.edges if DISPATCHER in (e.src, e.dst)]
        ports = reserve_ports(store, job, [agent_of[e.src] for e in mine])
        plan, updates = dispatcher_restart(job.plan, ports)
        job.plan = plan
        held: dict[str, list[int]] = {job.dispatcher_agent: [job.dispatcher_port]}
        for edge in plan.edges:
            held.setdefault(agent_of[edge.src], []).append(edge.port)
        job.ports = {a: tuple(p) for a, p in held.items()}
        status = job.nodes[name]
        status.state, status.reason, status.pid = "assigned", "", 0
        rec.ledger.started([name], tries, history, lost=[name])
        rec.pending.add(name)
        store.set_state(job, JobState.RECOVERING, "", f"epoch {plan.epoch}: dispatcher restarting")
        try:
            await send_epoch(store, job, plan, updates, agent_of, [DISPATCHER])
        except SendError as exc:
            await store.fail(job, f"recovery failed: {exc}")


async def recover(store: JobStore, job: Job, lost: dict[str, str]) -> None:
    """Replace the stage replicas in `lost` (node -> why); fails the job when that cannot be done."""
    rec = job.recovery
    async with rec.lock:
        assert job.plan is not None
        policy = job.plan.recovery
        dead = [n for n in lost if n in job.nodes]
        if not dead or job.state not in RECOVERABLE:
            return
        tries, history = rec.ledger.next_try(dead, [f"{n}: {lost[n]}" for n in dead])
        if tries > policy.attempts:
            await store.fail(job, f"gave up after {policy.attempts} replacement attempt(s): {'; '.join(history)}")
            return
        store.set_state(job, JobState.DEGRADED, "; ".join(f"{n} lost: {lost[n]}" for n in dead))
        if tries > 1:
            await asyncio.sleep(backoff(policy, tries))
            if job.state not in RECOVERABLE:
                return
        plan = job.plan
        dead_nodes = [Node.parse(n) for n in dead]
        shape = replacement_shape(plan, dead_nodes)
        kinds = {str(n): device_kind(job.nodes[str(n)].device) for n in shape.removed}
        gone = set(shape.removed)
        alive = [w.node for w in plan.workers if w.node not in gone and job.nodes[str(w.node)].state not in GONE]
        whole = complete(plan, alive)
        for n in dead:
            rec.pending.discard(n)
            del job.nodes[n]  # its device and ports are free again
        retire = [n for n in shape.removed if str(n) not in dead]
        for n in retire:  # a dead chain's survivors: stopped now, so their devices count as free
            job.nodes[str(n)].retiring = True
        wants = [(n, _kind_for(n, shape.removed, kinds)) for n in shape.added]
        try:
            placed = place(store, job, wants)
        except PlacementError as exc:
            await store.fail(job, f"{', '.join(dead)} lost ({'; '.join(lost[n] for n in dead)}) and no free "
                                  f"device to replace {'them' if len(dead) > 1 else 'it'}: {exc}")
            return
        change, agent_of = apply_on_agents(store, job, shape, placed)
        rec.ledger.started([str(n) for n in shape.added], tries, history, lost=dead)
        rec.pending.update(str(n) for n in shape.added)
        rec.whole = rec.whole and whole
        updates = with_failure(change, plan, dead_nodes, whole)
        agent_of[DISPATCHER] = job.dispatcher_agent
        store.set_state(job, JobState.RECOVERING, "", f"epoch {change.plan.epoch}: "
                        + ", ".join([f"+{n}" for n in shape.added] + [f"-{n}" for n in shape.removed]))
        try:
            await send_epoch(store, job, change.plan, updates, agent_of, shape.added, retire)
        except SendError as exc:
            await store.fail(job, f"recovery failed: {exc}")


async def replica_ready(store: JobStore, job: Job, node: str) -> None:
    """A replica said READY: once no replacement is pending, the pipeline is whole again."""
    rec = job.recovery
    rec.pending.discard(node)
    rec.ledger.served(node)
    if job.state is not JobState.RECOVERING or rec.pending or job.plan is None:
        return
    if not rec.whole:
        job.plan, update = restored(job.plan)
        rec.whole = True
        try:
            await send_epoch(store, job, job.plan, {DISPATCHER: update}, {DISPATCHER: job.dispatcher_agent})
        except SendError as exc:
            await store.fail(job, f"recovery failed: {exc}")
            return
    store.set_state(job, JobState.RUNNING, "", "replacements ready")


def _kind_for(node: Node, removed: tuple[Node, ...], kinds: dict[str, str]) -> str:
    """The device kind a newcomer needs: that of a removed node of its stage (what it replaces)."""
    for n in removed:
        if n.stage == node.stage and str(n) in kinds:
            return kinds[str(n)]
    return next(iter(kinds.values()))
