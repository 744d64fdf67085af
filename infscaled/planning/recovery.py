"""Replacing dead replicas as pure functions: the epoch after a loss (see protocol/topology.py).

`replacement_shape` says which nodes go and which come, in the same form as a scaling request
(planning/scale.py), so `apply_scale` builds the next plan and each running node's update;
`with_failure` then adds what every running node must hear about the loss (`dead`, and for the
dispatcher whether the pipeline is `complete`).

- Forward jobs: each dead replica gets one replacement (a fresh id in its stage) that takes
  over exactly its edges, with any dead neighbour replaced by that neighbour's replacement.
  Inheriting edges works for every graph ("mesh", "parallel", "explicit"), and the survivors'
  routing tables simply gain the new edges.
- The dispatcher: it comes back under its own name on the same host, and every edge it had is
  joined again on a fresh port (`dispatcher_restart`); what was in flight through it is lost
  with it (its callers retry forward requests; streams end with an error; a generation chain
  frees the dead dispatcher's sequences and joins the new one).
- Generation jobs: a chain that lost a member is dead as a whole (its survivors hold KV caches
  of sequences the dispatcher moves to other chains), so each such chain is removed and a fresh
  chain (new ids on every stage) is added, as scaling the chains up would.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from infscaled.planning.scale import ScaleChange, ScaleShape, chain_edges
from infscaled.protocol.plan import DISPATCHER, EdgePlan, JobPlan, Node, Recovery
from infscaled.protocol.topology import TopologyUpdate


def replacement_shape(plan: JobPlan, dead: Iterable[Node]) -> ScaleShape:
    """Which nodes leave and which take their place (no ports yet). Unknown nodes are ignored."""
    known = {w.node for w in plan.workers}
    lost = sorted({n for n in dead if n in known}, key=lambda n: (n.stage, n.replica))
    if not lost:
        return ScaleShape(None, (), (), ())
    if plan.generation is not None:
        return _chains(plan, lost)
    fresh: dict[int, int] = {}
    new: dict[Node, Node] = {}
    for n in lost:
        rid = fresh.get(n.stage, plan.fresh_replica(n.stage))
        fresh[n.stage] = rid + 1
        new[n] = Node(n.stage, rid)
    edges: list[tuple[Node, Node]] = []
    for e in plan.edges:
        if e.src in new or e.dst in new:
            edges.append((new.get(e.src, e.src), new.get(e.dst, e.dst)))
    return ScaleShape(lost[0].stage if len(fresh) == 1 else None, tuple(new.values()), tuple(lost), tuple(edges))


def _chains(plan: JobPlan, lost: list[Node]) -> ScaleShape:
    ids = sorted({n.replica for n in lost})
    stages = len(plan.stages)
    removed = tuple(Node(s, r) for r in ids for s in range(stages) if any(w.node == Node(s, r) for w in plan.workers))
    first = max(plan.fresh_replica(s) for s in range(stages))
    added, edges = chain_edges(first, len(ids), plan.last_stage)
    return ScaleShape(None, added, removed, edges)


def complete(plan: JobPlan, serving: Iterable[Node]) -> bool:
    """Whether the nodes in `serving` make a whole pipeline: a replica in every stage (a
    generation job: one whole chain)."""
    up = set(serving)
    if plan.generation is not None:
        return any(all(Node(s, r) in up for s in range(len(plan.stages))) for r in {n.replica for n in up})
    return all(any(n.stage == s.index for n in up) for s in plan.stages)


def with_failure(change: ScaleChange, old: JobPlan, dead: Iterable[Node], is_complete: bool
                 ) -> dict[Node, TopologyUpdate]:
    """Every running node's update for the epoch that replaces `dead`: the plan's own changes,
    plus the names of the dead (to all) and whether the pipeline is whole (to the dispatcher)."""
    dead_t = tuple(sorted(set(dead), key=lambda n: (n.stage, n.replica)))
    gone = set(change.removed)
    running = [w.node for w in old.workers if w.node not in gone] + [DISPATCHER]
    updates: dict[Node, TopologyUpdate] = {}
    for node in running:
        base = change.updates.get(node, TopologyUpdate(change.plan.epoch))
        updates[node] = replace(base, dead=dead_t, complete=is_complete if node == DISPATCHER else None)
    return updates


def restored(plan: JobPlan) -> tuple[JobPlan, TopologyUpdate]:
    """The epoch that tells the dispatcher the pipeline is whole again (replacements joined)."""
    nxt = replace(plan, epoch=plan.epoch + 1)
    return nxt, TopologyUpdate(nxt.epoch, complete=True)


def devices_for(plan: JobPlan, shape: ScaleShape) -> Mapping[Node, str]:
    """Each newcomer runs where a removed node of its stage ran (that device is free now), in
    order; with none left, where the stage's first replica runs."""
    free: dict[int, list[str]] = {}
    for n in shape.removed:
        free.setdefault(n.stage, []).append(plan.worker(n).device)
    out: dict[Node, str] = {}
    for n in shape.added:
        pool = free.get(n.stage)
        out[n] = pool.pop(0) if pool else plan.worker(plan.nodes(n.stage)[0]).device
    return out


def dispatcher_restart(plan: JobPlan, ports: Sequence[int]) -> tuple[JobPlan, dict[Node, TopologyUpdate]]:
    """The epoch that replaces a lost dispatcher: each of its edges gets the next port of `ports`
    (in plan order), and each stage replica at the other end joins it again."""
    mine = [e for e in plan.edges if DISPATCHER in (e.src, e.dst)]
    if len(ports) != len(mine):
        raise ValueError(f"the dispatcher has {len(mine)} edges, got {len(ports)} ports")
    fresh = dict(zip((e.key for e in mine), ports, strict=True))
    edges = tuple(replace(e, port=fresh[e.key]) if e.key in fresh else e for e in plan.edges)
    nxt = replace(plan, edges=edges, epoch=plan.epoch + 1)
    adds: dict[Node, list[EdgePlan]] = {}
    for e in nxt.edges:
        if e.key in fresh:
            peer = e.dst if e.src == DISPATCHER else e.src
            adds.setdefault(peer, []).append(e)
    updates = {w.node: TopologyUpdate(nxt.epoch, tuple(adds.get(w.node, ())), dead=(DISPATCHER,)) for w in plan.workers}
    return nxt, updates


def backoff(policy: Recovery, tries: int) -> float:
    """Seconds to wait before replacement attempt `tries` (1-based) of one line: none before the
    first, then `backoff_s`, doubling."""
    return 0.0 if tries <= 1 else policy.backoff_s * 2 ** (tries - 2)


@dataclass
class Ledger:
    """Replacement attempts per replica line, shared by `infscaled run` (runner/recovery.py) and
    the controller (controller/recovery.py); keys are node names.

    `attempts` counts the replacements of a line *in a row that did not come to serve*: a
    replacement inherits its predecessor's count plus one; a replica that said READY starts its
    line afresh (`served`), so a job that loses a healthy replica now and then keeps recovering,
    while one whose replacements keep dying before they serve gives up after `[recovery] attempts`.
    A replica that dies right after READY is bounded elsewhere: what it crashed on is replayed only
    until the request's own timeout. `losses` counts every loss of a line and never resets (the
    proxy tells one dispatcher death from the next by it, and says why with `last`)."""

    attempts: dict[str, int] = field(default_factory=dict)
    reasons: dict[str, list[str]] = field(default_factory=dict)  # the losses of the current run
    losses: dict[str, int] = field(default_factory=dict)
    last: dict[str, str] = field(default_factory=dict)  # the latest loss of each line (never reset)

    def next_try(self, dead: Sequence[str], why: Sequence[str]) -> tuple[int, list[str]]:
        """The attempt number for replacing `dead` together, and every reason on their lines so far."""
        tries = max(self.attempts.get(n, 0) for n in dead) + 1
        return tries, [r for n in dead for r in self.reasons.get(n, [])] + list(why)

    def started(self, nodes: Iterable[str], tries: int, history: Sequence[str], lost: Iterable[str] = ()) -> None:
        """`nodes` replace the `lost` ones as attempt `tries` of their line(s)."""
        total = max((self.losses.get(n, 0) for n in lost), default=0) + 1
        for n in nodes:
            self.attempts[n], self.reasons[n] = tries, list(history)
            self.losses[n] = total
            if history:
                self.last[n] = history[-1]

    def served(self, node: str) -> None:
        """`node` said READY: its line's failed attempts are behind it."""
        self.attempts.pop(node, None)
        self.reasons.pop(node, None)
