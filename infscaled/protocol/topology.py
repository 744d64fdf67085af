"""Live topology: a job's edges change while it serves, one epoch at a time (no torch).

Contract of an epoch (JobPlan.epoch):
- The plan of epoch e lists exactly the edges that exist once every node has applied e. A node
  learns a change as a TopologyUpdate (its added and removed edges only), over its control pipe.
- Added edges: both ends connect in the background (the sender hosts the edge's store on the
  edge's port); a sender routes to an added edge only once it is connected, and what is queued
  for it before that waits. A new node says READY only after all its own edges connected.
- Removed edges: only the sending end acts. It stops routing new work to the edge at once,
  sends everything already queued for it, then STOP; the receiver acknowledges STOP after
  everything before it was computed, and both ends close the edge. So a removed edge is drained,
  never cut: nothing in flight on it is lost.
- A stage replica whose in-edges are all gone (every one delivered STOP, none is connecting)
  finishes what it holds, sends STOP on its out-edges and exits 0: removing a replica means
  removing the edges into it, and the rest follows. A generation chain is drained first: the
  dispatcher admits nothing new to it and removes its edge only when its sequences finished.
- A message from an older epoch cannot arrive late: each edge is its own process group, and an
  edge is closed only after its STOP handshake, which follows its last message.
- Epochs only grow; a node ignores an update whose epoch is not newer than its own.

Failures (issue 12): a node declared dead (its process exited, or it stopped answering its
supervisor's heartbeat check and was killed) is named in `dead` of the next epoch, sent to every
running node. Its edges are already broken or about to break; a node still holding a live end to
it treats that end as broken at once (so nothing more is routed there, whatever the socket says).
The dispatcher replays what may have crossed a dead node (dispatch/core.py). `complete` tells the
dispatcher whether every stage (a generation job: at least one whole chain) has a live replica
again: while it is False the dispatcher holds new and replayed work instead of sending it into
a gap. The replacement of a dead node is an ordinary added node with a fresh replica id.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from infscaled.protocol.plan import EdgePlan, Node


@dataclass(frozen=True)
class TopologyUpdate:
    """The changes of one epoch that concern one node."""

    epoch: int
    add: tuple[EdgePlan, ...] = field(default=())
    remove: tuple[str, ...] = field(default=())  # edge keys ("0.1->1.2"); only the sender acts on them
    dead: tuple[Node, ...] = field(default=())  # nodes declared dead at this epoch
    complete: bool | None = None  # None: unchanged; see the module docstring

    def is_empty(self) -> bool:
        return not self.add and not self.remove and not self.dead and self.complete is None
