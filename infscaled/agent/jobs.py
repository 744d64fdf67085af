"""The agent's jobs: Deploy starts processes, StopJob stops them, Inspect builds a skeleton.

Each deployed job is one `WorkerGroup` (stage workers, plus the dispatcher service when
"dispatcher" is among the nodes). Its supervisor thread reports READY and exits through
`loop.call_soon_threadsafe`, and every change is posted to the controller as a WorkerState:
starting -> ready -> exited (clean, or stopped) | failed (with the reason).

Processes are spawned on the event loop's thread: a child's PR_SET_PDEATHSIG fires when the
thread that spawned it ends, so it must be the long-lived loop thread, not a pool thread.
Stopping joins processes, so it runs in a thread (asyncio.to_thread). Slow work (stops,
inspects) runs as tasks of the agent's TaskGroup; each catches and reports its own errors.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from infscaled.agent.config import AgentConfig
from infscaled.config.source import roots_problem, under_roots
from infscaled.errors import InfscaledError
from infscaled.protocol.control import DispatcherStats, StageStats
from infscaled.protocol.messages import (
    ChangeTopology,
    Deploy,
    ErrorMsg,
    Inspect,
    InspectResult,
    Message,
    Metrics,
    RunningWorker,
    StopJob,
    WorkerState,
)
from infscaled.protocol.plan import DISPATCHER, JobPlan, Node, plan_from_dict
from infscaled.worker.entry import WorkerSpec, worker_main
from infscaled.worker.group import Member, WorkerGroup
from infscaled.worker.inspect import inspect_in_subprocess
from infscaled.worker.service import ServiceSpec, dispatcher_main

log = logging.getLogger(__name__)

STARTING, READY, EXITED, FAILED = "starting", "ready", "exited", "failed"


class DeployError(InfscaledError):
    """A Deploy this agent cannot carry out (malformed plan, unknown node, job already here)."""


def source_refused(cfg: AgentConfig, source: str) -> str | None:
    """Why this agent will not build `source`, or None."""
    if source.startswith("python:") and not cfg.allow_python_sources:
        return (f"model.source {source!r}: this agent does not run python: model sources (they import and run "
                "code on its host); start it with --allow-python-sources to allow them")
    # The controller sends model directories as absolute paths; Hugging Face ids never start with "/".
    if cfg.model_roots is not None and source.startswith("/") and not under_roots(Path(source), cfg.model_roots):
        return f"model.source {source!r}: {roots_problem(cfg.model_roots).replace('controller', 'agent')}"
    return None


@dataclass
class _Job:
    job_id: str
    group: WorkerGroup
    states: dict[Node, WorkerState] = field(default_factory=dict)
    stopping: bool = False
    stopped: asyncio.Event = field(default_factory=asyncio.Event)
    # The latest stats per node, sent on by `metrics_forever`; `fresh` says something new arrived.
    stages: dict[Node, StageStats] = field(default_factory=dict)
    dispatcher: DispatcherStats | None = None
    fresh: bool = False
    recovers: bool = False  # the controller replaces lost members: keep the group when all exited


class JobManager:
    def __init__(self, cfg: AgentConfig, tg: asyncio.TaskGroup, post: Callable[[Message], None]) -> None:
        self.cfg = cfg
        self._tg = tg
        self.post = post
        self._loop = asyncio.get_running_loop()
        self.jobs: dict[str, _Job] = {}
        self._inspects: set[asyncio.Task[None]] = set()
        self._inspect_slots = asyncio.Semaphore(cfg.max_inspections)
        self.closing = False  # set by stop_all: no new processes from then on

    # -- controller messages (on the loop thread) ------------------------------------------------

    def handle(self, msg: Message) -> None:
        if isinstance(msg, Deploy):
            try:
                self.deploy(msg)
            except DeployError as exc:
                log.error("%s", exc)
                self.post(ErrorMsg(str(exc), msg.type))
        elif isinstance(msg, ChangeTopology):
            try:
                self.change_topology(msg)
            except DeployError as exc:
                log.error("%s", exc)
                self.post(ErrorMsg(str(exc), msg.type))
        elif isinstance(msg, StopJob):
            job = self.jobs.get(msg.job_id)
            if job is None:
                log.info("stop_job %s: no such job here (already stopped?)", msg.job_id)
                return
            self._tg.create_task(self._stop(job, msg.reason or "stop_job"), name=f"stop-{msg.job_id}")
        elif isinstance(msg, Inspect):
            if self.closing:
                self.post(InspectResult(msg.request_id, False, error="the agent is shutting down"))
                return
            refused = source_refused(self.cfg, msg.source)
            if refused is not None:
                log.warning("%s", refused)
                self.post(InspectResult(msg.request_id, False, error=refused))
                return
            task = self._tg.create_task(self._inspect(msg), name=f"inspect-{msg.request_id}")
            self._inspects.add(task)
            task.add_done_callback(self._inspects.discard)
        else:
            raise DeployError(f"the agent does not handle {msg.type} messages")

    def deploy(self, msg: Deploy) -> None:
        if self.closing:
            raise DeployError(f"deploy {msg.job_id}: the agent is shutting down")
        if msg.job_id in self.jobs:
            raise DeployError(f"deploy {msg.job_id}: the job is already running on this agent")
        try:
            plan = plan_from_dict(msg.plan)
        except (KeyError, ValueError, TypeError) as exc:
            raise DeployError(f"deploy {msg.job_id}: malformed plan: {type(exc).__name__}: {exc}") from None
        refused = source_refused(self.cfg, plan.model_source)
        if refused is not None:
            raise DeployError(f"deploy {msg.job_id}: {refused}")
        if not msg.nodes:
            raise DeployError(f"deploy {msg.job_id}: no nodes listed")
        members = []
        for name in msg.nodes:
            try:
                node = Node.parse(name)
            except ValueError as exc:
                raise DeployError(f"deploy {msg.job_id}: {exc}") from None
            if node.is_dispatcher:
                if not 1 <= msg.dispatcher_port <= 65535:
                    raise DeployError(f"deploy {msg.job_id}: dispatcher_port {msg.dispatcher_port} outside 1..65535")
                if not msg.service_token:
                    raise DeployError(f"deploy {msg.job_id}: the dispatcher needs a service_token")
                spec: object = ServiceSpec(plan, msg.dispatcher_port, msg.service_token, msg.request_timeout_s,
                                           self.cfg.worker_log_level, msg.ready_timeout_s)
                members.append(Member(node, dispatcher_main, spec))
                continue
            if node not in {w.node for w in plan.workers}:
                known = ", ".join(["dispatcher", *(str(w.node) for w in plan.workers)])
                raise DeployError(f"deploy {msg.job_id}: node {name!r} is not in the plan; plan nodes: {known}")
            spec = WorkerSpec(plan, node, self.cfg.worker_log_level, msg.ready_timeout_s)
            members.append(Member(node, worker_main, spec))
        if len({m.node for m in members}) != len(members):
            raise DeployError(f"deploy {msg.job_id}: a node is listed twice in {msg.nodes}")
        self._start_group(msg.job_id, members, msg.ready_timeout_s, msg.nodes, plan)

    def _start_group(self, job_id: str, members: list[Member], ready_timeout_s: float, names: list[str],
                     plan: JobPlan) -> None:
        """A new group of processes for a job on this agent (a Deploy, or the first replicas a
        topology change places here). A member whose heartbeat stops is killed and reported failed."""
        group = WorkerGroup(
            job_id, members, ready_timeout_s, heartbeat_timeout_s=plan.recovery.heartbeat_timeout_s,
            on_ready=lambda node, ready: self._soon(self._report, job_id, node, READY, ready.pid, ""),
            on_stats=lambda node, stats: self._soon(self._stats, job_id, node, stats),
            on_exit=lambda node, code, reason: self._soon(self._exited, job_id, node, code, reason))
        job = _Job(job_id, group, recovers=plan.recovery.enabled)
        self.jobs[job_id] = job
        log.info("job %s: starting %s", job_id, ", ".join(names))
        try:
            group.start()  # on this thread, deliberately: see the module docstring
        except Exception as exc:  # noqa: BLE001 - spawning failed (fds, memory): undo and report
            # Each node failed, with the reason: the controller fails the job at once and says why.
            why = f"starting processes failed: {type(exc).__name__}: {exc}"
            for m in members:
                h = group.handles.get(m.node)
                self._report(job_id, m.node, FAILED, (h.process.pid or 0) if h is not None else 0, why)
            self._tg.create_task(self._stop(job, "start failed"), name=f"undo-{job_id}")
            raise DeployError(f"deploy {job_id}: {why}") from exc
        for node, h in group.handles.items():
            self._report(job_id, node, STARTING, h.process.pid or 0, "")

    def change_topology(self, msg: ChangeTopology) -> None:
        """A running job's new epoch: start the new nodes placed here, hand running ones their
        edge changes (a replica losing all its inputs drains and exits 0 by itself)."""
        if self.closing:
            raise DeployError(f"change_topology {msg.job_id}: the agent is shutting down")
        job = self.jobs.get(msg.job_id)
        if job is not None and job.stopping:
            raise DeployError(f"change_topology {msg.job_id}: the job is stopping on this agent")
        try:
            plan = plan_from_dict(msg.plan)
            starts = [Node.parse(n) for n in msg.start]
            updates = [(Node.parse(u.node), u.control(msg.epoch)) for u in msg.updates]
            stops = [Node.parse(n) for n in msg.stop]
        except (KeyError, ValueError, TypeError) as exc:
            raise DeployError(f"change_topology {msg.job_id}: malformed: {type(exc).__name__}: {exc}") from None
        for node in starts:
            if node.is_dispatcher:
                if not (1 <= msg.dispatcher_port <= 65535 and msg.service_token):
                    raise DeployError(f"change_topology {msg.job_id}: restarting the dispatcher needs its "
                                      "dispatcher_port and service_token")
            elif node not in {w.node for w in plan.workers}:
                raise DeployError(f"change_topology {msg.job_id}: cannot start {node}: not a stage replica of "
                                  f"epoch {msg.epoch}")
        for node in [n for n, _ in updates] + stops:
            if job is None or node not in job.group.handles:
                raise DeployError(f"change_topology {msg.job_id}: node {node} does not run here")
        if job is None:  # the job's first replicas on this agent
            if not starts:
                raise DeployError(f"change_topology {msg.job_id}: the job does not run on this agent")
            members = [self._member(plan, n, msg) for n in starts]
            self._start_group(msg.job_id, members, msg.ready_timeout_s, msg.start, plan)
            return
        for node in stops:
            job.group.retire(node, f"retired at epoch {msg.epoch}")
        for node in starts:
            try:
                job.group.add(self._member(plan, node, msg))
            except (RuntimeError, ValueError, OSError) as exc:
                self._report(msg.job_id, node, FAILED, 0, f"starting failed: {exc}")
                continue
            self._report(msg.job_id, node, STARTING, job.group.handles[node].process.pid or 0, "")
        for node, update in updates:
            try:
                job.group.send(node, update)
            except OSError as exc:
                log.warning("job %s: topology epoch %d not delivered to %s: %s", msg.job_id, msg.epoch, node, exc)
        log.info("job %s: epoch %d: started %s, updated %s", msg.job_id, msg.epoch,
                 ", ".join(msg.start) or "none", ", ".join(u.node for u in msg.updates) or "none")

    def _member(self, plan: JobPlan, node: Node, msg: ChangeTopology) -> Member:
        """A process a topology change starts here: a stage replica, or the dispatcher service again."""
        if node.is_dispatcher:
            return Member(node, dispatcher_main, ServiceSpec(plan, msg.dispatcher_port, msg.service_token,
                                                             msg.request_timeout_s, self.cfg.worker_log_level,
                                                             msg.ready_timeout_s))
        return Member(node, worker_main, WorkerSpec(plan, node, self.cfg.worker_log_level, msg.ready_timeout_s))

    async def _stop(self, job: _Job, reason: str) -> None:
        """Stop a job's processes: dispatcher first (it drains, STOP flows down the pipeline),
        then the workers; grace, SIGTERM, SIGKILL. Reports every node exited."""
        if job.stopping:
            await job.stopped.wait()
            return
        job.stopping = True
        try:
            log.info("job %s: stopping (%s)", job.job_id, reason)
            await asyncio.to_thread(job.group.stop, self.cfg.stop_grace_s, [DISPATCHER], reason)
            # stop() joined the supervisor, so its last reports are already queued on the loop.
            await asyncio.sleep(0)
            for node, h in job.group.handles.items():
                if job.states.get(node, None) is None or job.states[node].state not in (EXITED, FAILED):
                    self._report(job.job_id, node, EXITED, h.process.pid or 0, "")
        except Exception as exc:  # noqa: BLE001 - task boundary: report, never tear down the agent
            log.exception("job %s: stopping failed", job.job_id)
            self.post(ErrorMsg(f"stop_job {job.job_id}: {type(exc).__name__}: {exc}", "stop_job"))
        finally:
            self.jobs.pop(job.job_id, None)
            job.stopped.set()

    async def stop_all(self) -> None:
        """Stop every job (concurrently); the agent's shutdown, before its link closes."""
        self.closing = True
        for task in list(self._inspects):
            task.cancel()
        if self.jobs:
            async with asyncio.TaskGroup() as tg:
                for job in list(self.jobs.values()):
                    tg.create_task(self._stop(job, "agent shutting down"))

    async def _inspect(self, msg: Inspect) -> None:
        try:
            async with self._inspect_slots:
                outcome = await inspect_in_subprocess(msg.source, self.cfg.inspect_timeout_s)
            result = InspectResult(msg.request_id, outcome.ok, outcome.unit_count, outcome.unit_weights,
                                   outcome.error)
        except Exception as exc:  # noqa: BLE001 - task boundary: the controller gets an answer
            log.exception("inspect %s failed", msg.source)
            result = InspectResult(msg.request_id, False, error=f"inspect failed: {type(exc).__name__}: {exc}")
        self.post(result)

    # -- worker events (supervisor thread -> loop thread) ----------------------------------------

    def _soon(self, callback: Callable[..., None], *args: object) -> None:
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:
            log.info("event loop closed; dropping a worker report %s", args)

    def _exited(self, job_id: str, node: Node, code: int | None, reason: str) -> None:
        job = self.jobs.get(job_id)
        pid = (job.group.handles[node].process.pid or 0) if job is not None else 0
        self._report(job_id, node, FAILED if reason else EXITED, pid, reason)
        if job is not None and not job.stopping and job.group.all_exited and not job.recovers:
            # Nothing left running: release the group (pipes, supervisor) and forget the job.
            self._tg.create_task(self._stop(job, "all processes exited"), name=f"reap-{job_id}")

    def _stats(self, job_id: str, node: Node, stats: StageStats | DispatcherStats) -> None:
        job = self.jobs.get(job_id)
        if job is None:
            return
        if isinstance(stats, DispatcherStats):
            job.dispatcher = stats
        elif node.is_dispatcher:
            return  # the service's final StageStats only repeats its DispatcherStats counters
        else:
            job.stages[node] = stats
        job.fresh = True

    async def metrics_forever(self) -> None:
        """Every metrics_interval_s, one Metrics per job whose stats changed (the agent's task)."""
        while True:
            await asyncio.sleep(self.cfg.metrics_interval_s)
            for job in list(self.jobs.values()):
                if job.fresh:
                    job.fresh = False
                    stages = [job.stages[n] for n in sorted(job.stages, key=str)]
                    self.post(Metrics(job.job_id, stages, job.dispatcher))

    def _report(self, job_id: str, node: Node, state: str, pid: int, reason: str) -> None:
        msg = WorkerState(job_id, str(node), state, pid, reason)
        job = self.jobs.get(job_id)
        if job is not None:
            job.states[node] = msg
        (log.error if state == FAILED else log.info)("job %s: %s %s%s", job_id, node, state,
                                                       f": {reason}" if reason else "")
        self.post(msg)

    # -- views -----------------------------------------------------------------------------------

    def snapshot(self) -> list[WorkerState]:
        """The current state of every node of every job here (resent on reconnect)."""
        return [s for job in self.jobs.values() for s in job.states.values()]

    def running(self) -> list[RunningWorker]:
        """The processes serving now (listed in Register: a restarted controller adopts them)."""
        return [RunningWorker(job.job_id, str(node), s.state, s.pid) for job in self.jobs.values()
                if not job.stopping for node, s in job.states.items() if s.state in (STARTING, READY)]

    async def orphaned(self, reason: str) -> None:
        """Stop every job: the controller has been unreachable for the whole grace period."""
        jobs = [job for job in self.jobs.values() if not job.stopping]
        if jobs:
            log.warning("stopping job(s) %s: %s", ", ".join(j.job_id for j in jobs), reason)
            async with asyncio.TaskGroup() as tg:
                for job in jobs:
                    tg.create_task(self._stop(job, reason))

    def workers_alive(self) -> int:
        return sum(job.group.alive() for job in self.jobs.values())
