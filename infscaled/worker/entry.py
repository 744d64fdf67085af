"""Entry point of a stage worker process (a fork of the supervisor's warm server: worker/start.py).

Life cycle: build the stage (only its own weights) -> connect every edge -> READY on the
control pipe -> serve until STOP -> final stats -> exit 0. Any failure is reported on
the control pipe as WorkerFailed before exiting non-zero, so the supervisor always
knows why. The worker dies with its supervisor: SIGINT is ignored (Ctrl-C belongs to
the launcher), SIGTERM exits, the parent's death delivers SIGTERM (PR_SET_PDEATHSIG),
and end-of-file on the control pipe exits too.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from infscaled.errors import WireError
from infscaled.protocol import control
from infscaled.protocol.plan import JobPlan, Node
from infscaled.worker.start import PR_SET_PDEATHSIG, prctl

METRICS_ENV = "INFSCALED_METRICS"  # "off": stage workers keep no live metrics (benchmarks compare)


def metrics_enabled() -> bool:
    value = os.environ.get(METRICS_ENV, "on").strip().lower()
    if value not in ("on", "off"):
        raise ValueError(f"{METRICS_ENV}={value!r}: expected 'on' or 'off'")
    return value == "on"


# GIL switch interval of generation workers (see _serve).
GEN_SWITCH_INTERVAL_S = 0.0002

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker process is told at spawn time: the job's plan and which node it is."""

    plan: JobPlan
    node: Node
    log_level: int = logging.WARNING
    # Peers build their stages before joining an edge, so connecting may wait for the slowest
    # build: this is the supervisor's READY timeout, not the (steady-state) edge timeout.
    connect_timeout_s: float = 300.0


def _die_with_parent() -> None:
    prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class EngineBox:
    """The engine once built; topology updates that arrive before it wait here (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._engine: Any = None
        self._pending: list[Any] = []

    def update(self, update: Any) -> None:
        with self._lock:
            if self._engine is None:
                self._pending.append(update)
                return
        self._engine.update(update)

    def put(self, engine: Any) -> None:
        with self._lock:
            self._engine, pending = engine, self._pending
            self._pending = []
        for update in pending:
            engine.update(update)


def _watch_control(conn: Connection, node: str, engine_box: EngineBox) -> None:
    """Control pipe reader: StopWorker exits at once; UpdateTopology goes to the engine once it
    exists (a new replica is spawned with its epoch's plan, so nothing is missed before); the
    supervisor's disappearance (pipe closed) exits."""
    try:
        while True:
            try:
                msg = control.decode(conn.recv_bytes())
            except WireError as exc:
                log.warning("worker %s: ignoring a malformed control message: %s", node, exc)
                continue
            if isinstance(msg, control.StopWorker):
                log.warning("worker %s: stop requested (%s)", node, msg.reason)
                os._exit(3)
            if isinstance(msg, control.UpdateTopology):
                try:
                    engine_box.update(msg.update())
                except ValueError as exc:
                    log.warning("worker %s: malformed topology update: %s", node, exc)
    except (EOFError, OSError):
        os._exit(4)


def start_heartbeat(node: str, send: Callable[[control.ControlMessage], None]) -> None:
    """Tell the supervisor this process is alive, from a thread of its own (so a long compute
    does not count as a hang, but a stopped or deadlocked process does: worker/group.py)."""
    def beat() -> None:
        try:
            while True:
                send(control.Heartbeat(node))
                time.sleep(control.HEARTBEAT_INTERVAL_S)
        except OSError:
            return  # the supervisor is gone; the control reader exits the process

    threading.Thread(target=beat, daemon=True, name="heartbeat").start()


def worker_main(spec: WorkerSpec, conn: Connection) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The default action, not a Python handler: it works even while the main thread is
    # blocked inside a C++ call (a gloo wait), where a Python handler would never run.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _die_with_parent()
    node = str(spec.node)
    # Log lines say which job and stage replica they come from.
    prefix = f"worker {spec.plan.job}/{node}"
    logging.basicConfig(level=spec.log_level, format=f"%(asctime)s {prefix} %(levelname)s %(message)s")
    send_lock = threading.Lock()

    def send(msg: control.ControlMessage) -> None:
        with send_lock:
            conn.send_bytes(control.encode(msg))

    engine_box = EngineBox()  # the control reader hands it topology updates
    threading.Thread(target=_watch_control, args=(conn, node, engine_box), daemon=True, name="control").start()
    start_heartbeat(node, send)
    try:
        _serve(spec, send, engine_box)
    except BaseException as exc:  # noqa: BLE001 - process boundary: report why, then exit non-zero
        log.exception("worker %s failed", node)
        try:
            send(control.WorkerFailed(node, f"{type(exc).__name__}: {exc}"))
        except OSError:
            pass
        os._exit(1)
    os._exit(0)


def _serve(spec: WorkerSpec, send: Callable[[control.ControlMessage], None], engine_box: EngineBox) -> None:
    # torch is imported here, in the child, so the supervisor's import cost stays its own.
    import torch

    from infscaled.engine.core import Engine, EngineSettings
    from infscaled.engine.program import Program
    from infscaled.models.sources import resolve
    from infscaled.models.stage import build_stage
    from infscaled.worker.nccl import transport_chooser

    torch.set_num_threads(max(1, int(os.environ.get("INFSCALED_WORKER_THREADS", "1"))))
    if spec.plan.dtype == "float32":
        # float32 means float32: cuDNN would otherwise run convolutions in TF32 on Ampere and
        # later GPUs (seen on H200: ResNet logits off by 1e-2 from the float32 reference).
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    plan, me = spec.plan, spec.node
    worker = plan.worker(me)
    stage_plan = plan.stages[me.stage]
    if worker.device.startswith("cuda"):
        torch.cuda.set_device(torch.device(worker.device))  # NCCL and the default streams use it
    started = time.monotonic()
    resolved = resolve(plan.model_source)
    stage = build_stage(resolved, stage_plan.first_unit, stage_plan.last_unit,
                        worker.device, plan.dtype, plan.seed,
                        compile_layers=plan.compile_layers and worker.device.startswith("cuda"))
    load_s = time.monotonic() - started
    log.info("%s: stage of units %d..%d built on %s in %.1f s", me, stage_plan.first_unit, stage_plan.last_unit,
             worker.device, load_s)
    program: Program
    measure = metrics_enabled()
    if plan.generation is not None:
        from infscaled.engine.programs.generation import GenerationStage

        # A decode step is small: its latency is the sum of thread handoffs (receiver ->
        # compute -> sender, several per gloo message), and with the compute thread busy
        # launching kernels each handoff waits up to the GIL switch interval (5 ms by
        # default). Measured on 2 x H200: ~40 ms per hop at 5 ms.
        sys.setswitchinterval(GEN_SWITCH_INTERVAL_S)
        program = GenerationStage(stage, worker.device, plan.generation, len(plan.stages), plan.cuda_graphs)
        measure = True  # generation stages always report (KV use drives admission views)
    else:
        from infscaled.engine.programs.forward import ForwardStage
        from infscaled.worker.router import Router

        program = ForwardStage(stage, worker.device, Router(plan.policy, seed=plan.seed), plan.cuda_graphs,
                               plan.max_inflight)
    settings = EngineSettings(worker.host, spec.connect_timeout_s, plan.edge_timeout_s, measure=measure)
    report = lambda s: send(control.WorkerStatsReport(s))  # noqa: E731 - one line, two users
    engine = Engine(me, program, settings, transport_chooser(plan, me), worker.device,
                    on_stats=report if measure else None)
    engine.epoch = plan.epoch
    if plan.generation is not None:
        # Before the edges join (so before READY, and before any sequence can reach this stage):
        # the decode and prefill buckets' compilation and capture (generation/warmup.py).
        from infscaled.generation.warmup import warm_up
        from infscaled.models.meta import dtype_of

        assert isinstance(program, GenerationStage)
        warm_up(program.decoder, plan.generation.warmup_s, spec.connect_timeout_s - (time.monotonic() - started),
                resolved.family, dtype_of(plan.dtype), program.prefills)
    engine.on_edge_failed = lambda end, why: send(control.EdgeFailed(str(me), str(end.peer), end.key, why, end.epoch))
    connecting = time.monotonic()
    # Joined in the background: a peer that dies meanwhile (declared dead by the supervisor's next
    # epoch) does not hold this replica's READY up (runner/recovery.py replaces it meanwhile).
    engine.join(list(plan.in_edges(me)) + list(plan.out_edges(me)), lambda: send(control.WorkerReady(
        str(me), os.getpid(), worker.device, list(stage.param_names), sum(p.numel() for p in stage.parameters()),
        load_s, time.monotonic() - connecting)))
    engine_box.put(engine)
    stats = engine.run()
    send(control.WorkerDone(stats))
