"""Jobs: the store, the state machine, and deployment onto agents.

    pending ──► deploying ──► running ──► stopping ──► stopped
       │            │          │   ▲          ▲
       │            │   loss   ▼   │ ready    │
       │            │        degraded ─► recovering   (controller/recovery.py: a lost replica is
       │            │            │            │         replaced while the job serves)
       └──(DELETE)──┼────────────┼────────────┘ (pending: at once)
                    └──► failed ◄┘  (a loss with recovery off, attempts spent or no free device,
                                     the dispatcher lost, an agent lost, a send failed)

A submitted job is inspected by one agent (unit count and weights), checked with the same
`planning.job` functions as `infscaled run`, placed on connected agents' free devices
(`planning.assign`), given one port per edge from the port range of the agent hosting the
edge's sender, planned, and deployed: every agent of the job gets its Deploy, or, if any send
fails, every agent gets StopJob and the job fails (never half-deployed). A job whose devices
are busy waits as pending and is retried whenever devices free up or agents join.

Everything here runs on the event loop; state changes between awaits are atomic, so two
placements never take the same device or port.

Durability (controller/store.py): every job change is written to the database (its file text,
state, placement, ports, plan, node states), and the database has it before any Deploy leaves.
A restarted controller loads every job as it was; the agents of the live ones must register
again within adopt_timeout_s. Each lists the processes it runs: those of live jobs assigned to
it are adopted as they are (same PIDs, ports and devices stay taken), those of jobs it should
not run are stopped, and a live job missing a process on it fails with the reason.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import secrets
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from infscaled.config import JobConfig
from infscaled.controller.config import ControllerConfig
from infscaled.controller.job import GONE, LIVE, SERVING, WORKER_STATES, Job, JobSource, JobState, NodeStatus, Rejected
from infscaled.controller.recovery import RECOVERABLE, can_recover, recover, recover_dispatcher, replica_ready
from infscaled.controller.registry import InspectError, Registry, SendError
from infscaled.controller.store import JobRecord, Store
from infscaled.errors import ConfigError
from infscaled.planning.assign import PlacementError, check_policy, device_kind
from infscaled.planning.job import check_model, job_edges, plan_job, stage_ranges
from infscaled.planning.offers import Offers
from infscaled.protocol.messages import Deploy, Metrics, RunningWorker, StopJob, WorkerState
from infscaled.protocol.plan import DISPATCHER, JobPlan, Node, plan_from_dict, plan_to_dict

log = logging.getLogger(__name__)

RECONCILE_GAP_S = 0.02  # the least time between two reconciler ticks

@dataclass(frozen=True)
class _Placement:
    nodes: dict[Node, tuple[str, str]]  # stage replica -> (agent id, device id)
    edge_ports: list[int]  # in job_edges order, as plan_job wants them
    dispatcher_agent: str
    dispatcher_port: int


class JobStore:
    def __init__(self, cfg: ControllerConfig, registry: Registry, store: Store | None = None) -> None:
        self.cfg = cfg
        self.registry = registry
        self.store = store
        registry.events = self
        self.event_log = registry.event_log
        self.jobs: dict[str, Job] = {}
        self.draining = False
        self._changed = asyncio.Event()  # replaced on every change: a broadcast to waiters
        self._wake = asyncio.Event()  # the reconciler has something to look at
        self._rejoined: set[str] = set()  # agents that registered again since the last tick
        self._orphans_stopped: set[tuple[str, str]] = set()  # (job id, agent id) told to stop on rejoin
        self._to_stop: dict[tuple[str, str], str] = {}  # (job id, agent id) -> why: sent at the next tick
        self._adopt_failures: dict[str, str] = {}  # job id -> why adoption failed: failed at the next tick
        # Where the next scaling / recovery port search starts, per agent (controller/scaling.py).
        self.port_cursor: dict[str, int] = {}
        # Each inspection is a child process on an agent: a burst of submissions queues here.
        self._inspections = asyncio.Semaphore(cfg.max_inspections)
        self._waiting_submissions = 0
        # The jobs a registering agent may concern (live or pending, or with a node that may still
        # run), found once per reconciler tick, plus those whose state changed since: a fleet
        # registering again after a restart must not cost every finished job (the database keeps
        # 1,000) per agent. None: not looked for yet (all jobs).
        self._unsettled: set[str] | None = None
        self._changed_jobs: set[str] = set()
        self._last_tick = 0.0

    # -- submission ------------------------------------------------------------------------------

    async def submit(self, cfg: JobConfig, source: JobSource) -> Job:
        """Inspect, check, place and deploy a parsed job; raises Rejected with the HTTP status."""
        if self.draining:
            raise Rejected(503, "the controller is shutting down")
        if self._inspections.locked() and self._waiting_submissions >= self.cfg.max_waiting_submissions:
            raise Rejected(429, f"{self.cfg.max_inspections} model inspection(s) in progress and "
                                f"{self._waiting_submissions} submission(s) waiting (max_waiting_submissions); "
                                "retry later")
        self._waiting_submissions += 1
        try:
            await self._inspections.acquire()
        finally:
            self._waiting_submissions -= 1
        try:
            agent_id, result = await self.registry.inspect(cfg.model.source)
        except InspectError as exc:
            raise Rejected(exc.status, str(exc)) from None
        finally:
            self._inspections.release()
        if not result.ok:
            # The same shape `infscaled run` gives a model that cannot be resolved or built.
            raise Rejected(400, f"{cfg.path}: model.source = {cfg.model.source!r}: {result.error}")
        weights = result.unit_weights
        if result.unit_count < 1 or len(weights) != result.unit_count or any(w < 0 for w in weights):
            raise Rejected(502, f"agent {agent_id} answered Inspect with unit_count {result.unit_count} "
                                f"and {len(weights)} unit weights")
        # The agent built the model, so a builtin name it was given exists.
        builtin = (cfg.model.source.removeprefix("builtin:"),)
        try:
            cfg = check_model(cfg, result.unit_count, builtin)
            ranges = stage_ranges(cfg, weights)
        except ConfigError as exc:
            raise Rejected(400, str(exc)) from None
        job = Job(_new_id(cfg.name, self.jobs), cfg, tuple(weights), ranges, time.time(), source)
        self._check_fits_cluster(job)
        self.jobs[job.id] = job
        self._save(job, history=True)
        self.event_log.emit("job_state", f"job {job.id} submitted ({cfg.model.source})", job=job.id,
                         state=str(job.state))
        log.info("job %s submitted (%s, %d stage(s), %d replica(s))", job.id, cfg.model.source,
                 cfg.stage_count, cfg.pipeline.replica_total)
        await self._try_start(job)
        return job

    def _check_fits_cluster(self, job: Job) -> None:
        """409 unless the job fits every device of every agent we know, busy or not."""
        try:
            trial = self._place(job, self.registry.known, {})
        except PlacementError as exc:
            raise Rejected(409, f"job {job.name} does not fit this cluster (all devices, busy or not): {exc}") from None
        try:
            self._plan(job, trial)
        except ValueError as exc:
            raise Rejected(400, f"{job.cfg.path}: cannot plan job {job.name}: {exc}") from None

    def _place(self, job: Job, offers: Offers, ports_in_use: dict[str, set[int]]) -> _Placement:
        cfg = job.cfg
        replicas = cfg.pipeline.replicas
        nodes = [Node(s, r) for s, count in enumerate(replicas) for r in range(count)]
        wanted = cfg.placement.devices
        devices = [wanted] * len(nodes) if isinstance(wanted, str) else list(wanted)
        static = dict(zip(nodes, cfg.placement.agents, strict=True)) if cfg.placement.policy == "static" else None
        check_policy(cfg.placement.policy)
        placed = offers.place(list(zip(nodes, devices, strict=True)), cfg.placement.policy, static)

        where = {node: agent for node, (agent, _) in placed.items()}
        where[DISPATCHER] = placed[Node(0, 0)][0]
        edges = job_edges(cfg)
        need = Counter(where[src] for src, _ in edges)
        need[where[DISPATCHER]] += 1  # the dispatcher's inference service
        free: dict[str, Any] = {}
        for agent_id, count in need.items():
            first, last = self.registry.agents[agent_id].info.port_range
            used = ports_in_use.get(agent_id, set())
            ports = list(itertools.islice((p for p in range(first, last + 1) if p not in used), count))
            if len(ports) < count:
                raise PlacementError(f"agent {agent_id} needs {count} free port(s) in its port_range "
                                     f"{first}..{last}, {len(ports)} free")
            free[agent_id] = iter(ports)
        # The dispatcher takes its agent's lowest free port, the edges the rest in edge order.
        dispatcher_port = next(free[where[DISPATCHER]])
        return _Placement(placed, [next(free[where[src]]) for src, _ in edges], where[DISPATCHER], dispatcher_port)

    def _plan(self, job: Job, placement: _Placement) -> JobPlan:
        agents = self.registry.agents
        nodes = sorted(placement.nodes)
        hosts = {node: agents[placement.nodes[node][0]].info.advertise for node in nodes}
        hosts[DISPATCHER] = agents[placement.dispatcher_agent].info.advertise
        devices = [_plan_device(placement.nodes[node][1]) for node in nodes]
        # Plans and worker processes carry the job id, unique across the cluster, not the name.
        return plan_job(replace(job.cfg, name=job.id), job.unit_weights, devices, placement.edge_ports,
                        hosts[DISPATCHER], hosts)

    async def _try_start(self, job: Job) -> None:
        """Place a pending job on free devices and deploy it, or leave it pending with the reason."""
        if job.state is not JobState.PENDING:  # stopped while another job was deploying
            return
        now = time.monotonic()
        busy_devices: set[tuple[str, str]] = set()
        busy_ports: dict[str, set[int]] = {}
        for other in self.jobs.values():
            if other.holds_resources(now):
                busy_devices |= {(s.agent, s.device) for s in other.nodes.values() if s.device}
                for agent_id, ports in other.ports.items():
                    busy_ports.setdefault(agent_id, set()).update(ports)
        self.registry.offers.set_busy(busy_devices)  # applies what changed since the last placement
        try:
            placement = self._place(job, self.registry.offers, busy_ports)
            plan = self._plan(job, placement)
        except PlacementError as exc:
            reason = f"waiting for free devices: {exc}"
            if job.reason != reason:
                job.reason = reason
                log.info("job %s pending: %s", job.id, reason)
                self._save(job)
                self._touch()
            return
        except ValueError as exc:  # checked at submission; a change of agents cannot cause it
            await self._fail(job, f"cannot plan: {exc}")
            return
        job.plan = plan
        job.nodes = {str(node): NodeStatus(agent, device) for node, (agent, device) in sorted(placement.nodes.items())}
        job.nodes[str(DISPATCHER)] = NodeStatus(placement.dispatcher_agent, "")
        held: dict[str, list[int]] = {placement.dispatcher_agent: [placement.dispatcher_port]}
        for edge in plan.edges:
            held.setdefault(job.nodes[str(edge.src)].agent, []).append(edge.port)
        job.ports = {agent_id: tuple(ports) for agent_id, ports in held.items()}
        job.dispatcher_agent, job.dispatcher_port = placement.dispatcher_agent, placement.dispatcher_port
        job.deadline = now + self.cfg.ready_timeout_s + self.cfg.heartbeat_timeout_s
        self._set_state(job, JobState.DEPLOYING, "", f"on {', '.join(job.agents)}")
        if self.store is not None:
            # Every process an agent starts must belong to a job the database knows (adoption).
            await self.store.sync()
        await self._deploy(job)

    async def _deploy(self, job: Job) -> None:
        assert job.plan is not None
        plan = plan_to_dict(job.plan)
        for agent_id in job.agents:
            if job.state is not JobState.DEPLOYING:  # failed while we were sending (agent lost)
                return
            msg = Deploy(
                job_id=job.id, plan=plan, nodes=[n for n, s in job.nodes.items() if s.agent == agent_id],
                dispatcher_port=job.dispatcher_port if agent_id == job.dispatcher_agent else 0,
                service_token=job.service_token, request_timeout_s=job.cfg.workload.request_timeout_s,
                ready_timeout_s=self.cfg.ready_timeout_s,
            )
            try:
                await self.registry.send(agent_id, msg)
            except SendError as exc:
                await self._fail(job, f"deploy failed: {exc}")
                return
        log.info("job %s deploying on %s", job.id, ", ".join(job.agents))

    # -- stopping and failing --------------------------------------------------------------------

    async def stop(self, job_id: str) -> Job:
        """DELETE: a pending job stops at once, a deployed one asks its agents to stop its workers."""
        job = self.get(job_id)
        if job.state is JobState.PENDING:
            self._set_stopped(job, "stopped on request before it was placed")
        elif job.state in (JobState.DEPLOYING, *SERVING):
            job.deadline = time.monotonic() + self.cfg.stop_grace_s
            self._set_state(job, JobState.STOPPING, "stop requested")
            await self._send_stop(job, "stopped on request")
            if job.state is JobState.STOPPING and job.drained:
                self._set_stopped(job, "stopped on request")
        return job

    async def _fail(self, job: Job, reason: str) -> None:
        if job.state not in (JobState.PENDING, *LIVE):
            return
        deployed = job.state is not JobState.PENDING
        job.deadline = time.monotonic() + self.cfg.stop_grace_s
        log.warning("job %s failed: %s", job.id, reason)
        self._set_state(job, JobState.FAILED, reason)
        if deployed:
            await self._send_stop(job, reason)

    async def _send_stop(self, job: Job, reason: str) -> None:
        for agent_id in job.agents:
            agent = self.registry.agents.get(agent_id)
            if agent is None or agent.state != "connected":
                continue
            try:
                await self.registry.send(agent_id, StopJob(job.id, reason))
            except SendError as exc:
                log.warning("job %s: %s", job.id, exc)

    def _set_stopped(self, job: Job, reason: str) -> None:
        log.info("job %s stopped", job.id)
        self._set_state(job, JobState.STOPPED, reason)

    async def stop_all(self, reason: str, timeout_s: float) -> None:
        """Shutdown: refuse new jobs, stop every job, wait up to `timeout_s` for their workers' exits."""
        self.draining = True
        for job in list(self.jobs.values()):
            if job.state is JobState.PENDING:
                self._set_stopped(job, reason)
            elif job.state in (JobState.DEPLOYING, *SERVING):
                job.deadline = time.monotonic() + timeout_s
                self._set_state(job, JobState.STOPPING, reason)
                await self._send_stop(job, reason)
        if not await self.wait_until(lambda: all(j.state is not JobState.STOPPING or j.drained
                                                 for j in self.jobs.values()), timeout_s):
            left = [j.id for j in self.jobs.values() if j.state is JobState.STOPPING and not j.drained]
            log.warning("shutdown: job(s) %s did not report their workers' exit within %g s", ", ".join(left),
                        timeout_s)

    # -- what agents report (registry.AgentEvents) -----------------------------------------------

    async def worker_state(self, agent_id: str, msg: WorkerState) -> str | None:
        job = self.jobs.get(msg.job_id)
        if (msg.job_id, agent_id) in self._orphans_stopped:
            # A process this controller told the agent to stop (it re-registered listing it).
            log.debug("job %s on agent %s: %s %s (being stopped)", msg.job_id, agent_id, msg.node, msg.state)
            if job is None:
                return None
        if job is None:
            return f"unknown job {msg.job_id!r}"
        status = job.nodes.get(msg.node)
        if status is None or status.agent != agent_id:
            return f"job {job.id} has no node {msg.node!r} on agent {agent_id}"
        if msg.state not in WORKER_STATES:
            return f"unknown worker state {msg.state!r}; allowed: {', '.join(WORKER_STATES)}"
        if status.retiring and msg.state == "exited" and not msg.reason:
            # Removed by scaling: it drained and exited cleanly. It leaves the job.
            del job.nodes[msg.node]
            self._save(job)
            self.event_log.emit("worker_state", f"job {job.id}: {msg.node} on {agent_id} retired (drained, exited)",
                                agent=agent_id, job=job.id, node=msg.node, state="retired")
            self._touch()
            return None
        status.state, status.reason = msg.state, msg.reason
        status.pid = msg.pid or status.pid
        self._save(job)
        self.event_log.emit("worker_state", f"job {job.id}: {msg.node} on {agent_id} {msg.state}"
                         + (f" (pid {status.pid})" if msg.state in ("starting", "ready") and status.pid else "")
                         + (f": {msg.reason}" if msg.reason else ""),
                         agent=agent_id, job=job.id, node=msg.node, state=msg.state)
        self._touch()
        lost = msg.state in ("exited", "failed")
        why = f"{msg.state} on agent {agent_id}" + (f": {msg.reason}" if msg.reason else "")
        if lost and can_recover(job, [msg.node]) and not status.retiring:
            if msg.node == str(DISPATCHER):
                await recover_dispatcher(self, job, why)
            else:
                await recover(self, job, {msg.node: why})
        elif lost and job.state in (JobState.DEPLOYING, *RECOVERABLE) and not status.retiring:
            await self._fail(job, f"worker {msg.node} on agent {agent_id} {msg.state}"
                                  + (f": {msg.reason}" if msg.reason else ""))
        elif msg.state == "ready" and job.state is JobState.RECOVERING:
            await replica_ready(self, job, msg.node)
        elif job.state is JobState.DEPLOYING and all(s.state == "ready" for s in job.nodes.values()):
            job.deadline = float("inf")
            log.info("job %s running", job.id)
            self._set_state(job, JobState.RUNNING, "")
        elif job.state is JobState.STOPPING and job.drained:
            self._set_stopped(job, "stopped on request" if job.reason == "stop requested" else job.reason)
        return None

    def metrics(self, agent_id: str, msg: Metrics) -> str | None:
        """Keep the newest snapshot of a job's nodes on this agent (reports of other nodes dropped)."""
        job = self.jobs.get(msg.job_id)
        if job is None:
            # A stopped job's last report can cross the controller's restart: nothing to correct.
            log.debug("metrics for unknown job %s from agent %s ignored", msg.job_id, agent_id)
            return None
        if agent_id not in job.agents:
            return f"job {job.id} has no node on agent {agent_id}"
        mine = [s for s in msg.stages
                if s.node != "dispatcher" and (st := job.nodes.get(s.node)) is not None and st.agent == agent_id]
        dispatcher = msg.dispatcher if job.dispatcher_agent == agent_id else None
        job.metrics[agent_id] = (time.monotonic(), Metrics(msg.job_id, mine, dispatcher))
        return None

    async def agent_lost(self, agent_id: str, reason: str) -> None:
        for job in list(self.jobs.values()):
            on_agent = [s for s in job.nodes.values() if s.agent == agent_id and s.state not in GONE]
            if not on_agent:
                continue
            for status in on_agent:
                status.state = "lost"
            names = [n for n, s in job.nodes.items() if s.agent == agent_id and s.state == "lost" and not s.retiring]
            if can_recover(job, names):
                await recover(self, job, {n: f"agent {agent_id} lost: {reason}" for n in names})
            elif job.state in (JobState.DEPLOYING, *RECOVERABLE):
                await self._fail(job, reason)
            elif job.state is JobState.STOPPING and job.drained:
                self._set_stopped(job, job.reason)
        self._touch()

    def agent_joined(self, agent_id: str, workers: list[RunningWorker]) -> None:
        """Adopt what the agent runs for live jobs assigned to it; mark the rest to be stopped.

        Synchronous, before the agent's next frame is read: the worker states it resends right
        after Welcome then meet a decided job table."""
        self._rejoined.add(agent_id)
        listed = {(w.job_id, w.node): w for w in workers}
        listed_jobs = {w.job_id for w in workers}
        for job_id in listed_jobs:
            job = self.jobs.get(job_id)
            if job is None or job.state not in LIVE or any(
                    (st := job.nodes.get(node)) is None or st.agent != agent_id
                    for j, node in listed if j == job_id):
                self._orphans_stopped.add((job_id, agent_id))
                self._to_stop[(job_id, agent_id)] = "the controller does not run this job on this agent"
        for job in self._may_concern(listed_jobs):
            mine = {n: s for n, s in job.nodes.items() if s.agent == agent_id}
            if not mine:
                continue
            for node, status in mine.items():
                running = listed.get((job.id, node))
                if running is not None:
                    status.state, status.pid = running.state, running.pid or status.pid
                elif status.state not in GONE:
                    status.state = "lost"  # not running there any more
            if job.state not in LIVE:
                if any(s.state not in GONE for s in mine.values()):
                    job.deadline = time.monotonic() + self.cfg.stop_grace_s  # its ports stay taken meanwhile
                self._save(job)
                continue
            if job.state is JobState.STOPPING and any(s.state not in GONE for s in mine.values()):
                # Stopped while this agent was away (its StopJob could not be sent): send it now.
                self._to_stop[(job.id, agent_id)] = job.reason or "stop requested"
            if agent_id in job.awaiting:
                job.awaiting.discard(agent_id)
                gone = [n for n, s in mine.items() if s.state in GONE]
                if job.state is JobState.STOPPING:
                    pass  # nothing to adopt: its processes are being stopped
                elif gone:
                    self._adopt_failures[job.id] = (f"worker(s) {', '.join(gone)} on agent {agent_id} were gone "
                                                    "when it registered again after the controller restarted")
                else:
                    pids = ", ".join(f"{n} pid {s.pid}" for n, s in mine.items())
                    log.info("job %s: adopted %s on agent %s", job.id, pids, agent_id)
                    self.event_log.emit("job_state", f"job {job.id}: adopted {pids} on agent {agent_id}",
                                        agent=agent_id, job=job.id, state=str(job.state))
            self._save(job)
        self._touch()
        self._wake.set()  # pending jobs may fit now; orphans to stop, adoption failures to act on

    def _may_concern(self, listed_jobs: set[str]) -> list[Job]:
        """The jobs in which an agent's registration may change something, in creation order: a
        finished job whose nodes have all exited holds nothing on any agent, unless it lists them."""
        if self._unsettled is None:
            return list(self.jobs.values())
        ids = self._unsettled | self._changed_jobs | listed_jobs
        return sorted((job for i in ids if (job := self.jobs.get(i)) is not None), key=lambda j: j.created)

    def _find_unsettled(self) -> None:
        self._changed_jobs = set()
        self._unsettled = {job.id for job in self.jobs.values()
                           if job.state in LIVE or job.state is JobState.PENDING
                           or any(s.state not in GONE for s in job.nodes.values())}

    # -- background ------------------------------------------------------------------------------

    async def reconcile_forever(self) -> None:
        """Deadlines and pending retries; woken by every change, and at least once a second."""
        period = min(1.0, self.cfg.heartbeat_interval_s)
        while True:
            try:
                async with asyncio.timeout(period):
                    await self._wake.wait()
            except TimeoutError:
                pass
            # Coalesce a burst of wake-ups (a fleet registering: one each) into a tick every
            # RECONCILE_GAP_S; a tick looks at every job.
            await asyncio.sleep(max(0.0, self._last_tick + RECONCILE_GAP_S - time.monotonic()))
            self._wake.clear()
            self._last_tick = time.monotonic()
            try:
                await self.tick()
            except Exception:  # noqa: BLE001 - task boundary: a bug must not stop the reconciler
                log.exception("job reconciler failed; retrying")

    async def tick(self) -> None:
        now = time.monotonic()
        self._find_unsettled()
        for job in list(self.jobs.values()):
            if job.state is JobState.DEPLOYING and now > job.deadline:
                late = [n for n, s in job.nodes.items() if s.state != "ready"]
                # The deadline set at deploy: ready_timeout_s, plus heartbeat_timeout_s for an agent's
                # last report to arrive; say the whole of it, not the half the user configured first.
                await self._fail(job, f"worker(s) {', '.join(late)} not ready within "
                                      f"{self.cfg.ready_timeout_s + self.cfg.heartbeat_timeout_s:g} s "
                                      f"(ready_timeout_s {self.cfg.ready_timeout_s:g} s + heartbeat_timeout_s "
                                      f"{self.cfg.heartbeat_timeout_s:g} s)")
            elif job.state is JobState.STOPPING and now > job.deadline:
                late = [n for n, s in job.nodes.items() if s.state not in GONE]
                self._set_stopped(job, f"{job.reason}; node(s) {', '.join(late)} did not report their exit "
                                       f"within {self.cfg.stop_grace_s:g} s")
        for job in list(self.jobs.values()):
            if job.awaiting and job.state in LIVE and now > job.adopt_deadline:
                missing, job.awaiting = sorted(job.awaiting), set()
                for status in job.nodes.values():
                    if status.agent in missing and status.state not in GONE:
                        status.state = "lost"
                await self._fail(job, f"agent(s) {', '.join(missing)} did not register again within "
                                      f"{self.cfg.adopt_timeout_s:g} s of the controller's restart (adopt_timeout_s)")
        failures, self._adopt_failures = self._adopt_failures, {}
        for job_id, reason in failures.items():
            if (failed := self.jobs.get(job_id)) is not None:
                await self._fail(failed, reason)
        to_stop, self._to_stop = self._to_stop, {}
        for (job_id, agent_id), why in to_stop.items():
            log.warning("agent %s runs processes of job %s: stopping them (%s)", agent_id, job_id, why)
            try:
                await self.registry.send(agent_id, StopJob(job_id, why))
            except SendError as exc:
                log.warning("job %s: %s", job_id, exc)
        rejoined, self._rejoined = self._rejoined, set()
        # Workers an agent ran when it was lost belong to jobs that failed meanwhile: make sure
        # they are gone, whatever the agent did when its connection dropped. One pass over the
        # jobs for every agent that registered again since the last tick.
        orphans = [(job, agent_id) for job in (list(self.jobs.values()) if rejoined else [])
                   if job.state not in LIVE
                   for agent_id in sorted({s.agent for s in job.nodes.values() if s.state == "lost"} & rejoined)]
        for job, agent_id in orphans:
            if (job.id, agent_id) not in self._orphans_stopped:
                self._orphans_stopped.add((job.id, agent_id))
                try:
                    await self.registry.send(agent_id, StopJob(job.id, job.reason))
                except SendError as exc:
                    log.warning("job %s: %s", job.id, exc)
        if not self.draining:
            for job in [j for j in self.jobs.values() if j.state is JobState.PENDING]:
                await self._try_start(job)

    # -- queries ---------------------------------------------------------------------------------

    def get(self, job_id: str) -> Job:
        job = self.jobs.get(job_id)
        if job is None:
            raise Rejected(404, f"no job {job_id!r}")
        return job

    def device_users(self) -> dict[tuple[str, str], str]:
        """(agent id, device id) -> id of the job holding it."""
        now = time.monotonic()
        return {(s.agent, s.device): j.id for j in self.jobs.values() if j.holds_resources(now)
                for s in j.nodes.values() if s.device}

    async def wait_until(self, predicate: Callable[[], bool], timeout_s: float) -> bool:
        """Wait until `predicate()` holds after some change, at most `timeout_s`; returns whether it holds."""
        try:
            async with asyncio.timeout(timeout_s):
                while not predicate():
                    await self._changed.wait()
        except TimeoutError:
            pass
        return predicate()

    def set_state(self, job: Job, state: JobState, reason: str, detail: str = "") -> None:
        self._set_state(job, state, reason, detail)

    def _set_state(self, job: Job, state: JobState, reason: str, detail: str = "") -> None:
        """Every job state change goes through here: it is an event for watchers and a row of history."""
        job.state, job.reason = state, reason
        self._changed_jobs.add(job.id)
        self._save(job, history=True)
        said = reason or detail
        self.event_log.emit("job_state", f"job {job.id} {state}" + (f": {said}" if said else ""), job=job.id,
                         state=str(state))
        self._touch()

    def _save(self, job: Job, history: bool = False) -> None:
        if self.store is not None:
            self.store.save_job(job.record())
            if history:
                self.store.add_state(job.id, str(job.state), job.reason)

    # -- start-up --------------------------------------------------------------------------------

    def restore(self, records: list[JobRecord]) -> None:
        """Load the database's jobs; live ones wait for their agents to register again (adoption)."""
        now = time.monotonic()
        for rec in records:
            try:
                job = self._rebuild(rec)
            except (ConfigError, KeyError, ValueError, TypeError) as exc:
                # Its processes, if any, are stopped as unknown when their agent registers.
                log.error("job %s in the database cannot be rebuilt (%s: %s); dropped", rec.id, type(exc).__name__, exc)
                continue
            if job.state in LIVE:
                job.awaiting = set(job.agents)
                job.adopt_deadline = now + self.cfg.adopt_timeout_s
                job.deadline = now + (self.cfg.ready_timeout_s if job.state is JobState.DEPLOYING
                                      else self.cfg.stop_grace_s)
                if job.state in SERVING:
                    job.deadline = float("inf")
            elif not job.drained:
                job.deadline = now + self.cfg.adopt_timeout_s  # its processes may still hold ports
            self.jobs[job.id] = job
        live = [j.id for j in self.jobs.values() if j.awaiting]
        if self.jobs:
            log.info("restored %d job(s) from the database; waiting for the agents of %d live one(s)%s",
                     len(self.jobs), len(live), f": {', '.join(live)}" if live else "")

    def _rebuild(self, rec: JobRecord) -> Job:
        source = JobSource(rec.file_text, rec.file_name, rec.name_override)
        cfg = source.parse()
        cfg = check_model(cfg, rec.unit_count, (cfg.model.source.removeprefix("builtin:"),))
        weights = tuple(rec.unit_weights)
        job = Job(rec.id, cfg, weights, stage_ranges(cfg, weights), rec.created, source, JobState(rec.state),
                  rec.reason, plan_from_dict(rec.plan) if rec.plan is not None else None,
                  {n: NodeStatus(**d) for n, d in rec.nodes.items()},
                  {a: tuple(p) for a, p in rec.ports.items()}, rec.dispatcher_agent, rec.dispatcher_port,
                  rec.service_token)
        return job

    # -- live scaling (controller/scaling.py) -----------------------------------------------------

    async def scale(self, job_id: str, stage: int | None, replicas: int) -> Job:
        from infscaled.controller.scaling import scale

        return await scale(self, job_id, stage, replicas)

    def persist(self, job: Job) -> None:
        self._save(job)

    def touch(self) -> None:
        self._touch()

    async def fail(self, job: Job, reason: str) -> None:
        await self._fail(job, reason)

    def _touch(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()
        self._wake.set()


def _plan_device(device_id: str) -> str:
    """An agent's device id as a worker's torch device: "cpu:3" -> "cpu", "cuda:1" stays."""
    return "cpu" if device_kind(device_id) == "cpu" else device_id


def _new_id(name: str, taken: dict[str, Job]) -> str:
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.")[:48] or "job"
    while True:
        job_id = f"{stem}-{secrets.token_hex(3)}"
        if job_id not in taken:
            return job_id
