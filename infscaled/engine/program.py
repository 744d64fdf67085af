"""What a node computes: the `Program` the engine (engine/core.py) drives.

Every hook runs on the engine's compute thread, except `acked` (an out-edge's ack reader
calls it; programs keep it thread-safe). The defaults give a stage replica's behaviour:
route with the engine's router, acknowledge STOP at once, end once no input is left, and
isolate a broken edge (the node keeps serving on the others; the supervisor and the
dispatcher deal with the dead peer).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from infscaled.engine.core import REQUESTS_KEY
from infscaled.engine.edges import EdgeEnd, EdgeState
from infscaled.routing.policies import NoRouteError
from infscaled.worker.router import Router

if TYPE_CHECKING:
    from infscaled.engine.core import Engine
    from infscaled.protocol.control import StageStats
    from infscaled.protocol.plan import Node
    from infscaled.worker.transport import Ack, Message

log = logging.getLogger(__name__)

# Tensors a CUDA stage keeps in host memory by default (engine/cuda.py): the request table, and
# attention masks (models decide "nothing is padded" on the host).
HOST_KEYS = frozenset({REQUESTS_KEY, "attention_mask"})


class Program:
    cuda_streams = False  # True: on a CUDA device the engine stages inputs and outputs on its streams
    pool_per_key = 8  # CUDA receive buffers kept per (shape, dtype)

    def __init__(self, router: Router | None = None) -> None:
        self.router = router
        self.engine: Engine

    def attach(self, engine: Engine) -> None:
        self.engine = engine

    def start(self) -> None:
        """The compute thread starts serving."""

    def finish(self) -> None:
        """The engine is done (or aborting): stop helper threads."""

    # -- data ------------------------------------------------------------------------------------

    def on_message(self, end: EdgeEnd, msg: Message) -> None:
        raise NotImplementedError

    def on_local(self, item: object) -> None:
        raise TypeError(f"{type(self).__name__} takes no local items, got {type(item).__name__}")

    def staged(self, end: EdgeEnd, name: str) -> bool:
        """CUDA stages (`cuda_streams`): whether tensor `name` of a message that arrives on `end`
        over a host transport is copied onto the device by the engine's receiver (engine/cuda.py);
        the others stay in host memory. Called on the receiver thread (keep it a pure function)."""
        return name not in HOST_KEYS

    def poll(self, now: float) -> float | None:
        """Do timed work; return the seconds until the next deadline, or None when idle."""
        return None

    def acked(self, end: EdgeEnd, ack: Ack) -> None:
        """An out-edge's peer computed one message (ack reader thread)."""
        if self.router is not None:
            self.router.acked(end.key, ack.samples, ack.compute_us / 1e6)

    # -- topology --------------------------------------------------------------------------------

    def on_output_added(self, end: EdgeEnd) -> None:
        """A new out-edge is connecting (what is sent to it waits until it is open)."""

    def on_output_open(self, end: EdgeEnd) -> None:
        if self.router is not None:
            self.router.add(end.key)

    def on_output_removed(self, end: EdgeEnd) -> None:
        """The plan removed this out-edge: route nothing new to it, drain it, close it."""
        if self.router is not None:
            self.router.remove(end.key)
        self.engine.close_output(end)

    def on_output_closed(self, end: EdgeEnd) -> None:
        if self.router is not None:
            self.router.remove(end.key)

    def on_input_stopped(self, end: EdgeEnd) -> None:
        """An in-edge's sender is done with it: acknowledge (after everything before it), and
        once no input is left, send nothing more."""
        self.engine.ack_stop(end)
        if self.inputs_done():
            self.engine.close_outputs()

    def inputs_done(self) -> bool:
        ins = self.engine.inputs()
        return bool(ins) and all(e.state in (EdgeState.CLOSED, EdgeState.BROKEN) for e in ins)

    def on_broken(self, end: EdgeEnd, error: BaseException) -> None:
        """An edge failed (peer gone, malformed message): that edge only. Nothing more is routed
        to it; what was queued on it is lost here (the dispatcher replays it). The node ends as
        usual once its inputs are done (broken ones count as done)."""
        if self.router is not None and end.outgoing:
            self.router.remove(end.key)
        if self.engine.on_edge_failed is not None:
            self.engine.on_edge_failed(end, f"{type(error).__name__}: {error}")
        log.warning("%s: edge %s broke (%s: %s); serving on without it", self.engine.node, end.key,
                    type(error).__name__, error)

    def on_nodes_dead(self, nodes: frozenset[Node]) -> None:
        """The supervisor declared `nodes` dead (their edges here are broken already)."""

    def on_complete(self, complete: bool) -> None:
        """Every stage has a live replica again (True) or one has none (False): the dispatcher's
        business (hold or replay); stages ignore it."""

    # -- stats -----------------------------------------------------------------------------------

    def stats(self, base: StageStats) -> StageStats:
        """The engine's counters plus this program's own (KV use, graph replays, ...)."""
        return base

    def pick(self, route_key: int) -> EdgeEnd:
        """The out-edge for the next message by the routing policy (NoRouteError: none is open)."""
        assert self.router is not None
        return self.engine.ends[self.router.pick(route_key)]

    def forward(self, msg: Message) -> bool:
        """Send `msg` on the routed out-edge. With none open, an out-edge still connecting takes it
        (queued until it opens: a new replica may compute before its own out-edges joined); with
        none at all (every downstream replica died), drop it and say so: the dispatcher replays
        what it journaled once a replacement is up."""
        try:
            end = self.pick(msg.route_key)
        except NoRouteError:
            joining = [e for e in self.engine.outputs() if e.state is EdgeState.CONNECTING]
            if joining:
                self.engine.send(joining[msg.mb_id % len(joining)], msg)
                return True
            self.engine.dropped += 1
            log.warning("%s: no live out-edge; message %d dropped (the dispatcher replays it)",
                        self.engine.node, msg.mb_id)
            return False
        self.engine.send(end, msg)
        return True
