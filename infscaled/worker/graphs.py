"""CUDA graphs for a stage's forward: capture a micro-batch shape once, then replay it.

A CUDA stage launches hundreds of kernels per micro-batch from Python; replaying a captured
graph launches them all at once, so the GPU no longer waits for a launching thread that shares
the GIL with the stage's receiver, sender and completion threads (BENCHMARKS.md section 4).

Contract (`StageGraphs.run`, called by the compute thread inside
`torch.cuda.stream(compute_stream)` and `torch.inference_mode()`):
- Key (`graph_key`): a micro-batch may replay a graph captured for the same key. The key is
  (name, shape, dtype) of every device tensor, plus the host `attention_mask` when it is all
  ones. Host tensors are read by Python at capture time only (units decide "nothing is padded"
  on the host: models/families/common.py `device_mask`, `last_positions`), so a graph
  is valid only for the host values it was captured with: all ones, recorded in the key. Any
  other host tensor (a padded mask, anything else) gives no key: the micro-batch runs eagerly.
  The request table never reaches the stage (the loop pops it first) and is ignored here.
- Eager fallbacks, each for good: no key; a key seen fewer than `warmup` times (the first
  capture must follow an eager run of the same shapes: cuBLAS, cuDNN and attention kernels
  initialise lazily, doing things a capture forbids); a new key once `max_graphs` captures
  were tried (failed ones included); a key whose capture raised (one warning, then eager:
  graphs are an optimisation and never fail the stage themselves); a key whose
  stage returned a host tensor other than a host input passed through (it was computed on
  the host, which a replay would not redo).
- Capture: static inputs (the key's shapes) are filled on the compute stream; the capture
  stream waits for the compute stream, the stage runs once under `torch.cuda.graph(...,
  capture_error_mode="thread_local")`, then the compute stream waits for the capture stream.
  thread_local because the stage's other threads keep running during a capture (NCCL
  receives on their streams, the completion thread synchronising events, pinned copies): in
  the default "global" mode their CUDA calls would invalidate it. `torch.cuda.graph` syncs
  the device once on entry (capture time only, once per key). All graphs of a stage share one
  memory pool: replays never overlap (they all run on the compute stream), so only
  intermediates, dead at the end of each graph, share memory. Capture records but does not
  run: the capturing micro-batch is then computed by a replay like every later one.
- Replay (on the compute stream): copy the inputs into the static inputs, `replay()`, and
  return CLONES of the static outputs. The sender sends a micro-batch's outputs later, on the
  send stream, while the next replay overwrites the static outputs; clones are allocated on
  the compute stream, so the stage loop's record_stream / buffer-pool rules apply to them as
  to eager outputs (and no output aliases an input buffer). Host outputs passed through (the
  mask) come from the current micro-batch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from infscaled.engine.core import REQUESTS_KEY

log = logging.getLogger(__name__)

Activation = dict[str, torch.Tensor]
GraphKey = tuple[tuple[Any, ...], ...]

# The one host tensor a graph tolerates, and only when it masks nothing.
MASK_KEY = "attention_mask"
WARMUP = 2
MAX_GRAPHS = 4
# Keys counted towards their warm-up at most; the oldest is forgotten first (shapes that never
# repeat must not grow the table).
MAX_COUNTED = 64


def graph_key(act: Mapping[str, torch.Tensor], device_type: str = "cuda") -> GraphKey | None:
    """The key under which `act`'s stage forward can be replayed, or None: run it eagerly.

    Tensors on `device_type` are device tensors (tests pass "meta"); every other tensor is a host
    tensor. Reading a host mask costs no device sync."""
    key: list[tuple[Any, ...]] = []
    on_device = False
    for name, t in act.items():
        if name == REQUESTS_KEY:
            continue
        if t.device.type == device_type:
            key.append((name, tuple(t.shape), t.dtype))
            on_device = True
        elif name == MASK_KEY and bool(t.all()):
            key.append((name, tuple(t.shape), t.dtype, "all ones"))
        else:
            return None
    return tuple(key) if on_device else None


@dataclass
class _Graph:
    """One captured forward: static inputs by name, and per output either its static tensor or
    the name of the host input it passes through."""

    graph: Any  # torch.cuda.CUDAGraph
    inputs: dict[str, torch.Tensor]
    outputs: list[tuple[str, torch.Tensor | None, str | None]]

    def replay(self, act: Mapping[str, torch.Tensor]) -> Activation:
        for name, static in self.inputs.items():
            static.copy_(act[name], non_blocking=True)  # device to device, on the compute stream
        self.graph.replay()
        return {name: static.clone() if static is not None else act[str(passed)]
                for name, static, passed in self.outputs}


class StageGraphs:
    """Eager runs, captures and replays of one CUDA stage's forward (see the module docstring)."""

    def __init__(self, node: str, stage: Callable[[Activation], Activation], compute_stream: Any,
                 warmup: int = WARMUP, max_graphs: int = MAX_GRAPHS, device_type: str = "cuda") -> None:
        self.node = node
        self.device_type = device_type  # see graph_key
        self.stage = stage
        self.compute_stream = compute_stream
        self.warmup = warmup
        self.max_graphs = max_graphs
        self.replays = 0  # micro-batches computed by replaying a graph (StageStats.graph_replays)
        self._graphs: dict[GraphKey, _Graph] = {}
        self._counted: dict[GraphKey, int] = {}  # eager runs of keys not captured yet
        self._eager: set[GraphKey] = set()  # keys whose capture failed
        self._full_logged = False
        self._capture_stream: Any = None  # created with the first capture, like the pool
        self._pool: Any = None

    @property
    def captured(self) -> int:
        return len(self._graphs)

    def run(self, act: Activation) -> Activation:
        key = graph_key(act, self.device_type)
        if key is None or key in self._eager:
            return self.stage(act)
        graph = self._graphs.get(key)
        if graph is None:
            graph = self._maybe_capture(key, act)
            if graph is None:
                return self.stage(act)
        self.replays += 1
        return graph.replay(act)

    def _maybe_capture(self, key: GraphKey, act: Activation) -> _Graph | None:
        """The new graph for `key` once it has run `warmup` times eagerly; None: run it eagerly."""
        # Failed captures count too: a model that cannot be captured costs at most max_graphs tries.
        if len(self._graphs) + len(self._eager) >= self.max_graphs:
            if not self._full_logged:
                self._full_logged = True
                log.info("stage %s: %d CUDA graph captures tried (the limit); new shapes run eagerly",
                         self.node, self.max_graphs)
            return None
        seen = self._counted.pop(key, 0)
        if seen < self.warmup:
            if len(self._counted) >= MAX_COUNTED:
                del self._counted[next(iter(self._counted))]
            self._counted[key] = seen + 1
            return None
        try:
            graph = self._capture(act)
        except Exception as exc:  # noqa: BLE001 - graphs are an optimisation: fall back, never fail the stage
            self._eager.add(key)
            log.warning("stage %s: CUDA graph capture failed for %s; this shape runs eagerly from now on: "
                        "%s: %s", self.node, _describe(key), type(exc).__name__, exc)
            return None
        self._graphs[key] = graph
        log.info("stage %s: captured CUDA graph %d of at most %d for %s", self.node, len(self._graphs),
                 self.max_graphs, _describe(key))
        return graph

    def _capture(self, act: Activation) -> _Graph:
        """Capture the stage forward for `act`'s shapes (compute thread, compute stream current)."""
        compute = self.compute_stream
        if self._capture_stream is None:
            self._capture_stream = torch.cuda.Stream(compute.device)
            self._pool = torch.cuda.graph_pool_handle()
        static = {name: torch.empty(t.shape, dtype=t.dtype, device=t.device)
                  for name, t in act.items() if t.is_cuda}
        for name, s in static.items():
            s.copy_(act[name], non_blocking=True)
        host = {name: t for name, t in act.items() if not t.is_cuda}
        graph, out = capture(lambda: self.stage({name: static.get(name, t) for name, t in act.items()}),
                             compute, self._capture_stream, self._pool)
        return _Graph(graph, static, static_outputs(out, host, "cuda"))


def capture(forward: Callable[[], Activation], compute: Any, capture_stream: Any, pool: Any) -> tuple[Any, Activation]:
    """Capture `forward()` as a CUDA graph on `capture_stream`, ordered after and before the work
    of `compute` (the stream the graph will be replayed on); returns (graph, its static outputs).
    thread_local: the process's other threads keep using CUDA meanwhile. Raises what capture raises."""
    graph = torch.cuda.CUDAGraph()
    capture_stream.wait_stream(compute)
    # The outer context restores the compute stream even if ending the capture raises
    # (torch.cuda.graph's own __exit__ then skips restoring it).
    with torch.cuda.stream(compute):
        try:
            with torch.cuda.graph(graph, pool=pool, stream=capture_stream, capture_error_mode="thread_local"):
                out = forward()
        finally:
            compute.wait_stream(capture_stream)
    return graph, out


def static_outputs(out: Mapping[str, torch.Tensor], host: Mapping[str, torch.Tensor],
                   device_type: str) -> list[tuple[str, torch.Tensor | None, str | None]]:
    """A captured forward's outputs: (name, static device tensor, None) or (name, None, the host
    input it passes through). Raises ValueError for a host output computed on the host: a replay
    would not recompute it."""
    outputs: list[tuple[str, torch.Tensor | None, str | None]] = []
    for name, t in out.items():
        if t.device.type == device_type:
            outputs.append((name, t, None))
            continue
        passed = next((n for n, h in host.items() if h is t), None)
        if passed is None:
            raise ValueError(f"output {name!r} is a host tensor computed on the host; a replay would not "
                             f"recompute it")
        outputs.append((name, None, passed))
    return outputs


def _describe(key: GraphKey) -> str:
    return ", ".join(f"{k[0]} {list(k[1])}" + (" (all ones)" if len(k) > 3 else "") for k in key)
