"""The data-plane CUDA streams of one stage (engine/core.py: Program.cuda_streams).

Stream contract (every stream owned by the stage, on its device; the default stream carries no
data-plane work):
- receive (receiver thread of in-edge i, on `recv{i}`): an NCCL in-edge receives device
  tensors into `pool` buffers (a reused buffer is first ordered after its previous reader's
  event); a gloo in-edge lands in pinned host memory and the tensors the program stages
  (`Program.staged`) are copied into pool buffers with non-blocking copies. Either way an event
  `ready` recorded on `recv{i}` after the data travels with the message (a message with nothing
  staged travels as it came). Host-side tensors (by default program.HOST_KEYS: the request table,
  attention masks; a generation stage keeps everything but its activations there) stay in host
  memory: they ride the header channel, and models decide "nothing is padded" on the host.
- compute (the program): waits for `ready` on its stream, hands input buffers back to the pool
  with an event recorded after its last read, and sends device outputs with `ready` = an event
  recorded after they were written. A forward stage computes on `compute` between a `start` and
  an `end` event (engine/programs/forward.py); a generation stage on the compute thread's
  current stream, where its warm-up captured its CUDA graphs (engine/programs/generation.py).
- send (sender thread of each out-edge): first waits on the host for `ready` (a blocking-sync
  event: the thread sleeps) so that the header, and with it the peer's NCCL receive kernel, goes
  out only when the data exists; an NCCL out-edge then sends device to device on `send`, a gloo
  out-edge (the dispatcher) gets the outputs copied into pinned host memory on `send`.
- every device tensor used on a stream other than the one that allocated it is
  `record_stream`-ed there, so the caching allocator never hands it out early.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from infscaled.engine.edges import EdgeEnd
from infscaled.worker.nccl import BufferPool
from infscaled.worker.transport import Message


class CudaStreams:
    def __init__(self, device: str, pool_per_key: int = 8) -> None:
        dev = torch.device(device)
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        self.device = dev
        self.compute = torch.cuda.Stream(dev)
        self.send = torch.cuda.Stream(dev)
        self.pool = BufferPool(dev, per_key=pool_per_key)

    def adopt(self, end: EdgeEnd) -> None:
        """Give a newly connected edge its streams (and, NCCL in-edges, the receive pool)."""
        assert end.edge is not None
        transport: Any = end.edge.transport
        if end.outgoing:
            if end.edge.device_channel:
                transport.send_stream = self.send
            return
        end.recv_stream = torch.cuda.Stream(self.device)
        transport.pin = True  # host tensors land in pinned memory
        if end.edge.device_channel:
            transport.recv_stream = end.recv_stream
            transport.pool = self.pool

    def to_device(self, msg: Message, end: EdgeEnd, staged: Callable[[EdgeEnd, str], bool]) -> Message:
        """Receiver thread, gloo in-edge: the pinned host tensors `staged` picks -> pool buffers on
        the edge's stream."""
        picked = {name for name in msg.tensors if staged(end, name)}
        if not picked:
            return msg
        stream: Any = end.recv_stream
        tensors: dict[str, torch.Tensor] = {}
        buffers: list[torch.Tensor] = []
        # Not under inference_mode: pool buffers are reused by NCCL receives, which run outside it.
        with torch.cuda.stream(stream):
            for name, t in msg.tensors.items():
                if name not in picked:
                    tensors[name] = t
                    continue
                buf = self.pool.take(t.shape, t.dtype, stream)
                buf.copy_(t, non_blocking=True)
                tensors[name] = buf
                buffers.append(buf)
            ready = torch.cuda.Event()
            ready.record(stream)
        return Message(msg.kind, msg.mb_id, msg.route_key, tensors, ready, buffers)

    def before_send(self, msg: Message, end: EdgeEnd) -> Message:
        """Sender thread: wait until computed; for a gloo out-edge, copy to pinned host memory."""
        if msg.ready is not None:
            # A header sent at enqueue time would start the peer's NCCL receive kernel a whole
            # compute time early, spinning on its SMs (measured: -2% throughput).
            msg.ready.synchronize()
        if end.device_channel or not any(t.device.type == "cuda" for t in msg.tensors.values()):
            return msg
        stream = self.send
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
