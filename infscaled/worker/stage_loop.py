"""The steady-state loop of one stage replica.

Thread contract (CPU path; the GPU path adds CUDA streams inside the same shape):
- one *receiver* thread per in-edge: blocks in `Edge.recv`, puts messages on the inbox;
- the *compute* thread (the caller of `run`): takes from the inbox, runs the stage
  under `torch.inference_mode()`, acks the micro-batch on its in-edge, puts the result
  on the outbox;
- one *sender* thread: takes from the outbox, picks an out-edge with the forwarding
  policy, sends;
- one *ack* thread per out-edge: receives the downstream replica's acks, which keep the
  router's outstanding counts and throughput estimates true.
So receiving micro-batch k+1 and sending k-1 never wait for computing k. The inbox and
outbox are bounded: when downstream is slow, the sender blocks, the outbox fills, the
compute thread blocks, the inbox fills, and the receivers stop reading: back-pressure
reaches the dispatcher, which caps micro-batches in flight anyway.

Shutdown is a STOP that flows down the data plane: a replica finishes after STOP has
arrived on every in-edge and everything before it was computed and sent; it then sends
STOP on every out-edge and waits for each to be acknowledged.

CUDA stream contract (a stage on a CUDA device; the threads above stay as they are):
- streams, all owned by this stage on its device: `recv{i}` (one per in-edge), `compute`,
  `send`; the caller's default stream carries no data-plane work.
- receive (receiver thread i, on `recv{i}`): an NCCL in-edge receives device tensors into
  buffers of the stage's `BufferPool` (a reused buffer is first ordered after its previous
  reader's event); a gloo in-edge (from the dispatcher) lands in pinned host memory and is
  copied into pool buffers with non-blocking copies. Either way an event `ready` is recorded
  on `recv{i}` after the data, and travels with the message.
- compute (compute thread, on `compute`): `compute.wait_event(ready)`, run the stage between
  two timing events `start` / `end`, hand the input buffers back to the pool with `end`
  (buffers an output aliases stay with that output), and put the result on the outbox
  with `ready = end`. The compute thread never waits for the GPU, so it enqueues micro-batch
  k+1 while k still runs; the receive of k+1 and the send of k-1 run on their own streams.
  With CUDA graphs on (job option `pipeline.cuda_graphs`, the default) the stage runs through
  `StageGraphs` (worker/graphs.py, whose docstring is its contract): eagerly, or by copying the
  inputs into a captured graph's static inputs, replaying it and cloning its static outputs,
  all on `compute` between the same two events (so `compute_s` stays GPU time). Replayed
  outputs are clones allocated on `compute`: none aliases an input buffer, so every input
  buffer goes back to the pool. A capture (once per shape) records on a stage-owned
  `capture` stream that waits for `compute` before and that `compute` waits for after; it
  syncs the device once (torch.cuda.graph).
- send (sender thread, on `send`): the sender thread first waits on the host for `ready` (the
  compute `end` event, a blocking-sync event: the thread sleeps) so that the header, and with
  it the peer's NCCL receive kernel, goes out only when the data exists (issued at enqueue
  time, the receive kernel would occupy SMs of the peer, spinning, for a whole compute time);
  then `send.wait_event(ready)` and NCCL sends device to device, overlapping the next
  micro-batch's compute. To a gloo out-edge (the dispatcher) the outputs are copied into pinned
  host memory with non-blocking copies and the sender thread waits for that copy's event. The
  compute thread never waits: the GPU always has the next micro-batch queued.
- completion thread (CUDA only): waits for each micro-batch's `end` event in order, reads the
  GPU time between `start` and `end`, updates the stats and sends the ack. So acks are sent
  once the GPU finished the micro-batch, and `compute_s` on a GPU is GPU time between the
  stage's first and last kernel of a micro-batch (it includes launch gaps when the host is
  late, never the wait for the input to arrive); no host thread of the data path blocks
  on the device except this one and the sender (see send).
- host-side tensors: the request table and `attention_mask` (HOST_KEYS) stay in host memory
  (they ride the header channel: tiny, and models decide "nothing is padded" on the host
  without a device sync); units copy a mask to the device only when it masks something.
- every device tensor used on a stream other than the one that allocated it is
  `record_stream`-ed there, so the caching allocator never hands it out early.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from infscaled.protocol.control import EdgeRate, StageStats
from infscaled.protocol.window import EventWindow, NullWindow, mean, rate, span
from infscaled.protocol.wire import DATA, STOP
from infscaled.worker.router import Router
from infscaled.worker.transport import ACK, STOP_ACK, Ack, Edge, Message

if TYPE_CHECKING:
    from infscaled.worker.graphs import StageGraphs

log = logging.getLogger(__name__)

# Activation key of the request table [n, 2] (request id, rows); it rides along unchanged.
REQUESTS_KEY = "requests"
# Tensors a CUDA stage keeps in host memory (see the stream contract above).
HOST_KEYS = frozenset({REQUESTS_KEY, "attention_mask"})
# INFSCALED_PROFILE_DIR=DIR: a CUDA stage records a torch profiler trace of micro-batches
# PROFILE_FROM..PROFILE_FROM+PROFILE_COUNT-1 (steady state) to DIR/stage-<node>.json (Chrome trace).
PROFILE_ENV = "INFSCALED_PROFILE_DIR"
PROFILE_FROM, PROFILE_COUNT = 30, 10


@dataclass
class _Inbound:
    edge: int  # index into the in-edges
    msg: Message | None  # None: the edge delivered STOP
    error: BaseException | None = None


class StageLoop:
    def __init__(self, node: str, stage: torch.nn.Module, device: str, in_edges: list[Edge],
                 out_edges: list[Edge], router: Router, queue_depth: int,
                 on_stats: Callable[[StageStats], None] | None = None, stats_interval_s: float = 1.0,
                 measure: bool = True, cuda_graphs: bool = True) -> None:
        self.node = node
        self.cuda_graphs = cuda_graphs  # CUDA stages only: capture and replay the forward (worker/graphs.py)
        self.measure = measure  # False: no live-metrics bookkeeping at all (INFSCALED_METRICS=off)
        self.stage = stage
        self.device = torch.device(device)
        self.in_edges = in_edges
        self.out_edges = out_edges
        self.router = router
        self.inbox: queue.Queue[_Inbound] = queue.Queue(maxsize=queue_depth)
        self.outbox: queue.Queue[Message | None] = queue.Queue(maxsize=queue_depth)
        self.on_stats = on_stats
        self.stats_interval_s = stats_interval_s
        self._error: BaseException | None = None
        self._threads: list[threading.Thread] = []
        self._micro_batches = 0
        self._samples = 0
        self._busy_s = 0.0
        self._first_at: float | None = None
        # Windows for live metrics: plain clock reads around calls that block anyway, so they add
        # no host sync. Each is written by its own thread(s) and read by the stats path.
        window = EventWindow if measure else NullWindow
        self._computed = window()  # (t, samples, compute_s)
        self._received = window()  # (t, recv_wait_s, in-edge index, samples)
        self._sent = window()  # (t, send_s)
        self._inflight = 0  # received DATA not yet sent on; receivers and the sender update it
        self._inflight_lock = threading.Lock()
        self.graphs: StageGraphs | None = None  # CUDA stages with cuda_graphs on
        self.cuda = self.device.type == "cuda"
        if self.cuda:
            self._setup_cuda()

    def _setup_cuda(self) -> None:
        from infscaled.worker.graphs import StageGraphs
        from infscaled.worker.nccl import BufferPool

        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.recv_streams = [torch.cuda.Stream(self.device) for _ in self.in_edges]
        self.compute_stream = torch.cuda.Stream(self.device)
        self.send_stream = torch.cuda.Stream(self.device)
        self.pool = BufferPool(self.device, per_key=max(4, self.inbox.maxsize + 2))
        self.graphs = StageGraphs(self.node, self.stage, self.compute_stream) if self.cuda_graphs else None
        for edge, stream in zip(self.in_edges, self.recv_streams, strict=True):
            edge.transport.pin = True  # host tensors land in pinned memory
            if edge.device_channel:
                edge.transport.recv_stream = stream  # type: ignore[attr-defined]
                edge.transport.pool = self.pool  # type: ignore[attr-defined]
        for edge in self.out_edges:
            if edge.device_channel:
                edge.transport.send_stream = self.send_stream  # type: ignore[attr-defined]
        # (start, end, in-edge, mb_id, samples), or ("stop", in-edge), in compute order; None ends.
        self._done: queue.Queue[Any] = queue.Queue()
        self._enqueued = 0
        self._profile_dir = os.environ.get(PROFILE_ENV)
        self._profiler: Any = None

    # -- threads ---------------------------------------------------------------------------------

    def _receiver(self, index: int) -> None:
        edge = self.in_edges[index]
        try:
            while True:
                waited = time.monotonic()
                msg = edge.recv()
                if msg.kind == STOP:
                    self.inbox.put(_Inbound(index, None))
                    return
                if self.cuda and not edge.device_channel:
                    msg = self._to_device(msg, self.recv_streams[index])
                now = time.monotonic()
                # The request table is a host tensor: reading it costs no device sync.
                if self.measure:
                    self._received.add(now, now - waited, index, int(msg.tensors[REQUESTS_KEY][:, 1].sum()))
                self._count_inflight(+1)
                self.inbox.put(_Inbound(index, msg))
        except BaseException as exc:  # noqa: BLE001 - thread boundary: hand the failure to compute
            self.inbox.put(_Inbound(index, None, exc))

    def _sender(self) -> None:
        try:
            while True:
                msg = self.outbox.get()
                if msg is None:
                    for edge in self.out_edges:
                        edge.send(Message(STOP, 0, 0, {}))
                    return
                if self.cuda and msg.ready is not None:
                    # Send once computed (a blocking-sync event: the thread sleeps, no spinning):
                    # a header sent at enqueue time would start the peer's NCCL receive kernel a
                    # whole compute time early, spinning on its SMs (measured: -2% throughput).
                    msg.ready.synchronize()
                index = self.router.pick(msg.route_key)
                started = time.monotonic()
                if self.cuda and not self.out_edges[index].device_channel:
                    msg = self._to_host(msg)
                self.out_edges[index].send(msg)
                now = time.monotonic()
                self._sent.add(now, now - started)
                self._count_inflight(-1)
        except BaseException as exc:  # noqa: BLE001 - thread boundary
            self._fail(exc)

    def _acks(self, index: int) -> None:
        edge = self.out_edges[index]
        try:
            while True:
                ack = edge.recv_ack()
                if ack.kind == STOP_ACK:
                    return
                self.router.acked(index, ack.samples, ack.compute_us / 1e6)
        except BaseException as exc:  # noqa: BLE001 - thread boundary
            self._fail(exc)

    def _to_device(self, msg: Message, stream: Any) -> Message:
        """Receiver thread, gloo in-edge: pinned host tensors -> pool buffers, on `stream`."""
        tensors: dict[str, torch.Tensor] = {}
        buffers: list[torch.Tensor] = []
        # Not under inference_mode: pool buffers are reused by NCCL receives, which run outside it.
        with torch.cuda.stream(stream):
            for name, t in msg.tensors.items():
                if name in HOST_KEYS:
                    tensors[name] = t
                    continue
                buf = self.pool.take(t.shape, t.dtype, stream)
                buf.copy_(t, non_blocking=True)
                tensors[name] = buf
                buffers.append(buf)
            ready = torch.cuda.Event()
            ready.record(stream)
        return Message(msg.kind, msg.mb_id, msg.route_key, tensors, ready, buffers)

    def _to_host(self, msg: Message) -> Message:
        """Sender thread, gloo out-edge: device outputs -> pinned host memory, non-blocking copies
        on the send stream; only this thread waits for them."""
        stream = self.send_stream
        tensors: dict[str, torch.Tensor] = {}
        with torch.inference_mode(), torch.cuda.stream(stream):
            if msg.ready is not None:
                stream.wait_event(msg.ready)
            for name, t in msg.tensors.items():
                if t.device.type == "cpu":
                    tensors[name] = t
                    continue
                host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                host.copy_(t, non_blocking=True)
                t.record_stream(stream)
                tensors[name] = host
            copied = torch.cuda.Event()
            copied.record(stream)
        copied.synchronize()
        return Message(msg.kind, msg.mb_id, msg.route_key, tensors)

    def _completions(self) -> None:
        """CUDA: in compute order, wait for each micro-batch's end event, then count and ack it."""
        try:
            while True:
                item = self._done.get()
                if item is None:
                    return
                if item[0] == "stop":
                    self.in_edges[item[1]].send_ack(Ack(STOP_ACK, 0, 0, 0))
                    continue
                start, end, edge, mb_id, samples = item
                end.synchronize()
                elapsed = start.elapsed_time(end) / 1e3
                self._busy_s += elapsed
                self._computed.add(time.monotonic(), samples, elapsed)
                self._micro_batches += 1
                self._samples += samples
                self.in_edges[edge].send_ack(Ack(ACK, mb_id, samples, int(elapsed * 1e6)))
        except BaseException as exc:  # noqa: BLE001 - thread boundary
            self._fail(exc)

    def _count_inflight(self, delta: int) -> None:
        with self._inflight_lock:
            self._inflight += delta

    def _fail(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc
        # Unblock the compute thread so it can report and tear down.
        try:
            self.inbox.put_nowait(_Inbound(-1, None, exc))
        except queue.Full:
            pass

    # -- compute ---------------------------------------------------------------------------------

    def stats(self) -> StageStats:
        now = time.monotonic()
        wall = now - self._first_at if self._first_at is not None else 0.0
        window_s = self._computed.window_s
        covered = span(now, self._first_at, window_s)
        computed, (samples, compute_s) = self._computed.sums(now, 2)
        arrivals = self._received.snapshot(now)
        recv_s = sum(e[1] for e in arrivals)
        per_edge = [0.0] * len(self.in_edges)
        for e in arrivals:
            per_edge[int(e[2])] += e[3]
        sent, (send_s,) = self._sent.sums(now, 1)
        return StageStats(
            self.node, self._micro_batches, self._samples, self._busy_s, wall, self.inbox.qsize(),
            window_s=window_s, occupancy=min(1.0, rate(compute_s, covered)), inflight=max(0, self._inflight),
            recv_wait_s=mean(recv_s, len(arrivals)), compute_s=mean(compute_s, computed), send_s=mean(send_s, sent),
            samples_per_s=rate(samples, covered),
            inputs=[EdgeRate(str(e.peer), rate(n, covered)) for e, n in zip(self.in_edges, per_edge, strict=True)],
            graph_replays=self.graphs.replays if self.graphs is not None else 0)

    def run(self) -> StageStats:
        """Serve until STOP arrived on every in-edge; raises on any failure (edges stay open)."""
        self._start(threading.Thread(target=self._sender, name=f"{self.node}-send", daemon=True))
        for i in range(len(self.in_edges)):
            self._start(threading.Thread(target=self._receiver, args=(i,), name=f"{self.node}-recv{i}", daemon=True))
        for i in range(len(self.out_edges)):
            self._start(threading.Thread(target=self._acks, args=(i,), name=f"{self.node}-ack{i}", daemon=True))
        if self.cuda:
            self._start(threading.Thread(target=self._completions, name=f"{self.node}-done", daemon=True))
        stopped = 0
        next_stats = time.monotonic() + self.stats_interval_s
        with torch.inference_mode():
            while stopped < len(self.in_edges):
                try:
                    # Wake up when idle too, so reports show the window emptying, not a frozen busy one.
                    item = self.inbox.get(timeout=self.stats_interval_s)
                except queue.Empty:
                    if self.on_stats is not None:
                        self.on_stats(self.stats())
                        next_stats = time.monotonic() + self.stats_interval_s
                    continue
                if item.error is not None:
                    raise item.error
                if item.msg is None:
                    stopped += 1
                    if self.cuda:  # after the acks of everything computed before it
                        self._done.put(("stop", item.edge))
                    else:
                        self.in_edges[item.edge].send_ack(Ack(STOP_ACK, 0, 0, 0))
                    continue
                if self.cuda:
                    self._compute_cuda(item.edge, item.msg)
                else:
                    self._compute(item.edge, item.msg)
                if self.on_stats is not None and time.monotonic() >= next_stats:
                    self.on_stats(self.stats())
                    next_stats = time.monotonic() + self.stats_interval_s
        self.outbox.put(None)
        if self.cuda:
            self._done.put(None)
        for t in self._threads:
            t.join()
        if self._error is not None:
            raise self._error
        return self.stats()

    def _compute(self, edge: int, msg: Message) -> None:
        if self._first_at is None:
            self._first_at = time.monotonic()
        requests = msg.tensors.pop(REQUESTS_KEY)
        act = {k: v.to(self.device, non_blocking=True) for k, v in msg.tensors.items()}
        start = time.perf_counter()
        out = self.stage(act)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        elapsed = time.perf_counter() - start
        samples = int(requests[:, 1].sum())
        self._busy_s += elapsed
        self._computed.add(time.monotonic(), samples, elapsed)
        self._micro_batches += 1
        self._samples += samples
        tensors = {REQUESTS_KEY: requests, **{k: v.cpu() for k, v in out.items()}}
        self.outbox.put(Message(DATA, msg.mb_id, msg.route_key, tensors))
        # Ack after handing the result on, so the (blocking) ack never delays the send.
        self.in_edges[edge].send_ack(Ack(ACK, msg.mb_id, samples, int(elapsed * 1e6)))

    def _compute_cuda(self, edge: int, msg: Message) -> None:
        """Enqueue one micro-batch on the compute stream; never waits for the GPU."""
        if self._first_at is None:
            self._first_at = time.monotonic()
        if self._profile_dir:
            self._profile_step()
        requests = msg.tensors.pop(REQUESTS_KEY)
        act = msg.tensors
        stream = self.compute_stream
        with torch.cuda.stream(stream):
            if msg.ready is not None:
                stream.wait_event(msg.ready)
            for t in act.values():
                if t.is_cuda:
                    t.record_stream(stream)
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True, blocking=True)
            start.record(stream)
            out = self.graphs.run(act) if self.graphs is not None else self.stage(act)
            end.record(stream)
        # An eager output may be an input passed through: its buffer stays with it. Replayed outputs
        # are clones, so with a graph every input buffer goes back.
        aliased = {t.untyped_storage().data_ptr() for t in out.values() if t.is_cuda}
        for buf in msg.buffers:
            if buf.untyped_storage().data_ptr() not in aliased:
                self.pool.give(buf, end)
        samples = int(requests[:, 1].sum())  # host tensor: no device sync
        self.outbox.put(Message(DATA, msg.mb_id, msg.route_key, {REQUESTS_KEY: requests, **out}, ready=end))
        self._done.put((start, end, edge, msg.mb_id, samples))

    def _profile_step(self) -> None:
        """Diagnostics only (INFSCALED_PROFILE_DIR): start and stop a trace around a few micro-batches."""
        n = self._enqueued
        self._enqueued += 1
        if n == PROFILE_FROM:
            from torch.profiler import ProfilerActivity, profile

            # GPU activity only: recording every CPU op would slow the launching thread and
            # starve the GPU, so the trace would not show the steady state it is meant to show.
            self._profiler = profile(activities=[ProfilerActivity.CUDA])
            self._profiler.__enter__()
        elif n == PROFILE_FROM + PROFILE_COUNT and self._profiler is not None:
            torch.cuda.synchronize(self.device)
            self._profiler.__exit__(None, None, None)
            path = os.path.join(str(self._profile_dir), f"stage-{self.node}.json")
            self._profiler.export_chrome_trace(path)
            self._profiler = None
            log.warning("stage %s: profiler trace of micro-batches %d..%d written to %s", self.node,
                        PROFILE_FROM, PROFILE_FROM + PROFILE_COUNT - 1, path)

    def _start(self, t: threading.Thread) -> None:
        self._threads.append(t)
        t.start()

