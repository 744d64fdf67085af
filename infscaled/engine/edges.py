"""One node's live edges: each end's state, its queue and its threads (see engine/core.py).

An `EdgeEnd` is this node's end of one edge of the plan. Its life:

    CONNECTING ──connected──► OPEN ──close (out) / STOP (in)──► CLOSING ──► CLOSED
         │                      │
         └──────────────────────┴──error──► BROKEN

Only the engine's compute thread changes `state`; the edge's own threads (receiver, sender,
ack reader, connector) report to it through the engine's inbox.
"""

from __future__ import annotations

import enum
import queue
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from infscaled.protocol.plan import EdgePlan, Node

if TYPE_CHECKING:
    from infscaled.worker.transport import Edge, Message


class EdgeState(enum.Enum):
    CONNECTING = "connecting"
    OPEN = "open"
    CLOSING = "closing"  # out: STOP queued behind what was queued before; in: STOP received, ack pending
    CLOSED = "closed"
    BROKEN = "broken"


LIVE_STATES = (EdgeState.CONNECTING, EdgeState.OPEN)


class StopMarker:
    """Queued on an out-edge after its last message: the sender sends STOP and ends."""


STOP_MARK = StopMarker()


@dataclass(eq=False)
class EdgeEnd:
    plan: EdgePlan
    me: Node
    state: EdgeState = EdgeState.CONNECTING
    edge: Edge | None = None  # the transport end, once connected
    outbox: queue.Queue[Message | StopMarker] = field(default_factory=queue.Queue)  # out-edges only
    error: str = ""
    ack_lock: threading.Lock = field(default_factory=threading.Lock)  # in-edges: acks go out one at a time
    recv_stream: object = None  # CUDA stages: this in-edge's receive stream
    sent: int = 0  # out-edges: data messages sent (sender thread)
    acked: int = 0  # out-edges: data messages the peer acknowledged (ack reader thread)
    epoch: int = 0  # the topology epoch that joined it: a restarted dispatcher's edges are younger than it

    @property
    def key(self) -> str:
        return self.plan.key

    @property
    def outgoing(self) -> bool:
        return self.plan.src == self.me

    @property
    def peer(self) -> Node:
        return self.plan.dst if self.outgoing else self.plan.src

    @property
    def live(self) -> bool:
        return self.state in LIVE_STATES

    @property
    def device_channel(self) -> bool:
        return self.edge is not None and self.edge.device_channel

    def __repr__(self) -> str:
        return f"EdgeEnd({self.key}, {self.state.value})"
