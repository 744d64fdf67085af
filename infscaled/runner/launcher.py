"""Run a job on this host: plan it, spawn its stage workers, host its dispatcher, supervise.

`LocalJob` is a context manager. Start-up: validate the job against the real model
(unit count) -> plan (partition, graph, placement, one port per edge) -> spawn one
worker process per stage replica -> connect the dispatcher's edges while the workers
build -> wait for every READY. Shutdown is the reverse: drain the dispatcher (STOP flows
down the pipeline), wait for each worker to finish, then SIGTERM / SIGKILL whatever is
left. A worker that exits unexpectedly (or stops answering its heartbeat) is replaced while the
job serves (runner/recovery.py, `[recovery]`); with recovery off, or once its attempts are
spent, the job fails at once with the reasons. Spawning and supervising the workers is
`worker.group.WorkerGroup`'s job, shared with the agent daemon.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field, replace

import torch

from infscaled.config import JobConfig, check_against_model, check_builtin
from infscaled.dispatch.batching import Batching
from infscaled.dispatch.sequences import Sequences
from infscaled.errors import ConfigError, InfscaledError, ModelError
from infscaled.models.base import InputSpec
from infscaled.models.builtins import BUILTIN_NAMES
from infscaled.models.meta import dtype_of
from infscaled.models.sources import ResolvedModel, resolve
from infscaled.models.stage import skeleton
from infscaled.planning.job import plan_job, ports_needed
from infscaled.planning.placement import place
from infscaled.planning.ports import free_ports
from infscaled.planning.scale import apply_scale, scale_shape
from infscaled.protocol.control import UpdateTopology, WorkerReady
from infscaled.protocol.plan import JobPlan, Node
from infscaled.protocol.topology import TopologyUpdate
from infscaled.runner.recovery import Recoverer
from infscaled.worker.entry import WorkerSpec, worker_main
from infscaled.worker.group import Member, WorkerGroup, WorkerHandle
from infscaled.worker.service import dispatcher_engine

log = logging.getLogger(__name__)

# How long a broken edge waits for the supervisor to name the worker that caused it.
EXPLAIN_WAIT_S = 3.0


@dataclass(frozen=True)
class Prepared:
    """A job checked against its model and planned; nothing started yet."""

    cfg: JobConfig
    resolved: ResolvedModel
    spec: InputSpec
    plan: JobPlan
    unit_count: int


def prepare(cfg: JobConfig) -> Prepared:
    """Everything that can fail on bad input fails here, before any process starts."""
    if cfg.model.source.startswith("builtin:"):
        check_builtin(cfg, BUILTIN_NAMES)
    try:
        resolved = resolve(cfg.model.source)
        sk = skeleton(resolved)
    except ModelError as exc:
        raise ConfigError(f"{cfg.path}: model.source = {cfg.model.source!r}: {exc}") from exc
    cfg = check_against_model(cfg, sk.unit_count)  # the builtin name was checked above
    cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    devices = place(cfg.placement.devices, cfg.pipeline.replicas, available_cuda=cuda)
    spec = sk.family.input_spec()
    if spec.kind == "image" and cfg.workload.image_size:
        spec = InputSpec("image", (spec.sample_shape[0], cfg.workload.image_size, cfg.workload.image_size))
    host = cfg.placement.host
    plan = plan_job(cfg, sk.unit_weights(), devices, free_ports(ports_needed(cfg), host), host)
    return Prepared(cfg, resolved, spec, plan, sk.unit_count)


@dataclass
class JobState:
    """What the supervisor knows, for summaries and tests."""

    workers: dict[Node, WorkerHandle] = field(default_factory=dict)
    failure: str | None = None


@dataclass(frozen=True)
class ScaleResult:
    """What one scaling call did (seconds are wall time from the call)."""

    plan: JobPlan
    added: tuple[Node, ...]
    removed: tuple[Node, ...]
    ready_s: float = 0.0  # until every added replica said READY (spawned, built its stage, joined its edges)
    load_s: float = 0.0  # the slowest added replica's weight load (inside ready_s)
    connect_s: float = 0.0  # the slowest added replica's edge joining (inside ready_s)


class LocalJob:
    def __init__(self, prepared: Prepared, ready_timeout_s: float = 300.0, log_level: int = logging.WARNING) -> None:
        self.prepared = prepared
        self.plan = prepared.plan
        self.ready_timeout_s = ready_timeout_s
        self.log_level = log_level
        self.dispatcher: Batching | Sequences | None = None
        self._closing = False
        self.topology_lock = threading.Lock()  # one topology change at a time (scaling, recovery)
        self.recoverer: Recoverer | None = None
        members = [self._member(self.plan, w.node) for w in self.plan.workers]
        self.group = WorkerGroup(self.plan.job, members, ready_timeout_s, on_exit=self._on_exit,
                                 on_ready=self._on_ready, heartbeat_timeout_s=self.plan.recovery.heartbeat_timeout_s)
        # The group fills in the handles as it spawns; the state shares its dict.
        self.state = JobState(workers=self.group.handles)

    # -- lifecycle -------------------------------------------------------------------------------

    def __enter__(self) -> LocalJob:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def closing(self) -> bool:
        return self._closing

    def _member(self, plan: JobPlan, node: Node) -> Member:
        return Member(node, worker_main, WorkerSpec(plan, node, self.log_level, self.ready_timeout_s))

    def start(self) -> None:
        self.group.start()
        cfg = self.prepared.cfg
        recovery = self.plan.recovery.enabled
        front: Batching | Sequences
        if self.plan.generation is not None:
            front = Sequences(self.plan.generation, request_timeout_s=cfg.workload.request_timeout_s,
                              on_broken=self._edge_broke, recovery=recovery)
        else:
            front = Batching(self.prepared.spec, dtype_of(self.plan.dtype), self.plan,
                             request_timeout_s=cfg.workload.request_timeout_s, on_broken=self._edge_broke,
                             recovery=recovery)
        self._connect_dispatcher(front)
        if not self.group.wait_ready(self.ready_timeout_s):
            raise InfscaledError(self.group.failure or f"workers not ready within {self.ready_timeout_s:g} s")
        self.dispatcher = front
        # From here on a lost worker is replaced (with recovery on), not a reason to fail.
        self.recoverer = Recoverer(self, self.group, self._member, self._fail)
        self.group.tolerate_exits = recovery
        front.run_engine()
        if self.group.failure:  # a worker may have died between READY and now
            front.fail(self.group.failure)

    def _connect_dispatcher(self, front: Batching | Sequences) -> None:
        # Connecting blocks until each peer worker has built its stage and joined, so a
        # worker that dies while building must abort the wait: run it in a thread and
        # give up when the supervisor reports a failure.
        error: list[BaseException] = []

        def connect() -> None:
            try:
                dispatcher_engine(self.plan, front, self.ready_timeout_s)
            except BaseException as exc:  # noqa: BLE001 - thread boundary
                error.append(exc)

        t = threading.Thread(target=connect, name="dispatcher-connect", daemon=True)
        t.start()
        while t.is_alive():
            t.join(0.1)
            if self.group.failure:
                raise InfscaledError(self.group.failure)
        if error:
            raise InfscaledError(self.group.failure or f"dispatcher could not connect: {error[0]}")

    def submit(self, x: torch.Tensor) -> Future[torch.Tensor]:
        assert isinstance(self.dispatcher, Batching), "job not started, or a generation job (use generator)"
        return self.dispatcher.submit(x)

    @property
    def generator(self) -> Sequences:
        """A generation job's dispatcher (submit sequences, cancel them)."""
        assert isinstance(self.dispatcher, Sequences), "job not started, or not a generation job"
        return self.dispatcher

    def scale(self, stage: int | None, replicas: int, wait: bool = True) -> ScaleResult:
        """Scale `stage` (a forward job; None: a generation job's chains) to `replicas` while
        serving (planning/scale.py). New replicas run on the device of the stage's first replica.
        With `wait`, returns once every added replica is READY (InfscaledError if one fails)."""
        with self.topology_lock:
            started = time.monotonic()
            plan = self.plan
            shape = scale_shape(plan, stage, replicas)
            if not shape.changed:
                return ScaleResult(plan, (), ())
            devices = {n: plan.worker(plan.nodes(n.stage)[0]).device for n in shape.added}
            ports = free_ports(len(shape.new_edges), plan.dispatcher_host)
            change = apply_scale(plan, shape, devices, ports)
            self.plan = change.plan
            for w in change.added:
                self.group.add(self._member(change.plan, w.node))
            assert self.dispatcher is not None
            for node, update in change.updates.items():
                if node.is_dispatcher:
                    self.dispatcher.engine.update(update)
                else:
                    self.group.send(node, UpdateTopology.of(update))
            log.info("job %s: epoch %d: +%s -%s", plan.job, change.plan.epoch,
                     ",".join(map(str, shape.added)) or "0", ",".join(map(str, shape.removed)) or "0")
            result = ScaleResult(change.plan, shape.added, shape.removed)
            if not wait or not shape.added:
                return result
            if not self.group.wait_nodes_ready(shape.added, self.ready_timeout_s):
                raise InfscaledError(self.group.failure or f"added replica(s) {', '.join(map(str, shape.added))} "
                                     f"not ready within {self.ready_timeout_s:g} s")
            ready = [r for n in shape.added if (r := self.group.handles[n].ready) is not None]
            return replace(result, ready_s=time.monotonic() - started, load_s=max(r.load_s for r in ready),
                           connect_s=max(r.connect_s for r in ready))

    def stop(self, grace_s: float = 10.0) -> None:
        """Drain and stop; idempotent. Never leaves a worker process behind."""
        if self._closing:
            return
        self._closing = True
        if self.recoverer is not None:
            self.recoverer.close()
        failed = bool(self.group.failure or self.state.failure or (self.dispatcher and self.dispatcher.failure))
        if self.dispatcher is not None and not failed:
            self.dispatcher.close(timeout_s=grace_s * 3)
        # A failed job's workers have nothing to drain (and a broken edge no longer ends a worker by
        # itself): every one is told to stop at once.
        self.group.stop(grace_s, first=list(self.group.handles) if failed else ())
        if self.dispatcher is not None and not self.dispatcher.wait_ended(0):
            self.dispatcher.engine.abort()

    def _edge_broke(self, detail: str) -> None:
        """An edge of the dispatcher broke. A peer's death is its usual cause, and the supervisor
        names it (worker, pid, exit code, its last words) a moment later: prefer that reason."""
        reason = self.group.wait_failure(EXPLAIN_WAIT_S) or detail
        assert self.dispatcher is not None
        self.dispatcher.fail(reason)

    def dispatcher_update(self, update: TopologyUpdate) -> None:
        assert self.dispatcher is not None
        self.dispatcher.engine.update(update)

    def _on_ready(self, node: Node, ready: WorkerReady) -> None:
        if self.recoverer is not None:
            self.recoverer.ready(node)

    def _on_exit(self, node: Node, code: int | None, reason: str) -> None:
        """Supervisor thread: a worker is gone. Once serving, an unexpected exit is a loss to
        recover from (runner/recovery.py decides); before that, or with recovery off, it fails
        the job at once."""
        if not reason:
            return
        if self.recoverer is not None and self.plan.recovery.enabled and not self._closing:
            self.recoverer.lost(node, reason)
            return
        self._fail(reason)

    def _fail(self, reason: str) -> None:
        if self.state.failure is None:
            self.state.failure = reason
        if self.group.failure is None:
            self.group.failure = reason
        if self.dispatcher is not None:
            self.dispatcher.fail(reason)
