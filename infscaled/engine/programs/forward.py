"""A forward stage: compute each micro-batch with the stage's units and route the result on.

The request table (`requests`: request id, rows) travels with every micro-batch unchanged.

CPU: compute on the engine's compute thread, route the result with the job's policy, then
acknowledge it on its in-edge (after handing the result on, so the blocking ack never delays
the send).

CUDA (engine/cuda.py has the stream contract): the compute thread only enqueues. It waits on
the compute stream for the input's `ready` event, runs the stage (through `StageGraphs`,
worker/graphs.py, when `cuda_graphs` is on: captured once per shape, then replayed) between two
timing events, gives the input buffers back to the pool with the `end` event (buffers an eager
output aliases stay with that output) and queues the result with `ready = end`. A completion
thread waits for each micro-batch's `end` in order, reads its GPU time, counts it and sends the
ack; an in-edge's STOP is acknowledged through the same queue, after every earlier ack.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any

import torch

from infscaled.engine.core import REQUESTS_KEY
from infscaled.engine.edges import EdgeEnd
from infscaled.engine.profile import StepTrace
from infscaled.engine.program import Program
from infscaled.models.stage import fuse_stage
from infscaled.protocol.control import StageStats
from infscaled.protocol.wire import DATA
from infscaled.worker.router import Router
from infscaled.worker.transport import ACK, Ack, Message

log = logging.getLogger(__name__)


class ForwardStage(Program):
    cuda_streams = True

    def __init__(self, stage: torch.nn.Module, device: str, router: Router, cuda_graphs: bool = True,
                 max_inflight: int = 2) -> None:
        super().__init__(router)
        # Decoder layers of Llama's shape run as the fused layer (models/families/fused_decode.py
        # prefill_step): q/k/v and gate/up as one product each, on CUDA the small operations as Triton kernels.
        fuse_stage(stage)
        self.stage = stage
        self.device = torch.device(device)
        self.cuda_graphs = cuda_graphs
        self.pool_per_key = max(4, max_inflight + 2)
        self.graphs: Any = None
        self._done: queue.Queue[Any] = queue.Queue()  # CUDA: completions in compute order; None ends
        self._completer: threading.Thread | None = None
        self._trace = StepTrace(30, 10)  # INFSCALED_PROFILE_DIR: engine/profile.py
        self._failed: BaseException | None = None

    def start(self) -> None:
        torch.set_grad_enabled(False)
        if self.engine.cuda is not None:
            from infscaled.worker.graphs import StageGraphs

            if self.cuda_graphs:
                self.graphs = StageGraphs(str(self.engine.node), self.stage, self.engine.cuda.compute)
            self._completer = threading.Thread(target=self._completions, name=f"{self.engine.node}-done",
                                               daemon=True)
            self._completer.start()

    def finish(self) -> None:
        if self._completer is not None:
            self._done.put(None)
            self._completer.join(30.0)
            self._completer = None

    def on_message(self, end: EdgeEnd, msg: Message) -> None:
        if self._failed is not None:
            raise self._failed
        with torch.inference_mode():
            if self.engine.cuda is not None:
                self._compute_cuda(end, msg)
            else:
                self._compute(end, msg)

    def on_input_stopped(self, end: EdgeEnd) -> None:
        if self.engine.cuda is not None:
            self._done.put(("stop", end))  # after the acks of everything computed before it
        else:
            self.engine.ack_stop(end)
        if self.inputs_done():
            self.engine.close_outputs()

    def _compute(self, end: EdgeEnd, msg: Message) -> None:
        requests = msg.tensors.pop(REQUESTS_KEY)
        act = {k: v.to(self.device, non_blocking=True) for k, v in msg.tensors.items()}
        start = time.perf_counter()
        out = self.stage(act)
        elapsed = time.perf_counter() - start
        samples = int(requests[:, 1].sum())
        self.engine.computed(samples, elapsed)
        tensors = {REQUESTS_KEY: requests, **{k: v.cpu() for k, v in out.items()}}
        self.forward(Message(DATA, msg.mb_id, msg.route_key, tensors))
        self.engine.passed_on()
        self.engine.ack(end, Ack(ACK, msg.mb_id, samples, int(elapsed * 1e6)))

    def _compute_cuda(self, end: EdgeEnd, msg: Message) -> None:
        """Enqueue one micro-batch on the compute stream; never waits for the GPU."""
        cuda = self.engine.cuda
        self._trace.step(self.engine.node, self.device)
        requests = msg.tensors.pop(REQUESTS_KEY)
        act = msg.tensors
        stream = cuda.compute
        with torch.cuda.stream(stream):
            if msg.ready is not None:
                stream.wait_event(msg.ready)
            for t in act.values():
                if t.is_cuda:
                    t.record_stream(stream)
            start = torch.cuda.Event(enable_timing=True)
            done = torch.cuda.Event(enable_timing=True, blocking=True)
            start.record(stream)
            out = self.graphs.run(act) if self.graphs is not None else self.stage(act)
            done.record(stream)
        # An eager output may be an input passed through: its buffer stays with it. Replayed outputs
        # are clones, so with a graph every input buffer goes back.
        aliased = {t.untyped_storage().data_ptr() for t in out.values() if t.is_cuda}
        for buf in msg.buffers:
            if buf.untyped_storage().data_ptr() not in aliased:
                cuda.pool.give(buf, done)
        samples = int(requests[:, 1].sum())  # host tensor: no device sync
        self.forward(Message(DATA, msg.mb_id, msg.route_key, {REQUESTS_KEY: requests, **out}, ready=done))
        self.engine.passed_on()
        self._done.put((start, done, end, msg.mb_id, samples))

    def _completions(self) -> None:
        """CUDA: in compute order, wait for each micro-batch's end event, then count and ack it."""
        try:
            while True:
                item = self._done.get()
                if item is None:
                    return
                if item[0] == "stop":
                    self.engine.ack_stop(item[1])
                    continue
                start, done, end, mb_id, samples = item
                done.synchronize()
                elapsed = start.elapsed_time(done) / 1e3
                self.engine.computed(samples, elapsed)
                self.engine.ack(end, Ack(ACK, mb_id, samples, int(elapsed * 1e6)))
        except BaseException as exc:  # noqa: BLE001 - thread boundary: the compute thread raises it
            self._failed = exc
            self.engine.wake()

    def poll(self, now: float) -> float | None:
        if self._failed is not None:
            raise self._failed
        return None

    def stats(self, base: StageStats) -> StageStats:
        if self.graphs is None:
            return base
        from dataclasses import replace

        return replace(base, graph_replays=self.graphs.replays)
